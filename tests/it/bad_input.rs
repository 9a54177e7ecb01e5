//! Bad WebSocket input gets its specified answer; the connection keeps its subscriptions and
//! other clients are unaffected.

use serde_json::json;

use crate::support::{WsClient, product, spawn_app, spawn_app_with};

#[tokio::test]
async fn each_bad_frame_gets_one_error_and_the_session_keeps_working() {
    let app = spawn_app().await;
    let id = app.create_product(product("Steady")).await["productId"]
        .as_i64()
        .unwrap();
    let mut bystander = WsClient::connect(&app.ws_url).await;
    bystander.subscribe(&[id]).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[id]).await;

    for (frame, code, needle) in [
        ("{not json", "malformed_json", "JSON"),
        (
            r#"{"command":"dance","productIDs":[1]}"#,
            "unknown_command",
            "dance",
        ),
        (r#"{"productIDs":[1]}"#, "unknown_command", "command"),
        (
            r#"{"command":"subscribe"}"#,
            "invalid_command",
            "productIDs",
        ),
        (
            r#"{"command":"subscribe","productIDs":[1.5]}"#,
            "invalid_product_id",
            "productIDs[0]",
        ),
        (
            r#"{"command":"subscribe","productIDs":[2,"3"]}"#,
            "invalid_product_id",
            "productIDs[1]",
        ),
        (
            r#"{"command":"subscribe","productIDs":[-7]}"#,
            "invalid_product_id",
            "-7",
        ),
        (
            r#"{"command":"subscribe","productIDs":[99999999999999999999]}"#,
            "invalid_product_id",
            "productIDs[0]",
        ),
    ] {
        client.send_text(frame).await;
        let error = client.next_json().await;
        assert_eq!(error["type"], "error", "{frame}");
        assert_eq!(error["error"], code, "{frame}");
        assert!(
            error["message"].as_str().unwrap().contains(needle),
            "{frame}: {error}"
        );
    }
    client.send_binary(vec![1, 2, 3]).await;
    let error = client.next_json().await;
    assert_eq!(error["error"], "binary_frame");

    // Nothing was half-applied and the original subscription still works, for both clients.
    assert_eq!(app.stats().await["subscriptions"], 2);
    app.patch_product(id, json!({"unitsAvailable": 1})).await;
    assert_eq!(client.next_change().await["product"]["unitsAvailable"], 1);
    assert_eq!(
        bystander.next_change().await["product"]["unitsAvailable"],
        1
    );
}

#[tokio::test]
async fn a_frame_over_the_limit_closes_with_1009_and_others_are_unaffected() {
    let app = spawn_app_with(&["--max-frame-bytes", "4096"]).await;
    let id = app.create_product(product("Limit")).await["productId"]
        .as_i64()
        .unwrap();
    let mut bystander = WsClient::connect(&app.ws_url).await;
    bystander.subscribe(&[id]).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    let ids: Vec<i64> = (1..=2000).collect();
    client.command("subscribe", &ids).await;
    assert_eq!(client.close_code().await, Some(1009));
    app.wait_for_sessions(1).await;
    app.patch_product(id, json!({"unitsAvailable": 2})).await;
    assert_eq!(
        bystander.next_change().await["product"]["unitsAvailable"],
        2
    );
}

#[tokio::test]
async fn more_subscriptions_than_the_cap_are_refused_whole() {
    let app = spawn_app_with(&["--max-subscriptions", "5"]).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    client.subscribe(&[1, 2, 3]).await;
    client.command("subscribe", &[3, 4, 5, 6]).await;
    let error = client.next_json().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"], "too_many_subscriptions");
    assert!(
        error["message"].as_str().unwrap().contains("limit of 5"),
        "{error}"
    );
    assert_eq!(
        app.stats().await["subscriptions"],
        3,
        "nothing half-applied"
    );
    // Up to the cap still works.
    client.subscribe(&[3, 4, 5]).await;
    assert_eq!(app.stats().await["subscriptions"], 5);
}
