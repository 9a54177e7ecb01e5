//! The actor task: owns [`Subscriptions`] and applies commands one at a time, so the maps need
//! no lock. It never awaits a session and does no I/O: outbox pushes never wait, and the
//! slow-client policy decides what a full one means (see `outbox`).
//!
//! Budgets: the session and subscription counts per client address live here too, beside the
//! maps they count, so a budget check is a lookup the actor makes anyway, with no lock.
//!
//! The whole-catalog subscribers and presence live in `all_and_presence` (a second `impl`
//! block), additive to the by-id path: a publish walks the by-id subscribers, then the (few) all-subscribers that are
//! not also by-id subscribers of that product, so each session gets each change once.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod all_and_presence;

use super::counts::Counts;
use super::outbox::{OutboxSender, Pushed, outbox};
use super::subscriptions::{Budget, OverLimit, SessionId, Subscriptions};
use super::{Command, Delivery, FrameBytes, PresenceChanges, Registration, Stats, Views};
use crate::config::{Budgets, IpPrefix, Limits};
use crate::product::{ProductId, Seq, SubscriptionStart};

/// Commands handled before the totals are published again: enough to amortize the stores
/// under load, few enough that an operator's view lags by microseconds.
const BATCH: usize = 64;

/// What one subscription to every product counts against the per-address and server
/// subscription budgets: what subscribing to 1 024 ids, the way clients approximated "all"
/// before it existed, cost. Not against the connection's own cap, which bounds the ids it holds.
pub const ALL_SUBSCRIPTION_WEIGHT: usize = 1024;

/// The sink kept per session: its outbox, the token that tells it it was evicted, and the
/// address its budgets are counted against (None: exempt or unknown).
#[derive(Debug)]
struct SessionSink<F> {
    outbox: OutboxSender<F>,
    evicted: CancellationToken,
    address: Option<IpAddr>,
}

/// What one client address holds.
#[derive(Debug, Default, Clone, Copy)]
struct AddressUse {
    sessions: usize,
    subscriptions: usize,
}

/// The actor's configuration.
#[derive(Debug)]
pub(super) struct Settings {
    pub(super) limits: Limits,
    pub(super) budgets: Budgets,
    /// Addresses the per-address budgets spare.
    pub(super) exempt: Vec<IpPrefix>,
}

struct Distributor<F> {
    subscriptions: Subscriptions<SessionSink<F>>,
    settings: Settings,
    addresses: HashMap<IpAddr, AddressUse>,
    next_session: u64,
    stats: Stats,
    counts: Arc<Counts>,
    /// Sessions subscribed to every product.
    all: HashSet<SessionId>,
    /// Sessions that asked for watcher counts.
    presence_sessions: HashSet<SessionId>,
    /// Products whose local subscriber count changed since the presence task last asked; None
    /// until it first asks (no presence task: nothing is noted).
    presence_dirty: Option<HashSet<ProductId>>,
    /// Products a presence session just subscribed to (their count is due even if unchanged).
    presence_fresh: HashSet<ProductId>,
    /// Products some presence session holds by id, with how many such sessions: kept as
    /// subscriptions change, so the presence task learns what to read without a walk.
    presence_interest: HashMap<ProductId, usize>,
    /// `presence_interest` gained or lost a product since the presence task last asked.
    presence_interest_changed: bool,
}

pub(super) fn spawn<F: FrameBytes>(
    inbox: mpsc::Receiver<Command<F>>,
    settings: Settings,
    counts: Arc<Counts>,
    position: Seq,
) {
    let actor = Distributor {
        subscriptions: Subscriptions::default(),
        settings,
        addresses: HashMap::new(),
        next_session: 0,
        stats: Stats {
            last_seq: position,
            ..Stats::default()
        },
        counts,
        all: HashSet::new(),
        presence_sessions: HashSet::new(),
        presence_dirty: None,
        presence_fresh: HashSet::new(),
        presence_interest: HashMap::new(),
        presence_interest_changed: false,
    };
    actor.publish_counts();
    tokio::spawn(
        actor
            .run(inbox)
            .instrument(tracing::info_span!("distributor")),
    );
}

impl<F: FrameBytes> Distributor<F> {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command<F>>) {
        let mut batch = Vec::with_capacity(BATCH);
        while inbox.recv_many(&mut batch, BATCH).await > 0 {
            for command in batch.drain(..) {
                self.handle(command);
            }
            self.publish_counts();
        }
        tracing::debug!("all handles dropped; distributor stops");
    }

    /// Copies the running totals where readers find them without asking.
    fn publish_counts(&self) {
        self.counts.store(&Stats {
            sessions: self.subscriptions.session_count(),
            subscriptions: self.subscriptions.subscription_count(),
            products_with_subscribers: self.subscriptions.product_count(),
            all_subscribers: self.all.len(),
            ..self.stats
        });
    }

    /// The address a session's budgets count against, or None if it is exempt.
    fn counted(&self, address: Option<IpAddr>) -> Option<IpAddr> {
        let address = address?.to_canonical();
        let exempt = self.settings.exempt.iter().any(|net| net.contains(address));
        (!exempt).then_some(address)
    }

    /// Refuses a new session if it would exceed a session budget.
    fn admit_session(&self, address: Option<IpAddr>) -> Result<(), OverLimit> {
        let budgets = &self.settings.budgets;
        let over = |budget, current, limit| OverLimit {
            budget,
            current,
            requested: 1,
            limit,
        };
        let sessions = self.subscriptions.session_count();
        if sessions >= budgets.max_sessions {
            return Err(over(Budget::Server, sessions, budgets.max_sessions));
        }
        let held = address
            .and_then(|ip| self.addresses.get(&ip))
            .map_or(0, |used| used.sessions);
        if address.is_some() && held >= budgets.max_sessions_per_ip {
            return Err(over(Budget::Address, held, budgets.max_sessions_per_ip));
        }
        Ok(())
    }

    /// Gives back what a leaving session held from its address's budgets.
    fn release(&mut self, address: Option<IpAddr>, sessions: usize, subscriptions: usize) {
        let Some(ip) = address else { return };
        if let Some(used) = self.addresses.get_mut(&ip) {
            used.sessions -= sessions;
            used.subscriptions -= subscriptions;
            if used.sessions == 0 {
                self.addresses.remove(&ip);
            }
        }
    }

    /// Removes a session and everything it held; its sink, if it was registered.
    fn remove_session(&mut self, id: SessionId) -> Option<SessionSink<F>> {
        let held = self.subscriptions.session_subscriptions(id) + self.forget_all_and_presence(id);
        let sink = self.subscriptions.remove_session(id)?;
        self.release(sink.address, 1, held);
        Some(sink)
    }

    fn handle(&mut self, command: Command<F>) {
        match command {
            Command::Publish {
                product,
                seq,
                frame,
            } => {
                self.stats.changes_published += 1;
                self.stats.last_seq = seq;
                let mut full = Vec::new();
                let subscriptions = &self.subscriptions;
                let frame_bytes = frame.byte_len() as u64;
                for (id, sink) in subscriptions.subscribers(product) {
                    let pushed = sink
                        .outbox
                        .push_change(product, seq, &frame, || subscriptions.session_products(id));
                    match pushed {
                        Pushed::Written => {
                            self.stats.messages_written_directly += 1;
                            self.stats.bytes_written_directly += frame_bytes;
                        }
                        Pushed::Queued => self.stats.messages_queued += 1,
                        Pushed::Deferred => self.stats.changes_deferred += 1,
                        Pushed::Full => full.push(id),
                        // The session ended; its Disconnect is on the way. A change written
                        // in part is counted by the session once it finishes it.
                        Pushed::Closed | Pushed::Started => {}
                    }
                }
                for id in full {
                    self.evict(id);
                }
                self.publish_to_all(product, seq, &frame);
            }
            Command::Reset {
                since,
                position,
                cause,
            } => {
                self.stats.resets += 1;
                self.stats.last_seq = position;
                let sessions: Vec<(SessionId, Vec<_>)> = self
                    .subscriptions
                    .session_ids()
                    .map(|id| (id, self.subscriptions.session_products(id)))
                    .filter(|(_, products)| !products.is_empty())
                    .collect();
                let mut reset_all: Vec<SessionId> = self.all.iter().copied().collect();
                for (id, products) in sessions {
                    reset_all.retain(|&all| all != id);
                    self.deliver(
                        id,
                        Delivery::Reset {
                            products,
                            since,
                            position,
                            cause,
                        },
                    );
                }
                // The feed of an all-subscriber resets the whole catalog whatever the products.
                for id in reset_all {
                    self.deliver(
                        id,
                        Delivery::Reset {
                            products: Vec::new(),
                            since,
                            position,
                            cause,
                        },
                    );
                }
            }
            Command::Register { address, reply } => {
                let address = self.counted(address);
                if let Err(over) = self.admit_session(address) {
                    self.stats.refused.count(true, over.budget);
                    let _ = reply.send(Err(over));
                    return;
                }
                self.next_session += 1;
                let id = SessionId(self.next_session);
                let limits = &self.settings.limits;
                let (sender, receiver) = outbox(
                    limits.outbox_capacity,
                    limits.outbox_bytes,
                    limits.slow_client_policy,
                    limits.conflate_after,
                );
                let evicted = CancellationToken::new();
                self.subscriptions.add_session(
                    id,
                    SessionSink {
                        outbox: sender,
                        evicted: evicted.clone(),
                        address,
                    },
                );
                if let Some(ip) = address {
                    self.addresses.entry(ip).or_default().sessions += 1;
                }
                let registration = Registration {
                    id,
                    outbox: receiver,
                    evicted,
                };
                if reply.send(Ok(registration)).is_err() {
                    // The session gave up while registering.
                    self.remove_session(id);
                }
            }
            Command::Subscribe {
                id,
                products,
                start,
            } => {
                let held = self.presence_before(id, &products);
                let subscribed = self.subscribe(id, &products);
                self.presence_after(id, &products, held);
                let answer = match subscribed {
                    Ok(()) => Delivery::Subscribed {
                        products,
                        position: self.stats.last_seq,
                        start,
                        total: self.subscriptions.session_subscriptions(id),
                    },
                    Err(over) => {
                        self.stats.refused.count(false, over.budget);
                        Delivery::Refused(over)
                    }
                };
                self.deliver(id, answer);
            }
            Command::Unsubscribe { id, products } => {
                let held = self.presence_before(id, &products);
                let removed = self.subscriptions.unsubscribe(id, &products);
                self.presence_after(id, &products, held);
                let address = self.subscriptions.sink(id).and_then(|sink| sink.address);
                self.release(address, 0, removed);
                let total = self.subscriptions.session_subscriptions(id);
                self.deliver(id, Delivery::Unsubscribed { products, total });
            }
            Command::Disconnect { id } => {
                if let Some(sink) = self.remove_session(id) {
                    sink.outbox.close();
                }
            }
            Command::Views {
                top_products,
                reply,
            } => {
                // Whoever asks for views may also want the totals as of this moment.
                self.publish_counts();
                let _ = reply.send(Views {
                    messages_waiting: self.subscriptions.sinks().map(|s| s.outbox.len()).sum(),
                    top_products: self.subscriptions.top_products(top_products),
                });
            }
            Command::SubscribeAll { id, start } => self.subscribe_all(id, start),
            Command::UnsubscribeAll { id } => self.unsubscribe_all(id),
            Command::WantPresence { id } => self.want_presence(id),
            Command::PresenceChanges { reply } => {
                let _ = reply.send(self.presence_changes());
            }
            Command::PublishPresence { counts } => self.publish_presence(counts),
        }
    }

    /// Subscribes within the session's cap and the budgets it shares with its address and
    /// the whole server; all or nothing.
    fn subscribe(&mut self, id: SessionId, products: &[ProductId]) -> Result<(), OverLimit> {
        let budgets = self.settings.budgets;
        let total = self.subscriptions.subscription_count() + self.all_held();
        let address = self.subscriptions.sink(id).and_then(|sink| sink.address);
        let held = address
            .and_then(|ip| self.addresses.get(&ip))
            .map_or(0, |used| used.subscriptions);
        let check = |new: usize| {
            let over = |budget, current, limit| OverLimit {
                budget,
                current,
                requested: new,
                limit,
            };
            if total + new > budgets.max_total_subscriptions {
                return Err(over(Budget::Server, total, budgets.max_total_subscriptions));
            }
            if address.is_some() && held + new > budgets.max_subscriptions_per_ip {
                return Err(over(
                    Budget::Address,
                    held,
                    budgets.max_subscriptions_per_ip,
                ));
            }
            Ok(())
        };
        let limit = self.settings.limits.max_subscriptions;
        let added = self.subscriptions.subscribe(id, products, limit, check)?;
        if let Some(used) = address.and_then(|ip| self.addresses.get_mut(&ip)) {
            used.subscriptions += added;
        }
        Ok(())
    }

    /// Queues a reply for one session, evicting it if its outbox refuses.
    fn deliver(&mut self, id: SessionId, delivery: Delivery<F>) {
        let Some(sink) = self.subscriptions.sink(id) else {
            return;
        };
        match sink.outbox.push(delivery) {
            Pushed::Queued => self.stats.messages_queued += 1,
            Pushed::Deferred => self.stats.changes_deferred += 1,
            Pushed::Full => self.evict(id),
            Pushed::Closed | Pushed::Written | Pushed::Started => {}
        }
    }

    fn evict(&mut self, id: SessionId) {
        if let Some(sink) = self.remove_session(id) {
            self.stats.slow_sessions_evicted += 1;
            // Nothing queued will be sent, and the session may not look for a while.
            sink.outbox.discard();
            sink.evicted.cancel();
            tracing::info!(session_id = %id, "outbox full; slow session evicted");
        }
    }
}
