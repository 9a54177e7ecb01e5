//! `--source replication`: what only the WAL reader can get wrong — a walsender killed
//! mid-stream and a PostgreSQL restart (nothing lost, nothing doubled), a slot that must keep
//! advancing while only other tables are written, a lost slot (a reset, never silence), slot
//! metrics, and `rowcast replication drop`. The delivery guarantees themselves run against both
//! sources in `delivery` (`both_sources!`).

use std::time::Duration;

use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::support::faults::PrivateCluster;
use crate::support::scenario::{self, Scenario, Writes};
use crate::support::{TestApp, WsClient, product, spawn_app_with, spawn_instance, wait_until};

const REPLICATION: [&str; 2] = ["--source", "replication"];

/// The slot's confirmed position, as a number.
async fn confirmed_flush(pool: &PgPool) -> u64 {
    let lsn: String = sqlx::query_scalar(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots
         WHERE database = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    rowcast::db::replication::parse_lsn(&lsn).unwrap()
}

/// Ends the walsender that streams to rowcast's reader; returns how many were ended.
async fn terminate_walsender(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots
         WHERE database = current_database() AND active_pid IS NOT NULL",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_a_killed_walsender_and_a_postgres_restart_lose_and_double_nothing() {
    walsender_killed_then_postgres_crashes(&[]).await;
}

/// With `--replication-commit async` the crash may take the newest changelog batches with it:
/// then every listener sees the rewound changelog and resets its subscribers, whose state after
/// the snapshot must match the table, with nothing missing, doubled or out of order after it.
/// Confirmations wait for the flush, so the changes of a lost batch are decoded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_unflushed_batches_and_a_postgres_crash_reset_or_lose_nothing() {
    walsender_killed_then_postgres_crashes(&["--replication-commit", "async"]).await;
}

async fn walsender_killed_then_postgres_crashes(commit: &[&str]) {
    let cluster = PrivateCluster::start().await;
    let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE rowcast_repl")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = cluster.url("rowcast_repl");
    let flags = [
        "--source",
        "replication",
        "--slow-client-policy",
        "disconnect",
        "--outbox-capacity",
        "512",
        "--listener-max-backoff",
        "1s",
    ];
    let flags = [&flags[..], commit].concat();
    let one = spawn_instance(&url, &flags).await;
    let two = spawn_instance(&url, &flags).await;
    let direct = PgPoolOptions::new()
        .max_connections(12)
        .acquire_timeout(Duration::from_secs(3))
        .connect(&url)
        .await
        .unwrap();
    let mut scenario = Scenario::new(
        scenario::seed(),
        Writes::Mixed {
            warmup: Duration::from_secs(2),
            settle: Duration::from_secs(4),
        },
    );
    scenario.stayers = 2;
    let urls = [one.ws_url.clone(), two.ws_url.clone()];
    let outcome = scenario::run(&one, &urls, &direct, &scenario, async {
        let killed = terminate_walsender(&direct).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let took = cluster.restart_immediate().await;
        format!("terminated {killed} walsender(s), then restarted PostgreSQL in {took:.1?}")
    })
    .await;
    outcome.assert_exact();
    drop((one, two));
    drop(cluster);
}

#[tokio::test]
async fn replication_the_slot_advances_while_only_other_tables_are_written() {
    slot_advances_while_only_other_tables_are_written(&REPLICATION).await;
}

/// With `--replication-commit async`, confirmations held for a batch's flush are released: a
/// product change first (an unflushed batch), then only other tables, and the slot keeps up.
#[tokio::test]
async fn replication_with_unflushed_batches_the_slot_still_advances() {
    slot_advances_while_only_other_tables_are_written(&[
        "--source",
        "replication",
        "--replication-commit",
        "async",
    ])
    .await;
}

async fn slot_advances_while_only_other_tables_are_written(flags: &[&str]) {
    let app = spawn_app_with(flags).await;
    app.create_product(product("Batch")).await;
    sqlx::query("CREATE TABLE unrelated (n bigint)")
        .execute(&app.pool)
        .await
        .unwrap();
    let before = confirmed_flush(&app.pool).await;
    for n in 0..200_i64 {
        sqlx::query("INSERT INTO unrelated VALUES ($1)")
            .bind(n)
            .execute(&app.pool)
            .await
            .unwrap();
    }
    let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let written = rowcast::db::replication::parse_lsn(&written).unwrap();
    assert!(written > before);
    wait_until(
        Duration::from_secs(15),
        "the slot confirming WAL of other tables",
        || async { confirmed_flush(&app.pool).await >= written },
    )
    .await;
    let metrics = app.metrics_text().await;
    for name in [
        "rowcast_replication_leader 1",
        "rowcast_replication_slot_lag_bytes",
        "rowcast_replication_slot_retained_wal_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test]
async fn replication_a_lost_slot_resets_subscribers_and_streaming_resumes_on_a_new_one() {
    let app = spawn_app_with(&REPLICATION).await;
    let id = app.create_product(product("Kept")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    // Drop the slot under the reader (it reconnects quickly, so retry until the drop wins).
    wait_until(Duration::from_secs(20), "dropping the slot", || async {
        terminate_walsender(&app.pool).await;
        sqlx::query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
             WHERE database = current_database()",
        )
        .execute(&app.pool)
        .await
        .is_ok()
    })
    .await;
    let reset = client.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    client.expect_ack(&[id]).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    app.wait_for_replication().await;
    app.patch_product(id, json!({"unitsAvailable": 42})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 42);
    let slots: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(slots, 1, "a new slot replaced the lost one");
}

#[tokio::test]
async fn replication_drop_hands_the_changelog_back_to_the_trigger() {
    let mut app = spawn_app_with(&REPLICATION).await;
    let url = app.database_url.clone();
    // A notify instance on a database the reader writes is refused, saying what to do.
    let cli = <rowcast::config::Cli as clap::Parser>::try_parse_from([
        "rowcast",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &url,
    ])
    .unwrap();
    let refused = rowcast::App::build(cli.config, rowcast::shutdown::Shutdown::new())
        .await
        .unwrap_err();
    assert!(
        format!("{refused:#}").contains("replication drop"),
        "{refused:#}"
    );
    app.stop().await;

    let cli = <rowcast::config::Cli as clap::Parser>::try_parse_from([
        "rowcast",
        "--database-url",
        &url,
        "replication",
        "drop",
    ])
    .unwrap();
    rowcast::app::replication_drop(&cli.config).await.unwrap();
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database())
              + (SELECT count(*) FROM pg_publication)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(leftovers, 0, "slot and publication are gone");

    let notify = spawn_instance(&url, &[]).await;
    let id = notify.create_product(product("Back")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&notify.ws_url).await;
    client.subscribe(&[id]).await;
    notify.patch_product(id, json!({"unitsAvailable": 7})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_a_slot_invalidated_by_max_slot_wal_keep_size_ends_in_reset_not_silence() {
    let cluster = PrivateCluster::start_with(&[("max_slot_wal_keep_size", "1MB")]).await;
    let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE rowcast_lost")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let url = cluster.url("rowcast_lost");
    let mut first = spawn_instance(&url, &REPLICATION).await;
    let id = first.create_product(product("Lost")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&first.ws_url).await;
    let position = client.subscribe(&[id]).await;
    drop(client);
    first.stop().await;

    // With no reader, a change is committed and the server removes WAL the slot still needs.
    let pool = PgPool::connect(&url).await.unwrap();
    crate::support::add_one_unit(&pool, id).await;
    for _ in 0..4 {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS filler (n bigint); INSERT INTO filler VALUES (1)",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::query("SELECT pg_switch_wal()")
            .execute(&pool)
            .await
            .unwrap();
    }
    sqlx::query("CHECKPOINT").execute(&pool).await.unwrap();
    let status: Option<String> = sqlx::query_scalar(
        "SELECT wal_status FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(status.as_deref(), Some("lost"), "the slot was invalidated");

    // The next reader replaces the slot and announces the gap: a resume from before it is a reset.
    let second = spawn_instance(&url, &REPLICATION).await;
    let mut client = WsClient::connect(&second.ws_url).await;
    client
        .send_json(&json!({"command": "subscribe", "productIDs": [id], "since": position}))
        .await;
    // Either the resume itself is answered with a reset (the reader announced the gap first) or
    // it is acknowledged and the reset follows once the reader has; never silence.
    let mut reset = client.next_json().await;
    if reset["type"] == "subscribed" {
        reset = client.next_json().await;
    }
    assert_eq!(reset["type"], "reset", "{reset}");
    client.expect_ack(&[id]).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["products"][0]["unitsAvailable"], 11, "{snapshot}");
    second.patch_product(id, json!({"unitsAvailable": 3})).await;
    // The instance's listener may re-base on the same gap after the resume did: a second reset
    // (and snapshot) is redundant but allowed; the change then arrives.
    let change = loop {
        let message = client.next_json().await;
        match message["type"].as_str() {
            Some("change") => break message,
            Some("reset" | "subscribed" | "snapshot") => {}
            _ => panic!("unexpected {message}"),
        }
    };
    assert_eq!(change["product"]["unitsAvailable"], 3);
    let status: Option<String> = sqlx::query_scalar(
        "SELECT wal_status FROM pg_replication_slots WHERE database = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_ne!(status.as_deref(), Some("lost"), "a new slot replaced it");
    drop((first, second, client, pool));
    drop(cluster);
}

#[tokio::test]
async fn replication_a_truncate_reaches_subscribers_as_a_reset_and_an_empty_snapshot() {
    let app = spawn_app_with(&REPLICATION).await;
    let id = app.create_product(product("Gone")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    sqlx::query("TRUNCATE products")
        .execute(&app.pool)
        .await
        .unwrap();
    let reset = client.next_json().await;
    assert_eq!(reset["type"], "reset", "{reset}");
    client.expect_ack(&[id]).await;
    let snapshot = client.next_json().await;
    assert_eq!(snapshot["products"], json!([]), "{snapshot}");
    assert_eq!(snapshot["missing"], json!([id]), "{snapshot}");
}

#[tokio::test]
async fn replication_migrate_prepares_the_slot_and_the_switch_before_any_instance_runs() {
    let database = crate::support::TestDatabase::create().await;
    let cli = <rowcast::config::Cli as clap::Parser>::try_parse_from([
        "rowcast",
        "--database-url",
        &database.url,
        "--source",
        "replication",
        "migrate",
    ])
    .unwrap();
    rowcast::app::migrate_only(&cli.config).await.unwrap();
    let pool = PgPool::connect(&database.url).await.unwrap();
    let (slots, publications, source): (i64, i64, String) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM pg_replication_slots WHERE database = current_database()),
                (SELECT count(*) FROM pg_publication),
                (SELECT source FROM changelog_source)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (slots, publications, source.as_str()),
        (1, 1, "replication")
    );
    // Written before any reader ran: in the slot, so delivered once one does.
    sqlx::query(
        "INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
         VALUES (5, 'Acme', '1', 1, 'Early')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let app = spawn_instance(&database.url, &REPLICATION).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client
        .send_json(&json!({"command": "subscribe", "productIDs": [5], "since": 0}))
        .await;
    client.expect_ack(&[5]).await;
    let change = client.next_change().await;
    assert_eq!(change["product"]["productName"], "Early", "{change}");
    drop((client, app, pool));
}

/// The leading instance publishes its reader's batches as they are handed over, without reading
/// them back — in a database whose TimeZone is not UTC (the reader's session is not sqlx's, which
/// sets UTC), where a commit time handed over as other text than the changelog's reads give
/// would look like a rewound history at the next health tick and reset every subscriber.
#[tokio::test]
async fn replication_the_leader_publishes_its_own_batches_without_reading_them_back() {
    let (app, id) = leader_with_product("300ms").await;
    sqlx::raw_sql(
        "DO $$ BEGIN
             EXECUTE format('ALTER DATABASE %I SET TimeZone = %L', current_database(),
                            'Asia/Kolkata');
         END $$",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    // The reader's next session starts in that TimeZone.
    let leader_pid = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity
             WHERE application_name = 'rowcast-replication' AND datname = current_database()",
        )
        .fetch_optional(&app.pool)
        .await
        .unwrap()
    };
    let old = leader_pid().await.expect("the reader's session");
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(old)
        .execute(&app.pool)
        .await
        .unwrap();
    wait_until(Duration::from_secs(20), "a new leading session", || async {
        leader_pid().await.is_some_and(|pid| pid != old) && {
            let metrics = app.metrics_text().await;
            metrics.contains("rowcast_replication_leader 1")
        }
    })
    .await;
    // The leader's listener stops listening once its reader leads again.
    wait_for_listening(&app, false).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    let before = app.stats().await["listener"].clone();

    crate::support::commit_updates_one_by_one(&app.pool, 30).await;
    for units in 1..=30 {
        assert_eq!(
            client.next_change().await["product"]["unitsAvailable"],
            units
        );
    }
    // Several health ticks compare the last change's commit time with the changelog's.
    client.expect_silence(Duration::from_secs(1)).await;
    let after = app.stats().await["listener"].clone();
    let grew = |field: &str| after[field].as_u64().unwrap() - before[field].as_u64().unwrap();
    // A health tick's catch-up may read a change just before its hand-off arrives.
    assert!(
        grew("changesHandedOver") >= 20,
        "changes handed over by the reader: {after}"
    );
    assert_eq!(after["reconnects"], before["reconnects"], "{after}");
    assert_eq!(
        grew("notifications"),
        0,
        "the leader's own batches no longer wake its LISTEN connection: {after}"
    );
}

/// A replication instance alone on a new database (so its reader leads), with the listener's
/// health interval given, and one product.
async fn leader_with_product(health_interval: &str) -> (TestApp, i64) {
    let app = spawn_app_with(&[
        "--source",
        "replication",
        "--listener-health-interval",
        health_interval,
    ])
    .await;
    let id = app.create_product(product("Led")).await["productId"]
        .as_i64()
        .unwrap();
    (app, id)
}

/// Waits until the instance's listener is (or is not) LISTENing.
async fn wait_for_listening(app: &TestApp, listening: bool) {
    wait_until(
        Duration::from_secs(10),
        "the listener's LISTEN state",
        || async { app.stats().await["listener"]["listening"] == json!(listening) },
    )
    .await;
}

/// Whether this instance's reader leads, from its gauge.
async fn leads(app: &TestApp) -> bool {
    app.metrics_text()
        .await
        .contains("rowcast_replication_leader 1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_an_instance_whose_reader_stops_leading_listens_again_at_once() {
    // A long health interval on `a`: its health tick's catch-up cannot stand in for a LISTEN,
    // and its reader, once a follower, does not try to lead again during the test.
    let (a, id) = leader_with_product("60s").await;
    wait_until(Duration::from_secs(10), "a to lead", || leads(&a)).await;
    let b = spawn_instance(
        &a.database_url,
        &[
            "--source",
            "replication",
            "--listener-health-interval",
            "100ms",
        ],
    )
    .await;
    wait_for_listening(&a, false).await;
    let mut client = WsClient::connect(&a.ws_url).await;
    client.subscribe(&[id]).await;

    // Ending a's stream ends its leadership; b (trying every 100 ms) takes over before a's
    // reader retries (200 ms), or the next round ends a's again.
    wait_until(Duration::from_secs(30), "b to lead", || async {
        if leads(&b).await {
            return true;
        }
        if leads(&a).await {
            terminate_walsender(&a.pool).await;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        false
    })
    .await;
    wait_for_listening(&a, true).await;
    assert_eq!(b.stats().await["listener"]["listening"], json!(false));

    crate::support::commit_updates_one_by_one(&a.pool, 10).await;
    for units in 1..=10 {
        let change = client
            .try_next_json(Duration::from_secs(10))
            .await
            .expect("b's batches reach a's client long before a's next health tick");
        assert_eq!(change["type"], "change", "{change}");
        assert_eq!(change["product"]["unitsAvailable"], units, "{change}");
    }
    assert!(!leads(&a).await, "a took the lead back");
}
