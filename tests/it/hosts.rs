//! The Host allowlist against DNS rebinding: a request addressed to a name that is not
//! rowcast's is refused (421 `unknown_host`) on HTTP/1.1 and HTTP/2, for REST, WebSockets, the
//! event stream and operator endpoints, while health checks answer and rowcast's own names
//! (loopback by default, `--allowed-host` too) work. The attacker's name is made to resolve to
//! rowcast with reqwest's `resolve`, as a rebinding DNS server would.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::{TestApp, get_json, product, spawn_app, spawn_app_with};

const REBOUND: &str = "rebind.example";

fn addr(app: &TestApp) -> SocketAddr {
    app.base_url.trim_start_matches("http://").parse().unwrap()
}

/// A client for which `name` resolves to the app, over HTTP/1.1 or (h2c, prior knowledge)
/// HTTP/2.
fn client_for(name: &str, app: &TestApp, http2: bool) -> reqwest::Client {
    let builder = reqwest::Client::builder().resolve(name, addr(app));
    let builder = if http2 {
        builder.http2_prior_knowledge()
    } else {
        builder.http1_only()
    };
    builder.build().unwrap()
}

/// Asserts a 421 `unknown_host` that names the host and the flag.
async fn assert_refused(response: reqwest::Response, version: reqwest::Version) {
    assert_eq!(response.status(), 421, "{}", response.url());
    assert_eq!(response.version(), version);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"], "unknown_host");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(REBOUND) && message.contains("--allowed-host"),
        "{message}"
    );
}

/// The status of a WebSocket handshake to `ws://<host>:<port>/websocket` sent to the app, with
/// the Origin a page of that host would send.
async fn ws_status(app: &TestApp, host: &str) -> u16 {
    let port = addr(app).port();
    let mut request = format!("ws://{host}:{port}/websocket")
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("origin", format!("http://{host}:{port}").parse().unwrap());
    let tcp = TcpStream::connect(addr(app)).await.unwrap();
    match tokio_tungstenite::client_async(request, tcp).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("handshake failed: {other}"),
    }
}

/// The status line of a raw HTTP/1.1 GET of `path` with this Host header.
async fn status_with_host(app: &TestApp, path: &str, host: &str) -> String {
    let mut tcp = TcpStream::connect(addr(app)).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    response.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn a_rebound_name_is_refused_on_http1_and_http2_but_health_checks_answer() {
    let app = spawn_app().await;
    let port = addr(&app).port();
    let base = format!("http://{REBOUND}:{port}");
    for (http2, version) in [
        (false, reqwest::Version::HTTP_11),
        (true, reqwest::Version::HTTP_2),
    ] {
        let rebound = client_for(REBOUND, &app, http2);
        let write = rebound
            .post(format!("{base}/products"))
            .json(&product("Rebound"))
            .send()
            .await
            .unwrap();
        assert_refused(write, version).await;
        for path in [
            "/products",
            "/products/events?ids=1",
            "/stats",
            "/metrics",
            "/",
        ] {
            let read = rebound.get(format!("{base}{path}")).send().await.unwrap();
            assert_refused(read, version).await;
        }
        for path in ["/healthz", "/readyz"] {
            let probe = rebound.get(format!("{base}{path}")).send().await.unwrap();
            assert_eq!(probe.status(), 200, "{path} answers any host");
        }
    }
    let products = get_json(&app.http, &format!("{}/products", app.base_url)).await;
    assert_eq!(products, json!([]), "nothing was written");

    // The page's Origin names its own (rebound) host, so the origin check alone lets it in.
    assert_eq!(ws_status(&app, REBOUND).await, 421);
    assert_eq!(ws_status(&app, "localhost").await, 101);
}

/// A WebSocket over HTTP/2 (h2c prior knowledge, extended CONNECT as RFC 8441): the name is
/// only in `:authority`.
#[tokio::test]
async fn a_websocket_over_http2_for_a_rebound_name_is_refused() {
    let app = spawn_app().await;
    let port = addr(&app).port();
    let tcp = TcpStream::connect(addr(&app)).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    // A first exchange brings the server's SETTINGS, which allow extended CONNECT.
    let health = Request::get(format!("http://localhost:{port}/healthz"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(health).await.unwrap().status(), 200);
    let connect = |host: &str| {
        Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://{host}:{port}/websocket"))
            .header("sec-websocket-version", "13")
            .header("origin", format!("http://{host}:{port}"))
            .extension(hyper::ext::Protocol::from_static("websocket"))
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    let refused = sender.send_request(connect(REBOUND)).await.unwrap();
    assert_eq!(refused.status(), 421);
    let accepted = sender.send_request(connect("localhost")).await.unwrap();
    assert_eq!(accepted.status(), 200, "the stream is a WebSocket now");
}

#[tokio::test]
async fn loopback_names_work_by_default_whatever_the_port() {
    let app = spawn_app().await;
    let port = addr(&app).port();
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_owned(),
        "LocalHost.:1".to_owned(),
    ] {
        assert_eq!(
            status_with_host(&app, "/products", &host).await,
            "HTTP/1.1 200 OK",
            "{host}"
        );
    }
    assert_eq!(
        status_with_host(&app, "/products", "127.0.0.2").await,
        "HTTP/1.1 421 Misdirected Request"
    );
    let localhost = client_for("localhost", &app, true);
    let response = localhost
        .post(format!("http://localhost:{port}/products"))
        .json(&product("Local"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
}

#[tokio::test]
async fn allowed_hosts_add_names_and_keep_refusing_others() {
    let app = spawn_app_with(&["--allowed-host", "rowcast.example,other.example."]).await;
    let port = addr(&app).port();
    for http2 in [false, true] {
        let named = client_for("rowcast.example", &app, http2);
        let response = named
            .post(format!("http://rowcast.example:{port}/products"))
            .json(&product("Named"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
    }
    assert_eq!(ws_status(&app, "rowcast.example").await, 101);
    assert_eq!(ws_status(&app, "other.example").await, 101);
    assert_eq!(ws_status(&app, "localhost").await, 101);
    assert_eq!(ws_status(&app, REBOUND).await, 421);
    let rebound = client_for(REBOUND, &app, false)
        .get(format!("http://{REBOUND}:{port}/products"))
        .send()
        .await
        .unwrap();
    assert_refused(rebound, reqwest::Version::HTTP_11).await;
}
