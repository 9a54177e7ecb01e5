//! The `rowcast` binary as an operator runs it: SIGTERM closes every WebSocket with 1001 and the
//! process exits promptly; with no DATABASE_URL it runs on its own private PostgreSQL cluster.

use std::time::Duration;

use crate::support::process::{free_port, rowcast, terminate_and_wait, wait_until_serving};
use crate::support::{TestDatabase, WsClient, get_json, product};

/// How long rowcast may take to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(5);

/// Waits for `/healthz` on `port`.
async fn wait_healthy(port: u16, child: &mut tokio::process::Child) {
    let url = format!("http://127.0.0.1:{port}/healthz");
    wait_until_serving(child, &reqwest::Client::new(), &url).await;
}

#[tokio::test]
async fn sigterm_closes_every_websocket_with_1001_and_exits() {
    let database = TestDatabase::create().await;
    let url = database.url.clone();
    let port = free_port();
    let mut child = rowcast(port).env("DATABASE_URL", &url).spawn().unwrap();
    wait_healthy(port, &mut child).await;
    let ws_url = format!("ws://127.0.0.1:{port}/websocket");
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = WsClient::connect(&ws_url).await;
        client.subscribe(&[1, 2]).await;
        clients.push(client);
    }
    let status = terminate_and_wait(&mut child, STOP_LIMIT).await;
    assert!(status.success(), "{status}");
    for client in &mut clients {
        assert_eq!(client.close_code().await, Some(1001));
    }
}

#[tokio::test]
async fn without_database_url_it_runs_on_a_private_cluster_and_stops_it() {
    let data_dir =
        std::env::temp_dir().join(format!("rowcast-embedded-{:x}", rand::random::<u64>()));
    let port = free_port();
    let mut child = rowcast(port)
        .args(["--embedded-data-dir", data_dir.to_str().unwrap()])
        .spawn()
        .unwrap();
    wait_healthy(port, &mut child).await;
    assert!(
        data_dir.join("pgdata/postmaster.pid").exists(),
        "the private cluster runs in the given data dir"
    );
    let http = reqwest::Client::new();
    let mut client = WsClient::connect(&format!("ws://127.0.0.1:{port}/websocket")).await;
    client.subscribe(&[1]).await;
    let created = http
        .post(format!("http://127.0.0.1:{port}/products"))
        .json(&product("Embedded"))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(client.next_change().await["action"], "INSERT");

    let status = terminate_and_wait(&mut child, STOP_LIMIT).await;
    assert!(status.success(), "{status}");
    assert!(
        !data_dir.join("pgdata/postmaster.pid").exists(),
        "the private cluster was stopped"
    );

    // The data survives a restart.
    let mut again = rowcast(port)
        .args(["--embedded-data-dir", data_dir.to_str().unwrap()])
        .spawn()
        .unwrap();
    wait_healthy(port, &mut again).await;
    let listed = get_json(&http, &format!("http://127.0.0.1:{port}/products")).await;
    assert_eq!(listed[0]["productName"], "Embedded");
    assert!(terminate_and_wait(&mut again, STOP_LIMIT).await.success());
    let _ = std::fs::remove_dir_all(&data_dir);
}

#[tokio::test]
async fn shutdown_waits_one_grace_period_for_requests_and_sessions_together() {
    use tokio::io::AsyncWriteExt;
    let mut app = crate::support::spawn_app_with(&[
        "--shutdown-grace",
        "500ms",
        "--heartbeat-interval",
        "120s",
    ])
    .await;
    let id = app.create_heavy_product(64_000).await;
    // A session that cannot take its close frame (it reads nothing, its buffers are full)...
    let mut stuck = WsClient::connect_with_small_receive_buffer(&app.ws_url).await;
    stuck.subscribe(&[id]).await;
    for _ in 0..200 {
        crate::support::add_one_unit(&app.pool, id).await;
    }
    // ...and an HTTP request whose body never finishes.
    let addr = app.base_url.trim_start_matches("http://").to_owned();
    let mut hung = tokio::net::TcpStream::connect(&addr).await.unwrap();
    hung.write_all(
        b"POST /products HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = app.stop().await;
    // Both outlive the 500 ms grace (the session tries its close frame for 1 s): one period
    // for both, not one each (which took 1 s).
    assert!(
        took >= Duration::from_millis(450),
        "waited the grace: {took:?}"
    );
    assert!(
        took < Duration::from_millis(850),
        "one grace period, not two: {took:?}"
    );
}
