//! The `rowcast` binary as an operator runs it: SIGTERM closes every WebSocket with 1001 and the
//! process exits promptly; with no DATABASE_URL it runs on its own private PostgreSQL cluster.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::support::{WsClient, fresh_database, product};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rowcast(port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rowcast"));
    command
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_remove("DATABASE_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true);
    command
}

async fn wait_healthy(port: u16, child: &mut Child) {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(child.try_wait().unwrap().is_none(), "rowcast exited early");
        let healthy = http
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200);
        if healthy {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rowcast not healthy within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn terminate_and_wait(child: &mut Child) -> std::process::ExitStatus {
    let pid = Pid::from_raw(i32::try_from(child.id().unwrap()).unwrap());
    kill(pid, Signal::SIGTERM).unwrap();
    tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("rowcast exits within 5 s of SIGTERM")
        .unwrap()
}

#[tokio::test]
async fn sigterm_closes_every_websocket_with_1001_and_exits() {
    let (_name, url) = fresh_database().await;
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
    let status = terminate_and_wait(&mut child).await;
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

    let status = terminate_and_wait(&mut child).await;
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
    let listed: serde_json::Value = http
        .get(format!("http://127.0.0.1:{port}/products"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["productName"], "Embedded");
    assert!(terminate_and_wait(&mut again).await.success());
    let _ = std::fs::remove_dir_all(&data_dir);
}
