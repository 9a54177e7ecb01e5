//! Server → client messages: each encoder builds one message's JSON in the shape
//! `docs/protocol.md` documents. Pure; the tests beside `mod.rs` pin the shapes.

use serde::Serialize;

use super::ErrorCode;
use crate::product::{Change, Product, ProductId, ResetCause, Seq};

/// Encodes a change once; the same bytes go to every subscriber.
pub fn encode_change(change: &Change) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        r#type: &'static str,
        #[serde(flatten)]
        change: &'a Change,
    }
    to_json(&Wire {
        r#type: "change",
        change,
    })
}

/// Encodes a change that stands for `versions` changes of its product: the client had stopped
/// reading, so the versions between were skipped and this is the newest (`"conflated":true`).
pub fn encode_conflated_change(change: &Change) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        r#type: &'static str,
        #[serde(flatten)]
        change: &'a Change,
        conflated: bool,
    }
    to_json(&Wire {
        r#type: "change",
        change,
        conflated: true,
    })
}

/// Encodes the acknowledgement of an applied subscribe (with the seq after which its changes
/// follow) or unsubscribe (without).
pub fn encode_ack(ids: &[ProductId], seq: Option<Seq>) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        r#type: &'static str,
        #[serde(rename = "productIDs")]
        product_ids: &'a [ProductId],
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<Seq>,
    }
    to_json(&Wire {
        r#type: if seq.is_some() {
            "subscribed"
        } else {
            "unsubscribed"
        },
        product_ids: ids,
        seq,
    })
}

/// Encodes the rows of subscribed products as of `seq`; `missing` ids have no row.
pub fn encode_snapshot(seq: Seq, products: &[Product], missing: &[ProductId]) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        r#type: &'static str,
        seq: Seq,
        products: &'a [Product],
        missing: &'a [ProductId],
    }
    to_json(&Wire {
        r#type: "snapshot",
        seq,
        products,
        missing,
    })
}

/// Tells a client that its stream cannot go on from `since` with a replay; a snapshot of the
/// products follows, then every change after it.
pub fn encode_reset(ids: &[ProductId], since: Seq, cause: ResetCause) -> String {
    reset(Some(ids), since, cause)
}

/// Like [`encode_reset`] for a subscribe-all: `"all":true` instead of `productIDs`; a paged
/// snapshot of the whole catalog follows.
pub fn encode_all_reset(since: Seq, cause: ResetCause) -> String {
    reset(None, since, cause)
}

/// A reset of `ids`, or of the whole catalog (None).
fn reset(ids: Option<&[ProductId]>, since: Seq, cause: ResetCause) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire<'a> {
        r#type: &'static str,
        #[serde(rename = "productIDs", skip_serializing_if = "Option::is_none")]
        product_ids: Option<&'a [ProductId]>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        all: bool,
        since: Seq,
        reason: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        pruned_through: Option<Seq>,
        #[serde(skip_serializing_if = "Option::is_none")]
        latest: Option<Seq>,
        message: String,
    }
    let (reason, pruned_through, latest, message) = match cause {
        ResetCause::Pruned { pruned_through } => (
            "pruned",
            Some(pruned_through),
            None,
            format!(
                "changes up to seq {pruned_through} are no longer kept, so a resume from {since} could miss some; \
                 a snapshot of the current rows follows, then every change after it"
            ),
        ),
        ResetCause::Rewound { latest } => (
            "rewound",
            None,
            Some(latest),
            format!(
                "the database's history does not continue from seq {since} (its newest is {latest}: \
                 restored, failed over or re-created); a snapshot of the current rows follows, then every change after it"
            ),
        ),
    };
    to_json(&Wire {
        r#type: "reset",
        product_ids: ids,
        all: ids.is_none(),
        since,
        reason,
        pruned_through,
        latest,
        message,
    })
}

/// Encodes the acknowledgement of a subscribe-all (changes with seq > `seq` follow) or, without
/// a seq, of an unsubscribe-all.
pub fn encode_all_ack(seq: Option<Seq>) -> String {
    #[derive(Serialize)]
    struct Wire {
        r#type: &'static str,
        all: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        seq: Option<Seq>,
    }
    to_json(&Wire {
        r#type: if seq.is_some() {
            "subscribed"
        } else {
            "unsubscribed"
        },
        all: true,
        seq,
    })
}

/// Encodes one page of the whole catalog as of `seq`; `more` is true on every page but the
/// last (the catalog is complete once a page without it arrived).
pub fn encode_all_snapshot_page(seq: Seq, products: &[Product], more: bool) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        r#type: &'static str,
        all: bool,
        seq: Seq,
        products: &'a [Product],
        more: bool,
    }
    to_json(&Wire {
        r#type: "snapshot",
        all: true,
        seq,
        products,
        more,
    })
}

/// Encodes a product's watcher count, summed over every instance on the database.
pub fn encode_presence(product: ProductId, watchers: u64) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Wire {
        r#type: &'static str,
        product_id: ProductId,
        watchers: u64,
    }
    to_json(&Wire {
        r#type: "presence",
        product_id: product,
        watchers,
    })
}

/// Encodes an error message for the client.
pub fn encode_error(code: ErrorCode, message: &str) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        r#type: &'static str,
        error: &'a str,
        message: &'a str,
    }
    to_json(&Wire {
        r#type: "error",
        error: code.as_str(),
        message,
    })
}

fn to_json(value: &impl Serialize) -> String {
    // Serializing these plain structs (strings, integers, derived enums) to a String cannot fail:
    // serde_json fails only for non-string map keys or failing custom Serialize impls.
    serde_json::to_string(value).unwrap_or_else(|err| {
        tracing::error!(cause = %err, "encoding a server message failed");
        String::new()
    })
}
