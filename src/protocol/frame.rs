//! [`Frame`]: one server message, encoded once into the exact bytes a WebSocket sends.
//!
//! Server-to-client WebSocket frames are never masked (RFC 6455 §5.1), so the frame of one
//! change is byte for byte the same for every subscriber: it is built once, when the change is
//! encoded, and every transport writes (a reference to) those bytes — the distributor straight
//! into sockets that can take them, sessions from their queues, TLS and HTTP/2 streams through
//! their own encryption or stream framing, SSE as the payload of its event.

use std::sync::{Arc, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

/// FIN bit and the text opcode: a complete, unfragmented text message.
const FIN_TEXT: u8 = 0x81;

/// An encoded server message, shared by all its recipients: cloning it bumps one reference
/// count. Holds the complete WebSocket text frame (header and payload) and the payload as text.
#[derive(Clone)]
pub struct Frame(Arc<Encoded>);

impl PartialEq for Frame {
    fn eq(&self, other: &Self) -> bool {
        self.0.wire == other.0.wire
    }
}

impl Eq for Frame {}

struct Encoded {
    /// Header and payload, as written to a plain WebSocket.
    wire: Bytes,
    /// The JSON text: `wire` after its header (the same allocation).
    text: axum::extract::ws::Utf8Bytes,
    /// The Server-Sent Event carrying it, built by the first SSE stream that sends it.
    event: OnceLock<Bytes>,
}

impl Frame {
    /// Encodes `text` as one unmasked WebSocket text frame (copied once, after its header).
    pub fn new(text: &str) -> Self {
        let len = text.len();
        let mut wire = Vec::with_capacity(len + 10);
        wire.push(FIN_TEXT);
        if len < 126 {
            // Fits the 7-bit length (checked just above).
            wire.push(len as u8);
        } else if let Ok(short) = u16::try_from(len) {
            wire.push(126);
            wire.extend_from_slice(&short.to_be_bytes());
        } else {
            wire.push(127);
            wire.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let header = wire.len();
        wire.extend_from_slice(text.as_bytes());
        let wire = Bytes::from(wire);
        // The payload was a `String`: valid UTF-8, so this never takes the fallback.
        let text = axum::extract::ws::Utf8Bytes::try_from(wire.slice(header..)).unwrap_or_default();
        Self(Arc::new(Encoded {
            wire,
            text,
            event: OnceLock::new(),
        }))
    }

    /// The whole Server-Sent Event for this message, `id: <seq>` first if it has one: built
    /// once per frame and shared by every stream that sends it. A frame is always sent with the
    /// same `seq` (a change's own, or none for a reply), so the first caller's is everyone's.
    pub fn event(&self, seq: Option<u64>) -> Bytes {
        self.0
            .event
            .get_or_init(|| {
                let text = self.as_str();
                let mut event = BytesMut::with_capacity(text.len() + 32);
                if let Some(seq) = seq {
                    event.put_slice(b"id: ");
                    event.put_slice(seq.to_string().as_bytes());
                    event.put_u8(b'\n');
                }
                // The JSON is compact: one line, its newlines escaped.
                event.put_slice(b"data: ");
                event.put_slice(text.as_bytes());
                event.put_slice(b"\n\n");
                event.freeze()
            })
            .clone()
    }

    /// The complete frame, header included, as a plain WebSocket writes it.
    pub fn wire(&self) -> &[u8] {
        &self.0.wire
    }

    /// The message text (the frame's payload).
    pub fn as_str(&self) -> &str {
        self.0.text.as_str()
    }

    /// Bytes of the message text.
    pub fn len(&self) -> usize {
        self.0.text.len()
    }

    /// True for an empty message (never sent by rowcast; here for completeness of `len`).
    pub fn is_empty(&self) -> bool {
        self.0.text.is_empty()
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self::new(&text)
    }
}

impl std::fmt::Debug for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Frame").field(&self.as_str()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What tungstenite writes for the same text message: our frames must be byte-identical.
    fn tungstenite_frame(text: &str) -> Vec<u8> {
        let frame = tungstenite::protocol::frame::Frame::message(
            text.as_bytes().to_vec(),
            tungstenite::protocol::frame::coding::OpCode::Data(
                tungstenite::protocol::frame::coding::Data::Text,
            ),
            true,
        );
        let mut out = Vec::new();
        frame.format(&mut out).unwrap();
        out
    }

    #[test]
    fn frames_are_what_a_websocket_library_writes_at_every_length_class() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let text = "x".repeat(len);
            let frame = Frame::new(&text);
            assert_eq!(frame.wire(), tungstenite_frame(&text), "length {len}");
            assert_eq!(frame.as_str(), text);
            assert_eq!(frame.len(), len);
        }
    }

    #[test]
    fn the_event_is_built_once_and_carries_the_id() {
        let frame = Frame::new(r#"{"type":"change","seq":7}"#);
        let event = frame.event(Some(7));
        assert_eq!(
            &event[..],
            b"id: 7\ndata: {\"type\":\"change\",\"seq\":7}\n\n"
        );
        assert_eq!(
            frame.clone().event(Some(7)).as_ptr(),
            event.as_ptr(),
            "shared"
        );
        let reply = Frame::new("{}");
        assert_eq!(&reply.event(None)[..], b"data: {}\n\n");
    }
}
