//! The two subscription maps and the only functions that change them. Pure data: no channels,
//! no I/O, so every invariant is checked by plain unit tests.
//!
//! Sessions live in a slab; `by_session` maps a session's id to its slot, and `by_product` maps
//! a product to the slots of its subscribers (a plain `Vec<u32>` the fan-out iterates, with a
//! position index once the set grows large), so a subscription costs a few words and no clone
//! of the session's sink (cloning it meant two atomic reference counts and a mutex per
//! subscription). Removing a session costs O(its subscriptions), never a scan of all products.
//! Empty sets are removed, and the subscription count is kept incrementally.

use std::collections::{HashMap as StdHashMap, HashSet as StdHashSet};

use foldhash::fast::RandomState;
use slab::Slab;

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

/// Whose budget a refusal hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// The one connection's cap.
    Connection,
    /// All sessions from the client's address together.
    Address,
    /// All sessions of the server together.
    Server,
}

/// A request (a subscribe, or a new session) that would take a budget past its limit; nothing
/// was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    /// Which budget.
    pub budget: Budget,
    /// What the budget's holder holds now.
    pub current: usize,
    /// What the refused request would have added.
    pub requested: usize,
    /// The budget.
    pub limit: usize,
}

/// A session's place in the slab. `u32`: the process cannot hold 4 billion sockets.
type Slot = u32;

#[derive(Debug)]
struct SessionEntry<S> {
    id: SessionId,
    sink: S,
    products: HashSet<ProductId>,
}

/// Sets up to this size are searched linearly on removal; larger ones keep a position index.
/// Most products have a handful of subscribers; a product with thousands (a fan-out) must
/// still lose one in O(1) when a session leaves. Scanning 128 slots (512 bytes) costs about
/// what the index's own insert and remove cost, so below that the index only adds work.
const LINEAR_SUBSCRIBERS: usize = 128;

/// The subscribers of one product, in no particular order.
#[derive(Debug, Default)]
struct Subscribers {
    slots: Vec<Slot>,
    /// slot → index in `slots`, kept only while the set is large.
    positions: Option<Box<HashMap<Slot, u32>>>,
}

impl Subscribers {
    fn insert(&mut self, slot: Slot) {
        if let Some(positions) = &mut self.positions {
            positions.insert(slot, self.slots.len() as u32);
        }
        self.slots.push(slot);
        if self.positions.is_none() && self.slots.len() > LINEAR_SUBSCRIBERS {
            let mut positions =
                HashMap::with_capacity_and_hasher(self.slots.len() * 2, RandomState::default());
            positions.extend(self.slots.iter().enumerate().map(|(i, &s)| (s, i as u32)));
            self.positions = Some(Box::new(positions));
        }
    }

    fn remove(&mut self, slot: Slot) {
        let index = match &mut self.positions {
            Some(positions) => positions.remove(&slot).map(|i| i as usize),
            None => self.slots.iter().position(|&s| s == slot),
        };
        let Some(index) = index else { return };
        self.slots.swap_remove(index);
        if let (Some(positions), Some(&moved)) = (&mut self.positions, self.slots.get(index)) {
            positions.insert(moved, index as u32);
        }
        if self.slots.len() <= LINEAR_SUBSCRIBERS / 2 {
            self.positions = None;
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }
}

/// Who is subscribed to what. `S` is what a change is handed to (an outbox sender in the
/// actor; anything in tests).
#[derive(Debug)]
pub(crate) struct Subscriptions<S> {
    sessions: Slab<SessionEntry<S>>,
    by_session: HashMap<SessionId, Slot>,
    by_product: HashMap<ProductId, Subscribers>,
    subscription_count: usize,
}

impl<S> Default for Subscriptions<S> {
    fn default() -> Self {
        Self {
            sessions: Slab::new(),
            by_session: HashMap::default(),
            by_product: HashMap::default(),
            subscription_count: 0,
        }
    }
}

impl<S> Subscriptions<S> {
    /// Adds a session with no subscriptions. Re-adding an id replaces nothing.
    pub(crate) fn add_session(&mut self, id: SessionId, sink: S) {
        if self.by_session.contains_key(&id) {
            return;
        }
        let slot = self.sessions.insert(SessionEntry {
            id,
            sink,
            products: HashSet::default(),
        });
        let slot = Slot::try_from(slot).expect("fewer than 2^32 sessions: each holds a socket");
        self.by_session.insert(id, slot);
    }

    /// Subscribes `id` to `products` (distinct ids), all or nothing: if the new ids would take
    /// the session past `limit`, or `budgets` refuses their number (the budgets shared with
    /// other sessions), nothing changes. Returns how many were new. Unknown sessions (already
    /// removed) are ignored.
    pub(crate) fn subscribe(
        &mut self,
        id: SessionId,
        products: &[ProductId],
        limit: usize,
        budgets: impl Fn(usize) -> Result<(), OverLimit>,
    ) -> Result<usize, OverLimit> {
        let Some(&slot) = self.by_session.get(&id) else {
            return Ok(0);
        };
        let entry = &mut self.sessions[slot as usize];
        let current = entry.products.len();
        // Most subscribes fit even if every id is new: they are inserted at once, one hash per
        // id. One that might not fit is counted first, so a refusal (a client pushing against
        // a budget, maybe in a loop) costs lookups only, never inserts and their rollback.
        let fits_whole = current + products.len() <= limit && budgets(products.len()).is_ok();
        if !fits_whole {
            let new = products
                .iter()
                .filter(|product| !entry.products.contains(*product))
                .count();
            if current + new > limit {
                return Err(OverLimit {
                    budget: Budget::Connection,
                    current,
                    requested: new,
                    limit,
                });
            }
            budgets(new)?;
        }
        entry.products.reserve(products.len());
        let mut new = Vec::with_capacity(products.len());
        for &product in products {
            if entry.products.insert(product) {
                new.push(product);
            }
        }
        self.by_product.reserve(new.len());
        for &product in &new {
            self.by_product.entry(product).or_default().insert(slot);
        }
        self.subscription_count += new.len();
        Ok(new.len())
    }

    /// Unsubscribes `id` from `products` it holds; others are ignored. Returns how many it held.
    pub(crate) fn unsubscribe(&mut self, id: SessionId, products: &[ProductId]) -> usize {
        let Some(&slot) = self.by_session.get(&id) else {
            return 0;
        };
        let entry = &mut self.sessions[slot as usize];
        let mut removed = 0;
        for product in products {
            if entry.products.remove(product) {
                removed += 1;
                Self::remove_from_product(&mut self.by_product, *product, slot);
            }
        }
        self.subscription_count -= removed;
        removed
    }

    /// Removes a session and all its subscriptions; returns its sink if it was present.
    pub(crate) fn remove_session(&mut self, id: SessionId) -> Option<S> {
        let slot = self.by_session.remove(&id)?;
        let entry = self.sessions.remove(slot as usize);
        for product in &entry.products {
            Self::remove_from_product(&mut self.by_product, *product, slot);
        }
        self.subscription_count -= entry.products.len();
        Some(entry.sink)
    }

    fn remove_from_product(
        by_product: &mut HashMap<ProductId, Subscribers>,
        product: ProductId,
        slot: Slot,
    ) {
        if let Some(subscribers) = by_product.get_mut(&product) {
            subscribers.remove(slot);
            if subscribers.len() == 0 {
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
            .flat_map(|subscribers| subscribers.slots.iter())
            .map(|&slot| {
                let entry = &self.sessions[slot as usize];
                (entry.id, &entry.sink)
            })
    }

    /// True if session `id` is subscribed to `product` by id.
    pub(crate) fn is_subscribed(&self, id: SessionId, product: ProductId) -> bool {
        self.by_session
            .get(&id)
            .is_some_and(|&slot| self.sessions[slot as usize].products.contains(&product))
    }

    /// How many sessions are subscribed to `product` by id.
    pub(crate) fn subscriber_count(&self, product: ProductId) -> usize {
        self.by_product.get(&product).map_or(0, Subscribers::len)
    }

    /// The sink of a session, if it is registered.
    pub(crate) fn sink(&self, id: SessionId) -> Option<&S> {
        let slot = *self.by_session.get(&id)?;
        Some(&self.sessions[slot as usize].sink)
    }

    /// Every session's id.
    pub(crate) fn session_ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.sessions.iter().map(|(_, entry)| entry.id)
    }

    /// Every session's sink.
    pub(crate) fn sinks(&self) -> impl Iterator<Item = &S> + '_ {
        self.sessions.iter().map(|(_, entry)| &entry.sink)
    }

    /// The products one session is subscribed to (empty if it is not registered).
    pub(crate) fn session_products(&self, id: SessionId) -> Vec<ProductId> {
        self.by_session.get(&id).map_or_else(Vec::new, |&slot| {
            let mut products: Vec<ProductId> = self.sessions[slot as usize]
                .products
                .iter()
                .copied()
                .collect();
            products.sort_unstable();
            products
        })
    }

    /// Subscriptions one session holds (0 if it is not registered).
    pub(crate) fn session_subscriptions(&self, id: SessionId) -> usize {
        self.by_session
            .get(&id)
            .map_or(0, |&slot| self.sessions[slot as usize].products.len())
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

    /// Asserts that the maps mirror each other and the counter is right (tests and debug).
    #[cfg(test)]
    pub(crate) fn check_invariant(&self) {
        assert_eq!(
            self.by_session.len(),
            self.sessions.len(),
            "slab and id map disagree"
        );
        let mut pairs = 0;
        for (&id, &slot) in &self.by_session {
            let entry = &self.sessions[slot as usize];
            assert_eq!(entry.id, id, "slot {slot} holds another session");
            for product in &entry.products {
                assert!(
                    self.by_product
                        .get(product)
                        .is_some_and(|subscribers| subscribers.slots.contains(&slot)),
                    "session {id} holds {product} but by_product does not list it"
                );
            }
            pairs += entry.products.len();
        }
        for (product, subscribers) in &self.by_product {
            assert!(
                subscribers.len() > 0,
                "empty subscriber set kept for {product}"
            );
            for (index, &slot) in subscribers.slots.iter().enumerate() {
                let entry = self.sessions.get(slot as usize);
                assert!(
                    entry.is_some_and(|entry| entry.products.contains(product)),
                    "by_product lists slot {slot} for {product} but its session does not hold it"
                );
                if let Some(positions) = &subscribers.positions {
                    assert_eq!(
                        positions.get(&slot),
                        Some(&(index as u32)),
                        "stale position index"
                    );
                }
            }
            if let Some(positions) = &subscribers.positions {
                assert_eq!(positions.len(), subscribers.len(), "position index size");
            }
            let mut unique = subscribers.slots.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(
                unique.len(),
                subscribers.len(),
                "duplicate subscriber for {product}"
            );
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

    /// No shared budget in the way.
    fn open(_: usize) -> Result<(), OverLimit> {
        Ok(())
    }

    fn ids(raw: &[i64]) -> Vec<ProductId> {
        raw.iter().map(|&id| ProductId::new(id).unwrap()).collect()
    }

    #[test]
    fn maps_mirror_each_other_through_every_operation() {
        let mut subs = Subscriptions::default();
        let (a, b) = (SessionId(1), SessionId(2));
        subs.add_session(a, 'a');
        subs.add_session(b, 'b');
        assert_eq!(subs.subscribe(a, &ids(&[1, 2, 3]), 10, open), Ok(3));
        subs.check_invariant();
        assert_eq!(
            subs.subscribe(a, &ids(&[3, 4]), 10, open),
            Ok(1),
            "set semantics"
        );
        assert_eq!(subs.subscribe(b, &ids(&[1]), 10, open), Ok(1));
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
        subs.subscribe(a, &ids(&[1, 2]), 3, open).unwrap();
        let err = subs.subscribe(a, &ids(&[2, 3, 4]), 3, open).unwrap_err();
        assert_eq!(
            err,
            OverLimit {
                budget: Budget::Connection,
                current: 2,
                requested: 2,
                limit: 3
            }
        );
        assert_eq!(subs.subscription_count(), 2);
        assert_eq!(subs.subscribers(ProductId::new(3).unwrap()).count(), 0);
        subs.check_invariant();
        // A shared budget that refuses is asked with the number of new ids, and rolls back too.
        let shared = OverLimit {
            budget: Budget::Address,
            current: 7,
            requested: 1,
            limit: 7,
        };
        let refuse = |new: usize| {
            assert!(
                new == 3 || new == 1,
                "asked with all ids, then with the new one"
            );
            Err(shared)
        };
        assert_eq!(subs.subscribe(a, &ids(&[1, 2, 3]), 3, refuse), Err(shared));
        assert_eq!(subs.subscription_count(), 2);
        subs.check_invariant();
        assert_eq!(subs.subscribe(a, &ids(&[1, 2, 3]), 3, open), Ok(1));
    }

    #[test]
    fn commands_for_unknown_sessions_are_ignored() {
        let mut subs: Subscriptions<()> = Subscriptions::default();
        assert_eq!(subs.subscribe(SessionId(9), &ids(&[1]), 10, open), Ok(0));
        assert_eq!(subs.unsubscribe(SessionId(9), &ids(&[1])), 0);
        assert_eq!(subs.product_count(), 0);
        subs.check_invariant();
    }

    #[test]
    fn large_subscriber_sets_switch_to_an_index_and_back() {
        let mut subs = Subscriptions::default();
        let product = ids(&[7]);
        let sessions: Vec<SessionId> = (1..=200).map(SessionId).collect();
        for &id in &sessions {
            subs.add_session(id, id.0);
            subs.subscribe(id, &product, 10, open).unwrap();
        }
        subs.check_invariant();
        assert!(subs.by_product[&product[0]].positions.is_some());
        // Leave in an order that moves members around inside the set.
        for (n, &id) in sessions.iter().enumerate().filter(|(n, _)| n % 3 != 1) {
            if n % 2 == 0 {
                subs.unsubscribe(id, &product);
            } else {
                subs.remove_session(id);
            }
            subs.check_invariant();
        }
        let left: Vec<u64> = subs.subscribers(product[0]).map(|(_, s)| *s).collect();
        let mut expected: Vec<u64> = (1..=200).filter(|n| (n - 1) % 3 == 1).collect();
        let mut got = left.clone();
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(got, expected);
        for &id in &sessions {
            subs.remove_session(id);
        }
        subs.check_invariant();
        assert_eq!(subs.product_count(), 0);
    }

    #[test]
    fn slots_are_reused_without_leaking_old_subscriptions() {
        let mut subs = Subscriptions::default();
        subs.add_session(SessionId(1), 'a');
        subs.subscribe(SessionId(1), &ids(&[1, 2]), 10, open)
            .unwrap();
        subs.remove_session(SessionId(1));
        subs.add_session(SessionId(2), 'b');
        assert_eq!(subs.subscribers(ProductId::new(1).unwrap()).count(), 0);
        subs.subscribe(SessionId(2), &ids(&[2]), 10, open).unwrap();
        let on_two: Vec<(SessionId, char)> = subs
            .subscribers(ProductId::new(2).unwrap())
            .map(|(id, s)| (id, *s))
            .collect();
        assert_eq!(on_two, vec![(SessionId(2), 'b')]);
        subs.check_invariant();
    }
}
