//! Delivery guarantees: commit-ordered seq, resume without gaps or duplicates (WebSocket and
//! SSE, on one instance or another), listener catch-up, snapshots, large rows, conflation.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::scenario::{self, Scenario, Writes, create_ids};
use crate::support::{
    Source, SseClient, WsClient, add_one_unit, committed_changes, get_json, product,
    products_in_table, spawn_app_with, spawn_instance, terminate_listener, wait_for_changelog,
    wait_until,
};

// The delivery guarantees hold whichever source writes the changelog.
crate::both_sources!(
    a_change_committed_while_the_client_was_away_arrives_on_resume_websocket_and_sse,
    randomized_writers_and_roaming_clients_on_two_instances_lose_and_double_nothing,
    changes_written_while_the_listener_is_down_all_arrive_in_order,
    snapshot_plus_stream_equals_the_final_table_for_a_client_joining_mid_writes,
    a_product_with_a_100_kb_name_is_written_and_delivered_in_full,
);

fn key(change: &Value) -> (i64, u64) {
    (
        change["product"]["productId"].as_i64().unwrap(),
        change["seq"].as_u64().unwrap(),
    )
}

async fn a_change_committed_while_the_client_was_away_arrives_on_resume_websocket_and_sse(
    source: Source,
) {
    let app = spawn_app_with(&source.with(&[])).await;
    let ids = create_ids(&app, 2).await;
    let (first, second) = (ids[0], ids[1]);

    for transport in ["websocket", "sse"] {
        // A changes `first` and stays open; B changes `second` and commits before A.
        let mut a = app.pool.begin().await.unwrap();
        let mut client_ws = None;
        let mut client_sse = None;
        if transport == "websocket" {
            let mut client = WsClient::connect(&app.ws_url).await;
            client.subscribe(&ids).await;
            client_ws = Some(client);
        } else {
            let mut client = SseClient::connect(
                &format!("{}/products/events?ids={first},{second}", app.base_url),
                None,
            )
            .await;
            assert_eq!(client.next_event().await.data["type"], "subscribed");
            client_sse = Some(client);
        }
        sqlx::query(
            "UPDATE products SET units_available = units_available + 100 WHERE product_id = $1",
        )
        .bind(first)
        .execute(&mut *a)
        .await
        .unwrap();
        let b = app
            .patch_product(second, json!({"productName": format!("B via {transport}")}))
            .await;

        let seen = if let Some(client) = &mut client_ws {
            let change = client.next_change().await;
            assert_eq!(change["product"], b);
            change["seq"].as_u64().unwrap()
        } else {
            let event = client_sse.as_mut().unwrap().next_event().await;
            assert_eq!(event.data["product"], b);
            assert_eq!(event.id, event.data["seq"].as_u64(), "SSE id is the seq");
            event.id.unwrap()
        };
        drop(client_ws);
        drop(client_sse);
        a.commit().await.unwrap();
        let a_row = get_json(&app.http, &format!("{}/products/{first}", app.base_url)).await;

        if transport == "websocket" {
            let mut client = WsClient::connect(&app.ws_url).await;
            client
                .send_json(&json!({"command": "subscribe", "productIDs": ids, "since": seen}))
                .await;
            assert_eq!(
                client.expect_ack(&ids).await,
                seen,
                "the ack carries the resume position"
            );
            let change = client.next_change().await;
            assert_eq!(change["product"], a_row, "A's change, committed while away");
            assert!(
                change["seq"].as_u64().unwrap() > seen,
                "A committed after B: higher seq"
            );
            client.expect_silence(Duration::from_millis(300)).await;
        } else {
            let mut client = SseClient::connect(
                &format!("{}/products/events?ids={first},{second}", app.base_url),
                Some(seen),
            )
            .await;
            assert_eq!(client.next_event().await.data["seq"], seen);
            let event = client.next_event().await;
            assert_eq!(event.data["product"], a_row);
            assert!(event.id.unwrap() > seen);
            assert!(
                client
                    .try_next_event(Duration::from_millis(300))
                    .await
                    .is_none()
            );
        }
    }
}

async fn randomized_writers_and_roaming_clients_on_two_instances_lose_and_double_nothing(
    source: Source,
) {
    let flags = source.with(&[
        "--slow-client-policy",
        "disconnect",
        "--outbox-capacity",
        "512",
    ]);
    let one = spawn_app_with(&flags).await;
    let two = spawn_instance(&one.database_url, &flags).await;
    let scenario = Scenario::new(scenario::seed(), Writes::SingleRows(300));
    let urls = [one.ws_url.clone(), two.ws_url.clone()];
    scenario::run(&one, &urls, &one.pool, &scenario, async { String::new() })
        .await
        .assert_exact();
}

async fn changes_written_while_the_listener_is_down_all_arrive_in_order(source: Source) {
    let app = spawn_app_with(&source.with(&["--listener-max-backoff", "500ms"])).await;
    let ids = create_ids(&app, 5).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    let first_ack = client.subscribe(&ids).await;
    let pool = app.pool.clone();
    let writer_ids = ids.clone();
    let writer = tokio::spawn(async move {
        for n in 0..600_usize {
            add_one_unit(&pool, writer_ids[n % writer_ids.len()]).await;
        }
    });
    let mut received = Vec::new();
    let mut killed = false;
    while received.len() < 600 {
        let change = client.next_change().await;
        received.push(key(&change));
        if received.len() == 100 && !killed {
            assert_eq!(terminate_listener(&app.pool).await, 1);
            killed = true;
        }
    }
    writer.await.unwrap();
    assert_eq!(
        received,
        committed_changes(&app.pool, &ids, first_ack).await
    );
    let stats = app.stats().await;
    assert!(
        stats["listener"]["reconnects"].as_u64() >= Some(1),
        "{stats}"
    );
    // With the trigger, changes committed while LISTEN was down are found by the catch-up
    // read. The replication reader writes them a batch later, often after the listener is back,
    // so there they may all arrive as notified reads: the order and count above are what count.
    if source == Source::Notify {
        assert!(
            stats["listener"]["changesReadFromChangelog"].as_u64() >= Some(1),
            "{stats}"
        );
    }
    client.expect_silence(Duration::from_millis(300)).await;
}

async fn snapshot_plus_stream_equals_the_final_table_for_a_client_joining_mid_writes(
    source: Source,
) {
    let app = spawn_app_with(&source.with(&[])).await;
    let mut ids = create_ids(&app, 6).await;
    let not_yet = ids.iter().max().unwrap() + 1000;
    ids.push(not_yet);
    let pool = app.pool.clone();
    let writer_ids = ids.clone();
    let writer = tokio::spawn(async move {
        for n in 0..400_usize {
            if n == 200 {
                sqlx::query("INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name) VALUES ($1, 'late', '1', 0, 'Late')")
                    .bind(not_yet)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            if n == 300 {
                sqlx::query("DELETE FROM products WHERE product_id = $1")
                    .bind(writer_ids[0])
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            add_one_unit(&pool, writer_ids[n % (writer_ids.len() - 1) + 1]).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client
        .send_json(&json!({"command": "subscribe", "productIDs": ids, "snapshot": true}))
        .await;
    let position = client.expect_ack(&ids).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["seq"], position);
    let mut state: BTreeMap<i64, Value> = snapshot["products"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["productId"].as_i64().unwrap(), p.clone()))
        .collect();
    for missing in snapshot["missing"].as_array().unwrap() {
        assert!(!state.contains_key(&missing.as_i64().unwrap()));
    }
    writer.await.unwrap();
    wait_for_changelog(&app.pool).await;
    let last: i64 = sqlx::query_scalar("SELECT max(seq) FROM product_changes")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let mut seen = position;
    // Each product's last change applied, to say which one a mismatch ends with.
    let mut last_change: BTreeMap<i64, (u64, String)> = BTreeMap::new();
    while seen < u64::try_from(last).unwrap() {
        let change = client.next_change().await;
        let (id, seq) = key(&change);
        assert!(seq > seen, "increasing seq after the snapshot");
        seen = seq;
        last_change.insert(
            id,
            (seq, change["action"].as_str().unwrap_or("?").to_owned()),
        );
        if change["action"] == "DELETE" {
            state.remove(&id);
        } else {
            state.insert(id, change["product"].clone());
        }
    }
    let table = products_in_table(&app.pool, &ids).await;
    let differing: Vec<String> = ids
        .iter()
        .filter(|id| state.get(id) != table.get(id))
        .map(|id| {
            format!(
                "product {id}: client {:?}, table {:?}, last change applied {:?}",
                state.get(id).map(|p| &p["unitsAvailable"]),
                table.get(id).map(|p| &p["unitsAvailable"]),
                last_change.get(id)
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "snapshot at seq {position} plus changes through {last} differs from the table:\n{}",
        differing.join("\n")
    );
}

async fn a_product_with_a_100_kb_name_is_written_and_delivered_in_full(source: Source) {
    let app = spawn_app_with(&source.with(&[])).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[777]).await;
    let name = "n".repeat(100 * 1024);
    let mut body = product(&name);
    body["productId"] = json!(777);
    let created = app
        .http
        .post(format!("{}/products", app.base_url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status(),
        201,
        "the write does not fail on notification size"
    );
    let insert = client.next_change().await;
    assert_eq!(insert["action"], "INSERT");
    assert_eq!(
        insert["product"]["productName"].as_str().unwrap().len(),
        name.len()
    );
    let longer = format!("{name}!");
    app.patch_product(777, json!({"productName": longer})).await;
    let update = client.next_change().await;
    assert_eq!(update["product"]["productName"], longer);
    // An update that leaves the (TOASTed) name alone still delivers the whole row.
    app.patch_product(777, json!({"unitsAvailable": 1})).await;
    let update = client.next_change().await;
    assert_eq!(update["product"]["productName"], longer);
    assert_eq!(update["product"]["unitsAvailable"], 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_conflated_with_bounded_memory_and_converges() {
    let app = spawn_app_with(&["--outbox-capacity", "64", "--heartbeat-interval", "120s"]).await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let mut body = product(&format!("heavy{n}"));
        body["productName"] = json!("x".repeat(4000));
        ids.push(
            app.create_product(body).await["productId"]
                .as_i64()
                .unwrap(),
        );
    }
    let mut sleeper = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    sleeper.subscribe(&ids).await;
    // 8 000 changes of ~4 KB (32 MB) while the client reads nothing.
    for _ in 0..80 {
        sqlx::query(
            "DO $$ BEGIN FOR i IN 1..100 LOOP
                 UPDATE products SET units_available = units_available + 1
                 WHERE product_id = (SELECT min(product_id) FROM products) + i % 5;
             END LOOP; END $$",
        )
        .execute(&app.pool)
        .await
        .unwrap();
    }
    let last: i64 = sqlx::query_scalar("SELECT max(seq) FROM product_changes")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "all changes published", || async {
        app.stats().await["lastSeq"] == json!(last)
    })
    .await;
    let stats = app.stats().await;
    assert_eq!(stats["sessions"], 1, "conflated, not disconnected: {stats}");
    assert!(stats["changesDeferred"].as_u64() > Some(0), "{stats}");
    assert!(
        stats["messagesWaiting"].as_u64() <= Some(64 + 1),
        "queue bounded by its capacity plus one gap marker: {stats}"
    );
    // It stopped reading for longer than the conflation threshold.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Now it reads: it converges to the latest state of every product, and the versions it
    // skipped are announced on the newer ones.
    let mut latest: HashMap<i64, Value> = HashMap::new();
    let mut marked = 0;
    let mut received = 0;
    while let Some(message) = sleeper.try_next_json(Duration::from_millis(500)).await {
        if message["type"] == "change" {
            received += 1;
            if message["conflated"] == json!(true) {
                marked += 1;
            }
            latest.insert(
                message["product"]["productId"].as_i64().unwrap(),
                message["product"].clone(),
            );
        }
    }
    for id in ids {
        let current = get_json(&app.http, &format!("{}/products/{id}", app.base_url)).await;
        assert_eq!(latest.get(&id), Some(&current), "product {id} converged");
    }
    assert!(
        marked >= 5,
        "one marked change per product at least: {marked}"
    );
    assert!(received < 1000, "conflated, not every version: {received}");
}

#[tokio::test]
async fn a_resume_from_before_retention_gets_a_reset_and_a_snapshot() {
    let app = spawn_app_with(&[
        "--changelog-max-rows",
        "5",
        "--changelog-prune-interval",
        "100ms",
    ])
    .await;
    let id = app.create_product(product("Pruned")).await["productId"]
        .as_i64()
        .unwrap();
    for units in 0..20 {
        app.patch_product(id, json!({"unitsAvailable": units}))
            .await;
    }
    // Retention keeps at most max-rows changes (the newest), in the background.
    wait_until(Duration::from_secs(10), "retention pruning", || async {
        let (kept, pruned): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM product_changes), pruned_through FROM changelog_horizon",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        kept <= 5 && pruned > 1
    })
    .await;

    let mut client = WsClient::connect(&app.ws_url).await;
    client
        .send_json(&json!({"command": "subscribe", "productIDs": [id], "since": 1}))
        .await;
    let reset = client.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["since"], 1);
    let position = client.expect_ack(&[id]).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["seq"], position);
    assert_eq!(snapshot["products"][0]["unitsAvailable"], 19);
    app.patch_product(id, json!({"unitsAvailable": 99})).await;
    let change = client.next_change().await;
    assert_eq!(change["product"]["unitsAvailable"], 99);
    assert!(change["seq"].as_u64().unwrap() > position);
}
