//! A client that stops reading is closed after `--write-timeout`, whatever it reads: an SSE
//! stream whose reader never reads its socket is closed and leaves the distributor under either
//! slow-client policy, while an honest reader on the same instance gets every change. And an
//! SSE stream evicted while hyper was not polling it sends nothing more once it is polled.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{SseClient, TestApp, committed_changes, spawn_app_with, wait_until};

/// Rounds of writes, and changes per round: the honest reader reads each round before the next
/// is written, so it is never more than one round behind.
const ROUNDS: usize = 50;
const PER_ROUND: usize = 5;

/// Sends `GET /products/events?ids=<id>` over a socket with a small receive buffer and never
/// reads it (a zero TCP window, as far as the server can tell).
async fn stuck_sse_reader(app: &TestApp, id: i64) -> TcpStream {
    let addr: SocketAddr = app
        .base_url
        .trim_start_matches("http://")
        .parse()
        .expect("a socket address in the base URL");
    let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("TCP connect");
    let request = format!(
        "GET /products/events?ids={id} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// The value of the `/metrics` sample written exactly as `series` (name and labels).
async fn metric(app: &TestApp, series: &str) -> f64 {
    let text = app.metrics_text().await;
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
        .parse()
        .unwrap()
}

/// Reads until the server ends the connection (EOF, or a reset of the data it gave up on);
/// false if it is still open after `limit`.
async fn ends_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buffer = vec![0; 1 << 16];
    tokio::time::timeout(limit, async {
        while let Ok(read) = stream.read(&mut buffer).await {
            if read == 0 {
                return;
            }
        }
    })
    .await
    .is_ok()
}

async fn a_stuck_sse_reader_is_closed_and_an_honest_one_gets_every_change(policy: &[&str]) {
    let mut flags = vec!["--write-timeout", "2s"];
    flags.extend_from_slice(policy);
    let app = spawn_app_with(&flags).await;
    // 100 KB per change, 25 MB in all: far more than the kernel buffers of a reader that never
    // reads hold on both sides, so the server's writes to it block.
    let id = app.create_heavy_product(100_000).await;
    let events = format!("{}/products/events?ids={id}", app.base_url);

    let mut honest = SseClient::connect(&events, None).await;
    let ack = honest.next_event().await.data;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    let position = ack["seq"].as_u64().unwrap();
    let mut stuck = stuck_sse_reader(&app, id).await;
    app.wait_for_sessions(2).await;
    let open = app.stats().await["transport"]["connectionsOpen"]
        .as_u64()
        .unwrap();

    let mut received = Vec::new();
    for _ in 0..ROUNDS {
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN FOR i IN 1..{PER_ROUND} LOOP
                 UPDATE products SET units_available = units_available + 1 WHERE product_id = {id};
             END LOOP; END $$"
        ))
        .execute(&app.pool)
        .await
        .unwrap();
        for _ in 0..PER_ROUND {
            let event = honest.next_event().await;
            assert_eq!(event.data["type"], "change", "{}", event.data);
            received.push((id, event.id.expect("changes carry their seq")));
        }
    }

    // Without a write deadline the stuck reader's connection stays open for good (and under
    // the conflate policy its session too, holding its queue).
    wait_until(
        Duration::from_secs(10),
        "the stuck reader's connection closed by the write deadline",
        || async {
            let stats = app.stats().await;
            let transport = &stats["transport"];
            transport["writeTimeouts"].as_u64() >= Some(1)
                && transport["connectionsOpen"].as_u64() < Some(open)
                && stats["sessions"] == json!(1)
        },
    )
    .await;
    let stats = app.stats().await;
    assert_eq!(stats["subscriptions"], 1, "{stats}");
    if policy.contains(&"disconnect") {
        assert_eq!(stats["slowSessionsEvicted"], 1, "{stats}");
    }
    assert!(metric(&app, "rowcast_write_timeouts_total").await >= 1.0);

    // The honest reader got every change, in order, and keeps getting them.
    assert_eq!(
        received,
        committed_changes(&app.pool, &[id], position).await
    );
    for units in 0..3 {
        app.patch_product(id, json!({"unitsAvailable": units}))
            .await;
        let event = honest.next_event().await;
        assert_eq!(event.data["product"]["unitsAvailable"], units);
    }

    // When the stuck reader finally reads, it gets what the kernel still held, then the end.
    assert!(
        ends_within(&mut stuck, Duration::from_secs(30)).await,
        "the server closed the stuck reader's connection"
    );
}

#[tokio::test]
async fn an_sse_reader_that_never_reads_is_closed_under_the_default_conflate_policy() {
    a_stuck_sse_reader_is_closed_and_an_honest_one_gets_every_change(&[]).await;
}

#[tokio::test]
async fn an_evicted_sse_reader_that_never_reads_is_closed_under_the_disconnect_policy() {
    // A queue of 8 overflows within a fraction of a second once the stuck reader's socket is
    // full, well before the 2 s deadline: the stream is evicted while hyper is not polling it,
    // which it would never notice by itself. The honest reader is at most 5 changes behind.
    a_stuck_sse_reader_is_closed_and_an_honest_one_gets_every_change(&[
        "--slow-client-policy",
        "disconnect",
        "--outbox-capacity",
        "8",
    ])
    .await;
}

/// Reads until the chunked body's last chunk: the stream ended (the connection stays open).
async fn read_to_end_of_body(stream: &mut TcpStream) {
    let mut tail = Vec::new();
    let mut buffer = vec![0; 1 << 16];
    while !tail.ends_with(b"\r\n0\r\n\r\n") {
        let read = stream.read(&mut buffer).await.unwrap();
        assert!(read > 0, "the connection closed before the body ended");
        tail.extend_from_slice(&buffer[..read]);
        let keep = tail.len().saturating_sub(16);
        tail.drain(..keep);
    }
}

#[tokio::test]
async fn an_evicted_sse_stream_sends_nothing_more_once_its_reader_reads_again() {
    // The deadline stays out of the way here: the readers start reading long before it.
    let app = spawn_app_with(&[
        "--slow-client-policy",
        "disconnect",
        "--outbox-capacity",
        "32",
        "--write-timeout",
        "5m",
    ])
    .await;
    let id = app.create_heavy_product(100_000).await;
    // Several readers: what a stream did once polled again after its eviction used to be
    // decided at random, so one reader alone would let a regression pass by chance.
    const READERS: usize = 4;
    let mut stuck = Vec::new();
    for _ in 0..READERS {
        stuck.push(stuck_sse_reader(&app, id).await);
    }
    app.wait_for_sessions(READERS as u64).await;
    // 25 MB, in transactions of 10 changes.
    for _ in 0..25 {
        sqlx::raw_sql(&format!(
            "DO $$ BEGIN FOR i IN 1..10 LOOP
                 UPDATE products SET units_available = units_available + 1 WHERE product_id = {id};
             END LOOP; END $$"
        ))
        .execute(&app.pool)
        .await
        .unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "the stuck readers' eviction",
        || async { app.stats().await["slowSessionsEvicted"] == json!(READERS) },
    )
    .await;
    let sse = r#"rowcast_messages_delivered_total{transport="sse"}"#;
    let delivered = metric(&app, sse).await;

    // Each reader drains its socket; hyper polls its stream again, which ends at once: the
    // body's last chunk follows what had already been handed to hyper.
    for reader in &mut stuck {
        tokio::time::timeout(Duration::from_secs(30), read_to_end_of_body(reader))
            .await
            .expect("the evicted stream ended once polled");
    }
    assert_eq!(
        metric(&app, sse).await,
        delivered,
        "nothing was handed out after the evictions"
    );
}
