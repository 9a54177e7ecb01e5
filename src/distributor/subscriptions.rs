//! The two subscription maps and the only functions that change them. Pure data: no channels,
//! no I/O, so every invariant is checked by plain unit tests.
//!
//! `by_product` maps a product to the sinks of the sessions subscribed to it (the fan-out path
//! iterates it without a second lookup); `by_session` maps a session to its sink and its
//! products, so removing a session costs O(its subscriptions), never a scan of all products.
//! Empty sets are removed, and the subscription count is kept incrementally.

use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};

use foldhash::fast::RandomState;

// foldhash: several times faster than SipHash on integer keys (profiles of subscribe churn
// spent a third of their time hashing), and still seeded per map, so ids chosen by clients
// cannot be aimed at one bucket.
type HashMap<K, V> = StdHashMap<K, V, RandomState>;
type HashSet<K> = StdHashSet<K, RandomState>;

use crate::product::ProductId;

/// Identifies one connected session for the lifetime of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub(crate) u64);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A subscribe that would take the session past its cap; nothing was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Subscriptions the session holds now.
    pub current: usize,
    /// New (not yet held) ids in the refused command.
    pub requested: usize,
    /// The per-session cap.
    pub limit: usize,
}

#[derive(Debug)]
struct SessionEntry<S> {
    sink: S,
    products: HashSet<ProductId>,
}

/// Who is subscribed to what. `S` is what a change is handed to (an outbox sender in the
/// actor; anything cloneable in tests).
#[derive(Debug)]
pub(crate) struct Subscriptions<S> {
    by_product: HashMap<ProductId, HashMap<SessionId, S>>,
    by_session: HashMap<SessionId, SessionEntry<S>>,
    subscription_count: usize,
}

impl<S> Default for Subscriptions<S> {
    fn default() -> Self {
        Self {
            by_product: HashMap::default(),
            by_session: HashMap::default(),
            subscription_count: 0,
        }
    }
}

impl<S: Clone> Subscriptions<S> {
    /// Adds a session with no subscriptions. Re-adding an id replaces nothing.
    pub(crate) fn add_session(&mut self, id: SessionId, sink: S) {
        self.by_session.entry(id).or_insert(SessionEntry {
            sink,
            products: HashSet::default(),
        });
    }

    /// Subscribes `id` to `products`, all or nothing: if the new ids would take the session past
    /// `limit`, nothing changes. Unknown sessions (already removed) are ignored.
    pub(crate) fn subscribe(
        &mut self,
        id: SessionId,
        products: &[ProductId],
        limit: usize,
    ) -> Result<usize, OverLimit> {
        let Some(entry) = self.by_session.get_mut(&id) else {
            return Ok(0);
        };
        let new: Vec<ProductId> = products
            .iter()
            .copied()
            .filter(|product| !entry.products.contains(product))
            .collect();
        let current = entry.products.len();
        if current + new.len() > limit {
            return Err(OverLimit {
                current,
                requested: new.len(),
                limit,
            });
        }
        for &product in &new {
            entry.products.insert(product);
            self.by_product
                .entry(product)
                .or_default()
                .insert(id, entry.sink.clone());
        }
        self.subscription_count += new.len();
        Ok(new.len())
    }

    /// Unsubscribes `id` from `products` it holds; others are ignored. Returns how many it held.
    pub(crate) fn unsubscribe(&mut self, id: SessionId, products: &[ProductId]) -> usize {
        let Some(entry) = self.by_session.get_mut(&id) else {
            return 0;
        };
        let mut removed = 0;
        for product in products {
            if entry.products.remove(product) {
                removed += 1;
                Self::remove_from_product(&mut self.by_product, *product, id);
            }
        }
        self.subscription_count -= removed;
        removed
    }

    /// Removes a session and all its subscriptions; returns its sink if it was present.
    pub(crate) fn remove_session(&mut self, id: SessionId) -> Option<S> {
        let entry = self.by_session.remove(&id)?;
        for product in &entry.products {
            Self::remove_from_product(&mut self.by_product, *product, id);
        }
        self.subscription_count -= entry.products.len();
        Some(entry.sink)
    }

    fn remove_from_product(
        by_product: &mut HashMap<ProductId, HashMap<SessionId, S>>,
        product: ProductId,
        id: SessionId,
    ) {
        if let Some(subscribers) = by_product.get_mut(&product) {
            subscribers.remove(&id);
            if subscribers.is_empty() {
                by_product.remove(&product);
            }
        }
    }

    /// The sinks subscribed to `product`.
    pub(crate) fn subscribers(
        &self,
        product: ProductId,
    ) -> impl Iterator<Item = (SessionId, &S)> + '_ {
        self.by_product
            .get(&product)
            .into_iter()
            .flat_map(|subscribers| subscribers.iter().map(|(id, sink)| (*id, sink)))
    }

    /// The sink of a session, if it is registered.
    pub(crate) fn sink(&self, id: SessionId) -> Option<&S> {
        self.by_session.get(&id).map(|entry| &entry.sink)
    }

    /// Every session's sink.
    pub(crate) fn sinks(&self) -> impl Iterator<Item = &S> + '_ {
        self.by_session.values().map(|entry| &entry.sink)
    }

    /// Subscriptions one session holds (0 if it is not registered).
    pub(crate) fn session_subscriptions(&self, id: SessionId) -> usize {
        self.by_session
            .get(&id)
            .map_or(0, |entry| entry.products.len())
    }

    /// Registered sessions.
    pub(crate) fn session_count(&self) -> usize {
        self.by_session.len()
    }

    /// (session, product) pairs.
    pub(crate) fn subscription_count(&self) -> usize {
        self.subscription_count
    }

    /// Products with at least one subscriber.
    pub(crate) fn product_count(&self) -> usize {
        self.by_product.len()
    }

    /// Up to `limit` products with the most subscribers, most first (ties: lower id first).
    /// Walks every subscribed product: meant for an operator's view, not a hot path.
    pub(crate) fn top_products(&self, limit: usize) -> Vec<(ProductId, usize)> {
        let mut counts: Vec<(ProductId, usize)> = self
            .by_product
            .iter()
            .map(|(product, subscribers)| (*product, subscribers.len()))
            .collect();
        let by_rank =
            |a: &(ProductId, usize), b: &(ProductId, usize)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        if counts.len() > limit {
            counts.select_nth_unstable_by(limit, by_rank);
            counts.truncate(limit);
        }
        counts.sort_unstable_by(by_rank);
        counts
    }

    /// Asserts that the two maps mirror each other and the counter is right (tests and debug).
    #[cfg(test)]
    pub(crate) fn check_invariant(&self) {
        let mut pairs = 0;
        for (id, entry) in &self.by_session {
            for product in &entry.products {
                assert!(
                    self.by_product
                        .get(product)
                        .is_some_and(|subscribers| subscribers.contains_key(id)),
                    "session {id} holds {product} but by_product does not list it"
                );
            }
            pairs += entry.products.len();
        }
        for (product, subscribers) in &self.by_product {
            assert!(
                !subscribers.is_empty(),
                "empty subscriber set kept for {product}"
            );
            for id in subscribers.keys() {
                assert!(
                    self.by_session
                        .get(id)
                        .is_some_and(|entry| entry.products.contains(product)),
                    "by_product lists session {id} for {product} but the session does not hold it"
                );
            }
        }
        assert_eq!(
            pairs, self.subscription_count,
            "subscription counter drifted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[i64]) -> Vec<ProductId> {
        raw.iter().map(|&id| ProductId::new(id).unwrap()).collect()
    }

    #[test]
    fn maps_mirror_each_other_through_every_operation() {
        let mut subs = Subscriptions::default();
        let (a, b) = (SessionId(1), SessionId(2));
        subs.add_session(a, 'a');
        subs.add_session(b, 'b');
        assert_eq!(subs.subscribe(a, &ids(&[1, 2, 3]), 10), Ok(3));
        subs.check_invariant();
        assert_eq!(subs.subscribe(a, &ids(&[3, 4]), 10), Ok(1), "set semantics");
        assert_eq!(subs.subscribe(b, &ids(&[1]), 10), Ok(1));
        subs.check_invariant();
        assert_eq!(subs.subscription_count(), 5);
        assert_eq!(subs.product_count(), 4);

        let on_one: Vec<char> = subs
            .subscribers(ProductId::new(1).unwrap())
            .map(|(_, sink)| *sink)
            .collect();
        assert_eq!(on_one.len(), 2);

        assert_eq!(subs.unsubscribe(a, &ids(&[1, 9])), 1);
        subs.check_invariant();
        assert_eq!(subs.subscribers(ProductId::new(1).unwrap()).count(), 1);

        assert_eq!(subs.remove_session(a), Some('a'));
        subs.check_invariant();
        assert_eq!(subs.remove_session(a), None, "removal is idempotent");
        assert_eq!(subs.remove_session(b), Some('b'));
        subs.check_invariant();
        assert_eq!(
            (
                subs.session_count(),
                subs.subscription_count(),
                subs.product_count()
            ),
            (0, 0, 0)
        );
    }

    #[test]
    fn over_limit_subscribe_changes_nothing() {
        let mut subs = Subscriptions::default();
        let a = SessionId(1);
        subs.add_session(a, ());
        subs.subscribe(a, &ids(&[1, 2]), 3).unwrap();
        let err = subs.subscribe(a, &ids(&[2, 3, 4]), 3).unwrap_err();
        assert_eq!(
            err,
            OverLimit {
                current: 2,
                requested: 2,
                limit: 3
            }
        );
        assert_eq!(subs.subscription_count(), 2);
        assert_eq!(subs.subscribers(ProductId::new(3).unwrap()).count(), 0);
        subs.check_invariant();
        assert_eq!(subs.subscribe(a, &ids(&[1, 2, 3]), 3), Ok(1));
    }

    #[test]
    fn commands_for_unknown_sessions_are_ignored() {
        let mut subs: Subscriptions<()> = Subscriptions::default();
        assert_eq!(subs.subscribe(SessionId(9), &ids(&[1]), 10), Ok(0));
        assert_eq!(subs.unsubscribe(SessionId(9), &ids(&[1])), 0);
        assert_eq!(subs.product_count(), 0);
        subs.check_invariant();
    }
}
