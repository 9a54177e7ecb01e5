//! The WebSocket wire protocol: parsing client commands, encoding server messages, and the
//! closed table of close codes. Pure: no I/O, no sockets; `session` and `listener` call it.
//!
//! Client → server (text frames):
//! `{"command":"subscribe","productIDs":[1,2]}` (optionally with `"since":<seq>` to resume, or
//! `"snapshot":true` for the current rows first), `{"command":"unsubscribe","productIDs":[2]}`.
//! Server → client: `{"type":"subscribed","productIDs":[…],"seq":S}` once applied (changes with
//! seq > S follow), `{"type":"unsubscribed","productIDs":[…]}`,
//! `{"type":"snapshot","seq":S,"products":[…],"missing":[…]}`,
//! `{"type":"reset",…}` when a resume position is older than the changelog keeps,
//! `{"type":"change","seq":N,"action":…,"product":{…}}` per committed change, and
//! `{"type":"error","error":<code>,"message":…}` for input the server could not use.
//!
//! Whole catalog: `{"command":"subscribe","all":true}` (with the same `since`, `snapshot` and
//! `delivery` options) and `{"command":"unsubscribe","all":true}`; their messages carry
//! `"all":true` instead of `productIDs`, and an all-snapshot comes in pages (`"more":true` on
//! every page but the last). Presence: `"presence":true` in a by-id subscribe asks for
//! `{"type":"presence","productId":N,"watchers":W}` messages.
//!
//! Also names [`Frame`], the encoded message every transport sends. Imports `product`, and
//! `distributor` for the one trait a `Frame` implements so the distributor can carry it.

use serde_json::Value;

use crate::product::{ProductId, SubscriptionStart};

mod encode;

pub use encode::{
    encode_ack, encode_all_ack, encode_all_reset, encode_all_snapshot_page, encode_change,
    encode_conflated_change, encode_error, encode_presence, encode_reset, encode_snapshot,
};

mod frame;

pub use frame::Frame;

/// What a client whose replay or snapshot found the change history busy is told: the reason of
/// its 1013 close frame (WebSocket), the message of its `history_busy` error (SSE).
pub const HISTORY_BUSY: &str = "change history is busy; reconnect and resume";

/// The WebSocket close codes rowcast sends: one closed table. `docs/protocol.md` lists the same
/// codes (a test compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1001 Going Away: the server is shutting down. Reconnect (with backoff) to another or the
    /// restarted instance.
    GoingAway,
    /// 1008 Policy Violation: the peer stopped answering pings in time. Reconnect if still alive.
    Policy,
    /// 1009 Message Too Big: a client frame exceeded the configured limit. Fix the client; do not
    /// resend the same frame.
    TooBig,
    /// 1011 Internal Error: the server could not serve the session (its distributor stopped, or
    /// the change history could not be read). Reconnect with backoff.
    Internal,
    /// 1013 Try Again Later: the server shed this session to protect everyone else. Either the
    /// client read too slowly and its queue overflowed (reconnect and read faster), or its
    /// replay or snapshot found the change history busy — too many being read at once — with
    /// the reason [`HISTORY_BUSY`] (reconnect with backoff and resume with `since`: nothing
    /// is lost).
    TryAgainLater,
}

impl CloseCode {
    /// Every code, for documentation checks.
    pub const ALL: [Self; 5] = [
        Self::GoingAway,
        Self::Policy,
        Self::TooBig,
        Self::Internal,
        Self::TryAgainLater,
    ];

    /// The number on the wire.
    pub const fn code(self) -> u16 {
        match self {
            Self::GoingAway => 1001,
            Self::Policy => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
            Self::TryAgainLater => 1013,
        }
    }
}

/// Machine-readable error codes in `{"type":"error"}` messages: one closed table, also listed in
/// `docs/protocol.md` (a test compares them). The connection stays open and keeps its
/// subscriptions after each of them, except [`Self::HistoryBusy`], which ends an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not valid JSON.
    MalformedJson,
    /// The JSON is not an object with a known `command`.
    UnknownCommand,
    /// The command's fields are missing, unknown or of the wrong type.
    InvalidCommand,
    /// An id is not an integer in 0..=9007199254740991 (2^53 - 1).
    InvalidProductId,
    /// The frame was binary; only text frames carry commands.
    BinaryFrame,
    /// Applying the subscribe would exceed the per-connection cap; nothing was applied.
    TooManySubscriptions,
    /// Applying the subscribe would exceed the subscriptions all connections from the client's
    /// address may hold together; nothing was applied.
    AddressSubscriptionBudget,
    /// Applying the subscribe would exceed the subscriptions the server holds for everyone;
    /// nothing was applied.
    ServerSubscriptionBudget,
    /// SSE only: the stream's replay or snapshot found the change history busy (too many being
    /// read at once), and the stream ends after this message. `EventSource` reconnects by
    /// itself and resumes after `Last-Event-ID`, so nothing is lost. (A WebSocket is closed with
    /// 1013 instead.)
    HistoryBusy,
}

impl ErrorCode {
    /// Every code, for documentation checks.
    pub const ALL: [Self; 9] = [
        Self::MalformedJson,
        Self::UnknownCommand,
        Self::InvalidCommand,
        Self::InvalidProductId,
        Self::BinaryFrame,
        Self::TooManySubscriptions,
        Self::AddressSubscriptionBudget,
        Self::ServerSubscriptionBudget,
        Self::HistoryBusy,
    ];

    /// The code on the wire.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::UnknownCommand => "unknown_command",
            Self::InvalidCommand => "invalid_command",
            Self::InvalidProductId => "invalid_product_id",
            Self::BinaryFrame => "binary_frame",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::AddressSubscriptionBudget => "address_subscription_budget",
            Self::ServerSubscriptionBudget => "server_subscription_budget",
            Self::HistoryBusy => "history_busy",
        }
    }
}

/// A command a client sent, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientCommand {
    /// Start receiving changes of these products (set semantics: repeats are no-ops); the
    /// last field is `"presence":true` (watcher counts wanted, for the whole connection).
    Subscribe(Vec<ProductId>, SubscriptionStart, Versions, bool),
    /// Stop receiving changes of these products.
    Unsubscribe(Vec<ProductId>),
    /// Start receiving changes of every product, present and future (`"all":true`).
    SubscribeAll(SubscriptionStart, Versions),
    /// Stop receiving every product's changes (by-id subscriptions stay).
    UnsubscribeAll,
}

/// Which versions a subscriber gets after it has stopped reading for a while (`"delivery"` in
/// a subscribe). Applies to the whole connection once asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Versions {
    /// `"latest"` (default): the newest version of each product, marked `"conflated":true`
    /// where versions were skipped.
    #[default]
    Latest,
    /// `"all"`: every version, read from the changelog at the client's pace.
    All,
}

/// Why a client frame could not be used; becomes one `{"type":"error"}` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ProtocolError {
    /// One of [`error_code`].
    pub code: ErrorCode,
    /// Human-readable detail naming what was wrong.
    pub message: String,
}

impl ProtocolError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl ClientCommand {
    /// Parses one text frame. Ids are deduplicated, keeping the first occurrence's position.
    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        // Most frames are plain, valid subscribes and unsubscribes: read those straight into
        // integers (a generic JSON tree of 1 024 ids was the largest single cost of a subscribe).
        // Anything else — options, bad input — takes the general path, which names the problem.
        if let Ok(plain) = serde_json::from_str::<PlainCommand>(text) {
            if let Some(ids) = plain
                .product_ids
                .iter()
                .map(|&id| i64::try_from(id).ok().and_then(ProductId::new))
                .collect::<Option<Vec<ProductId>>>()
            {
                let ids = dedup_keeping_order(ids);
                return Ok(match plain.command {
                    PlainVerb::Subscribe => {
                        Self::Subscribe(ids, SubscriptionStart::Live, Versions::Latest, false)
                    }
                    PlainVerb::Unsubscribe => Self::Unsubscribe(ids),
                });
            }
        }
        Self::parse_general(text)
    }

    /// Parses any frame, with an error that says what is wrong.
    fn parse_general(text: &str) -> Result<Self, ProtocolError> {
        let value: Value = serde_json::from_str(text).map_err(|err| {
            ProtocolError::new(
                ErrorCode::MalformedJson,
                format!("frame is not valid JSON: {err}"),
            )
        })?;
        let Value::Object(mut members) = value else {
            return Err(ProtocolError::new(
                ErrorCode::UnknownCommand,
                "expected a JSON object like {\"command\":\"subscribe\",\"productIDs\":[1]}",
            ));
        };
        let command = match members.remove("command") {
            Some(Value::String(command)) => command,
            Some(_) => {
                return Err(ProtocolError::new(
                    ErrorCode::UnknownCommand,
                    "`command` must be a string: \"subscribe\" or \"unsubscribe\"",
                ));
            }
            None => {
                return Err(ProtocolError::new(
                    ErrorCode::UnknownCommand,
                    "missing `command`: expected \"subscribe\" or \"unsubscribe\"",
                ));
            }
        };
        let subscribing = match command.as_str() {
            "subscribe" => true,
            "unsubscribe" => false,
            other => {
                return Err(ProtocolError::new(
                    ErrorCode::UnknownCommand,
                    format!("unknown command {other:?}: expected \"subscribe\" or \"unsubscribe\""),
                ));
            }
        };
        let all = match members.remove("all") {
            None | Some(Value::Null | Value::Bool(false)) => false,
            Some(Value::Bool(true)) => true,
            Some(value) => {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidCommand,
                    format!("`all` must be true or false; got {value}"),
                ));
            }
        };
        if all {
            return parse_all(subscribing, &command, members);
        }
        let ids = match members.remove("productIDs") {
            Some(Value::Array(ids)) => ids,
            Some(_) => {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidCommand,
                    "`productIDs` must be an array of product ids",
                ));
            }
            None => {
                return Err(ProtocolError::new(
                    ErrorCode::InvalidCommand,
                    format!(
                        "`{command}` needs `productIDs`, an array of product ids, or `\"all\":true`"
                    ),
                ));
            }
        };
        let (start, versions, presence) = if subscribing {
            (
                parse_start(&mut members)?,
                parse_versions(&mut members)?,
                parse_presence(&mut members)?,
            )
        } else {
            (SubscriptionStart::Live, Versions::Latest, false)
        };
        if let Some(unknown) = members.keys().next() {
            return Err(ProtocolError::new(
                ErrorCode::InvalidCommand,
                format!("unknown field `{unknown}` in `{command}`"),
            ));
        }
        let mut parsed = Vec::with_capacity(ids.len());
        for (index, raw) in ids.iter().enumerate() {
            let id = ProductId::from_json(raw).ok_or_else(|| {
                ProtocolError::new(
                    ErrorCode::InvalidProductId,
                    format!(
                        "productIDs[{index}] = {raw} is not a product id (an integer from 0 to {})",
                        ProductId::MAX
                    ),
                )
            })?;
            parsed.push(id);
        }
        let parsed = dedup_keeping_order(parsed);
        Ok(if subscribing {
            Self::Subscribe(parsed, start, versions, presence)
        } else {
            Self::Unsubscribe(parsed)
        })
    }
}

/// The rest of a command with `"all":true`: the same options as a by-id subscribe, except
/// `productIDs` (contradictory) and `presence` (watcher counts are per product).
fn parse_all(
    subscribing: bool,
    command: &str,
    mut members: serde_json::Map<String, Value>,
) -> Result<ClientCommand, ProtocolError> {
    if members.contains_key("productIDs") {
        return Err(ProtocolError::new(
            ErrorCode::InvalidCommand,
            format!("`{command}` takes either `productIDs` or `\"all\":true`, not both"),
        ));
    }
    let (start, versions) = if subscribing {
        (parse_start(&mut members)?, parse_versions(&mut members)?)
    } else {
        (SubscriptionStart::Live, Versions::Latest)
    };
    if let Some(unknown) = members.keys().next() {
        let hint = if unknown == "presence" {
            " (watcher counts are asked for with a by-id subscribe)"
        } else {
            ""
        };
        return Err(ProtocolError::new(
            ErrorCode::InvalidCommand,
            format!("unknown field `{unknown}` in `{command}` with `all`{hint}"),
        ));
    }
    Ok(if subscribing {
        ClientCommand::SubscribeAll(start, versions)
    } else {
        ClientCommand::UnsubscribeAll
    })
}

/// Reads the optional `presence` member of a subscribe.
fn parse_presence(members: &mut serde_json::Map<String, Value>) -> Result<bool, ProtocolError> {
    match members.remove("presence") {
        None | Some(Value::Null | Value::Bool(false)) => Ok(false),
        Some(Value::Bool(true)) => Ok(true),
        Some(value) => Err(ProtocolError::new(
            ErrorCode::InvalidCommand,
            format!("`presence` must be true or false; got {value}"),
        )),
    }
}

/// A subscribe without options or an unsubscribe, as most clients send them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainCommand {
    command: PlainVerb,
    #[serde(rename = "productIDs")]
    product_ids: Vec<u64>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum PlainVerb {
    Subscribe,
    Unsubscribe,
}

/// Drops repeated ids, keeping each first occurrence where it was.
fn dedup_keeping_order(ids: Vec<ProductId>) -> Vec<ProductId> {
    // Clients usually send ids in increasing order: then there is nothing to drop.
    if ids.windows(2).all(|pair| pair[0] < pair[1]) {
        return ids;
    }
    let mut seen = std::collections::HashSet::with_capacity_and_hasher(
        ids.len(),
        foldhash::fast::RandomState::default(),
    );
    ids.into_iter().filter(|id| seen.insert(*id)).collect()
}

/// Reads the optional `delivery` member of a subscribe.
fn parse_versions(members: &mut serde_json::Map<String, Value>) -> Result<Versions, ProtocolError> {
    match members.remove("delivery") {
        None | Some(Value::Null) => Ok(Versions::Latest),
        Some(Value::String(mode)) if mode == "latest" => Ok(Versions::Latest),
        Some(Value::String(mode)) if mode == "all" => Ok(Versions::All),
        Some(value) => Err(ProtocolError::new(
            ErrorCode::InvalidCommand,
            format!("`delivery` must be \"latest\" or \"all\"; got {value}"),
        )),
    }
}

/// Reads the optional `since` / `snapshot` members of a subscribe.
fn parse_start(
    members: &mut serde_json::Map<String, Value>,
) -> Result<SubscriptionStart, ProtocolError> {
    let since = members.remove("since");
    let snapshot = members.remove("snapshot");
    let since = match since {
        None | Some(Value::Null) => None,
        Some(value) => Some(value.as_u64().filter(|seq| i64::try_from(*seq).is_ok()).ok_or_else(
            || {
                ProtocolError::new(
                    ErrorCode::InvalidCommand,
                    format!("`since` must be a seq from a change message (an integer ≥ 0); got {value}"),
                )
            },
        )?),
    };
    let snapshot = match snapshot {
        None | Some(Value::Null | Value::Bool(false)) => false,
        Some(Value::Bool(true)) => true,
        Some(value) => {
            return Err(ProtocolError::new(
                ErrorCode::InvalidCommand,
                format!("`snapshot` must be true or false; got {value}"),
            ));
        }
    };
    match (since, snapshot) {
        (Some(_), true) => Err(ProtocolError::new(
            ErrorCode::InvalidCommand,
            "use either `since` (resume) or `snapshot` (start from the current rows), not both",
        )),
        (Some(seq), false) => Ok(SubscriptionStart::Since(seq)),
        (None, true) => Ok(SubscriptionStart::Snapshot),
        (None, false) => Ok(SubscriptionStart::Live),
    }
}

#[cfg(test)]
mod tests;
