//! A WebSocket test client speaking rowcast's protocol. Timeouts here are "never arrived"
//! bounds, not performance assertions.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a message may take before the test calls it lost.
pub const ARRIVAL: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct WsClient {
    socket: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl WsClient {
    pub async fn connect(url: &str) -> Self {
        let (socket, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("WebSocket connects");
        Self { socket }
    }

    /// Connects, or says why not (for clients that retry).
    pub async fn try_connect(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (socket, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { socket })
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket
            .send(Message::text(text))
            .await
            .expect("send text frame");
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.socket
            .send(Message::binary(data))
            .await
            .expect("send binary frame");
    }

    /// Connects from the loopback address `source` (e.g. 127.0.0.2), so one test can be several
    /// client addresses; the refusal, if the server answers the upgrade with an error.
    pub async fn try_connect_from(
        url: &str,
        source: std::net::IpAddr,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let addr: std::net::SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port in the URL")
            .parse()
            .expect("a socket address in the URL");
        let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
        socket
            .bind(std::net::SocketAddr::new(source, 0))
            .expect("bind the source address");
        let stream = socket.connect(addr).await.expect("TCP connect");
        let (socket, _) =
            tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream)).await?;
        Ok(Self { socket })
    }

    /// Connects with a tiny kernel receive buffer, so a client that stops reading backs up
    /// into the server quickly.
    pub async fn connect_with_small_receive_buffer(url: &str) -> Self {
        let addr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port in the URL")
            .parse()
            .expect("a socket address in the URL");
        let socket = tokio::net::TcpSocket::new_v4().expect("TCP socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("TCP connect");
        let (socket, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("WebSocket handshake");
        Self { socket }
    }

    /// Subscribes and waits for the ack, which lists the ids once each, in request order;
    /// returns the ack's seq (changes after it follow).
    pub async fn subscribe(&mut self, ids: &[i64]) -> u64 {
        self.command("subscribe", ids).await;
        self.expect_ack(ids).await
    }

    /// Reads the next message and asserts it is the subscribe ack for `ids`; returns its seq.
    pub async fn expect_ack(&mut self, ids: &[i64]) -> u64 {
        let ack = self.next_json().await;
        assert_eq!(ack["type"], "subscribed", "{ack}");
        assert_eq!(ack["productIDs"], json!(dedup(ids)), "{ack}");
        ack["seq"].as_u64().expect("the ack carries a seq")
    }

    /// Sends any JSON command, or says why it could not be sent.
    pub async fn try_send_json(
        &mut self,
        command: &Value,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        self.socket.send(Message::text(command.to_string())).await
    }

    /// Sends any JSON command.
    pub async fn send_json(&mut self, command: &Value) {
        self.send_text(&command.to_string()).await;
    }

    /// Unsubscribes and waits for the ack.
    pub async fn unsubscribe(&mut self, ids: &[i64]) {
        self.command("unsubscribe", ids).await;
        let ack = self.next_json().await;
        assert_eq!(
            ack,
            json!({"type": "unsubscribed", "productIDs": dedup(ids)})
        );
    }

    /// The next data message as raw text.
    pub async fn next_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(ARRIVAL, self.socket.next())
                .await
                .expect("a message arrives in time");
            match message {
                Some(Ok(Message::Text(text))) => return text.as_str().to_owned(),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    pub async fn command(&mut self, command: &str, ids: &[i64]) {
        self.send_text(&json!({"command": command, "productIDs": ids}).to_string())
            .await;
    }

    /// The next data message as JSON (pings are answered by tungstenite and skipped).
    pub async fn next_json(&mut self) -> Value {
        self.try_next_json(ARRIVAL)
            .await
            .expect("a message arrives in time")
    }

    /// The next data message within `limit`, or None.
    pub async fn try_next_json(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Some(serde_json::from_str(&text).expect("server sends JSON"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// The next data message within `limit`: Ok(None) if none came, Err(close code) if the
    /// connection ended (for clients that reconnect and resume).
    pub async fn next_or_closed(&mut self, limit: Duration) -> Result<Option<Value>, Option<u16>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let Ok(message) = tokio::time::timeout_at(deadline, self.socket.next()).await else {
                return Ok(None);
            };
            match message {
                Some(Ok(Message::Text(text))) => {
                    return Ok(Some(
                        serde_json::from_str(&text).expect("server sends JSON"),
                    ));
                }
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(None),
            }
        }
    }

    /// The next change message; asserts its type.
    pub async fn next_change(&mut self) -> Value {
        let message = self.next_json().await;
        assert_eq!(message["type"], "change", "{message}");
        message
    }

    /// Asserts no data message arrives within `window`.
    pub async fn expect_silence(&mut self, window: Duration) {
        if let Some(message) = self.try_next_json(window).await {
            panic!("expected no message, got {message}");
        }
    }

    /// Reads until the server closes; returns the close code (None if the TCP connection ended
    /// without a close frame).
    pub async fn close_code(&mut self) -> Option<u16> {
        self.close_frame().await.map(|(code, _)| code)
    }

    /// Reads until the server closes; returns the close code and reason (None if the TCP
    /// connection ended without a close frame).
    pub async fn close_frame(&mut self) -> Option<(u16, String)> {
        loop {
            match tokio::time::timeout(ARRIVAL, self.socket.next())
                .await
                .expect("the server closes in time")
            {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Closes politely.
    pub async fn close(mut self) {
        let _ = self.socket.close(None).await;
    }
}

fn dedup(ids: &[i64]) -> Vec<i64> {
    let mut seen = std::collections::HashSet::new();
    ids.iter().copied().filter(|id| seen.insert(*id)).collect()
}
