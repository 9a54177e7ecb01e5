//! Budgets that hold under abuse: sessions and subscriptions per client address and server-wide
//! (HTTP/2 streams counted one by one), the command pace, the bound on unread replies, and the
//! operator endpoints behind their own token. Several client addresses are simulated with
//! loopback sources (127.0.0.2, …); 127.0.0.1, where the harness itself connects from, is the
//! only exempt one.

use std::net::IpAddr;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{TestApp, WsClient, product, spawn_app_with, wait_until};

/// Only the harness's own address is exempt from per-address budgets.
const EXEMPT_HARNESS_ONLY: [&str; 2] = ["--per-ip-limit-exempt", "127.0.0.1/32"];

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// The status and error code a WebSocket upgrade from `source` is refused with.
async fn refused_upgrade(app: &TestApp, source: IpAddr) -> (u16, String) {
    match WsClient::try_connect_from(&app.ws_url, source).await {
        Ok(_) => panic!("the upgrade from {source} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let retry_after = response.headers().get("retry-after");
            assert!(retry_after.is_some(), "refusals say when to retry");
            let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or(b"{}"))
                .expect("a JSON error body");
            (
                response.status().as_u16(),
                body["error"].as_str().unwrap_or_default().to_owned(),
            )
        }
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// A client from `source`; `h2` speaks HTTP/2 with prior knowledge (one connection, many
/// streams).
fn client_from(source: IpAddr, h2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder().local_address(source);
    let builder = if h2 {
        builder.http2_prior_knowledge()
    } else {
        builder
    };
    builder.build().unwrap()
}

async fn open_events(client: &reqwest::Client, app: &TestApp) -> reqwest::Response {
    client
        .get(format!("{}/products/events?ids=1", app.base_url))
        .send()
        .await
        .unwrap()
}

async fn error_of(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    (status, body["error"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn sessions_are_budgeted_per_address_and_server_wide_and_http2_streams_count() {
    let mut flags = vec!["--max-sessions", "6", "--max-sessions-per-ip", "2"];
    flags.extend(EXEMPT_HARNESS_ONLY);
    let app = spawn_app_with(&flags).await;

    let first = WsClient::try_connect_from(&app.ws_url, loopback(2))
        .await
        .unwrap();
    let _second = WsClient::try_connect_from(&app.ws_url, loopback(2))
        .await
        .unwrap();
    assert_eq!(
        refused_upgrade(&app, loopback(2)).await,
        (429, "too_many_sessions_from_address".to_owned())
    );
    // An event stream is a session too, from the same budget.
    let (status, code) = error_of(open_events(&client_from(loopback(2), false), &app).await).await;
    assert_eq!(
        (status, code.as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions_from_address"
        )
    );
    let _third = WsClient::try_connect_from(&app.ws_url, loopback(3))
        .await
        .unwrap();

    // One HTTP/2 connection, several streams: each stream is a session of its own.
    let h2 = client_from(loopback(4), true);
    let stream_a = open_events(&h2, &app).await;
    let stream_b = open_events(&h2, &app).await;
    assert_eq!(
        (stream_a.status(), stream_b.status()),
        (StatusCode::OK, StatusCode::OK)
    );
    assert_eq!(stream_a.version(), reqwest::Version::HTTP_2);
    let (status, code) = error_of(open_events(&h2, &app).await).await;
    assert_eq!(
        (status, code.as_str()),
        (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_sessions_from_address"
        )
    );

    let _fourth = WsClient::try_connect_from(&app.ws_url, loopback(5))
        .await
        .unwrap();

    // Six sessions now: the server-wide budget refuses everyone, exempt addresses included.
    app.wait_for_sessions(6).await;
    assert_eq!(
        refused_upgrade(&app, loopback(6)).await,
        (503, "too_many_sessions".to_owned())
    );
    assert_eq!(
        refused_upgrade(&app, loopback(1)).await,
        (503, "too_many_sessions".to_owned())
    );
    let refused = app.stats().await["refused"].clone();
    assert_eq!(refused["sessionsAddress"], 3, "{refused}");
    assert_eq!(refused["sessionsServer"], 2, "{refused}");

    // A closed session gives its place back to its address and to the server.
    first.close().await;
    app.wait_for_sessions(5).await;
    let mut again = WsClient::try_connect_from(&app.ws_url, loopback(2))
        .await
        .unwrap();
    again.subscribe(&[1]).await;
    drop((stream_a, stream_b));
}

#[tokio::test]
async fn subscriptions_are_budgeted_per_address_and_server_wide_and_refusals_keep_the_connection() {
    let mut flags = vec![
        "--max-subscriptions-per-ip",
        "5",
        "--max-total-subscriptions",
        "8",
    ];
    flags.extend(EXEMPT_HARNESS_ONLY);
    let app = spawn_app_with(&flags).await;
    let id = app.create_product(product("budgeted")).await["productId"]
        .as_i64()
        .unwrap();

    let mut a = WsClient::try_connect_from(&app.ws_url, loopback(2))
        .await
        .unwrap();
    let mut b = WsClient::try_connect_from(&app.ws_url, loopback(2))
        .await
        .unwrap();
    a.subscribe(&[id, 9001, 9002, 9003, 9004]).await;
    // Already-held ids cost nothing; one new one is over the address's 5.
    a.command("subscribe", &[id, 9005]).await;
    let refusal = a.next_json().await;
    assert_eq!(refusal["error"], "address_subscription_budget", "{refusal}");
    // The address's budget is shared by all its connections.
    b.command("subscribe", &[id]).await;
    assert_eq!(b.next_json().await["error"], "address_subscription_budget");

    let mut c = WsClient::try_connect_from(&app.ws_url, loopback(3))
        .await
        .unwrap();
    c.subscribe(&[id, 9006, 9007]).await;
    let mut d = WsClient::try_connect_from(&app.ws_url, loopback(4))
        .await
        .unwrap();
    d.command("subscribe", &[id]).await;
    let refusal = d.next_json().await;
    assert_eq!(refusal["error"], "server_subscription_budget", "{refusal}");

    // Refused subscribes change nothing else: a still gets its product's changes.
    app.patch_product(id, json!({"unitsAvailable": 7})).await;
    assert_eq!(a.next_change().await["product"]["unitsAvailable"], 7);
    assert_eq!(c.next_change().await["product"]["unitsAvailable"], 7);
    let stats = app.stats().await;
    assert_eq!(stats["subscriptions"], 8, "{stats}");
    assert_eq!(stats["refused"]["subscriptionsAddress"], 2, "{stats}");
    assert_eq!(stats["refused"]["subscriptionsServer"], 1, "{stats}");

    // Unsubscribing gives the budget back.
    a.unsubscribe(&[9001]).await;
    b.subscribe(&[9008]).await;
}

#[tokio::test]
async fn a_command_flood_is_read_at_the_configured_pace_and_loses_nothing() {
    let app = spawn_app_with(&["--command-rate", "20", "--command-burst", "5"]).await;
    let mut client = WsClient::connect(&app.ws_url).await;
    for n in 0..30 {
        client.command("unsubscribe", &[n]).await;
    }
    for n in 0..30 {
        let ack = client.next_json().await;
        assert_eq!(ack, json!({"type": "unsubscribed", "productIDs": [n]}));
    }
    let stats = app.stats().await;
    assert!(stats["commandsThrottled"].as_u64() >= Some(1), "{stats}");
}

#[tokio::test]
async fn a_client_that_floods_commands_without_reading_is_evicted_at_its_queue_bound() {
    // No pace, so the flood reaches the distributor as fast as the network brings it.
    let app = spawn_app_with(&[
        "--outbox-capacity",
        "64",
        "--command-rate",
        "1000000",
        "--command-burst",
        "1000000",
    ])
    .await;
    let id = app.create_product(product("flooded")).await["productId"]
        .as_i64()
        .unwrap();
    let mut honest = WsClient::connect(&app.ws_url).await;
    honest.subscribe(&[id]).await;

    let mut flooder = WsClient::connect(&app.ws_url).await;
    let ids: Vec<i64> = (1_000_000..1_000_500).collect();
    let command = json!({"command": "unsubscribe", "productIDs": ids});
    let flood = tokio::spawn(async move {
        for _ in 0..20_000 {
            if flooder.try_send_json(&command).await.is_err() {
                return true;
            }
        }
        false
    });
    wait_until(
        Duration::from_secs(20),
        "the flooder is evicted",
        || async { app.stats().await["slowSessionsEvicted"] == json!(1) },
    )
    .await;
    app.wait_for_sessions(1).await;
    app.patch_product(id, json!({"unitsAvailable": 3})).await;
    assert_eq!(honest.next_change().await["product"]["unitsAvailable"], 3);
    assert!(
        tokio::time::timeout(Duration::from_secs(20), flood)
            .await
            .expect("the flood ends once the server closed")
            .unwrap(),
        "the server stopped taking the flood"
    );
}

#[tokio::test]
async fn operator_endpoints_need_the_ops_token_when_one_is_set() {
    const OPS: &str = "ops-token-0123456789";
    const API: &str = "api-token-0123456789";
    let app = spawn_app_with(&["--ops-token", OPS, "--api-token", API]).await;
    let anonymous = reqwest::Client::new();
    for path in ["/stats", "/metrics"] {
        let url = format!("{}{path}", app.base_url);
        let status = |bearer: Option<&'static str>| {
            let mut request = anonymous.get(&url);
            if let Some(token) = bearer {
                request = request.bearer_auth(token);
            }
            async move { request.send().await.unwrap().status() }
        };
        assert_eq!(status(None).await, StatusCode::UNAUTHORIZED, "{path}");
        assert_eq!(
            status(Some(API)).await,
            StatusCode::UNAUTHORIZED,
            "{path}: the API token is not the ops token"
        );
        assert_eq!(status(Some(OPS)).await, StatusCode::OK, "{path}");
    }
    for open in ["/healthz", "/readyz", "/products"] {
        let status = anonymous
            .get(format!("{}{open}", app.base_url))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, StatusCode::OK, "{open} stays open");
    }
}
