//! Subscribing to every product (`"all":true`): every change exactly once in commit order under
//! concurrent writers, a resume on another instance without a gap, a paged snapshot of a large
//! table, the SSE equivalent, and the budget it counts against.

use std::time::Duration;

use rand::Rng;
use serde_json::{Value, json};

use crate::support::sse::SseClient;
use crate::support::{WsClient, product, spawn_app, spawn_app_with, spawn_instance};

/// Every committed change after `after`, as (product, seq), in seq order.
async fn all_committed(pool: &sqlx::PgPool, after: u64) -> Vec<(i64, u64)> {
    let rows: Vec<(i64, i64)> =
        sqlx::query_as("SELECT product_id, seq FROM product_changes WHERE seq > $1 ORDER BY seq")
            .bind(i64::try_from(after).unwrap())
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(p, s)| (p, u64::try_from(s).unwrap()))
        .collect()
}

/// Subscribes `client` to every product and returns the ack's seq.
async fn subscribe_all(client: &mut WsClient, options: Value) -> u64 {
    let mut command = json!({"command": "subscribe", "all": true});
    if let (Some(command), Some(options)) = (command.as_object_mut(), options.as_object()) {
        command.extend(options.clone());
    }
    client.send_json(&command).await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    assert_eq!(ack["all"], true, "{ack}");
    assert!(ack.get("productIDs").is_none(), "{ack}");
    ack["seq"].as_u64().expect("the ack carries a seq")
}

/// Reads changes until `count` arrived; returns them as (product, seq).
async fn read_changes(client: &mut WsClient, count: usize) -> Vec<(i64, u64)> {
    let mut seen = Vec::with_capacity(count);
    while seen.len() < count {
        let change = client.next_change().await;
        seen.push((
            change["product"]["productId"].as_i64().unwrap(),
            change["seq"].as_u64().unwrap(),
        ));
    }
    seen
}

/// Writers on several connections commit random inserts, updates and deletes concurrently.
async fn random_writes(pool: &sqlx::PgPool, writers: usize, each: usize) {
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..each {
                let (kind, id) = {
                    let mut rng = rand::rng();
                    (rng.random_range(0..4), rng.random_range(1..40_i64))
                };
                let sql = match kind {
                    0 => "INSERT INTO products (manufacturer, price_per_unit, units_available, product_name)
                          VALUES ('Acme', '1.00', 1, 'random')",
                    1 => "DELETE FROM products WHERE product_id = $1",
                    _ => "UPDATE products SET units_available = units_available + 1 WHERE product_id = $1",
                };
                let query = sqlx::query(sql);
                let query = if kind == 0 { query } else { query.bind(id) };
                query.execute(&pool).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn an_all_subscriber_gets_every_change_of_concurrent_writers_once_in_commit_order() {
    let app = spawn_app().await;
    for name in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        app.create_product(product(name)).await;
    }
    let mut all = WsClient::connect(&app.ws_url).await;
    let start = subscribe_all(&mut all, json!({})).await;
    // Also subscribed by id to some products: each change still arrives once.
    let mut both = WsClient::connect(&app.ws_url).await;
    both.subscribe(&[1, 2, 3]).await;
    let both_start = subscribe_all(&mut both, json!({"delivery": "all"})).await;

    random_writes(&app.pool, 4, 60).await;

    let committed = all_committed(&app.pool, start).await;
    assert!(committed.len() > 50, "{} changes", committed.len());
    assert_eq!(read_changes(&mut all, committed.len()).await, committed);
    all.expect_silence(Duration::from_millis(300)).await;
    let committed = all_committed(&app.pool, both_start).await;
    assert_eq!(read_changes(&mut both, committed.len()).await, committed);
    both.expect_silence(Duration::from_millis(300)).await;

    // Unsubscribing from all leaves the by-id subscriptions.
    both.send_json(&json!({"command": "unsubscribe", "all": true}))
        .await;
    assert_eq!(
        both.next_json().await,
        json!({"type": "unsubscribed", "all": true})
    );
    let created = app.create_product(product("late")).await;
    assert_eq!(all.next_change().await["product"], created);
    both.expect_silence(Duration::from_millis(300)).await;
    // Product 2 may have been deleted by the writers: insert or update it.
    sqlx::query(
        "INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
         VALUES (2, 'Acme', '1.00', 77, 'again')
         ON CONFLICT (product_id) DO UPDATE SET units_available = 77",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let change = both.next_change().await;
    assert_eq!(change["product"]["productId"], 2);
}

#[tokio::test]
async fn a_subscribe_all_resumes_on_another_instance_without_a_gap() {
    let first = spawn_app().await;
    let second = spawn_instance(&first.database_url, &[]).await;
    for name in ["a", "b", "c"] {
        first.create_product(product(name)).await;
    }
    let mut client = WsClient::connect(&first.ws_url).await;
    let start = subscribe_all(&mut client, json!({})).await;
    random_writes(&first.pool, 2, 20).await;
    first.create_product(product("d")).await;
    // Random updates and deletes of absent ids change nothing, so the count varies per run:
    // read what was committed (at least the creation above), not a fixed number.
    let committed = all_committed(&first.pool, start).await;
    let seen = read_changes(&mut client, committed.len()).await;
    assert_eq!(seen, committed);
    let last = seen.last().unwrap().1;
    client.close().await;

    // Written while the client is away, and while it resumes.
    random_writes(&first.pool, 2, 20).await;
    let mut resumed = WsClient::connect(&second.ws_url).await;
    assert_eq!(
        subscribe_all(&mut resumed, json!({"since": last})).await,
        last
    );
    random_writes(&first.pool, 2, 10).await;
    let committed = all_committed(&first.pool, last).await;
    assert_eq!(read_changes(&mut resumed, committed.len()).await, committed);
    resumed.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_snapshot_of_ten_thousand_products_arrives_in_pages_within_the_frame_limit() {
    let app = spawn_app().await;
    sqlx::query(
        "INSERT INTO products (manufacturer, price_per_unit, units_available, product_name)
         SELECT 'Manufacturer ' || i, '12.50', i, 'A product with a name of some length ' || i
         FROM generate_series(1, 10000) AS i",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client
        .send_json(&json!({"command": "subscribe", "all": true, "snapshot": true}))
        .await;
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    let seq = ack["seq"].as_u64().unwrap();
    let mut ids = std::collections::BTreeSet::new();
    let mut pages = 0;
    loop {
        let text = client.next_text().await;
        assert!(
            text.len() <= 256 * 1024,
            "page of {} bytes exceeds the frame limit",
            text.len()
        );
        let page: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(page["type"], "snapshot");
        assert_eq!(page["all"], true);
        assert_eq!(page["seq"].as_u64(), Some(seq));
        pages += 1;
        for product in page["products"].as_array().unwrap() {
            assert!(ids.insert(product["productId"].as_i64().unwrap()));
        }
        if page["more"] == false {
            break;
        }
        assert_eq!(page["more"], true);
    }
    assert_eq!(ids.len(), 10_000);
    assert!(pages >= 10, "{pages} pages");
    // Changes after the snapshot follow it.
    app.patch_product(5, json!({"unitsAvailable": 1})).await;
    let change = client.next_change().await;
    assert!(change["seq"].as_u64().unwrap() > seq);
    assert_eq!(change["product"]["productId"], 5);
}

#[tokio::test]
async fn an_event_stream_of_every_product_and_its_bad_queries() {
    let app = spawn_app().await;
    let mut stream =
        SseClient::connect(&format!("{}/products/events?all=true", app.base_url), None).await;
    let ack = stream.next_event().await;
    assert_eq!(ack.data["type"], "subscribed");
    assert_eq!(ack.data["all"], true);
    let created = app.create_product(product("seen")).await;
    let change = stream.next_event().await;
    assert_eq!(change.data["product"], created);
    assert_eq!(change.id, change.data["seq"].as_u64());

    for (query, says) in [
        ("all=true&ids=1", "not both"),
        ("all=yes", "`all` must be true or false"),
        ("", "`ids` is required"),
    ] {
        let response = app
            .http
            .get(format!("{}/products/events?{query}", app.base_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
    }
}

#[tokio::test]
async fn a_subscribe_all_counts_against_the_server_budget() {
    let app = spawn_app_with(&["--max-total-subscriptions", "1500"]).await;
    let mut first = WsClient::connect(&app.ws_url).await;
    subscribe_all(&mut first, json!({})).await;
    let mut second = WsClient::connect(&app.ws_url).await;
    second
        .send_json(&json!({"command": "subscribe", "all": true}))
        .await;
    let refused = second.next_json().await;
    assert_eq!(refused["error"], "server_subscription_budget", "{refused}");
    // The first still holds it; by-id subscriptions within what is left still work.
    second.subscribe(&[1, 2]).await;
    assert_eq!(app.stats().await["allSubscribers"], 1);
}

#[tokio::test]
async fn under_auth_reads_every_product_needs_a_ticket_or_the_token() {
    const TOKEN: &str = "whole-catalog-token-0123456789abcdef";
    let app = spawn_app_with(&["--api-token", TOKEN, "--auth-reads"]).await;
    let anonymous = reqwest::Client::new();
    let events = format!("{}/products/events?all=true", app.base_url);
    let refused = anonymous.get(&events).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    assert!(WsClient::try_connect(&app.ws_url).await.is_err());

    let ticket: Value = app
        .http
        .post(format!("{}/ws-ticket", app.base_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ticket = ticket["ticket"].as_str().unwrap();
    let mut ws = WsClient::connect(&format!("{}?ticket={ticket}", app.ws_url)).await;
    subscribe_all(&mut ws, json!({})).await;
    let stream = app
        .http
        .get(&events)
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut sse = SseClient::from_response(stream);
    assert_eq!(sse.next_event().await.data["all"], true);

    let created = app.create_product(product("authorized")).await;
    assert_eq!(ws.next_change().await["product"], created);
    assert_eq!(sse.next_event().await.data["product"], created);
}

/// Reads until nothing arrives for `quiet`: the changes as (product, seq), and how many were
/// marked conflated.
async fn drain(client: &mut WsClient, quiet: Duration) -> (Vec<(i64, u64)>, usize) {
    let mut changes = Vec::new();
    let mut conflated = 0;
    while let Some(message) = client.try_next_json(quiet).await {
        assert_ne!(message["type"], "reset", "{message}");
        if message["type"] == "change" {
            changes.push((
                message["product"]["productId"].as_i64().unwrap(),
                message["seq"].as_u64().unwrap(),
            ));
            conflated += usize::from(message["conflated"] == true);
        }
    }
    (changes, conflated)
}

#[tokio::test]
async fn all_subscribers_that_stop_reading_are_conflated_unless_they_asked_for_every_version() {
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "16",
        "--heartbeat-interval",
        "120s",
        "--conflate-after",
        "3s",
    ])
    .await;
    for n in 0..4 {
        let mut body = product(&format!("p{n}"));
        // ~16 KB per change: more than the kernel buffers of a client that stops reading.
        body["productName"] = json!("w".repeat(16_000));
        app.create_product(body).await;
    }
    let mut prompt = WsClient::connect(&app.ws_url).await;
    let prompt_start = subscribe_all(&mut prompt, json!({})).await;
    let prompt = tokio::spawn(async move { drain(&mut prompt, Duration::from_secs(3)).await });
    let mut latest = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    let latest_start = subscribe_all(&mut latest, json!({})).await;
    let mut every = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    let every_start = subscribe_all(&mut every, json!({"delivery": "all"})).await;

    let mut writers = Vec::new();
    for writer in 0..4_i64 {
        let pool = app.pool.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..60_i64 {
                crate::support::add_one_unit(&pool, 1 + (writer + n) % 4).await;
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let last = all_committed(&app.pool, 0).await.last().unwrap().1;
    crate::support::wait_until(
        Duration::from_secs(20),
        "every change published",
        || async { app.stats().await["lastSeq"] == json!(last) },
    )
    .await;
    let (changes, conflated) = prompt.await.unwrap();
    assert_eq!(conflated, 0, "a prompt reader is never conflated");
    assert_eq!(changes, all_committed(&app.pool, prompt_start).await);

    // Past the threshold: the two that stopped reading had stopped.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let (changes, conflated) = drain(&mut every, Duration::from_secs(2)).await;
    assert_eq!(conflated, 0);
    assert_eq!(changes, all_committed(&app.pool, every_start).await);
    let (changes, conflated) = drain(&mut latest, Duration::from_secs(2)).await;
    let all = all_committed(&app.pool, latest_start).await;
    assert!(conflated > 0, "skipped versions are announced");
    assert!(
        changes.len() < all.len(),
        "{} of {}",
        changes.len(),
        all.len()
    );
    assert!(
        changes.windows(2).all(|pair| pair[0].1 < pair[1].1),
        "in seq order"
    );
    for id in 1..=4 {
        let newest = all.iter().rev().find(|(product, _)| *product == id);
        let got = changes.iter().rev().find(|(product, _)| *product == id);
        assert_eq!(got, newest, "product {id} ends on its newest version");
    }
}

#[tokio::test]
async fn a_subscribe_all_resuming_from_pruned_history_gets_a_reset_and_a_paged_snapshot() {
    let app = spawn_app().await;
    for name in ["a", "b", "c", "d", "e"] {
        app.create_product(product(name)).await;
    }
    // What retention does: announce the cut, then delete up to it.
    let last = all_committed(&app.pool, 0).await.last().unwrap().1;
    let cut = i64::try_from(last).unwrap() - 1;
    sqlx::query("UPDATE changelog_horizon SET pruned_through = $1")
        .bind(cut)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM product_changes WHERE seq <= $1")
        .bind(cut)
        .execute(&app.pool)
        .await
        .unwrap();

    let mut client = WsClient::connect(&app.ws_url).await;
    client
        .send_json(&json!({"command": "subscribe", "all": true, "since": 1}))
        .await;
    let reset = client.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["all"], true);
    assert_eq!(reset["reason"], "pruned");
    assert_eq!(reset["prunedThrough"], cut);
    assert!(reset.get("productIDs").is_none());
    let ack = client.next_json().await;
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["all"], true);
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["seq"], ack["seq"]);
    assert_eq!(snapshot["more"], false);
    assert_eq!(snapshot["products"].as_array().unwrap().len(), 5);
    app.patch_product(3, json!({"unitsAvailable": 1})).await;
    let change = client.next_change().await;
    assert!(change["seq"].as_u64() > ack["seq"].as_u64());
}
