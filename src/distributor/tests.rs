//! The actor through its handle: fan-out order, positions, overflow, resets and cleanup.

use super::*;
use crate::config::SlowClientPolicy;

fn limits(outbox_capacity: usize, max_subscriptions: usize, policy: SlowClientPolicy) -> Limits {
    Limits {
        outbox_capacity,
        outbox_bytes: 1 << 20,
        conflate_after: std::time::Duration::from_secs(1),
        slow_client_policy: policy,
        max_subscriptions,
        max_frame_bytes: 1024,
        ws_read_buffer_bytes: 1024,
        ws_write_buffer_bytes: 1024,
        max_body_bytes: 1024,
    }
}

/// Budgets that never bind, for tests about something else.
fn open_budgets() -> Budgets {
    Budgets {
        max_sessions: 1 << 20,
        max_sessions_per_ip: 1 << 20,
        max_total_subscriptions: 1 << 30,
        max_subscriptions_per_ip: 1 << 30,
        command_rate: 1000,
        command_burst: 1000,
    }
}

fn spawn<F: FrameBytes>(limits: Limits, position: Seq) -> DistributorHandle<F> {
    DistributorHandle::spawn(limits, open_budgets(), Vec::new(), position)
}

/// The totals once every command sent so far is handled.
async fn settled<F: FrameBytes>(distributor: &DistributorHandle<F>) -> Stats {
    distributor.views(0).await.unwrap();
    distributor.stats()
}

fn ids(raw: &[i64]) -> Vec<ProductId> {
    raw.iter().map(|&id| ProductId::new(id).unwrap()).collect()
}

async fn next<F: FrameBytes>(registration: &mut Registration<F>) -> Option<Delivery<F>> {
    let mut batch = Vec::new();
    registration
        .outbox
        .recv_batch(&mut batch, 1)
        .await
        .then(|| batch.remove(0))
}

fn change<F>(product: i64, seq: Seq, frame: F) -> Delivery<F> {
    Delivery::Change {
        product: ProductId::new(product).unwrap(),
        seq,
        frame,
    }
}

#[tokio::test]
async fn fans_out_in_order_and_acks_carry_the_position() {
    let distributor = spawn::<&'static str>(limits(16, 10, SlowClientPolicy::Conflate), 40);
    let mut a = distributor.register(None).await.unwrap();
    let mut b = distributor.register(None).await.unwrap();
    distributor
        .subscribe(a.id, ids(&[1]), SubscriptionStart::Live)
        .await
        .unwrap();
    distributor.publish(ids(&[1])[0], 41, "one").await.unwrap();
    distributor
        .subscribe(b.id, ids(&[1, 2]), SubscriptionStart::Since(3))
        .await
        .unwrap();
    distributor.publish(ids(&[2])[0], 42, "two").await.unwrap();

    assert_eq!(
        next(&mut a).await,
        Some(Delivery::Subscribed {
            products: ids(&[1]),
            position: 40,
            start: SubscriptionStart::Live,
            total: 1
        })
    );
    assert_eq!(next(&mut a).await, Some(change(1, 41, "one")));
    assert_eq!(
        next(&mut b).await,
        Some(Delivery::Subscribed {
            products: ids(&[1, 2]),
            position: 41,
            start: SubscriptionStart::Since(3),
            total: 2
        })
    );
    assert_eq!(next(&mut b).await, Some(change(2, 42, "two")));
    assert_eq!(settled(&distributor).await.last_seq, 42);
}

#[tokio::test]
async fn full_outbox_evicts_only_that_session_under_the_disconnect_policy() {
    let distributor = spawn::<u64>(limits(2, 10, SlowClientPolicy::Disconnect), 0);
    let slow = distributor.register(None).await.unwrap();
    let mut fast = distributor.register(None).await.unwrap();
    let product = ids(&[1])[0];
    distributor
        .subscribe(slow.id, vec![product], SubscriptionStart::Live)
        .await
        .unwrap();
    distributor
        .subscribe(fast.id, vec![product], SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(next(&mut fast).await.is_some());
    for n in 1..=5 {
        distributor.publish(product, n, n).await.unwrap();
        assert_eq!(next(&mut fast).await, Some(change(1, n, n)));
    }
    slow.evicted.cancelled().await;
    let mut slow = slow;
    assert_eq!(next(&mut slow).await, None, "its queue was dropped with it");
    let stats = settled(&distributor).await;
    assert_eq!(stats.sessions, 1);
    assert_eq!(stats.slow_sessions_evicted, 1);
    assert_eq!(stats.subscriptions, 1);
}

#[tokio::test]
async fn a_full_queue_defers_changes_to_one_gap_and_resets_reach_every_session() {
    let distributor = spawn::<u64>(limits(4, 10, SlowClientPolicy::Conflate), 0);
    let mut slow = distributor.register(None).await.unwrap();
    distributor
        .subscribe(slow.id, ids(&[2, 1]), SubscriptionStart::Live)
        .await
        .unwrap();
    for seq in 1..=100 {
        let product = if seq % 2 == 0 { 2 } else { 1 };
        distributor
            .publish(ids(&[product])[0], seq, seq)
            .await
            .unwrap();
    }
    let stats = settled(&distributor).await;
    assert_eq!(stats.sessions, 1);
    assert_eq!(
        distributor.views(0).await.unwrap().messages_waiting,
        5,
        "ack, 3 changes, one gap"
    );
    assert_eq!(stats.changes_deferred, 97);
    let mut batch = Vec::new();
    slow.outbox.recv_batch(&mut batch, 100).await;
    assert!(matches!(batch[0], Delivery::Subscribed { .. }));
    assert_eq!(
        &batch[1..4],
        &[change(1, 1, 1), change(2, 2, 2), change(1, 3, 3)]
    );
    assert!(
        matches!(&batch[4], Delivery::Gap { products, after: 3, upto: 100, .. } if *products == ids(&[1, 2])),
        "{:?}",
        batch[4]
    );
    // The reader took the gap: the queue is in order again.
    distributor.publish(ids(&[1])[0], 101, 101).await.unwrap();
    distributor
        .reset(101, 150, ResetCause::Rewound { latest: 150 })
        .await
        .unwrap();
    distributor.publish(ids(&[2])[0], 151, 151).await.unwrap();
    assert_eq!(next(&mut slow).await, Some(change(1, 101, 101)));
    assert_eq!(
        next(&mut slow).await,
        Some(Delivery::Reset {
            products: ids(&[1, 2]),
            since: 101,
            position: 150,
            cause: ResetCause::Rewound { latest: 150 }
        })
    );
    assert_eq!(next(&mut slow).await, Some(change(2, 151, 151)));
    let stats = settled(&distributor).await;
    assert_eq!((stats.resets, stats.last_seq), (1, 151));
}

#[tokio::test]
async fn refused_subscribe_is_reported_and_maps_empty_after_disconnects() {
    let distributor = spawn::<u64>(limits(16, 2, SlowClientPolicy::Conflate), 0);
    let mut a = distributor.register(None).await.unwrap();
    distributor
        .subscribe(a.id, ids(&[1, 2, 3]), SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(matches!(next(&mut a).await, Some(Delivery::Refused(_))));
    distributor
        .subscribe(a.id, ids(&[1, 2]), SubscriptionStart::Live)
        .await
        .unwrap();
    let b = distributor.register(None).await.unwrap();
    distributor
        .subscribe(b.id, ids(&[2]), SubscriptionStart::Live)
        .await
        .unwrap();
    assert_eq!(settled(&distributor).await.subscriptions, 3);
    assert_eq!(
        distributor.views(1).await.unwrap().top_products,
        vec![(ids(&[2])[0], 2)],
        "product 2 has two subscribers"
    );
    distributor.disconnect(a.id).await;
    distributor.disconnect_soon(b.id);
    let stats = settled(&distributor).await;
    assert_eq!(
        (
            stats.sessions,
            stats.subscriptions,
            stats.products_with_subscribers
        ),
        (0, 0, 0)
    );
    assert!(matches!(
        next(&mut a).await,
        Some(Delivery::Subscribed { .. })
    ));
    assert_eq!(
        next(&mut a).await,
        None,
        "outbox closes when the session is dropped"
    );
}

#[tokio::test]
async fn session_and_subscription_budgets_hold_per_address_and_server_wide() {
    let budgets = Budgets {
        max_sessions: 3,
        max_sessions_per_ip: 2,
        max_total_subscriptions: 5,
        max_subscriptions_per_ip: 3,
        ..open_budgets()
    };
    let exempt = vec![crate::config::IpPrefix::parse("127.0.0.0/8").unwrap()];
    let distributor = DistributorHandle::<u64>::spawn(
        limits(16, 10, SlowClientPolicy::Conflate),
        budgets,
        exempt,
        0,
    );
    let remote: std::net::IpAddr = "192.0.2.7".parse().unwrap();
    let local: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let mut a = distributor.register(Some(remote)).await.unwrap();
    let b = distributor.register(Some(remote)).await.unwrap();
    let refused = distributor.register(Some(remote)).await.unwrap_err();
    assert!(matches!(
        refused,
        RegisterError::OverBudget(OverLimit {
            budget: Budget::Address,
            current: 2,
            limit: 2,
            ..
        })
    ));
    // Loopback is exempt from the per-address budget, not from the server's.
    let mut c = distributor.register(Some(local)).await.unwrap();
    let refused = distributor.register(Some(local)).await.unwrap_err();
    assert!(matches!(
        refused,
        RegisterError::OverBudget(OverLimit {
            budget: Budget::Server,
            current: 3,
            limit: 3,
            ..
        })
    ));

    // The address's 3 subscriptions are shared by its two sessions.
    distributor
        .subscribe(a.id, ids(&[1, 2]), SubscriptionStart::Live)
        .await
        .unwrap();
    distributor
        .subscribe(b.id, ids(&[1, 2]), SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut a).await,
        Some(Delivery::Subscribed { .. })
    ));
    // b's refusal is in b's outbox; check it through the counters.
    let stats = settled(&distributor).await;
    assert_eq!(stats.subscriptions, 2);
    assert_eq!(stats.refused.subscriptions_address, 1);
    // The exempt session still meets the server-wide budget: 2 held + 4 > 5.
    distributor
        .subscribe(c.id, ids(&[5, 6, 7, 8]), SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut c).await,
        Some(Delivery::Refused(OverLimit {
            budget: Budget::Server,
            current: 2,
            requested: 4,
            limit: 5
        }))
    ));
    // Unsubscribing and leaving give the budgets back.
    distributor.unsubscribe(a.id, ids(&[1, 2])).await.unwrap();
    distributor.disconnect(b.id).await;
    distributor
        .subscribe(a.id, ids(&[1, 2, 3]), SubscriptionStart::Live)
        .await
        .unwrap();
    let stats = settled(&distributor).await;
    assert_eq!((stats.sessions, stats.subscriptions), (2, 3));
    assert_eq!(
        (
            stats.refused.sessions_address,
            stats.refused.sessions_server
        ),
        (1, 1)
    );
    assert!(
        distributor.register(Some(remote)).await.is_ok(),
        "b's slot is free"
    );
}

#[tokio::test]
async fn an_all_subscriber_gets_each_change_once_even_when_also_subscribed_by_id() {
    let distributor = spawn::<&'static str>(limits(16, 10, SlowClientPolicy::Conflate), 5);
    let mut a = distributor.register(None).await.unwrap();
    distributor
        .subscribe(a.id, ids(&[1]), SubscriptionStart::Live)
        .await
        .unwrap();
    distributor
        .subscribe_all(a.id, SubscriptionStart::Live)
        .await
        .unwrap();
    distributor.publish(ids(&[1])[0], 6, "one").await.unwrap();
    distributor.publish(ids(&[9])[0], 7, "nine").await.unwrap();
    distributor.unsubscribe_all(a.id).await.unwrap();
    distributor
        .publish(ids(&[9])[0], 8, "nine again")
        .await
        .unwrap();
    distributor
        .publish(ids(&[1])[0], 9, "one again")
        .await
        .unwrap();
    assert!(matches!(
        next(&mut a).await,
        Some(Delivery::Subscribed { .. })
    ));
    assert_eq!(
        next(&mut a).await,
        Some(Delivery::SubscribedAll {
            position: 5,
            start: SubscriptionStart::Live
        })
    );
    assert_eq!(next(&mut a).await, Some(change(1, 6, "one")));
    assert_eq!(next(&mut a).await, Some(change(9, 7, "nine")));
    assert_eq!(next(&mut a).await, Some(Delivery::UnsubscribedAll));
    assert_eq!(next(&mut a).await, Some(change(1, 9, "one again")));
    let stats = settled(&distributor).await;
    assert_eq!(stats.all_subscribers, 0);
    assert_eq!(stats.messages_queued, 6);
}

#[tokio::test]
async fn a_subscribe_all_counts_against_the_server_budget_until_its_session_leaves() {
    let budgets = Budgets {
        max_total_subscriptions: ALL_SUBSCRIPTION_WEIGHT + 5,
        ..open_budgets()
    };
    let distributor = DistributorHandle::<u64>::spawn(
        limits(16, 10, SlowClientPolicy::Conflate),
        budgets,
        Vec::new(),
        0,
    );
    let mut a = distributor.register(None).await.unwrap();
    let mut b = distributor.register(None).await.unwrap();
    distributor
        .subscribe_all(a.id, SubscriptionStart::Live)
        .await
        .unwrap();
    distributor
        .subscribe_all(b.id, SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut a).await,
        Some(Delivery::SubscribedAll { .. })
    ));
    assert!(matches!(
        next(&mut b).await,
        Some(Delivery::Refused(OverLimit {
            budget: Budget::Server,
            ..
        }))
    ));
    distributor
        .subscribe(b.id, ids(&[1, 2, 3, 4, 5, 6]), SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(matches!(next(&mut b).await, Some(Delivery::Refused(_))));
    distributor.disconnect(a.id).await;
    distributor
        .subscribe_all(b.id, SubscriptionStart::Live)
        .await
        .unwrap();
    assert!(matches!(
        next(&mut b).await,
        Some(Delivery::SubscribedAll { .. })
    ));
    assert_eq!(settled(&distributor).await.all_subscribers, 1);
}

#[tokio::test]
async fn presence_reaches_only_sessions_that_asked_and_changes_are_noted_once_asked() {
    let distributor = spawn::<&'static str>(limits(16, 10, SlowClientPolicy::Conflate), 0);
    let mut watcher = distributor.register(None).await.unwrap();
    let mut quiet = distributor.register(None).await.unwrap();
    // Before a presence task asks, nothing is noted.
    distributor
        .subscribe(quiet.id, ids(&[1]), SubscriptionStart::Live)
        .await
        .unwrap();
    assert_eq!(
        distributor.presence_changes().await.unwrap(),
        PresenceChanges::default()
    );
    distributor.want_presence(watcher.id).await.unwrap();
    distributor
        .subscribe(watcher.id, ids(&[1]), SubscriptionStart::Live)
        .await
        .unwrap();
    let changes = distributor.presence_changes().await.unwrap();
    assert_eq!(changes.counts, vec![(ids(&[1])[0], 2)]);
    assert_eq!(changes.fresh, ids(&[1]));
    assert_eq!(changes.watched, Some(ids(&[1])));
    distributor
        .publish_presence(vec![(ids(&[1])[0], "two watchers")])
        .await
        .unwrap();
    distributor.disconnect(quiet.id).await;
    let changes = distributor.presence_changes().await.unwrap();
    assert_eq!(changes.counts, vec![(ids(&[1])[0], 1)]);
    assert!(changes.fresh.is_empty());
    assert_eq!(changes.watched, None, "the watcher still holds product 1");
    distributor
        .unsubscribe(watcher.id, ids(&[1]))
        .await
        .unwrap();
    assert_eq!(
        distributor.presence_changes().await.unwrap().watched,
        Some(Vec::new())
    );

    assert!(matches!(
        next(&mut watcher).await,
        Some(Delivery::Subscribed { .. })
    ));
    assert_eq!(
        next(&mut watcher).await,
        Some(Delivery::Presence {
            frame: "two watchers"
        })
    );
    // The quiet session got its ack and nothing else.
    assert!(matches!(
        next(&mut quiet).await,
        Some(Delivery::Subscribed { .. })
    ));
    assert_eq!(next(&mut quiet).await, None);
}
