//! What the LISTEN task reports about itself: read by `/stats`, `/readyz` and `/metrics`
//! through the watch the task owns.

use crate::product::Seq;

/// What the listener reports about itself (for `/stats` and readiness).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[schema(as = ListenerState)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatus {
    /// True while the connection is healthy: LISTENing, or taking the batches of this
    /// instance's leading replication reader (see `listening`).
    pub connected: bool,
    /// False while this instance's replication reader leads: its batches come by hand-off, and
    /// nothing else writes the changelog, so the connection does not LISTEN (health queries and
    /// reads go on).
    pub listening: bool,
    /// Notifications taken off the LISTEN connection (each wakes at most one read; several
    /// waiting at once share it).
    pub notifications: u64,
    /// Connections replaced after a failure since start.
    pub reconnects: u64,
    /// Changes published from reads woken by a notification.
    pub changes_received: u64,
    /// Notifications whose payload named no seq (garbage, or not rowcast's; each still woke
    /// one read).
    pub payloads_skipped: u64,
    /// Changes published from reads after a reconnect or at a health tick.
    pub changes_read_from_changelog: u64,
    /// Changes published as this instance's replication reader handed them over (no read).
    pub changes_handed_over: u64,
    /// The seq of the last change published.
    #[schema(value_type = u64)]
    pub last_seq: Seq,
    /// Consecutive failed attempts to connect and catch up (0 while healthy).
    pub failed_attempts: u64,
    /// Changelog page reads (each bounded by rows and bytes).
    pub changelog_reads: u64,
}
