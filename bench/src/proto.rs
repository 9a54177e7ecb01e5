//! rowcast's public wire protocol as the bench (and the floor server) sees it: client
//! commands, server frames, and the product body the writers send.
//!
//! Server frames are parsed borrowed (`Cow` strings) and unknown fields are ignored, so a
//! server that adds fields (e.g. `"seq"`) or a richer product still parses, and the hot
//! receive path allocates only when a string carries escapes.
//!
//! The bench's own counter travels inside the product (`BenchName`): `productName =
//! "bench:<update>:<send-ns>"` and `unitsAvailable = <per-product version>`. That works for
//! any server that echoes the product it stored, needs no side channel, and lets the
//! receiver compute latency and order by itself.

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

/// A client → server command.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClientCommand {
    pub command: String,
    #[serde(rename = "productIDs")]
    pub product_ids: Vec<u64>,
}

/// `{"command":"subscribe","productIDs":[…]}` as text.
pub fn subscribe_text(ids: &[u64]) -> String {
    command_text("subscribe", ids)
}

/// `{"command":"unsubscribe","productIDs":[…]}` as text.
pub fn unsubscribe_text(ids: &[u64]) -> String {
    command_text("unsubscribe", ids)
}

/// `{"command":"subscribe","productIDs":[…],"since":N}`: resume after seq `since`.
pub fn subscribe_since_text(ids: &[u64], since: u64) -> String {
    command_text_with("subscribe", ids, &format!(",\"since\":{since}"))
}

/// `{"command":"subscribe","productIDs":[…],"snapshot":true}`: the current rows first.
pub fn subscribe_snapshot_text(ids: &[u64]) -> String {
    command_text_with("subscribe", ids, ",\"snapshot\":true")
}

fn command_text(command: &str, ids: &[u64]) -> String {
    command_text_with(command, ids, "")
}

/// The command with `extra` (`,"key":value…`, already JSON) after the ids.
fn command_text_with(command: &str, ids: &[u64], extra: &str) -> String {
    let mut s = String::with_capacity(40 + ids.len() * 9 + extra.len());
    s.push_str("{\"command\":\"");
    s.push_str(command);
    s.push_str("\",\"productIDs\":[");
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&id.to_string());
    }
    s.push(']');
    s.push_str(extra);
    s.push('}');
    s
}

/// Any server → client text frame.
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub action: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub product: Option<WireProduct<'a>>,
    /// Commit-ordered sequence number, when the server sends one.
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, rename = "productIDs")]
    pub product_ids: Option<Vec<u64>>,
    #[serde(default, borrow)]
    pub error: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
}

/// The product fields the bench reads; the rest are skipped.
#[derive(Debug, Deserialize)]
pub struct WireProduct<'a> {
    #[serde(rename = "productId")]
    pub id: u64,
    #[serde(rename = "unitsAvailable", default)]
    pub units_available: i64,
    #[serde(rename = "productName", default, borrow)]
    pub product_name: Cow<'a, str>,
}

impl<'a> ServerFrame<'a> {
    pub fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

/// The product body the writers send (POST and PUT take the same shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProductBody {
    pub manufacturer: String,
    #[serde(rename = "pricePerUnit")]
    pub price_per_unit: String,
    #[serde(rename = "unitsAvailable")]
    pub units_available: i64,
    #[serde(rename = "productName")]
    pub product_name: String,
}

impl ProductBody {
    /// A bench product carrying update number `update`, per-product `version` and the send
    /// time `sent_ns` (see `clock`).
    pub fn bench(update: u64, version: i64, sent_ns: u64) -> Self {
        Self {
            manufacturer: "rowcast-bench".to_owned(),
            price_per_unit: "1.50".to_owned(),
            units_available: version,
            product_name: BenchName { update, sent_ns }.to_string(),
        }
    }
}

/// The counter the bench embeds in `productName`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchName {
    pub update: u64,
    pub sent_ns: u64,
}

impl std::fmt::Display for BenchName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bench:{}:{}", self.update, self.sent_ns)
    }
}

impl BenchName {
    /// `None` for products the bench did not write (someone else's traffic).
    pub fn parse(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("bench:")?;
        let (u, t) = rest.split_once(':')?;
        Some(Self {
            update: u.parse().ok()?,
            sent_ns: t.parse().ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_the_documented_json() {
        assert_eq!(
            subscribe_text(&[1, 2, 3]),
            r#"{"command":"subscribe","productIDs":[1,2,3]}"#
        );
        assert_eq!(
            unsubscribe_text(&[]),
            r#"{"command":"unsubscribe","productIDs":[]}"#
        );
        assert_eq!(
            subscribe_since_text(&[4], 0),
            r#"{"command":"subscribe","productIDs":[4],"since":0}"#
        );
        assert_eq!(
            subscribe_snapshot_text(&[4, 5]),
            r#"{"command":"subscribe","productIDs":[4,5],"snapshot":true}"#
        );
        let back: ClientCommand = serde_json::from_str(&subscribe_text(&[7])).unwrap();
        assert_eq!(
            back,
            ClientCommand {
                command: "subscribe".into(),
                product_ids: vec![7]
            }
        );
    }

    #[test]
    fn change_frame_with_and_without_seq() {
        let t = r#"{"type":"change","action":"UPDATE","product":{"productId":5,"manufacturer":"m","pricePerUnit":"1.50","unitsAvailable":3,"productName":"bench:9:123"}}"#;
        let f = ServerFrame::parse(t).unwrap();
        assert_eq!(f.kind, "change");
        assert_eq!(f.seq, None);
        let p = f.product.unwrap();
        assert_eq!((p.id, p.units_available), (5, 3));
        assert_eq!(
            BenchName::parse(&p.product_name),
            Some(BenchName {
                update: 9,
                sent_ns: 123
            })
        );
        let t = r#"{"type":"change","seq":77,"action":"DELETE","product":{"productId":5,"productName":"x\"y"}}"#;
        let f = ServerFrame::parse(t).unwrap();
        assert_eq!(f.seq, Some(77));
        assert_eq!(BenchName::parse(&f.product.unwrap().product_name), None);
    }

    #[test]
    fn ack_and_error_frames() {
        let f = ServerFrame::parse(r#"{"type":"subscribed","productIDs":[1,2]}"#).unwrap();
        assert_eq!(f.product_ids, Some(vec![1, 2]));
        let f =
            ServerFrame::parse(r#"{"type":"error","error":"bad_command","message":"no"}"#).unwrap();
        assert_eq!(f.error.as_deref(), Some("bad_command"));
    }

    #[test]
    fn bench_name_round_trip() {
        let n = BenchName {
            update: 12,
            sent_ns: 3_000_000_001,
        };
        assert_eq!(BenchName::parse(&n.to_string()), Some(n));
        assert_eq!(BenchName::parse("bench:1"), None);
    }
}
