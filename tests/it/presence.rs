//! Presence: watcher counts summed over every instance on one database, sent only to the
//! clients that asked, within 2 s of a change in membership; a killed instance's watchers leave
//! the count at the next heartbeat (a restart never counts its clients twice), a frozen one's
//! within the stated expiry.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::process::{free_port, rowcast, send_signal, wait_until_serving};
use crate::support::{WsClient, spawn_app_with, spawn_instance, wait_until};

/// Issue 16: "within 2 s of a change in membership".
const WITHIN: Duration = Duration::from_secs(2);

/// Short, so the test does not wait the default 5 s; the bound it checks is the same formula.
const EXPIRY: &str = "2s";

/// Subscribes to `ids` asking for watcher counts; waits for the ack.
async fn watch(client: &mut WsClient, ids: &[i64]) {
    client
        .send_json(&json!({"command": "subscribe", "productIDs": ids, "presence": true}))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
}

/// Reads until the latest count `client` was told for each product of `expected` is the one
/// expected; fails after `limit`. Every message on the way must be a presence message (nothing
/// else is written in these tests).
async fn expect_counts(client: &mut WsClient, expected: &[(i64, u64)], limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut latest = std::collections::HashMap::new();
    loop {
        if expected
            .iter()
            .all(|(product, n)| latest.get(product) == Some(n))
        {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(message) = client.try_next_json(left).await else {
            panic!("not told {expected:?} within {limit:?}; latest {latest:?}");
        };
        assert_eq!(message["type"], "presence", "{message}");
        assert_eq!(
            message.as_object().unwrap().len(),
            3,
            "counts only: {message}"
        );
        latest.insert(
            message["productId"].as_i64().unwrap(),
            message["watchers"].as_u64().unwrap(),
        );
    }
}

/// [`expect_counts`] for one product.
async fn expect_watchers(client: &mut WsClient, product: i64, watchers: u64, limit: Duration) {
    expect_counts(client, &[(product, watchers)], limit).await;
}

#[tokio::test]
async fn watcher_counts_add_up_over_two_instances_and_follow_membership_within_two_seconds() {
    let flags = ["--presence-expiry", EXPIRY];
    let first = spawn_app_with(&flags).await;
    let second = spawn_instance(&first.database_url, &flags).await;

    let mut a = WsClient::connect(&first.ws_url).await;
    watch(&mut a, &[1, 2]).await;
    expect_watchers(&mut a, 1, 1, WITHIN).await;

    let mut b = WsClient::connect(&second.ws_url).await;
    watch(&mut b, &[1]).await;
    for client in [&mut a, &mut b] {
        expect_watchers(client, 1, 2, WITHIN).await;
    }

    // A socket that did not ask counts as a watcher but is told nothing.
    let mut quiet = WsClient::connect(&second.ws_url).await;
    quiet.subscribe(&[1, 2]).await;
    expect_counts(&mut a, &[(1, 3), (2, 2)], WITHIN).await;
    expect_watchers(&mut b, 1, 3, WITHIN).await;

    // Leaving: by unsubscribing, and by closing the socket.
    quiet.unsubscribe(&[1]).await;
    for client in [&mut a, &mut b] {
        expect_watchers(client, 1, 2, WITHIN).await;
    }
    b.close().await;
    expect_watchers(&mut a, 1, 1, WITHIN).await;
    // Presence off costs no messages: the quiet socket got none of the above.
    quiet.expect_silence(Duration::from_millis(500)).await;
}

/// A second rowcast process on `database_url` with `flags`, serving on the port returned.
async fn spawn_process(database_url: &str, flags: &[&str]) -> (tokio::process::Child, u16) {
    let port = free_port();
    let mut child = rowcast(port)
        .env("DATABASE_URL", database_url)
        .args(flags)
        .spawn()
        .unwrap();
    wait_until_serving(
        &mut child,
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/healthz"),
    )
    .await;
    (child, port)
}

/// Two clients on `port` subscribed to product `product` (without presence).
async fn two_watchers_on(port: u16, product: i64) -> Vec<WsClient> {
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = WsClient::connect(&format!("ws://127.0.0.1:{port}/websocket")).await;
        client.subscribe(&[product]).await;
        clients.push(client);
    }
    clients
}

/// Product 7 watched on two instances: the in-process `survivor`, whose `watcher` asks for
/// counts, and a `child` process with two more sockets (`others`); the watcher was told 3.
struct Watched {
    survivor: crate::support::TestApp,
    child: tokio::process::Child,
    watcher: WsClient,
    others: Vec<WsClient>,
}

async fn watched_on_two_instances(flags: &[&str]) -> Watched {
    let survivor = spawn_app_with(flags).await;
    let (child, port) = spawn_process(&survivor.database_url, flags).await;
    let mut watcher = WsClient::connect(&survivor.ws_url).await;
    watch(&mut watcher, &[7]).await;
    expect_watchers(&mut watcher, 7, 1, WITHIN).await;
    let others = two_watchers_on(port, 7).await;
    expect_watchers(&mut watcher, 7, 3, WITHIN).await;
    Watched {
        survivor,
        child,
        watcher,
        others,
    }
}

async fn live_instances(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM presence_instances")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_killed_and_restarted_instances_clients_are_not_counted_twice() {
    // A long expiry (heartbeats every 4 s): only the dead instance's released liveness lock can
    // take its watchers out of the count this soon.
    let flags = ["--presence-expiry", "20s"];
    let Watched {
        survivor,
        mut child,
        mut watcher,
        others: doomed,
    } = watched_on_two_instances(&flags).await;

    // No goodbye; a supervisor starts it again and its clients reconnect there.
    send_signal(&child, Signal::SIGKILL);
    child.wait().await.unwrap();
    drop(doomed);
    let (mut restarted, port) = spawn_process(&survivor.database_url, &flags).await;
    let _back = two_watchers_on(port, 7).await;

    // Told 3 again (or never told otherwise), and never the 5 of counting the dead instance's
    // two sockets beside their reconnections.
    let deadline = Instant::now() + Duration::from_secs(6);
    let mut told = Vec::new();
    while let Some(message) = watcher
        .try_next_json(deadline.saturating_duration_since(Instant::now()))
        .await
    {
        assert_eq!(message["type"], "presence", "{message}");
        told.push(message["watchers"].as_u64().unwrap());
    }
    assert!(told.iter().all(|&n| n <= 3), "counts told: {told:?}");
    assert!(told.last().is_none_or(|&n| n == 3), "counts told: {told:?}");
    assert_eq!(
        live_instances(&survivor.pool).await,
        2,
        "the dead instance's row is gone well before its 20 s expiry"
    );
    let sum: i64 = sqlx::query_scalar(
        "SELECT sum(watchers)::bigint FROM presence_counts WHERE product_id = 7",
    )
    .fetch_one(&survivor.pool)
    .await
    .unwrap();
    assert_eq!(sum, 3);
    send_signal(&restarted, Signal::SIGTERM);
    restarted.wait().await.unwrap();
}

#[tokio::test]
async fn a_frozen_instances_watchers_leave_the_count_within_the_expiry() {
    let Watched {
        survivor,
        mut child,
        mut watcher,
        others: frozen,
    } = watched_on_two_instances(&["--presence-expiry", EXPIRY]).await;

    // Stopped, its sessions stay open and hold its liveness lock: only the expiry tells.
    send_signal(&child, Signal::SIGSTOP);
    let stopped = Instant::now();
    // The expiry, a tick, the one-second message gap, and slack for a loaded machine.
    let bound = Duration::from_secs(2) + Duration::from_millis(250) + Duration::from_secs(1);
    expect_watchers(&mut watcher, 7, 1, bound + Duration::from_secs(1)).await;
    let took = stopped.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "expired too early: {took:?}"
    );
    // The next heartbeat of the survivor (five per expiry) deletes the frozen instance's rows.
    wait_until(
        Duration::from_secs(2),
        "the frozen instance's rows are deleted",
        || async { live_instances(&survivor.pool).await == 1 },
    )
    .await;
    send_signal(&child, Signal::SIGKILL);
    child.wait().await.unwrap();
    drop(frozen);
}

#[tokio::test]
async fn an_instance_that_stops_removes_its_watchers_at_once_not_at_expiry() {
    // The default expiry (5 s): a count that falls within 2 s fell because the instance left.
    let first = spawn_app_with(&[]).await;
    let mut second = spawn_instance(&first.database_url, &[]).await;
    let mut watcher = WsClient::connect(&first.ws_url).await;
    watch(&mut watcher, &[3]).await;
    let mut leaving = WsClient::connect(&second.ws_url).await;
    leaving.subscribe(&[3]).await;
    expect_watchers(&mut watcher, 3, 2, WITHIN).await;
    second.stop().await;
    expect_watchers(&mut watcher, 3, 1, WITHIN).await;
}
