//! Isolation between kinds of database work: clients reading history (resumes, snapshots)
//! cannot take REST's or readiness's connections; past the history queue they are told to come
//! back (WebSocket close 1013, SSE `history_busy`), and when they do they lose nothing.
//!
//! Every history read is made to block, not to be slow: a test transaction holds an ACCESS
//! EXCLUSIVE lock on the changelog, so each replay query waits on it while holding its history
//! connection, until the test releases the lock. What the tests assert follows from who holds
//! what, never from how long something took.

use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Transaction};

use crate::support::ws::ARRIVAL;
use crate::support::{
    SseClient, TestApp, WsClient, committed_changes, product, spawn_app_with, wait_until,
};

/// The reason of the 1013 close frame a refused replay gets.
const BUSY_REASON: &str = "change history is busy; reconnect and resume";

/// One history connection and room for two reads (one running, one waiting), so the third
/// replay at once is refused; a single REST connection, which before the pools were separated
/// was the one a blocked replay took.
const FLAGS: &[&str] = &[
    "--db-max-connections",
    "1",
    "--db-history-connections",
    "1",
    "--db-history-queue",
    "2",
    // The queued read waits for the test to release the lock; this bound is never reached.
    "--db-history-acquire-timeout",
    "60s",
    // The lock blocks every reader of the changelog, the listener's health check included (it
    // would count as a hung connection and make /readyz 503); what is under test is that
    // history readers take no one else's connections, so no health tick falls in a test.
    "--listener-health-interval",
    "1h",
];

/// Two products and some updates: the history every replay below must deliver.
async fn commit_history(app: &TestApp) -> (Vec<i64>, Vec<(i64, u64)>) {
    let a = app.create_product(product("A")).await["productId"]
        .as_i64()
        .unwrap();
    let b = app.create_product(product("B")).await["productId"]
        .as_i64()
        .unwrap();
    for (id, units) in [(a, 1), (b, 2), (a, 3)] {
        app.patch_product(id, json!({"unitsAvailable": units}))
            .await;
    }
    let ids = vec![a, b];
    let changes = committed_changes(&app.pool, &ids, 0).await;
    assert_eq!(changes.len(), 5);
    (ids, changes)
}

/// Takes the changelog for a transaction of the test's own: every read of it blocks until the
/// transaction ends.
async fn lock_changelog(pool: &PgPool) -> Transaction<'static, Postgres> {
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE product_changes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    lock
}

/// `/stats` → `history`.
async fn history_stats(app: &TestApp) -> Value {
    app.stats().await["history"].clone()
}

/// Waits until the history queue holds `reading` reads with a connection and `waiting` without.
async fn wait_for_history(app: &TestApp, reading: u64, waiting: u64) {
    wait_until(ARRIVAL, "the history queue", || async {
        let history = history_stats(app).await;
        history["reading"] == json!(reading) && history["waiting"] == json!(waiting)
    })
    .await;
}

/// A WebSocket that asked to resume `ids` from the beginning.
async fn resuming_socket(app: &TestApp, ids: &[i64]) -> WsClient {
    let mut socket = WsClient::connect(&app.ws_url).await;
    socket
        .send_json(&json!({"command": "subscribe", "productIDs": ids, "since": 0}))
        .await;
    socket
}

/// Reads the ack of a resume from 0 and then as many changes as `expected` holds; asserts they
/// are exactly those, in order.
async fn expect_replay(socket: &mut WsClient, ids: &[i64], expected: &[(i64, u64)]) {
    assert_eq!(socket.expect_ack(ids).await, 0);
    let mut received = Vec::new();
    for _ in expected {
        let change = socket.next_change().await;
        received.push((
            change["product"]["productId"].as_i64().unwrap(),
            change["seq"].as_u64().unwrap(),
        ));
    }
    assert_eq!(received, expected);
}

async fn get_status(app: &TestApp, path: &str) -> u16 {
    app.http
        .get(format!("{}{path}", app.base_url))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn rest_keeps_answering_while_replays_saturate_their_pool() {
    let app = spawn_app_with(FLAGS).await;
    let (ids, changes) = commit_history(&app).await;
    let lock = lock_changelog(&app.pool).await;

    // One replay holds the history connection (blocked on the lock), one waits for it.
    let mut running = resuming_socket(&app, &ids).await;
    wait_for_history(&app, 1, 0).await;
    let mut queued = resuming_socket(&app, &ids).await;
    wait_for_history(&app, 1, 1).await;

    // REST and readiness have a connection of their own.
    assert_eq!(
        get_status(&app, &format!("/products/{}", ids[0])).await,
        200
    );
    assert_eq!(get_status(&app, "/readyz").await, 200);

    // The queue is full: further replays are refused at once, and told to come back.
    for _ in 0..2 {
        let mut refused = resuming_socket(&app, &ids).await;
        assert_eq!(
            refused.close_frame().await,
            Some((1013, BUSY_REASON.to_owned()))
        );
    }
    assert_eq!(
        history_stats(&app).await,
        json!({"connections": 1, "queue": 2, "waiting": 1, "reading": 1, "busyRefusals": 2}),
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|line| line == "rowcast_history_reads_refused_total 2"),
        "{metrics}"
    );
    assert_eq!(get_status(&app, "/readyz").await, 200);

    // Released, both queued replays deliver every change once, in order, and go on live.
    lock.rollback().await.unwrap();
    expect_replay(&mut running, &ids, &changes).await;
    expect_replay(&mut queued, &ids, &changes).await;
    app.patch_product(ids[1], json!({"unitsAvailable": 9}))
        .await;
    let all = committed_changes(&app.pool, &ids, 0).await;
    assert_eq!(all.len(), changes.len() + 1);
    for socket in [&mut running, &mut queued] {
        let change = socket.next_change().await;
        assert_eq!(change["product"]["unitsAvailable"], 9);
        assert_eq!(change["seq"].as_u64(), all.last().map(|&(_, seq)| seq));
    }

    // A refused client that comes back, as told, loses nothing either.
    let mut returning = resuming_socket(&app, &ids).await;
    expect_replay(&mut returning, &ids, &all).await;
    assert_eq!(history_stats(&app).await["busyRefusals"], 2);
}

#[tokio::test]
async fn an_event_stream_refused_by_a_busy_history_says_so_ends_and_resumes_in_full() {
    let app = spawn_app_with(FLAGS).await;
    let (ids, changes) = commit_history(&app).await;
    let list = ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let url = format!("{}/products/events?ids={list}&since=0", app.base_url);
    let lock = lock_changelog(&app.pool).await;

    let mut running = SseClient::connect(&url, None).await;
    wait_for_history(&app, 1, 0).await;
    let mut queued = SseClient::connect(&url, None).await;
    wait_for_history(&app, 1, 1).await;

    let mut refused = SseClient::connect(&url, None).await;
    let event = refused.next_event().await;
    assert_eq!(
        event.data,
        json!({"type": "error", "error": "history_busy", "message": BUSY_REASON})
    );
    assert_eq!(event.id, None);
    refused.expect_end().await;
    assert_eq!(history_stats(&app).await["busyRefusals"], 1);
    assert_eq!(
        get_status(&app, &format!("/products/{}", ids[0])).await,
        200
    );

    lock.rollback().await.unwrap();
    for stream in [&mut running, &mut queued] {
        expect_events(stream, &ids, &changes).await;
    }
    // The EventSource reconnects to the same URL (with `since`), as the refused one would.
    let mut returning = SseClient::connect(&url, None).await;
    expect_events(&mut returning, &ids, &changes).await;
}

/// Reads an event stream's ack (after 0) and then exactly `expected`, in order, each change
/// with its seq as the event id.
async fn expect_events(stream: &mut SseClient, ids: &[i64], expected: &[(i64, u64)]) {
    let ack = stream.next_event().await;
    assert_eq!(
        ack.data,
        json!({"type": "subscribed", "productIDs": ids, "seq": 0})
    );
    let mut received = Vec::new();
    for _ in expected {
        let event = stream.next_event().await;
        assert_eq!(event.data["type"], "change", "{}", event.data);
        assert_eq!(event.id, event.data["seq"].as_u64());
        received.push((
            event.data["product"]["productId"].as_i64().unwrap(),
            event.data["seq"].as_u64().unwrap(),
        ));
    }
    assert_eq!(received, expected);
}

#[tokio::test]
async fn a_replay_that_waits_too_long_is_busy_but_a_failed_read_is_an_internal_error() {
    let app = spawn_app_with(&[
        "--db-history-connections",
        "1",
        "--db-history-queue",
        "4",
        // Short: the wait below is for a lock the test holds until after it ends.
        "--db-history-acquire-timeout",
        "300ms",
        "--listener-health-interval",
        "1h",
    ])
    .await;
    let (ids, _) = commit_history(&app).await;
    let lock = lock_changelog(&app.pool).await;

    let mut running = resuming_socket(&app, &ids).await;
    wait_for_history(&app, 1, 0).await;
    // Room in the queue, but the one connection stays taken past the acquire timeout.
    let mut waiting = resuming_socket(&app, &ids).await;
    assert_eq!(
        waiting.close_frame().await,
        Some((1013, BUSY_REASON.to_owned()))
    );
    assert_eq!(history_stats(&app).await["busyRefusals"], 1);

    // A read the database fails is not "busy": it keeps its 1011, and is not counted.
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'rowcast-history' AND datname = current_database()",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(terminated >= 1);
    assert_eq!(running.close_code().await, Some(1011));
    assert_eq!(history_stats(&app).await["busyRefusals"], 1);
    lock.rollback().await.unwrap();
}

/// Pooled connections are not pinged while in steady use (a round trip per query saved), but one
/// that sat idle is checked before it is handed out: connections killed while idle (a restart,
/// a failover, a proxy's idle timeout) are replaced, and no request gets a dead one.
#[tokio::test]
async fn rest_connections_that_died_while_idle_are_replaced_not_handed_to_requests() {
    let app = spawn_app_with(&["--db-max-connections", "4"]).await;
    let id = app.create_product(product("Idle")).await["productId"]
        .as_i64()
        .unwrap();
    let url = format!("{}/products/{id}", app.base_url);
    let get_all = || {
        futures_util::future::join_all((0..8).map(|_| {
            let (http, url) = (app.http.clone(), url.clone());
            async move { http.get(url).send().await.unwrap().status().as_u16() }
        }))
    };
    // Several requests at once open several REST connections.
    assert_eq!(get_all().await, vec![200; 8]);
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'rowcast' AND datname = current_database()",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(terminated >= 1, "the REST pool had connections to kill");
    assert_eq!(
        get_all().await,
        vec![200; 8],
        "every request after the idle connections died gets a live one"
    );
}

/// A request abandoned while its statement runs leaves the connection owing a reply; the REST
/// pool's next user of that connection (the only one here) must get its own answer, not the
/// abandoned one's, and nothing may fail.
#[tokio::test]
async fn a_rest_request_abandoned_mid_statement_does_not_spoil_its_connection() {
    let app = spawn_app_with(&["--db-max-connections", "1"]).await;
    let id = app.create_product(product("Abandoned")).await["productId"]
        .as_i64()
        .unwrap();
    let url = format!("{}/products/{id}", app.base_url);
    let body = |units: i64| json!({"manufacturer": "Acme", "pricePerUnit": "1EUR", "unitsAvailable": units, "productName": "Abandoned"});

    // The row is locked, so the PUT's UPDATE waits inside PostgreSQL until the test lets go.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM products WHERE product_id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *lock)
        .await
        .unwrap();
    let abandoned = tokio::spawn({
        let (http, url, body) = (app.http.clone(), url.clone(), body(111));
        async move { http.put(url).json(&body).send().await }
    });
    wait_until(
        ARRIVAL,
        "the PUT's UPDATE waits for the row lock",
        || async {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = 'rowcast' AND wait_event_type = 'Lock'",
            )
            .fetch_one(&app.pool)
            .await
            .unwrap()
                == 1
        },
    )
    .await;
    // The client gives up: its connection closes and the server drops the request mid-statement.
    abandoned.abort();
    let _ = abandoned.await;
    lock.rollback().await.unwrap();

    for units in [7, 8, 9] {
        let put = app.http.put(&url).json(&body(units)).send().await.unwrap();
        assert_eq!(put.status(), 200);
        let put: Value = put.json().await.unwrap();
        assert_eq!(put["unitsAvailable"], units, "the PUT got its own answer");
        let get: Value = app
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(get["unitsAvailable"], units, "the GET got its own answer");
    }
}
