//! Commit order: every subscriber sees one product's changes in the order they committed.

use crate::support::{WsClient, add_one_unit, product, spawn_app};

#[tokio::test]
async fn a_thousand_updates_arrive_in_commit_order_at_every_subscriber() {
    const UPDATES: i64 = 1000;
    let app = spawn_app().await;
    let id = app.create_product(product("Counter")).await["productId"]
        .as_i64()
        .unwrap();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = WsClient::connect(&app.ws_url).await;
        client.subscribe(&[id]).await;
        clients.push(client);
    }
    // Separate transactions from several connections at once, so commit order is decided by
    // the database, not by one connection's sequence.
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let pool = app.pool.clone();
            tokio::spawn(async move {
                for _ in 0..UPDATES / 4 {
                    add_one_unit(&pool, id).await;
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    // Each commit increments by one, so commit order is exactly 11, 12, … (the product starts
    // at 10 units).
    for client in &mut clients {
        for expected in 1..=UPDATES {
            let change = client.next_change().await;
            assert_eq!(change["product"]["unitsAvailable"], 10 + expected);
        }
    }
}
