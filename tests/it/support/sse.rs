//! A Server-Sent Events test client: reads `id:`/`data:` events from a streaming response.

use std::time::Duration;

use serde_json::Value;

use super::ws::ARRIVAL;

#[derive(Debug)]
pub struct SseClient {
    response: reqwest::Response,
    buffer: String,
}

/// One event: its id (changes carry their seq) and its JSON data.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: Option<u64>,
    pub data: Value,
}

impl SseClient {
    /// Opens `url`, sending `Last-Event-ID` if given, as a reconnecting EventSource does.
    pub async fn connect(url: &str, last_event_id: Option<u64>) -> Self {
        let mut request = reqwest::Client::new()
            .get(url)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        Self::from_response(request.send().await.expect("SSE request"))
    }

    /// Reads events from a response the test made itself (with its own headers).
    pub fn from_response(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        Self {
            response,
            buffer: String::new(),
        }
    }

    /// The next event with data (keep-alive comments are skipped).
    pub async fn next_event(&mut self) -> SseEvent {
        self.try_next_event(ARRIVAL)
            .await
            .expect("an event arrives in time")
    }

    /// Asserts that the server ends the stream (within the arrival bound) with no more events.
    pub async fn expect_end(&mut self) {
        let deadline = tokio::time::Instant::now() + ARRIVAL;
        loop {
            assert!(
                !self.buffer.contains("data:"),
                "expected the stream to end, got more: {:?}",
                self.buffer
            );
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("the server ends the stream in time");
            match chunk {
                Ok(Some(chunk)) => self
                    .buffer
                    .push_str(std::str::from_utf8(&chunk).expect("UTF-8 stream")),
                Ok(None) | Err(_) => return,
            }
        }
    }

    pub async fn try_next_event(&mut self, limit: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(value) = line.strip_prefix("id:") {
                        id = Some(value.trim().parse().expect("numeric event id"));
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                if !data.is_empty() {
                    return Some(SseEvent {
                        id,
                        data: serde_json::from_str(&data).expect("JSON data"),
                    });
                }
                continue;
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .ok()?
                .expect("stream read")?;
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("UTF-8 stream"));
        }
    }
}
