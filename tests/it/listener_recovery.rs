//! The LISTEN connection comes back by itself after it is killed, and nothing written in the
//! meantime is lost.

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
