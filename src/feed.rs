//! `Feed`: turns one subscriber's outbox into the exact sequence of messages its client
//! receives, whatever the transport (WebSocket or SSE): acks, snapshots, resets, replays from
//! the changelog, and live changes, with no gap and no duplicate.
//!
//! Each subscribe ack from the distributor carries `position` P: the live changes that follow
//! in the outbox are exactly those with seq > P. The client's stream should begin after C (its
//! `since`, the snapshot's seq, or P for a plain subscribe). If C < P, the feed replays
//! (C, P] from the changelog before going on with the outbox; if C > P (a client resuming from
//! an instance that is ahead of this one), it drops live changes with seq <= C for those
//! products. Replays are read a page at a time, so a long one streams in bounded memory.
//!
//! The same replay serves a [`Delivery::Gap`]: changes the distributor did not queue because the
//! queue was full are read from the changelog when the feed reaches the marker, so a client that
//! reads promptly loses no version however large a burst. A marker reached more than
//! `--conflate-after` after it opened means the client had stopped reading: then only the newest
//! version of each product is sent, marked `"conflated":true`.
//!
//! Every replay page carries the retention horizon read in the same database snapshot; if
//! retention may have removed changes the replay still needs (a slow replay racing the pruner),
//! the feed sends `reset` and a snapshot instead of a stream with a hole. The same happens on a
//! [`Delivery::Reset`] from the distributor, and when a client resumes from a seq the database
//! has never reached (its history was rewound).
//!
//! Every history read goes through `db::HistoryReader` (the history pool behind a bounded
//! queue); one it refuses ([`HistoryError::Busy`]) ends the stream like a failed read, and the
//! transport tells the client to come back and resume.
//!
//! A session subscribed to every product (`"all":true`) is served by the same machinery with
//! whole-catalog reads: its resumes and gaps replay every product's changes, a reset or snapshot
//! reads every row in one database snapshot and sends it in pages of at most
//! [`SNAPSHOT_PAGE_ROWS`] products and about [`SNAPSHOT_PAGE_BYTES`] bytes, and a single floor
//! (not one per product) drops live changes the client already has.
//!
//! Imports `distributor` (outbox), `protocol` (encoding), `product`, `db` (the history reader),
//! and `metrics` (how each stream began: live, resume, snapshot, reset).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::db::changelog::Scope;
use crate::db::{HistoryError, HistoryReader};
use crate::distributor::{Budget, Delivery, OutboxReceiver};
use crate::metrics::{Metrics, StartKind};
use crate::product::{Product, ProductId, ResetCause, Seq, SubscriptionStart};
use crate::protocol::{self, ErrorCode, Frame};

/// Outbox messages taken at once; also about how many messages are written per flush.
pub const BATCH: usize = 64;

/// Products per page of a whole-catalog snapshot at most: a 10 000-product table arrives in ten
/// messages a client can parse one at a time.
pub const SNAPSHOT_PAGE_ROWS: usize = 1000;
/// Bytes of product JSON per page of a whole-catalog snapshot, about (a page holds at least
/// one product, which may be larger): the default `--max-frame-bytes`, so a client whose frame
/// limit matches the server's accepts every page.
pub const SNAPSHOT_PAGE_BYTES: usize = 256 * 1024;

/// One message for the client. `seq` is set for changes (SSE uses it as the event id).
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The encoded JSON message.
    pub text: Frame,
    /// The change's seq, if it is a change.
    pub seq: Option<Seq>,
}

/// Changes to read from the changelog before the outbox goes on.
#[derive(Debug)]
struct Replay {
    products: Vec<ProductId>,
    /// Changes after this seq are still to be sent (the cursor).
    after: Seq,
    /// ...up to and including this one.
    upto: Seq,
    /// `Some(start)`: only the newest version per product in (start, upto] (conflated).
    conflated_from: Option<Seq>,
    /// Every product's changes (a subscribe-all), not only `products`'.
    all: bool,
}

/// One subscriber's ordered message source.
#[derive(Debug)]
pub struct Feed {
    outbox: OutboxReceiver<Frame>,
    history: HistoryReader,
    pending: VecDeque<Delivery<Frame>>,
    replay: Option<Replay>,
    /// Per product: live changes at or below this seq were already covered for the client.
    floors: HashMap<ProductId, Seq>,
    /// The client asked for every version: gaps are never conflated.
    every_version: bool,
    /// The session is subscribed to every product: gaps and resets cover the whole catalog.
    all: bool,
    /// Live changes at or below this seq were already covered for the client (whole catalog).
    all_floor: Option<Seq>,
    metrics: Metrics,
}

impl Feed {
    /// A feed over a registered session's outbox, reading history through `history`.
    pub fn new(outbox: OutboxReceiver<Frame>, history: HistoryReader, metrics: Metrics) -> Self {
        Self {
            outbox,
            history,
            pending: VecDeque::new(),
            replay: None,
            floors: HashMap::new(),
            every_version: false,
            all: false,
            all_floor: None,
            metrics,
        }
    }

    /// From now on every gap is replayed in full, however late the client reaches it.
    pub fn keep_every_version(&mut self) {
        self.every_version = true;
    }

    /// True while messages can be produced without waiting for the outbox.
    pub fn has_pending(&self) -> bool {
        self.replay.is_some() || !self.pending.is_empty()
    }

    /// True if live changes may skip this feed (written by the distributor straight into the
    /// socket): nothing is pending and no product (nor the whole catalog) still has a floor to
    /// filter against.
    pub fn lane_may_open(&self) -> bool {
        !self.has_pending() && self.floors.is_empty() && self.all_floor.is_none()
    }

    /// Drops what is pending (the session is closing).
    pub fn discard(&mut self) {
        self.pending.clear();
        self.replay = None;
    }

    /// Waits for outbox messages; false once the outbox is closed and drained. Cancel-safe.
    pub async fn recv(&mut self) -> bool {
        self.outbox.recv_batch(&mut self.pending, BATCH).await
    }

    /// Frees buffers kept for the next batch if nothing is waiting in them (called by an idle
    /// session; a busy one keeps them, so a change costs it no allocation).
    pub fn release_idle_memory(&mut self) {
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
        self.outbox.release_idle_memory();
    }

    /// Appends the next messages to `out`: one replay page, or what the pending outbox
    /// messages expand to (up to a batch, stopping where a replay begins).
    pub async fn fill(&mut self, out: &mut Vec<Outgoing>) -> Result<(), HistoryError> {
        if self.replay.is_some() {
            // Boxed, like `begin`: a database query's future is large, and held inline it would
            // sit in every idle session's task.
            return Box::pin(self.replay_page(out)).await;
        }
        while let Some(delivery) = self.pending.pop_front() {
            self.expand(delivery, out).await?;
            if self.replay.is_some() || out.len() >= BATCH {
                break;
            }
        }
        Ok(())
    }

    /// Sends one page of the replay in progress, or a reset if retention got there first.
    async fn replay_page(&mut self, out: &mut Vec<Outgoing>) -> Result<(), HistoryError> {
        let Some(replay) = &mut self.replay else {
            return Ok(());
        };
        let scope = if replay.all {
            Scope::All
        } else {
            Scope::Products(&replay.products)
        };
        let page = match replay.conflated_from {
            None => self.history.range(scope, replay.after, replay.upto).await?,
            Some(start) => {
                self.history
                    .latest(scope, (start, replay.upto), replay.after)
                    .await?
            }
        };
        if page.pruned_through > replay.after {
            // Changes this replay still needs may be gone: never send a stream with a hole.
            let Some(replay) = self.replay.take() else {
                return Ok(());
            };
            let cause = ResetCause::Pruned {
                pruned_through: page.pruned_through,
            };
            if replay.all {
                return self.reset_all(replay.after, cause, out).await;
            }
            return self.reset(&replay.products, replay.after, cause, out).await;
        }
        let mut conflated = 0;
        for logged in &page.changes {
            let change = &logged.change;
            replay.after = change.seq;
            if self
                .floors
                .get(&change.product.product_id)
                .is_some_and(|&floor| change.seq <= floor)
            {
                continue;
            }
            let text = if logged.versions > 1 {
                conflated += logged.versions - 1;
                protocol::encode_conflated_change(change)
            } else {
                protocol::encode_change(change)
            };
            out.push(Outgoing {
                text: text.into(),
                seq: Some(change.seq),
            });
        }
        if conflated > 0 {
            self.metrics.changes_conflated(conflated);
        }
        if !page.more {
            self.replay = None;
        }
        Ok(())
    }

    async fn expand(
        &mut self,
        delivery: Delivery<Frame>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), HistoryError> {
        match delivery {
            Delivery::Change {
                product,
                seq,
                frame,
            } => {
                if let Some(&floor) = self.floors.get(&product) {
                    if seq <= floor {
                        return Ok(());
                    }
                    self.floors.remove(&product);
                }
                if let Some(floor) = self.all_floor {
                    if seq <= floor {
                        return Ok(());
                    }
                    // The outbox is in seq order: nothing below the floor follows.
                    self.all_floor = None;
                }
                // The shared frame: cloning it bumped a reference count, nothing more.
                out.push(Outgoing {
                    text: frame,
                    seq: Some(seq),
                });
                if !self.floors.is_empty() {
                    // Live changes come in seq order: no later one can be at or below a floor
                    // this one passed, so such floors are spent (and the lane may open again).
                    self.floors.retain(|_, floor| *floor > seq);
                }
            }
            Delivery::Subscribed {
                products,
                position,
                start,
                total,
            } => {
                // The WebSocket session's span declares this field; elsewhere it is a no-op.
                tracing::Span::current().record("subscriptions", total);
                if start == SubscriptionStart::Live {
                    self.metrics.subscription_started(StartKind::Live);
                    out.push(message(protocol::encode_ack(&products, Some(position))));
                } else {
                    // Resumes and snapshots read the database: boxed so that their futures do
                    // not enlarge every session (see `fill`).
                    Box::pin(self.begin(products, position, start, out)).await?;
                }
            }
            Delivery::Unsubscribed { products, total } => {
                tracing::Span::current().record("subscriptions", total);
                for product in &products {
                    self.floors.remove(product);
                }
                out.push(message(protocol::encode_ack(&products, None)));
            }
            Delivery::Gap {
                products,
                after,
                upto,
                stale_at,
            } => {
                let stopped_reading = !self.every_version && Instant::now() >= stale_at;
                self.replay = Some(Replay {
                    products,
                    after,
                    upto,
                    conflated_from: stopped_reading.then_some(after),
                    all: self.all,
                });
            }
            Delivery::Reset {
                products,
                since,
                position: _,
                cause,
            } => {
                if self.all {
                    Box::pin(self.reset_all(since, cause, out)).await?;
                } else {
                    Box::pin(self.reset(&products, since, cause, out)).await?;
                }
            }
            Delivery::SubscribedAll { position, start } => {
                self.all = true;
                Box::pin(self.begin_all(position, start, out)).await?;
            }
            Delivery::UnsubscribedAll => {
                self.all = false;
                self.all_floor = None;
                out.push(message(protocol::encode_all_ack(None)));
            }
            Delivery::Presence { frame } => out.push(Outgoing {
                text: frame,
                seq: None,
            }),
            Delivery::Refused(over) => {
                let (code, holder) = match over.budget {
                    Budget::Connection => (ErrorCode::TooManySubscriptions, "per connection"),
                    Budget::Address => (
                        ErrorCode::AddressSubscriptionBudget,
                        "for all connections from your address",
                    ),
                    Budget::Server => (
                        ErrorCode::ServerSubscriptionBudget,
                        "for all clients of this server",
                    ),
                };
                out.push(message(protocol::encode_error(
                    code,
                    &format!(
                        "subscribing to {} more products would exceed the limit of {} {holder} \
                         ({} held now); nothing was subscribed",
                        over.requested, over.limit, over.current
                    ),
                )));
            }
        }
        Ok(())
    }

    /// Starts a resumed or snapshot subscription's stream after the client's position.
    async fn begin(
        &mut self,
        products: Vec<ProductId>,
        position: Seq,
        start: SubscriptionStart,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), HistoryError> {
        let from = match start {
            SubscriptionStart::Live => position,
            SubscriptionStart::Since(since) => {
                let changelog = self.history.position(since).await?;
                let cause = if since < changelog.pruned_through {
                    Some(ResetCause::Pruned {
                        pruned_through: changelog.pruned_through,
                    })
                } else if since > changelog.latest {
                    // The client saw seqs this database never reached: another history.
                    Some(ResetCause::Rewound {
                        latest: changelog.latest,
                    })
                } else {
                    None
                };
                if let Some(cause) = cause {
                    // The snapshot is newer than the position, so no replay follows.
                    return self.reset(&products, since, cause, out).await;
                } else {
                    self.metrics.subscription_started(StartKind::Resume);
                    out.push(message(protocol::encode_ack(&products, Some(since))));
                    since
                }
            }
            SubscriptionStart::Snapshot => {
                self.metrics.subscription_started(StartKind::Snapshot);
                self.snapshot(&products, out).await?
            }
        };
        if from < position {
            self.replay = Some(Replay {
                products,
                after: from,
                upto: position,
                conflated_from: None,
                all: false,
            });
        } else if from > position {
            for product in products {
                let floor = self.floors.entry(product).or_insert(from);
                *floor = (*floor).max(from);
            }
        }
        Ok(())
    }

    /// Starts `products` again: `reset`, then the ack and a snapshot; live changes the snapshot
    /// already reflects are dropped. Floors from before are replaced, not raised: after a rewind
    /// the new history's seqs are lower than the old ones.
    async fn reset(
        &mut self,
        products: &[ProductId],
        since: Seq,
        cause: ResetCause,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), HistoryError> {
        self.metrics.subscription_started(StartKind::Reset);
        out.push(message(protocol::encode_reset(products, since, cause)));
        let seq = self.snapshot(products, out).await?;
        for &product in products {
            self.floors.insert(product, seq);
        }
        Ok(())
    }

    /// Sends the ack and a snapshot of `products`; returns the snapshot's seq.
    async fn snapshot(
        &mut self,
        products: &[ProductId],
        out: &mut Vec<Outgoing>,
    ) -> Result<Seq, HistoryError> {
        let snapshot = self.history.snapshot(products).await?;
        let missing: Vec<ProductId> = products
            .iter()
            .copied()
            .filter(|id| {
                snapshot
                    .products
                    .binary_search_by_key(id, |product| product.product_id)
                    .is_err()
            })
            .collect();
        out.push(message(protocol::encode_ack(products, Some(snapshot.seq))));
        out.push(message(protocol::encode_snapshot(
            snapshot.seq,
            &snapshot.products,
            &missing,
        )));
        Ok(snapshot.seq)
    }
}

/// Whole-catalog subscriptions: the same steps as `begin`, `reset` and `snapshot`, reading
/// every product.
impl Feed {
    /// Starts a subscribe-all's stream after the client's position.
    async fn begin_all(
        &mut self,
        position: Seq,
        start: SubscriptionStart,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), HistoryError> {
        let from = match start {
            SubscriptionStart::Live => {
                self.metrics.subscription_started(StartKind::Live);
                out.push(message(protocol::encode_all_ack(Some(position))));
                position
            }
            SubscriptionStart::Since(since) => {
                let changelog = self.history.position(since).await?;
                if since < changelog.pruned_through {
                    let cause = ResetCause::Pruned {
                        pruned_through: changelog.pruned_through,
                    };
                    return self.reset_all(since, cause, out).await;
                }
                if since > changelog.latest {
                    let cause = ResetCause::Rewound {
                        latest: changelog.latest,
                    };
                    return self.reset_all(since, cause, out).await;
                }
                self.metrics.subscription_started(StartKind::Resume);
                out.push(message(protocol::encode_all_ack(Some(since))));
                since
            }
            SubscriptionStart::Snapshot => {
                self.metrics.subscription_started(StartKind::Snapshot);
                self.snapshot_all(out).await?
            }
        };
        if from < position {
            self.replay = Some(Replay {
                products: Vec::new(),
                after: from,
                upto: position,
                conflated_from: None,
                all: true,
            });
        } else if from > position {
            self.all_floor = Some(self.all_floor.map_or(from, |floor| floor.max(from)));
        }
        Ok(())
    }

    /// Starts the whole catalog again: `reset`, the ack, and a paged snapshot; live changes the
    /// snapshot already reflects are dropped.
    async fn reset_all(
        &mut self,
        since: Seq,
        cause: ResetCause,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), HistoryError> {
        self.metrics.subscription_started(StartKind::Reset);
        out.push(message(protocol::encode_all_reset(since, cause)));
        let seq = self.snapshot_all(out).await?;
        // Replaced, not raised: after a rewind the new history's seqs are lower.
        self.all_floor = Some(seq);
        self.floors.clear();
        Ok(())
    }

    /// Sends the ack and every row in pages; returns the snapshot's seq.
    async fn snapshot_all(&mut self, out: &mut Vec<Outgoing>) -> Result<Seq, HistoryError> {
        let snapshot = self.history.snapshot_all().await?;
        out.push(message(protocol::encode_all_ack(Some(snapshot.seq))));
        let mut rest = snapshot.products.as_slice();
        loop {
            let take = page_len(rest);
            let (page, after) = rest.split_at(take);
            rest = after;
            out.push(message(protocol::encode_all_snapshot_page(
                snapshot.seq,
                page,
                !rest.is_empty(),
            )));
            if rest.is_empty() {
                return Ok(snapshot.seq);
            }
        }
    }
}

/// How many of `products` go into the next snapshot page: at least one (if any), at most
/// [`SNAPSHOT_PAGE_ROWS`], and no more than fit [`SNAPSHOT_PAGE_BYTES`] by a generous estimate.
fn page_len(products: &[Product]) -> usize {
    // The JSON of one product beside its strings: keys, id, units, quotes, commas.
    const OVERHEAD: usize = 128;
    let mut bytes = 0;
    for (index, product) in products.iter().take(SNAPSHOT_PAGE_ROWS).enumerate() {
        // Escaping at most doubles a string's length in practice (\" and \\); control
        // characters are rare enough in product data to be caught by the margin.
        let size = OVERHEAD
            + 2 * (product.manufacturer.len()
                + product.price_per_unit.len()
                + product.product_name.len());
        if index > 0 && bytes + size > SNAPSHOT_PAGE_BYTES {
            return index;
        }
        bytes += size;
    }
    products.len().min(SNAPSHOT_PAGE_ROWS)
}

fn message(text: String) -> Outgoing {
    Outgoing {
        text: text.into(),
        seq: None,
    }
}
