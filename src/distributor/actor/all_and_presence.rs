//! The actor's whole-catalog subscribers (`"all":true`) and presence bookkeeping: a second
//! `impl` block of [`Distributor`], beside the by-id path and not in it. A child module so it
//! reaches the actor's private state, as the first block does.

use super::*;

/// Whole-catalog subscribers and presence: beside the by-id path, not in it.
impl<F: FrameBytes> Distributor<F> {
    /// What all-subscriptions hold of the server budget.
    pub(super) fn all_held(&self) -> usize {
        self.all.len() * ALL_SUBSCRIPTION_WEIGHT
    }

    /// Hands a change to every all-subscriber that did not get it by id.
    pub(super) fn publish_to_all(&mut self, product: ProductId, seq: Seq, frame: &F) {
        if self.all.is_empty() {
            return;
        }
        let mut full = Vec::new();
        for &id in &self.all {
            if self.subscriptions.is_subscribed(id, product) {
                continue;
            }
            let Some(sink) = self.subscriptions.sink(id) else {
                continue;
            };
            // A gap opened here is replayed for every product by the feed, which knows the
            // session subscribed to all: the products it names do not matter.
            match sink.outbox.push_change(product, seq, frame, Vec::new) {
                Pushed::Written => {
                    self.stats.messages_written_directly += 1;
                    self.stats.bytes_written_directly += frame.byte_len() as u64;
                }
                Pushed::Queued => self.stats.messages_queued += 1,
                Pushed::Deferred => self.stats.changes_deferred += 1,
                Pushed::Full => full.push(id),
                // Written in part: the session counts it once it finishes it.
                Pushed::Closed | Pushed::Started => {}
            }
        }
        for id in full {
            self.evict(id);
        }
    }

    pub(super) fn subscribe_all(&mut self, id: SessionId, start: SubscriptionStart) {
        let Some(sink) = self.subscriptions.sink(id) else {
            return;
        };
        let address = sink.address;
        let answer = if self.all.contains(&id) {
            Ok(())
        } else {
            let weight = ALL_SUBSCRIPTION_WEIGHT;
            let budgets = self.settings.budgets;
            let total = self.subscriptions.subscription_count() + self.all_held();
            let held = address
                .and_then(|ip| self.addresses.get(&ip))
                .map_or(0, |used| used.subscriptions);
            let over = |budget, current, limit| OverLimit {
                budget,
                current,
                requested: weight,
                limit,
            };
            if total + weight > budgets.max_total_subscriptions {
                Err(over(Budget::Server, total, budgets.max_total_subscriptions))
            } else if address.is_some() && held + weight > budgets.max_subscriptions_per_ip {
                Err(over(
                    Budget::Address,
                    held,
                    budgets.max_subscriptions_per_ip,
                ))
            } else {
                self.all.insert(id);
                if let Some(used) = address.and_then(|ip| self.addresses.get_mut(&ip)) {
                    used.subscriptions += weight;
                }
                Ok(())
            }
        };
        let delivery = match answer {
            Ok(()) => Delivery::SubscribedAll {
                position: self.stats.last_seq,
                start,
            },
            Err(over) => {
                self.stats.refused.count(false, over.budget);
                Delivery::Refused(over)
            }
        };
        self.deliver(id, delivery);
    }

    pub(super) fn unsubscribe_all(&mut self, id: SessionId) {
        if self.all.remove(&id) {
            let address = self.subscriptions.sink(id).and_then(|sink| sink.address);
            self.release(address, 0, ALL_SUBSCRIPTION_WEIGHT);
        }
        self.deliver(id, Delivery::UnsubscribedAll);
    }

    /// Drops a leaving session from the all and presence sets; returns the budget its
    /// all-subscription held.
    pub(super) fn forget_all_and_presence(&mut self, id: SessionId) -> usize {
        let watching = self.presence_sessions.remove(&id);
        if watching || self.presence_dirty.is_some() {
            let products = self.subscriptions.session_products(id);
            self.note_presence(id, &products);
            if watching {
                for product in products {
                    self.interest(product, false);
                }
            }
        }
        if self.all.remove(&id) {
            ALL_SUBSCRIPTION_WEIGHT
        } else {
            0
        }
    }

    pub(super) fn want_presence(&mut self, id: SessionId) {
        let asked = self.subscriptions.sink(id).is_some() && self.presence_sessions.insert(id);
        if asked {
            let products = self.subscriptions.session_products(id);
            for &product in &products {
                self.interest(product, true);
            }
            if self.presence_dirty.is_some() {
                self.presence_fresh.extend(products);
            }
        }
    }

    /// One more (or one fewer) presence session holds `product`.
    pub(super) fn interest(&mut self, product: ProductId, more: bool) {
        let count = self.presence_interest.entry(product).or_default();
        if more {
            *count += 1;
            self.presence_interest_changed |= *count == 1;
        } else {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.presence_interest.remove(&product);
                self.presence_interest_changed = true;
            }
        }
    }

    /// Before a subscribe or unsubscribe of `products`: notes their counts may change, and for a
    /// presence session returns which of them it holds now.
    pub(super) fn presence_before(
        &mut self,
        id: SessionId,
        products: &[ProductId],
    ) -> Option<Vec<bool>> {
        self.note_presence(id, products);
        self.presence_sessions.contains(&id).then(|| {
            products
                .iter()
                .map(|&product| self.subscriptions.is_subscribed(id, product))
                .collect()
        })
    }

    /// After it: a presence session's interest follows what it gained or lost.
    pub(super) fn presence_after(
        &mut self,
        id: SessionId,
        products: &[ProductId],
        held: Option<Vec<bool>>,
    ) {
        let Some(held) = held else { return };
        for (&product, was) in products.iter().zip(held) {
            let now = self.subscriptions.is_subscribed(id, product);
            if now != was {
                self.interest(product, now);
            }
        }
    }

    /// Notes that the local counts of `products` may change (a subscribe, an unsubscribe, a
    /// session leaving): only while a presence task asks.
    pub(super) fn note_presence(&mut self, id: SessionId, products: &[ProductId]) {
        let Some(dirty) = &mut self.presence_dirty else {
            return;
        };
        dirty.extend(products.iter().copied());
        if self.presence_sessions.contains(&id) {
            self.presence_fresh.extend(products.iter().copied());
        }
    }

    pub(super) fn presence_changes(&mut self) -> PresenceChanges {
        let dirty = self
            .presence_dirty
            .replace(HashSet::new())
            .unwrap_or_default();
        let counts = dirty
            .into_iter()
            .map(|product| (product, self.subscriptions.subscriber_count(product)))
            .collect();
        let fresh = self.presence_fresh.drain().collect();
        let watched = std::mem::take(&mut self.presence_interest_changed)
            .then(|| self.presence_interest.keys().copied().collect());
        PresenceChanges {
            counts,
            fresh,
            watched,
        }
    }

    pub(super) fn publish_presence(&mut self, counts: Vec<(ProductId, F)>) {
        if self.presence_sessions.is_empty() {
            return;
        }
        let mut full = Vec::new();
        for (product, frame) in counts {
            for (id, sink) in self.subscriptions.subscribers(product) {
                if !self.presence_sessions.contains(&id) {
                    continue;
                }
                match sink.outbox.push(Delivery::Presence {
                    frame: frame.clone(),
                }) {
                    Pushed::Queued => self.stats.messages_queued += 1,
                    Pushed::Full => full.push(id),
                    Pushed::Deferred | Pushed::Closed | Pushed::Written | Pushed::Started => {}
                }
            }
        }
        for id in full {
            self.evict(id);
        }
    }
}
