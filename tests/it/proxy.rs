//! Several rowcast instances behind nginx, set up as the README's proxy section shows: browsers
//! (rowcast.js in headless Chromium) and writers reach them only through the proxy. One
//! instance is killed under steady load; its clients reconnect through nginx to the others and
//! resume, and every client receives exactly the committed changes of its products after its
//! first answer: none missing, none twice, in commit order.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::nginx::Nginx;
use crate::support::process::{free_port, rowcast, wait_until_serving};
use crate::support::webdriver::{Browser, skip_without_chromedriver};
use crate::support::{TestDatabase, post_product, product};

const INSTANCES: usize = 3;
const CLIENTS: usize = 12;
const PRODUCTS: usize = 24;
/// Products per client, spread so that every product has several watchers.
const IDS_PER_CLIENT: usize = 4;
/// Writes per second through the proxy while the instance dies.
const WRITE_RATE: u64 = 150;
/// How long the last changes may take to reach every client after the writers stop.
const ARRIVAL: Duration = Duration::from_secs(30);

#[tokio::test]
async fn three_instances_behind_nginx_one_killed_under_load_every_client_gets_each_change_once_in_order()
 {
    if skip_without_chromedriver() || !Nginx::available() {
        return;
    }
    let database = TestDatabase::create().await;
    let http = reqwest::Client::new();
    let ports: Vec<u16> = (0..INSTANCES).map(|_| free_port()).collect();
    let mut instances = Vec::new();
    // One after the other: the first applies the migrations.
    for &port in &ports {
        let mut child = rowcast(port)
            .env("DATABASE_URL", &database.url)
            .spawn()
            .unwrap();
        let ready = format!("http://127.0.0.1:{port}/readyz");
        wait_until_serving(&mut child, &http, &ready).await;
        instances.push(child);
    }
    let nginx = Nginx::start(&ports).await;

    let mut products = Vec::new();
    for i in 0..PRODUCTS {
        products.push(post_product(&http, &nginx.base, &format!("proxied {i}")).await);
    }

    let browser = Browser::start().await;
    browser.goto(&format!("{}/healthz", nginx.base)).await;
    browser
        .eval(&format!(
            r#"const products = {products};
            window.clients = [];
            import("/rowcast.js").then(({{ connect }}) => {{
              for (let i = 0; i < {CLIENTS}; i++) {{
                const record = {{ ids: [], snapshots: {{}}, seen: [], states: [] }};
                for (let k = 0; k < {IDS_PER_CLIENT}; k++) record.ids.push(products[(i * 5 + k * 7) % products.length]);
                const client = connect("ws://" + location.host + "/websocket", {{
                  onState: (state) => record.states.push(state),
                }});
                client.subscribe(record.ids, {{
                  snapshot: true,
                  onSnapshot: (_, {{ productId, seq }}) => {{ record.snapshots[productId] = seq; }},
                  onChange: (c) => record.seen.push([c.product.productId, c.seq]),
                }});
                window.clients.push(record);
              }}
            }});
            return true;"#,
            products = json!(products),
        ))
        .await;
    browser
        .wait_for(
            &format!(
                "return window.clients.length === {CLIENTS} && window.clients.every(
                   (c) => Object.keys(c.snapshots).length === c.ids.length);"
            ),
            "every client has its first answer (the snapshot)",
            Duration::from_secs(20),
        )
        .await;

    // Kill the instance that holds the most of them.
    let mut sessions = Vec::new();
    for &port in &ports {
        sessions.push(sessions_of(&http, port).await);
    }
    assert_eq!(
        sessions.iter().sum::<u64>(),
        CLIENTS as u64,
        "every client has one session somewhere: {sessions:?}"
    );
    let (victim, &victim_sessions) = sessions
        .iter()
        .enumerate()
        .max_by_key(|(_, n)| **n)
        .unwrap();
    assert!(victim_sessions > 0);

    let stop = Arc::new(AtomicBool::new(false));
    let writes_ok = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_steadily(
        nginx.base.clone(),
        products.clone(),
        stop.clone(),
        writes_ok.clone(),
    ));
    tokio::time::sleep(Duration::from_secs(2)).await;
    instances[victim].kill().await.unwrap();
    let ok_at_kill = writes_ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let refused = writer.await.unwrap();
    let ok_after_kill = writes_ok.load(Ordering::Relaxed) - ok_at_kill;
    assert!(
        ok_after_kill > WRITE_RATE,
        "writes go on through the proxy after the kill: {ok_after_kill} (refused {refused:?})"
    );

    // What each client must have: every committed change of its products after its snapshot.
    let clients: Vec<Value> =
        serde_json::from_value(browser.eval("return window.clients;").await).unwrap();
    let pool = sqlx::PgPool::connect(&database.url).await.unwrap();
    let mut expected = Vec::new();
    for client in &clients {
        let mut seqs = Vec::new();
        for (id, snapshot) in client["snapshots"].as_object().unwrap() {
            let rows: Vec<i64> = sqlx::query_scalar(
                "SELECT seq FROM product_changes WHERE product_id = $1 AND seq > $2 ORDER BY seq",
            )
            .bind(id.parse::<i64>().unwrap())
            .bind(snapshot.as_i64().unwrap())
            .fetch_all(&pool)
            .await
            .unwrap();
            seqs.extend(
                rows.into_iter()
                    .map(|seq| (id.parse::<i64>().unwrap(), seq)),
            );
        }
        seqs.sort_by_key(|&(_, seq)| seq);
        expected.push(seqs);
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    assert!(total > 500, "the load wrote enough to matter: {total}");
    browser
        .wait_for(
            &format!("return window.clients.reduce((n, c) => n + c.seen.length, 0) >= {total};"),
            "every client catches up",
            ARRIVAL,
        )
        .await;
    // Anything doubled would arrive late: give it the time.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clients: Vec<Value> =
        serde_json::from_value(browser.eval("return window.clients;").await).unwrap();
    let mut resumed = 0;
    for (i, (client, expected)) in clients.iter().zip(&expected).enumerate() {
        let seen: Vec<(i64, i64)> = serde_json::from_value(client["seen"].clone()).unwrap();
        assert_eq!(
            &seen, expected,
            "client {i}: every change of its products after its snapshot, once, in commit order"
        );
        let states: Vec<String> = serde_json::from_value(client["states"].clone()).unwrap();
        if states.iter().any(|s| s == "resumed") {
            resumed += 1;
        }
    }
    eprintln!(
        "proxy: sessions per instance {sessions:?}, killed #{victim}; {total} changes expected and \
         received over {CLIENTS} clients; {resumed} clients resumed; writes after the kill \
         {ok_after_kill}, refused {refused:?}"
    );
    assert!(
        resumed >= victim_sessions,
        "the {victim_sessions} clients of the killed instance reconnected through nginx and resumed \
         ({resumed} did); sessions per instance before: {sessions:?}"
    );
    let after: Vec<u64> = futures_util::future::join_all(
        ports
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != victim)
            .map(|(_, port)| sessions_of(&http, *port)),
    )
    .await;
    assert_eq!(
        after.iter().sum::<u64>(),
        CLIENTS as u64,
        "the survivors hold every client: {after:?}"
    );
}

/// The WebSocket sessions one instance holds, asked of it directly (not through the proxy).
async fn sessions_of(http: &reqwest::Client, port: u16) -> u64 {
    let stats: Value = http
        .get(format!("http://127.0.0.1:{port}/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    stats["sessions"].as_u64().unwrap()
}

/// PUTs the products round-robin through the proxy at [`WRITE_RATE`] until `stop`; counts the
/// answered ones in `ok` and returns how many were refused (a request in flight to the killed
/// instance gets 502: whether it committed, the changelog says).
async fn write_steadily(
    base: String,
    products: Vec<i64>,
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
) -> BTreeMap<u16, u64> {
    let http = reqwest::Client::new();
    let mut refused = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / WRITE_RATE));
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let id = products[usize::try_from(n).unwrap() % products.len()];
        let mut body = product("proxied");
        body["unitsAvailable"] = json!(n);
        match http
            .put(format!("{base}/products/{id}"))
            .json(&body)
            .send()
            .await
        {
            Ok(response) if response.status().is_success() => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(response) => *refused.entry(response.status().as_u16()).or_default() += 1,
            Err(_) => *refused.entry(0).or_default() += 1,
        }
    }
    refused
}
