//! Presence: watcher counts summed over every instance on one database, sent only to the
//! clients that asked, within 2 s of a change in membership; a killed instance's watchers leave
//! the count within the stated expiry.

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

#[tokio::test]
async fn a_killed_instances_watchers_leave_the_count_within_the_expiry() {
    let flags = ["--presence-expiry", EXPIRY];
    let survivor = spawn_app_with(&flags).await;
    let port = free_port();
    let mut child = rowcast(port)
        .env("DATABASE_URL", &survivor.database_url)
        .args(flags)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    wait_until_serving(
        &mut child,
        &http,
        &format!("http://127.0.0.1:{port}/healthz"),
    )
    .await;

    let mut watcher = WsClient::connect(&survivor.ws_url).await;
    watch(&mut watcher, &[7]).await;
    expect_watchers(&mut watcher, 7, 1, WITHIN).await;
    let mut doomed = Vec::new();
    for _ in 0..2 {
        let mut client = WsClient::connect(&format!("ws://127.0.0.1:{port}/websocket")).await;
        client.subscribe(&[7]).await;
        doomed.push(client);
    }
    expect_watchers(&mut watcher, 7, 3, WITHIN).await;

    // No goodbye: its rows stay until they expire.
    send_signal(&child, Signal::SIGKILL);
    let killed = Instant::now();
    child.wait().await.unwrap();
    // The expiry, a tick, the one-second message gap, and slack for a loaded machine.
    let bound = Duration::from_secs(2) + Duration::from_millis(250) + Duration::from_secs(1);
    expect_watchers(&mut watcher, 7, 1, bound + Duration::from_secs(1)).await;
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "expired too early: {took:?}"
    );
    // The next heartbeat of the survivor (five per expiry) deletes the dead instance's rows.
    wait_until(
        Duration::from_secs(2),
        "the dead instance's rows are deleted",
        || async {
            let instances: i64 = sqlx::query_scalar("SELECT count(*) FROM presence_instances")
                .fetch_one(&survivor.pool)
                .await
                .unwrap();
            instances == 1
        },
    )
    .await;
    drop(doomed);
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
