//! The LISTEN connection, and the connection the listener reads the changelog on, come back by
//! themselves after either is killed, and nothing written in the meantime is lost.

use std::time::Duration;

use serde_json::json;

use crate::support::{WsClient, product, spawn_app, terminate_listener, wait_until};

#[tokio::test]
async fn changes_flow_again_after_the_listen_backend_is_terminated_and_none_are_lost() {
    let app = spawn_app().await;
    let id = app.create_product(product("Survivor")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;

    assert_eq!(terminate_listener(&app.pool).await, 1);
    // Written while the listener is (most likely) still reconnecting: the changelog catch-up
    // delivers it anyway.
    app.patch_product(id, json!({"unitsAvailable": 100})).await;
    wait_until(
        Duration::from_secs(5),
        "the listener noticing the loss",
        || async { app.stats().await["listener"]["reconnects"].as_u64() >= Some(1) },
    )
    .await;
    app.wait_for_listener().await;
    app.patch_product(id, json!({"unitsAvailable": 101})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 100);
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 101);
    let stats = app.stats().await;
    assert_eq!(
        stats["sessions"], 1,
        "the WebSocket session survived: {stats}"
    );
}

#[tokio::test]
async fn changes_flow_again_after_the_listeners_read_connection_is_terminated() {
    let app = spawn_app().await;
    let id = app.create_product(product("Reread")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'rowcast-listener-reads' AND datname = current_database()",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(
        terminated, 1,
        "the listener reads on a connection of its own"
    );
    // Its notification arrives on the live LISTEN connection; the read fails on the dead one,
    // and the listener starts a new life with both connections.
    app.patch_product(id, json!({"unitsAvailable": 200})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 200);
    app.patch_product(id, json!({"unitsAvailable": 201})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 201);
    let stats = app.stats().await;
    assert!(
        stats["listener"]["reconnects"].as_u64() >= Some(1),
        "the failed read started a new life: {stats}"
    );
}

#[tokio::test]
async fn an_unparseable_notification_is_skipped_not_fatal() {
    let app = spawn_app().await;
    let id = app.create_product(product("Robust")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;
    for payload in [
        "not json",
        r#"{"action":"TRUNCATE"}"#,
        r#"{"action":"UPDATE","product":{"productId":-1}}"#,
    ] {
        sqlx::query("SELECT pg_notify('product_change', $1)")
            .bind(payload)
            .execute(&app.pool)
            .await
            .unwrap();
    }
    app.patch_product(id, json!({"unitsAvailable": 77})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 77);
    let stats = app.stats().await;
    assert_eq!(stats["listener"]["payloadsSkipped"], 3);
    assert_eq!(
        stats["listener"]["reconnects"], 0,
        "skipping is not a reconnect"
    );
}
