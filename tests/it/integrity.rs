//! Integrity of the change stream against hostile database roles and unlucky operators:
//! notifications cannot forge or black-hole changes, any role allowed to write products triggers
//! pushes, key changes and TRUNCATE are announced, and every gap the changelog cannot fill
//! (pruned during an outage or a replay, a rewound database) ends in `reset` + snapshot.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::support::{
    TestApp, WsClient, commit_updates_one_by_one, committed_changes, product, products_in_table,
    spawn_app, spawn_app_with, terminate_listener, url_for_database, wait_until,
};

/// A login role for the test's database, dropped again by `drop_role`.
async fn create_role(app: &TestApp, grants: &str) -> (String, PgPool) {
    let role = format!("rowcast_role_{:016x}", rand::random::<u64>());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(&app.pool)
        .await
        .unwrap();
    if !grants.is_empty() {
        sqlx::query(&format!("GRANT {grants} ON products TO {role}"))
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let options = PgConnectOptions::from_str(&app.database_url)
        .unwrap()
        .username(&role);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap();
    (role, pool)
}

async fn drop_role(app: &TestApp, role: &str, pool: PgPool) {
    pool.close().await;
    sqlx::query(&format!("DROP OWNED BY {role}"))
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(&app.pool)
        .await
        .unwrap();
}

async fn max_seq(db: impl sqlx::PgExecutor<'_>) -> i64 {
    sqlx::query_scalar("SELECT coalesce(max(seq), 0) FROM product_changes")
        .fetch_one(db)
        .await
        .unwrap()
}

/// Applies one server message to a client's view of its products; returns the message type.
fn apply(state: &mut BTreeMap<i64, Value>, message: &Value) -> String {
    match message["type"].as_str().unwrap() {
        "change" => {
            let id = message["product"]["productId"].as_i64().unwrap();
            if message["action"] == "DELETE" {
                state.remove(&id);
            } else {
                state.insert(id, message["product"].clone());
            }
        }
        "snapshot" => {
            for missing in message["missing"].as_array().unwrap() {
                state.remove(&missing.as_i64().unwrap());
            }
            for product in message["products"].as_array().unwrap() {
                state.insert(product["productId"].as_i64().unwrap(), product.clone());
            }
        }
        _ => {}
    }
    message["type"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn forged_notifications_change_nothing_and_any_role_allowed_to_write_triggers_pushes() {
    let app = spawn_app().await;
    let id = app.create_product(product("Genuine")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    let last = max_seq(&app.pool).await;

    let (forger, forger_pool) = create_role(&app, "").await;
    let fake = json!({"productId": id, "manufacturer": "Evil", "pricePerUnit": "0.01", "unitsAvailable": 1, "productName": "Forged"});
    for payload in [
        json!({"seq": last + 1, "action": "UPDATE", "product": fake}).to_string(),
        json!({"seq": last, "action": "UPDATE", "product": fake}).to_string(),
        json!({"seq": last - 1, "action": "UPDATE", "productId": id}).to_string(),
        json!({"seq": last + 1, "action": "UPDATE", "productId": id}).to_string(),
        json!({"seq": 9_000_000_000_000_000_000_u64, "action": "UPDATE", "productId": id})
            .to_string(),
        json!({"seq": -5, "action": "DELETE", "productId": id}).to_string(),
        "\u{1}garbage{".to_owned(),
    ] {
        sqlx::query("SELECT pg_notify('product_change', $1)")
            .bind(payload)
            .execute(&forger_pool)
            .await
            .unwrap();
    }
    let forged_history =
        sqlx::query("INSERT INTO product_changes VALUES (999, 1, 'UPDATE', '{}', now(), 2)")
            .execute(&forger_pool)
            .await;
    assert!(
        forged_history.is_err(),
        "only the trigger writes the changelog"
    );
    client.expect_silence(Duration::from_millis(500)).await;

    // The real change that gets the seq a forger named is delivered, and so is every later one.
    app.patch_product(id, json!({"unitsAvailable": 41})).await;
    let change = client.next_change().await;
    assert_eq!(change["seq"], last + 1);
    assert_eq!(change["product"]["manufacturer"], "Acme");
    assert_eq!(change["product"]["unitsAvailable"], 41);
    let ready = app
        .http
        .get(format!("{}/readyz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(app.stats().await["lastSeq"], last + 1);
    drop_role(&app, &forger, forger_pool).await;

    // An application role with plain table rights (no changelog, no sequence) writes with SQL.
    let (writer, writer_pool) = create_role(&app, "SELECT, INSERT, UPDATE, DELETE").await;
    sqlx::query("UPDATE products SET units_available = 42 WHERE product_id = $1")
        .bind(id)
        .execute(&writer_pool)
        .await
        .unwrap();
    let change = client.next_change().await;
    assert_eq!(change["seq"], last + 2);
    assert_eq!(change["product"]["unitsAvailable"], 42);
    drop_role(&app, &writer, writer_pool).await;
}

#[tokio::test]
async fn key_changes_and_truncate_are_announced_to_subscribers_of_every_id_involved() {
    let app = spawn_app().await;
    let a = app.create_product(product("A")).await["productId"]
        .as_i64()
        .unwrap();
    let b = app.create_product(product("B")).await["productId"]
        .as_i64()
        .unwrap();
    let mut old_id = WsClient::connect(&app.ws_url).await;
    old_id.subscribe(&[a]).await;
    let mut new_id = WsClient::connect(&app.ws_url).await;
    new_id.subscribe(&[1000, b]).await;

    sqlx::query("UPDATE products SET product_id = 1000 WHERE product_id = $1")
        .bind(a)
        .execute(&app.pool)
        .await
        .unwrap();
    let gone = old_id.next_change().await;
    assert_eq!(
        (
            gone["action"].as_str(),
            gone["product"]["productId"].as_i64()
        ),
        (Some("DELETE"), Some(a))
    );
    let appeared = new_id.next_change().await;
    assert_eq!(
        (
            appeared["action"].as_str(),
            appeared["product"]["productId"].as_i64()
        ),
        (Some("INSERT"), Some(1000))
    );
    assert_eq!(
        appeared["seq"].as_u64(),
        gone["seq"].as_u64().map(|seq| seq + 1)
    );

    sqlx::query("TRUNCATE products")
        .execute(&app.pool)
        .await
        .unwrap();
    let first = new_id.next_change().await;
    let second = new_id.next_change().await;
    assert_eq!(
        [&first, &second].map(|c| (
            c["action"].as_str().unwrap().to_owned(),
            c["product"]["productId"].as_i64().unwrap()
        )),
        [("DELETE".to_owned(), b), ("DELETE".to_owned(), 1000)]
    );
    old_id.expect_silence(Duration::from_millis(300)).await;
    // rowcast's own hints always name a seq.
    assert_eq!(app.stats().await["listener"]["payloadsSkipped"], 0);
}

#[tokio::test]
async fn a_listener_outage_longer_than_retention_ends_in_reset_and_a_snapshot() {
    let app = spawn_app().await;
    let id = app.create_product(product("Outage")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    let database: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    // Keep the listener out (the test's own connection stays), write, and prune as retention
    // would, all before it can come back. (A database's connections are switched off from
    // another database.)
    let mut writer = app.pool.acquire().await.unwrap();
    let admin = PgPool::connect(&url_for_database(&app.database_url, "postgres"))
        .await
        .unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
    ))
    .execute(&admin)
    .await
    .unwrap();
    terminate_listener(&mut *writer).await;
    for units in 0..30 {
        sqlx::query("UPDATE products SET units_available = $2 WHERE product_id = $1")
            .bind(id)
            .bind(units)
            .execute(&mut *writer)
            .await
            .unwrap();
    }
    let cut = max_seq(&mut *writer).await - 5;
    sqlx::query("UPDATE changelog_horizon SET pruned_through = $1")
        .bind(cut)
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::query("DELETE FROM product_changes WHERE seq <= $1")
        .bind(cut)
        .execute(&mut *writer)
        .await
        .unwrap();
    sqlx::query(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    drop(writer);

    let mut state = products_in_table(&app.pool, &[id]).await;
    state.clear();
    let reset = client.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "pruned");
    assert_eq!(reset["prunedThrough"], cut);
    let position = client.expect_ack(&[id]).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["seq"], position);
    apply(&mut state, &snapshot);
    assert_eq!(state, products_in_table(&app.pool, &[id]).await);
    app.patch_product(id, json!({"unitsAvailable": 500})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 500);
    let stats = app.stats().await;
    assert_eq!(stats["resets"], 1, "{stats}");
}

#[tokio::test]
async fn pruning_that_overtakes_a_clients_replay_ends_in_reset_and_a_snapshot() {
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "16",
        "--changelog-max-rows",
        "50",
        "--changelog-prune-interval",
        "100ms",
        "--heartbeat-interval",
        "120s",
    ])
    .await;
    // 64 KB per change (25 MB in all): more than the kernel buffers of a client that does not
    // read can hold, so its queue overflows into a gap that retention then overtakes.
    let id = app.create_heavy_product(64_000).await;
    let mut sleeper = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    sleeper.subscribe(&[id]).await;
    // Far more than the socket buffers, the queue (16) and retention (50) hold.
    commit_updates_one_by_one(&app.pool, 400).await;
    let last = max_seq(&app.pool).await;
    wait_until(Duration::from_secs(10), "published and pruned", || async {
        let stats = app.stats().await;
        let pruned: i64 = sqlx::query_scalar("SELECT pruned_through FROM changelog_horizon")
            .fetch_one(&app.pool)
            .await
            .unwrap();
        stats["lastSeq"] == json!(last) && pruned > last - 60
    })
    .await;
    let stats = app.stats().await;
    assert!(
        stats["changesDeferred"].as_u64() > Some(0),
        "the queue overflowed: {stats}"
    );

    let mut state = BTreeMap::new();
    let mut kinds = Vec::new();
    while let Some(message) = sleeper.try_next_json(Duration::from_millis(1000)).await {
        kinds.push(apply(&mut state, &message));
        if message["type"] == "reset" {
            assert_eq!(message["reason"], "pruned", "{message}");
        }
    }
    assert!(
        kinds.iter().any(|kind| kind == "reset"),
        "announced: {kinds:?}"
    );
    assert_eq!(
        state,
        products_in_table(&app.pool, &[id]).await,
        "converged to the table"
    );
}

#[tokio::test]
async fn a_rewound_database_resets_subscribers_and_resuming_clients_within_the_health_interval() {
    let app = spawn_app_with(&["--listener-health-interval", "300ms"]).await;
    let id = app.create_product(product("Rewound")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    let mut sse = crate::support::SseClient::connect(
        &format!("{}/products/events?ids={id}", app.base_url),
        None,
    )
    .await;
    assert_eq!(sse.next_event().await.data["type"], "subscribed");
    let before = max_seq(&app.pool).await;
    for units in 1..=5 {
        app.patch_product(id, json!({"unitsAvailable": units}))
            .await;
        client.next_change().await;
    }
    let ahead = max_seq(&app.pool).await;
    // A restore from an older backup: the changelog and its sequence go back, the row too.
    let started = std::time::Instant::now();
    sqlx::query("DELETE FROM product_changes WHERE seq > $1")
        .bind(before)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("SELECT setval('product_change_seq', $1)")
        .bind(before)
        .execute(&app.pool)
        .await
        .unwrap();
    let reset = client.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    assert_eq!(reset["reason"], "rewound");
    assert_eq!(reset["since"], ahead);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "noticed in {:?}",
        started.elapsed()
    );
    let position = client.expect_ack(&[id]).await;
    assert_eq!(position, u64::try_from(before).unwrap());
    assert_eq!(client.next_json().await["type"], "snapshot");
    // The same on SSE: after the five changes, the reset and a fresh start.
    let mut events = Vec::new();
    while events.last() != Some(&json!("snapshot")) {
        events.push(sse.next_event().await.data["type"].clone());
    }
    assert_eq!(
        events,
        [
            json!("change"),
            json!("change"),
            json!("change"),
            json!("change"),
            json!("change"),
            json!("reset"),
            json!("subscribed"),
            json!("snapshot")
        ]
    );

    // Later changes flow, with the database's seqs.
    app.patch_product(id, json!({"unitsAvailable": 77})).await;
    let change = client.next_change().await;
    assert_eq!(change["seq"], before + 1);
    assert_eq!(change["product"]["unitsAvailable"], 77);

    // A client resuming from the old history's position is told too.
    let mut resumer = WsClient::connect(&app.ws_url).await;
    resumer
        .send_json(&json!({"command": "subscribe", "productIDs": [id], "since": ahead}))
        .await;
    let reset = resumer.next_json().await;
    assert_eq!(
        (reset["type"].as_str(), reset["reason"].as_str()),
        (Some("reset"), Some("rewound")),
        "{reset}"
    );
    resumer.expect_ack(&[id]).await;
    let snapshot = resumer.next_json().await;
    assert_eq!(snapshot["products"][0]["unitsAvailable"], 77);

    // A rewound history that already grew past the old position is caught by its first read.
    let now = max_seq(&app.pool).await;
    sqlx::query("DELETE FROM product_changes WHERE seq > $1")
        .bind(now - 1)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query("SELECT setval('product_change_seq', $1)")
        .bind(now - 1)
        .execute(&app.pool)
        .await
        .unwrap();
    sqlx::query(
        "DO $$ BEGIN FOR i IN 1..3 LOOP
             UPDATE products SET units_available = 900 + i WHERE product_id = (SELECT min(product_id) FROM products);
         END LOOP; END $$",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let mut state = BTreeMap::new();
    let mut kinds = Vec::new();
    while let Some(message) = client.try_next_json(Duration::from_millis(1500)).await {
        kinds.push(apply(&mut state, &message));
    }
    assert!(kinds.iter().any(|kind| kind == "reset"), "{kinds:?}");
    assert_eq!(state, products_in_table(&app.pool, &[id]).await);
    assert_eq!(app.stats().await["resets"], 2);
}

#[tokio::test]
async fn a_catch_up_that_keeps_failing_backs_off_instead_of_storming() {
    let app = spawn_app_with(&[
        "--listener-max-backoff",
        "1s",
        "--listener-health-interval",
        "1s",
    ])
    .await;
    sqlx::query("ALTER TABLE product_changes RENAME TO product_changes_away")
        .execute(&app.pool)
        .await
        .unwrap();
    terminate_listener(&app.pool).await;
    wait_until(Duration::from_secs(5), "the first failure", || async {
        app.stats().await["listener"]["failedAttempts"].as_u64() >= Some(1)
    })
    .await;
    let first = app.stats().await["listener"]["reconnects"]
        .as_u64()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let listener = app.stats().await["listener"].clone();
    let attempts = listener["reconnects"].as_u64().unwrap() - first;
    // 0.2 + 0.4 + 0.8 + 1 + 1 + 1 s (±25 % jitter): about 6 in 5 s; a reset backoff would
    // retry every ~100 ms (about 50).
    assert!(
        (3..=9).contains(&attempts),
        "{attempts} attempts in 5 s: {listener}"
    );
    assert!(listener["failedAttempts"].as_u64() >= Some(4), "{listener}");
    assert_eq!(listener["connected"], false);
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("rowcast_listener_failed_attempts"),
        "{metrics}"
    );

    sqlx::query("ALTER TABLE product_changes_away RENAME TO product_changes")
        .execute(&app.pool)
        .await
        .unwrap();
    app.wait_for_listener().await;
    assert_eq!(app.stats().await["listener"]["failedAttempts"], 0);
}

/// Reads every message until `quiet` passes without one; returns the changes as (product, seq)
/// and how many were marked conflated.
async fn drain_changes(client: &mut WsClient, quiet: Duration) -> (Vec<(i64, u64)>, usize) {
    let mut changes = Vec::new();
    let mut conflated = 0;
    while let Some(message) = client.try_next_json(quiet).await {
        assert_ne!(message["type"], "reset", "{message}");
        if message["type"] == "change" {
            changes.push((
                message["product"]["productId"].as_i64().unwrap(),
                message["seq"].as_u64().unwrap(),
            ));
            if message["conflated"] == json!(true) {
                conflated += 1;
            }
        }
    }
    (changes, conflated)
}

#[tokio::test]
async fn only_clients_that_stop_reading_are_conflated_even_through_a_listener_outage() {
    // A reader slowed down by a busy machine must not pass for one that stopped: the test gives
    // the threshold room, and the two that stop reading wait past it.
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "16",
        "--heartbeat-interval",
        "120s",
        "--conflate-after",
        "4s",
    ])
    .await;
    let mut ids = Vec::new();
    for n in 0..4 {
        let mut body = product(&format!("p{n}"));
        // ~16 KB per change (15 MB in all): more than the kernel buffers of a client that stops
        // reading, so its queue overflows.
        body["productName"] = json!("w".repeat(16_000));
        ids.push(
            app.create_product(body).await["productId"]
                .as_i64()
                .unwrap(),
        );
    }
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut client = WsClient::connect(&app.ws_url).await;
        let position = client.subscribe(&ids).await;
        readers.push(tokio::spawn(async move {
            let drained = drain_changes(&mut client, Duration::from_secs(3)).await;
            (position, drained)
        }));
    }
    let mut latest = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    let latest_position = latest.subscribe(&ids).await;
    let mut every = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    every
        .send_json(&json!({"command": "subscribe", "productIDs": ids, "delivery": "all"}))
        .await;
    let every_position = every.expect_ack(&ids).await;

    let mut writers = Vec::new();
    for writer in 0..8_i64 {
        let pool = app.pool.clone();
        let ids = ids.clone();
        writers.push(tokio::spawn(async move {
            for n in 0..120_i64 {
                let id = ids[usize::try_from((writer + n) % 4).unwrap()];
                crate::support::add_one_unit(&pool, id).await;
            }
        }));
    }
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        terminate_listener(&app.pool).await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let last = max_seq(&app.pool).await;
    wait_until(
        Duration::from_secs(20),
        "every change published",
        || async { app.stats().await["lastSeq"] == json!(last) },
    )
    .await;
    let stats = app.stats().await;
    assert!(
        stats["listener"]["reconnects"].as_u64() >= Some(1),
        "{stats}"
    );
    assert!(
        stats["changesDeferred"].as_u64() > Some(0),
        "queues overflowed: {stats}"
    );

    for reader in readers {
        let (position, (changes, conflated)) = reader.await.unwrap();
        assert_eq!(conflated, 0, "a prompt reader is never conflated");
        assert_eq!(
            changes,
            committed_changes(&app.pool, &ids, position).await,
            "a prompt reader gets every version, in order"
        );
    }
    // The two that stopped reading: well past the conflation threshold.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let (changes, conflated) = drain_changes(&mut every, Duration::from_secs(2)).await;
    assert_eq!(conflated, 0);
    assert_eq!(
        changes,
        committed_changes(&app.pool, &ids, every_position).await,
        "\"delivery\":\"all\" gets every version after it reads again"
    );
    let (changes, conflated) = drain_changes(&mut latest, Duration::from_secs(2)).await;
    let all = committed_changes(&app.pool, &ids, latest_position).await;
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
    for id in &ids {
        let newest = all.iter().rev().find(|(product, _)| product == id);
        let got = changes.iter().rev().find(|(product, _)| product == id);
        assert_eq!(got, newest, "product {id} ends on its newest version");
    }
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_backlog_of_large_rows_is_caught_up_in_order_in_bounded_memory_and_linear_reads() {
    use crate::support::process::{free_port, rowcast, wait_until_serving};
    const ROWS: i64 = 300;
    const NAME_BYTES: usize = 400_000;
    let test_database = crate::support::TestDatabase::create().await;
    let (database, url) = (test_database.name.clone(), test_database.url.clone());
    let port = free_port();
    let mut child = rowcast(port).env("DATABASE_URL", &url).spawn().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    wait_until_serving(&mut child, &http, &format!("{base}/healthz")).await;
    let pid = child.id().unwrap();
    let created: Value = http
        .post(format!("{base}/products"))
        .json(&product("Large"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["productId"].as_i64().unwrap();
    let stats = || async { crate::support::get_json(&http, &format!("{base}/stats")).await };
    // Subscribe after the INSERT went through, so the stream starts with the first UPDATE.
    wait_until(Duration::from_secs(10), "the INSERT published", || async {
        stats().await["lastSeq"] == json!(1)
    })
    .await;
    let mut client = WsClient::connect(&format!("ws://127.0.0.1:{port}/websocket")).await;
    client.subscribe(&[id]).await;
    let baseline = peak_rss_kib(pid);

    let pool = PgPool::connect(&url).await.unwrap();
    let admin = PgPool::connect(&url_for_database(&url, "postgres"))
        .await
        .unwrap();
    let mut writer = pool.acquire().await.unwrap();
    sqlx::query(&format!(
        "ALTER DATABASE {database} ALLOW_CONNECTIONS false"
    ))
    .execute(&admin)
    .await
    .unwrap();
    terminate_listener(&mut *writer).await;
    // 300 commits of a 400 KB name (120 MB of changes) while the listener is away.
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN FOR i IN 1..{ROWS} LOOP
             UPDATE products SET product_name = repeat(chr(65 + i % 26), {NAME_BYTES}),
                                 units_available = i
             WHERE product_id = {id};
             COMMIT;
         END LOOP; END $$"
    ))
    .execute(&mut *writer)
    .await
    .unwrap();
    let before = stats().await["listener"].clone();
    let reads_before = before["changelogReads"].as_u64().unwrap();
    sqlx::query(&format!("ALTER DATABASE {database} ALLOW_CONNECTIONS true"))
        .execute(&admin)
        .await
        .unwrap();
    drop(writer);

    for units in 1..=ROWS {
        let change = client.next_change().await;
        assert_eq!(
            change["product"]["unitsAvailable"], units,
            "every change, in order"
        );
        assert_eq!(
            change["product"]["productName"].as_str().unwrap().len(),
            NAME_BYTES
        );
    }
    let after = stats().await["listener"].clone();
    let reads = after["changelogReads"].as_u64().unwrap() - reads_before;
    // Every change read is counted once, by what woke the read (an early return used to skip
    // the count).
    let counted = |listener: &Value| {
        listener["changesReadFromChangelog"].as_u64().unwrap()
            + listener["changesReceived"].as_u64().unwrap()
    };
    assert_eq!(
        counted(&after) - counted(&before),
        u64::try_from(ROWS).unwrap()
    );
    let growth_mib = (peak_rss_kib(pid) - baseline) / 1024;
    eprintln!("large-row catch-up: {reads} changelog reads, peak RSS +{growth_mib} MiB");
    // Pages hold 4 MiB (11 of these rows): ~28 reads; a few more for health ticks and retries.
    assert!(reads <= 40, "reads grow linearly with the backlog: {reads}");
    // 120 MB went through; what is held at once is a page and a queue's byte budget.
    assert!(growth_mib <= 60, "peak RSS grew by {growth_mib} MiB");
    child.kill().await.unwrap();
    pool.close().await;
    admin.close().await;
}
