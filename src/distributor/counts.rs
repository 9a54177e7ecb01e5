//! The actor's running totals in atomics: written only by the actor (after each batch of
//! commands, so a busy actor pays a dozen relaxed stores per batch, not per change), read by
//! anyone at any time without a message. Fields are stored one by one, so a reader may see one
//! batch's sessions beside the next batch's subscriptions: fine for monitoring, which is all
//! this is for.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use super::{Refusals, Stats};

#[derive(Debug, Default)]
pub(super) struct Counts {
    sessions: AtomicU64,
    subscriptions: AtomicU64,
    products_with_subscribers: AtomicU64,
    all_subscribers: AtomicU64,
    changes_published: AtomicU64,
    messages_queued: AtomicU64,
    messages_written_directly: AtomicU64,
    bytes_written_directly: AtomicU64,
    slow_sessions_evicted: AtomicU64,
    changes_deferred: AtomicU64,
    resets: AtomicU64,
    last_seq: AtomicU64,
    sessions_server: AtomicU64,
    sessions_address: AtomicU64,
    subscriptions_connection: AtomicU64,
    subscriptions_address: AtomicU64,
    subscriptions_server: AtomicU64,
}

impl Counts {
    /// Publishes the actor's totals.
    pub(super) fn store(&self, stats: &Stats) {
        let put = |cell: &AtomicU64, value: u64| cell.store(value, Relaxed);
        put(&self.sessions, stats.sessions as u64);
        put(&self.subscriptions, stats.subscriptions as u64);
        put(
            &self.products_with_subscribers,
            stats.products_with_subscribers as u64,
        );
        put(&self.all_subscribers, stats.all_subscribers as u64);
        put(&self.changes_published, stats.changes_published);
        put(&self.messages_queued, stats.messages_queued);
        put(
            &self.messages_written_directly,
            stats.messages_written_directly,
        );
        put(&self.bytes_written_directly, stats.bytes_written_directly);
        put(&self.slow_sessions_evicted, stats.slow_sessions_evicted);
        put(&self.changes_deferred, stats.changes_deferred);
        put(&self.resets, stats.resets);
        put(&self.last_seq, stats.last_seq);
        let refused = &stats.refused;
        put(&self.sessions_server, refused.sessions_server);
        put(&self.sessions_address, refused.sessions_address);
        put(
            &self.subscriptions_connection,
            refused.subscriptions_connection,
        );
        put(&self.subscriptions_address, refused.subscriptions_address);
        put(&self.subscriptions_server, refused.subscriptions_server);
    }

    /// The totals last published.
    pub(super) fn load(&self) -> Stats {
        let get = |cell: &AtomicU64| cell.load(Relaxed);
        // Counts of things held in memory fit in usize.
        let size = |cell: &AtomicU64| usize::try_from(get(cell)).unwrap_or(usize::MAX);
        Stats {
            sessions: size(&self.sessions),
            subscriptions: size(&self.subscriptions),
            products_with_subscribers: size(&self.products_with_subscribers),
            all_subscribers: size(&self.all_subscribers),
            changes_published: get(&self.changes_published),
            messages_queued: get(&self.messages_queued),
            messages_written_directly: get(&self.messages_written_directly),
            bytes_written_directly: get(&self.bytes_written_directly),
            slow_sessions_evicted: get(&self.slow_sessions_evicted),
            changes_deferred: get(&self.changes_deferred),
            resets: get(&self.resets),
            last_seq: get(&self.last_seq),
            refused: Refusals {
                sessions_server: get(&self.sessions_server),
                sessions_address: get(&self.sessions_address),
                subscriptions_connection: get(&self.subscriptions_connection),
                subscriptions_address: get(&self.subscriptions_address),
                subscriptions_server: get(&self.subscriptions_server),
            },
        }
    }
}
