//! The actor task: owns [`Subscriptions`] and applies commands one at a time, so the maps need
//! no lock. It never awaits a session and does no I/O: outbox pushes never wait, and the
//! slow-client policy decides what a full one means (see `outbox`).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::outbox::{OutboxSender, Pushed, outbox};
use super::subscriptions::{SessionId, Subscriptions};
use super::{Command, Delivery, FrameBytes, Registration, Stats};
use crate::config::Limits;
use crate::product::Seq;

/// The sink kept per session: its outbox and the token that tells it it was evicted.
#[derive(Debug)]
struct SessionSink<F> {
    outbox: OutboxSender<F>,
    evicted: CancellationToken,
}

struct Distributor<F> {
    subscriptions: Subscriptions<SessionSink<F>>,
    limits: Limits,
    next_session: u64,
    stats: Stats,
}

pub(super) fn spawn<F: FrameBytes>(
    inbox: mpsc::Receiver<Command<F>>,
    limits: Limits,
    position: Seq,
) {
    let actor = Distributor {
        subscriptions: Subscriptions::default(),
        limits,
        next_session: 0,
        stats: Stats {
            last_seq: position,
            ..Stats::default()
        },
    };
    tokio::spawn(
        actor
            .run(inbox)
            .instrument(tracing::info_span!("distributor")),
    );
}

impl<F: FrameBytes> Distributor<F> {
    async fn run(mut self, mut inbox: mpsc::Receiver<Command<F>>) {
        while let Some(command) = inbox.recv().await {
            self.handle(command);
        }
        tracing::debug!("all handles dropped; distributor stops");
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
                for (id, sink) in subscriptions.subscribers(product) {
                    let pushed = sink.outbox.push_change(product, seq, frame.clone(), || {
                        subscriptions.session_products(id)
                    });
                    match pushed {
                        Pushed::Queued => self.stats.messages_queued += 1,
                        Pushed::Deferred => self.stats.changes_deferred += 1,
                        Pushed::Full => full.push(id),
                        // The session ended; its Disconnect is on the way.
                        Pushed::Closed => {}
                    }
                }
                for id in full {
                    self.evict(id);
                }
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
                for (id, products) in sessions {
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
            }
            Command::Register { reply } => {
                self.next_session += 1;
                let id = SessionId(self.next_session);
                let (sender, receiver) = outbox(
                    self.limits.outbox_capacity,
                    self.limits.outbox_bytes,
                    self.limits.slow_client_policy,
                    self.limits.conflate_after,
                );
                let evicted = CancellationToken::new();
                self.subscriptions.add_session(
                    id,
                    SessionSink {
                        outbox: sender,
                        evicted: evicted.clone(),
                    },
                );
                let registration = Registration {
                    id,
                    outbox: receiver,
                    evicted,
                };
                if reply.send(registration).is_err() {
                    // The session gave up while registering.
                    self.subscriptions.remove_session(id);
                }
            }
            Command::Subscribe {
                id,
                products,
                start,
            } => {
                let answer =
                    match self
                        .subscriptions
                        .subscribe(id, &products, self.limits.max_subscriptions)
                    {
                        Ok(_) => Delivery::Subscribed {
                            products,
                            position: self.stats.last_seq,
                            start,
                            total: self.subscriptions.session_subscriptions(id),
                        },
                        Err(over) => Delivery::Refused(over),
                    };
                self.deliver(id, answer);
            }
            Command::Unsubscribe { id, products } => {
                self.subscriptions.unsubscribe(id, &products);
                let total = self.subscriptions.session_subscriptions(id);
                self.deliver(id, Delivery::Unsubscribed { products, total });
            }
            Command::Disconnect { id } => {
                if let Some(sink) = self.subscriptions.remove_session(id) {
                    sink.outbox.close();
                }
            }
            Command::TopProducts { limit, reply } => {
                let _ = reply.send(self.subscriptions.top_products(limit));
            }
            Command::Stats { reply } => {
                let _ = reply.send(Stats {
                    sessions: self.subscriptions.session_count(),
                    subscriptions: self.subscriptions.subscription_count(),
                    products_with_subscribers: self.subscriptions.product_count(),
                    messages_waiting: self.subscriptions.sinks().map(|s| s.outbox.len()).sum(),
                    ..self.stats
                });
            }
        }
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
            Pushed::Closed => {}
        }
    }

    fn evict(&mut self, id: SessionId) {
        if let Some(sink) = self.subscriptions.remove_session(id) {
            self.stats.slow_sessions_evicted += 1;
            // Nothing queued will be sent, and the session may not look for a while.
            sink.outbox.discard();
            sink.evicted.cancel();
            tracing::info!(session_id = %id, "outbox full; slow session evicted");
        }
    }
}
