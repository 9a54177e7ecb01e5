//! A client that stops reading is cut off (close 1013) without delaying anyone else, and the
//! server holds a bounded amount for it.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{WsClient, product, spawn_app_with, wait_until};

#[tokio::test]
async fn a_client_that_never_reads_is_evicted_and_others_keep_getting_changes() {
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "256",
        "--slow-client-policy",
        "disconnect",
    ])
    .await;
    // ~4 KB per change, so the stuck client's socket buffers fill after about a thousand.
    let id = app.create_heavy_product(4000).await;

    let mut stuck = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    stuck.subscribe(&[id]).await;
    let mut reader = WsClient::connect(&app.ws_url).await;
    reader.subscribe(&[id]).await;

    // 80 transactions of 100 changes each (32 MB in all for the stuck client); the reader
    // reads each batch before the next is written, so it is never more than 100 behind.
    let mut expected = 0;
    for _ in 0..80 {
        sqlx::query(
            "DO $$ BEGIN FOR i IN 1..100 LOOP
                 UPDATE products SET units_available = units_available + 1
                 WHERE product_id = (SELECT min(product_id) FROM products);
             END LOOP; END $$",
        )
        .execute(&app.pool)
        .await
        .unwrap();
        for _ in 0..100 {
            expected += 1;
            assert_eq!(
                reader.next_change().await["product"]["unitsAvailable"],
                10 + expected
            );
        }
    }

    wait_until(
        Duration::from_secs(10),
        "the slow client's eviction",
        || async { app.stats().await["slowSessionsEvicted"] == json!(1) },
    )
    .await;
    let stats = app.stats().await;
    assert_eq!(
        stats["sessions"], 1,
        "the stuck session is gone, and with it its queue"
    );
    assert_eq!(stats["subscriptions"], 1);

    // The reader still gets fresh changes promptly.
    let mut latencies = Vec::new();
    for units in 0..5 {
        let started = Instant::now();
        app.patch_product(id, json!({"unitsAvailable": units}))
            .await;
        assert_eq!(
            reader.next_change().await["product"]["unitsAvailable"],
            units
        );
        latencies.push(started.elapsed());
    }
    latencies.sort();
    assert!(
        latencies[2] < Duration::from_millis(100),
        "median write-to-delivery {:?} for the reader after the eviction",
        latencies[2]
    );

    // When the stuck client finally reads, it finds what was buffered, then the connection
    // ends (with close 1013 if the close frame fit into its buffers).
    let code = stuck.close_code().await;
    assert!(matches!(code, Some(1013) | None), "got close code {code:?}");
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_disconnected() {
    let app = spawn_app_with(&[
        "--heartbeat-interval",
        "200ms",
        "--heartbeat-timeout",
        "300ms",
    ])
    .await;
    let mut live = WsClient::connect(&app.ws_url).await;
    live.subscribe(&[1]).await;
    let mut silent = WsClient::connect(&app.ws_url).await;
    silent.subscribe(&[2]).await;
    // `silent` never reads, so it never answers pings; `live` keeps reading (and answering).
    live.expect_silence(Duration::from_millis(1500)).await;
    let stats = app.stats().await;
    assert_eq!(stats["sessions"], 1, "{stats}");
    assert_eq!(stats["subscriptions"], 1);
    // The close frame (1008) is sent, but the silent peer's pending pongs fail to write once
    // the server has closed, so the client may see the TCP end first.
    let code = silent.close_code().await;
    assert!(matches!(code, Some(1008) | None), "got close code {code:?}");
}

#[tokio::test]
async fn a_reading_client_keeps_its_session_and_its_changes_across_many_heartbeats() {
    // Each ping also frees the session's idle buffers; each pong re-arms the next ping. A
    // session that answers must live on and get every change, before and after those cycles.
    let app = spawn_app_with(&[
        "--heartbeat-interval",
        "100ms",
        "--heartbeat-timeout",
        "300ms",
    ])
    .await;
    let id = app.create_product(product("Pinged")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    for round in 1..=5_i64 {
        // About five ping/pong cycles while idle (the client answers pings as it reads).
        client.expect_silence(Duration::from_millis(500)).await;
        for step in 1..=3_i64 {
            let units = round * 10 + step;
            app.patch_product(id, json!({"unitsAvailable": units}))
                .await;
            assert_eq!(
                client.next_change().await["product"]["unitsAvailable"],
                units
            );
        }
    }
    assert_eq!(
        app.stats().await["sessions"],
        1,
        "the session was never dropped"
    );
}

#[tokio::test]
async fn a_batch_cut_short_by_eviction_is_not_counted_as_delivered() {
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "64",
        "--slow-client-policy",
        "disconnect",
        "--heartbeat-interval",
        "120s",
    ])
    .await;
    // 64 KB per change: one batch is far more than the stuck client's socket buffers hold.
    let id = app.create_heavy_product(64_000).await;
    let mut stuck = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    stuck.subscribe(&[id]).await;
    crate::support::commit_updates_one_by_one(&app.pool, 400).await;
    wait_until(
        Duration::from_secs(10),
        "the stuck client's eviction",
        || async { app.stats().await["slowSessionsEvicted"] == json!(1) },
    )
    .await;
    app.wait_for_sessions(0).await;
    // Everything the server wrote reaches the client once it reads: what it counted as
    // delivered must be no more than that (the ack was read above).
    let mut received = 1;
    let ending = loop {
        match stuck.next_or_closed(Duration::from_secs(5)).await {
            Ok(Some(_)) => received += 1,
            other => break other,
        }
    };
    let metrics = app.metrics_text().await;
    let delivered: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("rowcast_messages_delivered_total{transport=\"websocket\"} ")
        })
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        delivered <= f64::from(received),
        "counted {delivered} delivered, the client received {received}, then {ending:?}"
    );
}
