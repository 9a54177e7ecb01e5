//! Subscribing over a WebSocket: who receives which change, set semantics, and cleanup.

use std::time::Duration;

use serde_json::json;

use crate::support::{WsClient, product, spawn_app};

const QUIET: Duration = Duration::from_millis(300);

#[tokio::test]
async fn two_subscribers_see_insert_update_delete_and_unsubscribe_stops_only_one() {
    let app = spawn_app().await;
    let mut a = WsClient::connect(&app.ws_url).await;
    let mut b = WsClient::connect(&app.ws_url).await;
    // Subscribe before the product exists: the INSERT is delivered.
    a.subscribe(&[1]).await;
    b.subscribe(&[1]).await;

    let created = app.create_product(product("Widget")).await;
    assert_eq!(created["productId"], 1);
    for client in [&mut a, &mut b] {
        let change = client.next_change().await;
        assert_eq!(change["action"], "INSERT");
        assert_eq!(
            change["product"], created,
            "same shape as the REST representation"
        );
    }

    let updated = app.patch_product(1, json!({"unitsAvailable": 3})).await;
    for client in [&mut a, &mut b] {
        let change = client.next_change().await;
        assert_eq!(change["action"], "UPDATE");
        assert_eq!(change["product"], updated);
    }

    a.unsubscribe(&[1]).await;
    app.patch_product(1, json!({"unitsAvailable": 4})).await;
    assert_eq!(b.next_change().await["product"]["unitsAvailable"], 4);
    a.expect_silence(QUIET).await;

    let deleted = app
        .http
        .delete(format!("{}/products/1", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let change = b.next_change().await;
    assert_eq!(change["action"], "DELETE");
    assert_eq!(
        change["product"]["unitsAvailable"], 4,
        "DELETE carries the last state"
    );
    a.expect_silence(QUIET).await;
}

#[tokio::test]
async fn duplicate_subscribe_delivers_each_change_once_and_others_are_not_disturbed() {
    let app = spawn_app().await;
    let first = app.create_product(product("One")).await["productId"]
        .as_i64()
        .unwrap();
    let second = app.create_product(product("Two")).await["productId"]
        .as_i64()
        .unwrap();
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[first]).await;
    client.subscribe(&[first, first]).await;
    app.patch_product(first, json!({"unitsAvailable": 1})).await;
    app.patch_product(second, json!({"unitsAvailable": 1}))
        .await;
    app.patch_product(first, json!({"unitsAvailable": 2})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 1);
    let change = client.next_change().await;
    assert_eq!(
        change["product"]["productId"], first,
        "product {second} is not subscribed"
    );
    assert_eq!(change["product"]["unitsAvailable"], 2);
    client.expect_silence(QUIET).await;
}

#[tokio::test]
async fn a_change_written_by_any_client_of_the_database_is_delivered() {
    let app = spawn_app().await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[42]).await;
    sqlx::query(
        "INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
         VALUES (42, 'psql', '1.00', 1, 'Written in SQL')",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    let frame = client.next_text().await;
    let rest = app
        .http
        .get(format!("{}/products/42", app.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(frame.starts_with(r#"{"type":"change","seq":"#), "{frame}");
    assert!(
        frame.ends_with(&format!(r#","action":"INSERT","product":{rest}}}"#)),
        "the product in the change is byte-for-byte the REST representation: {frame} vs {rest}"
    );
}

#[tokio::test]
async fn maps_are_empty_after_every_client_disconnects() {
    let app = spawn_app().await;
    let mut clients = Vec::new();
    for n in 0..20_i64 {
        let mut client = WsClient::connect(&app.ws_url).await;
        let ids: Vec<i64> = (1..=1024).map(|id| id + n * 10).collect();
        client.subscribe(&ids).await;
        clients.push(client);
    }
    let stats = app.stats().await;
    assert_eq!(stats["sessions"], 20);
    assert_eq!(stats["subscriptions"], 20 * 1024);
    assert_eq!(stats["productsWithSubscribers"], 1024 + 19 * 10);

    // Half close politely, half just drop the TCP connection.
    for (n, client) in clients.into_iter().enumerate() {
        if n % 2 == 0 {
            client.close().await;
        } else {
            drop(client);
        }
    }
    app.wait_for_sessions(0).await;
    let stats = app.stats().await;
    assert_eq!(
        (
            stats["subscriptions"].clone(),
            stats["productsWithSubscribers"].clone()
        ),
        (json!(0), json!(0))
    );
}
