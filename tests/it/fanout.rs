//! The direct lane: plain WebSocket subscribers that keep up get each change written into their
//! socket by the distributor in one pass, while one whose socket would block leaves the lane
//! and gets exactly what it got before (its queue, the slow-client policy, the same order).

use std::time::Duration;

use serde_json::Value;

use crate::support::{TestApp, WsClient, get_json, spawn_app_with, wait_until};

/// Changes made in one transaction per round; readers read a round before the next is written.
const PER_ROUND: usize = 25;
const ROUNDS: usize = 40;

async fn update_heavy_product(app: &TestApp, id: i64, times: usize) {
    sqlx::query(&format!(
        "DO $$ BEGIN FOR i IN 1..{times} LOOP
             UPDATE products SET units_available = units_available + 1 WHERE product_id = {id};
         END LOOP; END $$"
    ))
    .execute(&app.pool)
    .await
    .unwrap();
}

/// The product's units now: each update adds one.
async fn units_now(app: &TestApp, id: i64) -> i64 {
    let product = get_json(&app.http, &format!("{}/products/{id}", app.base_url)).await;
    product["unitsAvailable"].as_i64().unwrap()
}

fn units(change: &Value) -> i64 {
    change["product"]["unitsAvailable"].as_i64().unwrap()
}

fn stat(stats: &Value, name: &str) -> u64 {
    stats[name]
        .as_u64()
        .unwrap_or_else(|| panic!("/stats has {name}: {stats}"))
}

#[tokio::test]
async fn a_blocked_subscriber_keeps_its_order_and_policy_while_the_others_are_written_directly() {
    // Conflation only for a client that stopped reading for an hour: the stuck client below
    // must get every version when it reads again, from its queue and the changelog.
    let app = spawn_app_with(&["--outbox-capacity", "64", "--conflate-after", "1h"]).await;
    // ~4 KB per change: the stuck client's small socket buffers fill within a few rounds.
    let id = app.create_heavy_product(4000).await;
    let mut stuck = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    stuck.subscribe(&[id]).await;
    let mut readers = Vec::new();
    for _ in 0..6 {
        let mut reader = WsClient::connect(&app.ws_url).await;
        reader.subscribe(&[id]).await;
        readers.push(reader);
    }
    let before = app.stats().await;

    let start = units_now(&app, id).await;
    let mut expected = start;
    for _ in 0..ROUNDS {
        update_heavy_product(&app, id, PER_ROUND).await;
        for reader in &mut readers {
            for k in 1..=PER_ROUND as i64 {
                let change = reader.next_change().await;
                assert_eq!(units(&change), expected + k, "a reader's changes in order");
            }
        }
        expected += PER_ROUND as i64;
    }

    let after = app.stats().await;
    let direct = stat(&after, "messagesWrittenDirectly") - stat(&before, "messagesWrittenDirectly");
    let deliveries = (readers.len() * PER_ROUND * ROUNDS) as u64;
    // Readers that keep up are written directly; a reader can fall behind for a moment (its
    // socket full while the test reads another), and then takes the queue until it drained.
    assert!(
        direct >= deliveries / 2,
        "{direct} of {deliveries} reader deliveries went through the direct lane"
    );
    let queued = stat(&after, "messagesQueued") - stat(&before, "messagesQueued");
    let deferred = stat(&after, "changesDeferred") - stat(&before, "changesDeferred");
    assert!(
        deferred > 0,
        "the stuck client overflowed its queue: {queued} queued, {deferred} deferred"
    );
    assert_eq!(stat(&after, "slowSessionsEvicted"), 0);

    // The stuck client reads again: every version, in order, none twice — the queue, then the
    // gap read from the changelog, exactly as without the lane.
    for k in 1..=(PER_ROUND * ROUNDS) as i64 {
        let change = stuck.next_change().await;
        assert_eq!(
            units(&change),
            start + k,
            "the stuck client's changes in order"
        );
        assert!(
            change.get("conflated").is_none(),
            "nothing conflated: {change}"
        );
    }
    stuck.expect_silence(Duration::from_millis(300)).await;

    // Once it has caught up, it is back on the lane: the next change is written directly.
    let lane_before = stat(&app.stats().await, "messagesWrittenDirectly");
    update_heavy_product(&app, id, 1).await;
    assert_eq!(units(&stuck.next_change().await), expected + 1);
    for reader in &mut readers {
        assert_eq!(units(&reader.next_change().await), expected + 1);
    }
    wait_until(Duration::from_secs(5), "direct writes counted", || async {
        stat(&app.stats().await, "messagesWrittenDirectly") >= lane_before + 7
    })
    .await;
}

#[tokio::test]
async fn under_the_disconnect_policy_a_blocked_subscriber_is_evicted_and_the_lane_goes_on() {
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "64",
        "--slow-client-policy",
        "disconnect",
    ])
    .await;
    let id = app.create_heavy_product(4000).await;
    let mut stuck = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    stuck.subscribe(&[id]).await;
    let mut reader = WsClient::connect(&app.ws_url).await;
    reader.subscribe(&[id]).await;

    let start = units_now(&app, id).await;
    let mut expected = start;
    for _ in 0..ROUNDS {
        update_heavy_product(&app, id, PER_ROUND).await;
        for k in 1..=PER_ROUND as i64 {
            assert_eq!(units(&reader.next_change().await), expected + k);
        }
        expected += PER_ROUND as i64;
    }
    let stats = app.stats().await;
    assert_eq!(stat(&stats, "slowSessionsEvicted"), 1, "{stats}");
    assert!(stat(&stats, "messagesWrittenDirectly") > 0);
    // The stuck client gets what was queued before the overflow, in order, then 1013.
    let mut last = start;
    loop {
        match stuck.next_or_closed(Duration::from_secs(10)).await {
            Ok(Some(message)) if message["type"] == "change" => {
                assert_eq!(units(&message), last + 1, "in order up to the eviction");
                last += 1;
            }
            Ok(Some(other)) => panic!("unexpected {other}"),
            Ok(None) => panic!("no close frame within 10 s"),
            Err(code) => {
                assert_eq!(code, Some(1013));
                break;
            }
        }
    }
    assert!(last < expected, "evicted before the end");
}
