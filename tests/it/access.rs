//! Who may use the server: the WebSocket origin check (HTTP/1.1 and HTTP/2), the optional API
//! token for REST, single-use WebSocket tickets (and that they never reach the logs), and the
//! limits on connections per client address and on concurrent REST requests.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::process::{free_port, rowcast, terminate_and_wait, wait_until_serving};
use crate::support::secure::{TestCa, h2_connection, wss_http1, wss_http2, wss_http2_on};
use crate::support::{TestApp, TestDatabase, WsClient, product, spawn_app_with, wait_until};

const TOKEN: &str = "test-token-0123456789";

/// The status a plain `ws://` handshake gets (101 when it is accepted).
async fn ws_status(url: &str, origin: Option<&str>, bearer: Option<&str>) -> u16 {
    let mut request = url.into_client_request().unwrap();
    if let Some(origin) = origin {
        request
            .headers_mut()
            .insert("origin", origin.parse().unwrap());
    }
    if let Some(token) = bearer {
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed: {other}"),
    }
}

async fn error_code(response: reqwest::Response) -> String {
    let body: Value = response.json().await.unwrap();
    body["error"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_browser_page_of_another_origin_gets_403_on_http1_and_http2() {
    let ca = TestCa::new();
    let cert = ca.issue("server");
    let flags = cert.flags();
    let app = spawn_app_with(&flags.iter().map(String::as_str).collect::<Vec<_>>()).await;
    let addr = app.tls_addr.unwrap();
    let own = format!("https://localhost:{}", addr.port());

    assert_eq!(
        wss_http1(addr, &ca, "/websocket", Some("https://evil.example"))
            .await
            .err(),
        Some(StatusCode::FORBIDDEN)
    );
    assert!(wss_http1(addr, &ca, "/websocket", Some(&own)).await.is_ok());
    assert!(wss_http1(addr, &ca, "/websocket", None).await.is_ok());

    let mut connection = h2_connection(addr, &ca).await;
    let port = addr.port();
    assert_eq!(
        wss_http2_on(
            &mut connection,
            port,
            "/websocket",
            Some("https://evil.example")
        )
        .await
        .err(),
        Some(StatusCode::FORBIDDEN)
    );
    // Same host, other port: another origin.
    let other_port = format!("https://localhost:{}", port + 1);
    assert_eq!(
        wss_http2_on(&mut connection, port, "/websocket", Some(&other_port))
            .await
            .err(),
        Some(StatusCode::FORBIDDEN)
    );
    let mut ws = wss_http2_on(&mut connection, port, "/websocket", Some(&own))
        .await
        .unwrap();
    ws.subscribe(&[1]).await;

    // Plain HTTP follows the same rule.
    let plain = app.base_url.trim_start_matches("http://");
    assert_eq!(
        ws_status(&app.ws_url, Some("http://evil.example"), None).await,
        403
    );
    assert_eq!(
        ws_status(&app.ws_url, Some(&format!("http://{plain}")), None).await,
        101
    );
    assert_eq!(ws_status(&app.ws_url, Some("null"), None).await, 403);
}

#[tokio::test]
async fn allowed_origins_replace_the_same_host_default() {
    let app = spawn_app_with(&[
        "--allowed-origin",
        "https://app.example",
        "--allowed-origin",
        "http://localhost:3000",
    ])
    .await;
    let own = format!("http://{}", app.base_url.trim_start_matches("http://"));
    assert_eq!(
        ws_status(&app.ws_url, Some("https://app.example"), None).await,
        101
    );
    assert_eq!(
        ws_status(&app.ws_url, Some("http://localhost:3000"), None).await,
        101
    );
    assert_eq!(ws_status(&app.ws_url, Some(&own), None).await, 403);
    assert_eq!(ws_status(&app.ws_url, None, None).await, 101);
}

#[tokio::test]
async fn with_a_token_rest_writes_need_it_and_reads_stay_open() {
    let app = spawn_app_with(&["--api-token", TOKEN]).await;
    let anonymous = reqwest::Client::new();
    let products = format!("{}/products", app.base_url);

    let missing = anonymous
        .post(&products)
        .json(&product("x"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);
    assert!(
        missing.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    assert_eq!(error_code(missing).await, "unauthorized");
    for wrong in ["wrong-token-0123456789", &TOKEN[1..], &format!("{TOKEN}x")] {
        let response = anonymous
            .post(&products)
            .bearer_auth(wrong)
            .json(&product("x"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{wrong}");
    }
    let deleted = anonymous
        .delete(format!("{products}/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::UNAUTHORIZED);

    let mut ws = WsClient::connect(&app.ws_url).await;
    ws.subscribe(&[1]).await;
    let created = anonymous
        .post(&products)
        .bearer_auth(TOKEN)
        .json(&product("authorized"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(ws.next_change().await["action"], "INSERT");
    let read = anonymous.get(&products).send().await.unwrap();
    assert_eq!(read.status(), StatusCode::OK);
}

#[tokio::test]
async fn with_auth_reads_subscriptions_need_a_single_use_unexpired_ticket() {
    let app = spawn_app_with(&[
        "--api-token",
        TOKEN,
        "--auth-reads",
        "--ws-ticket-ttl",
        "2s",
    ])
    .await;
    let anonymous = reqwest::Client::new();
    let ticket_url = format!("{}/ws-ticket", app.base_url);
    let ws_with = |ticket: &str| format!("{}?ticket={ticket}", app.ws_url);

    // Reads need the token now; health checks never do.
    let read = anonymous
        .get(format!("{}/products", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::UNAUTHORIZED);
    let health = anonymous
        .get(format!("{}/healthz", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // No credentials, a wrong token, an unknown ticket: 401 before the upgrade.
    assert_eq!(ws_status(&app.ws_url, None, None).await, 401);
    assert_eq!(
        ws_status(&app.ws_url, None, Some("wrong-token-0123456789")).await,
        401
    );
    assert_eq!(
        ws_status(
            &ws_with("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            None,
            None
        )
        .await,
        401
    );
    // Non-browser clients may send the token itself.
    assert_eq!(ws_status(&app.ws_url, None, Some(TOKEN)).await, 101);

    // Tickets are for token holders only.
    let refused = anonymous.post(&ticket_url).send().await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    let issue = || async {
        let response = app.http.post(&ticket_url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["cache-control"], "no-store");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["expiresIn"], json!(2.0));
        body["ticket"].as_str().unwrap().to_owned()
    };

    // A valid ticket works, once.
    let ticket = issue().await;
    let mut ws = WsClient::connect(&ws_with(&ticket)).await;
    ws.subscribe(&[1]).await;
    app.create_product(product("ticketed")).await;
    assert_eq!(ws.next_change().await["product"]["productName"], "ticketed");
    assert_eq!(ws_status(&ws_with(&ticket), None, None).await, 401);

    // An expired one does not.
    let stale = issue().await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(ws_status(&ws_with(&stale), None, None).await, 401);
}

#[tokio::test]
async fn tickets_never_appear_in_the_logs() {
    // The binary as operators run it, logging everything (RUST_LOG=trace) to a file.
    let ca = TestCa::new();
    let cert = ca.issue("server");
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let (plain_port, tls_port) = (free_port(), free_port());
    let log_path = ca.dir.join("rowcast.log");
    let mut child = rowcast(plain_port)
        .args(["--tls-listen", &format!("127.0.0.1:{tls_port}")])
        .args(cert.flags())
        .args(["--api-token", TOKEN, "--auth-reads"])
        .env("DATABASE_URL", &url)
        .env("RUST_LOG", "trace")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{plain_port}");
    let ws_url = format!("ws://127.0.0.1:{plain_port}/websocket");
    let http = reqwest::Client::new();
    wait_until_serving(&mut child, &http, &format!("{base}/healthz")).await;
    let issue = || async {
        let body: Value = http
            .post(format!("{base}/ws-ticket"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["ticket"].as_str().unwrap().to_owned()
    };

    let over_h1 = issue().await;
    let over_h2 = issue().await;
    let mut ws = WsClient::connect(&format!("{ws_url}?ticket={over_h1}")).await;
    ws.subscribe(&[1]).await;
    // Refusals are logged too; the reused ticket must not be in them.
    assert_eq!(
        ws_status(&format!("{ws_url}?ticket={over_h1}"), None, None).await,
        401
    );
    let tls_addr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let mut h2 = wss_http2(tls_addr, &ca, &format!("/websocket?ticket={over_h2}"), None)
        .await
        .unwrap();
    h2.subscribe(&[1]).await;
    ws.close().await;
    drop(h2);
    terminate_and_wait(&mut child, Duration::from_secs(10)).await;

    let logs = std::fs::read_to_string(&log_path).unwrap();
    // The log did record these requests, down to the path.
    assert!(
        logs.matches("/websocket").count() >= 3,
        "requests were logged: {} bytes",
        logs.len()
    );
    for ticket in [&over_h1, &over_h2] {
        assert!(
            !logs.contains(ticket.as_str()),
            "ticket {ticket} was logged"
        );
    }
    assert!(!logs.contains(TOKEN), "the token was logged");
}

/// A TCP connection from `source` (another loopback address than the harness uses).
async fn connect_from(source: &str, app: &TestApp) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket
        .connect(app.base_url.trim_start_matches("http://").parse().unwrap())
        .await
        .unwrap()
}

/// True if the connection is served (a health check answered), false if the server closed it.
async fn served(stream: &mut TcpStream) -> bool {
    if stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
        Ok(Ok(n)) => buf[..n].starts_with(b"HTTP/1.1 200"),
        Ok(Err(_)) => false,
        Err(_) => panic!("no answer and no close within 5 s"),
    }
}

#[tokio::test]
async fn connections_per_client_address_are_limited_and_websockets_count_while_open() {
    let app = spawn_app_with(&[
        "--max-connections-per-ip",
        "2",
        "--per-ip-limit-exempt",
        "127.0.0.1",
    ])
    .await;
    let source = "127.0.0.2";
    let mut first = connect_from(source, &app).await;
    assert!(served(&mut first).await);
    // A WebSocket takes the second slot, and keeps it after its upgrade request is done.
    let tcp = connect_from(source, &app).await;
    let (mut ws, _) = tokio_tungstenite::client_async(app.ws_url.as_str(), tcp)
        .await
        .unwrap();
    let mut third = connect_from(source, &app).await;
    assert!(!served(&mut third).await, "the third connection is refused");
    assert!(app.stats().await["transport"]["connectionsRefused"].as_u64() >= Some(1));
    // Other addresses have their own budget.
    let mut elsewhere = connect_from("127.0.0.3", &app).await;
    assert!(served(&mut elsewhere).await);

    // Closing the WebSocket frees its slot.
    futures_util::SinkExt::close(&mut ws).await.unwrap();
    drop(ws);
    wait_until(Duration::from_secs(5), "a freed slot", || async {
        served(&mut connect_from(source, &app).await).await
    })
    .await;
}

#[tokio::test]
async fn rest_requests_over_the_concurrency_limit_get_503_and_slow_ones_time_out() {
    let app = spawn_app_with(&["--max-concurrent-requests", "1", "--request-timeout", "1s"]).await;
    let created = app.create_product(product("locked")).await;
    let id = created["productId"].as_i64().unwrap();

    // Hold the row so a PATCH waits inside its handler.
    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM products WHERE product_id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *lock)
        .await
        .unwrap();
    let http = app.http.clone();
    let url = format!("{}/products/{id}", app.base_url);
    let patch = tokio::spawn(async move {
        http.patch(url)
            .header("content-type", "application/merge-patch+json")
            .body(r#"{"unitsAvailable":1}"#)
            .send()
            .await
            .unwrap()
    });
    wait_until(Duration::from_secs(5), "the PATCH waiting for the lock", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
            > 0
    })
    .await;

    let shed = app
        .http
        .get(format!("{}/products", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.headers()["retry-after"], "1");
    assert_eq!(error_code(shed).await, "overloaded");
    // Operator endpoints have no such limit.
    assert_eq!(app.stats().await["listener"]["connected"], true);

    let timed_out = patch.await.unwrap();
    assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(timed_out).await, "timeout");
    lock.rollback().await.unwrap();
    let ok = app
        .http
        .get(format!("{}/products", app.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_ticket_from_one_instance_opens_a_websocket_on_another_once() {
    let flags = [
        "--api-token",
        TOKEN,
        "--auth-reads",
        "--ws-ticket-ttl",
        "2s",
    ];
    let a = spawn_app_with(&flags).await;
    let b = crate::support::spawn_instance(&a.database_url, &flags).await;
    let issue = |app: &TestApp| {
        let request = app.http.post(format!("{}/ws-ticket", app.base_url));
        async move {
            let body: Value = request.send().await.unwrap().json().await.unwrap();
            body["ticket"].as_str().unwrap().to_owned()
        }
    };
    let with = |app: &TestApp, ticket: &str| format!("{}?ticket={ticket}", app.ws_url);

    let ticket = issue(&a).await;
    let mut ws = WsClient::connect(&with(&b, &ticket)).await;
    ws.subscribe(&[1]).await;
    a.create_product(product("shared")).await;
    assert_eq!(ws.next_change().await["product"]["productName"], "shared");
    // Spent on B: refused by both.
    assert_eq!(ws_status(&with(&a, &ticket), None, None).await, 401);
    assert_eq!(ws_status(&with(&b, &ticket), None, None).await, 401);

    let stale = issue(&b).await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(ws_status(&with(&a, &stale), None, None).await, 401);
}

/// The next event that is a change (it carries an id).
async fn next_sse_change(sse: &mut crate::support::SseClient) -> crate::support::sse::SseEvent {
    loop {
        let event = sse.next_event().await;
        if event.id.is_some() {
            return event;
        }
    }
}

#[tokio::test]
async fn an_event_stream_opened_with_a_ticket_reconnects_with_its_cookie() {
    let app = spawn_app_with(&["--api-token", TOKEN, "--auth-reads"]).await;
    let id = app.create_product(product("streamed")).await["productId"]
        .as_i64()
        .unwrap();
    let anonymous = reqwest::Client::new();
    let issue = || async {
        let response = app.http.post(format!("{}/ws-ticket", app.base_url));
        let body: Value = response.send().await.unwrap().json().await.unwrap();
        body["ticket"].as_str().unwrap().to_owned()
    };
    let events =
        |ticket: &str| format!("{}/products/events?ids={id}&ticket={ticket}", app.base_url);

    // A request the handler refuses does not spend its ticket.
    let ticket = issue().await;
    let bad = anonymous
        .get(format!(
            "{}/products/events?ids=x&ticket={ticket}",
            app.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    let first = anonymous.get(events(&ticket)).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let set_cookie = first.headers()["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/products/events"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let mut sse = crate::support::SseClient::from_response(first);
    crate::support::add_one_unit(&app.pool, id).await;
    let seen = next_sse_change(&mut sse).await;
    drop(sse);

    // A change while disconnected, then EventSource's reconnect: same URL (spent ticket).
    crate::support::add_one_unit(&app.pool, id).await;
    let reconnect = |cookie: Option<&str>| {
        let mut request = anonymous
            .get(events(&ticket))
            .header("last-event-id", seen.id.unwrap().to_string());
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        request.send()
    };
    assert_eq!(reconnect(None).await.unwrap().status(), 401);
    let forged = "rowcast_stream=v1.99999999999.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    assert_eq!(reconnect(Some(forged)).await.unwrap().status(), 401);
    let again = reconnect(Some(&cookie)).await.unwrap();
    assert!(again.headers().contains_key("set-cookie"), "renewed");
    let mut sse = crate::support::SseClient::from_response(again);
    let missed = next_sse_change(&mut sse).await;
    assert_eq!(missed.id, Some(seen.id.unwrap() + 1), "no gap");
}

#[tokio::test]
async fn an_authenticated_stream_ends_to_renew_its_cookie_before_it_expires() {
    let flags = ["--api-token", TOKEN, "--auth-reads"];
    let app = spawn_app_with(&[&flags[..], &["--stream-credential-ttl", "2s"]].concat()).await;
    let events = format!("{}/products/events?ids=1", app.base_url);
    let first = app.http.get(&events).send().await.unwrap();
    let cookie = first.headers()["set-cookie"].to_str().unwrap();
    let cookie = cookie.split(';').next().unwrap().to_owned();
    // Ends after half the lifetime (1 s), so EventSource reconnects while the cookie is valid.
    let mut stream = crate::support::SseClient::from_response(first);
    assert_eq!(stream.next_event().await.data["type"], "subscribed");
    stream.expect_end().await;
    let anonymous = reqwest::Client::new();
    let with_cookie = || anonymous.get(&events).header("cookie", &cookie).send();
    assert_eq!(with_cookie().await.unwrap().status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(with_cookie().await.unwrap().status(), 401, "expired");
}
