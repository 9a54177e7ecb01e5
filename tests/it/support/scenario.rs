//! The randomized delivery scenario: writers commit changes to a set of products while clients,
//! each subscribed to a random subset, roam between rowcast instances (read a while, disconnect,
//! resume with `since` on any instance). Afterwards every client's stream is compared with what
//! the changelog says was committed: nothing missing, nothing twice, nothing out of order,
//! nothing that was never committed. `delivery.rs` runs it plain; `faults.rs` runs it with a
//! fault injected between rowcast and PostgreSQL halfway through.
//!
//! The seed is printed; `ROWCAST_TEST_SEED=<n>` replays one.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{TestApp, WsClient, add_one_unit, product, products_in_table};

/// Names written only by transactions that roll back: no client may ever see one.
pub const PHANTOM: &str = "PHANTOM";

/// No client loop runs longer than this, whatever happens.
const CLIENT_HARD_LIMIT: Duration = Duration::from_secs(300);

/// The seed from `ROWCAST_TEST_SEED`, or a random one; printed either way.
pub fn seed() -> u64 {
    let seed = match std::env::var("ROWCAST_TEST_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .expect("ROWCAST_TEST_SEED is an unsigned integer"),
        Err(_) => rand::random(),
    };
    eprintln!("seed {seed} (replay with ROWCAST_TEST_SEED={seed})");
    seed
}

/// What the writers do.
#[derive(Debug, Clone, Copy)]
pub enum Writes {
    /// Each writer commits this many single-row updates, one per transaction; every one must
    /// succeed. The fault future is not awaited.
    SingleRows(usize),
    /// Each writer runs a random mix until `warmup`, the fault, and `settle` have passed:
    /// single-row updates, multi-row transactions (some deleting and re-inserting a row),
    /// transactions that roll back (whole, or one savepoint of a committed one) after writing
    /// [`PHANTOM`] names, and (writer 0, on two products of its own) transactions held open for
    /// up to 1.5 s. Write errors are counted, not fatal: a database restart breaks the writers'
    /// connections too.
    Mixed { warmup: Duration, settle: Duration },
}

/// The scenario's size.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub products: usize,
    pub clients: usize,
    pub writers: usize,
    /// The first `stayers` clients do not roam: client n stays on instance n (mod the number of
    /// instances) and reconnects, with `since`, only when its connection ends. A gap in one
    /// instance's live stream shows in them; roaming clients often paper over it with a reset.
    pub stayers: usize,
    pub writes: Writes,
    /// How long the clients may take, once the writers are done, to have everything.
    pub catch_up_limit: Duration,
}

impl Scenario {
    /// 24 products, 6 clients (all roaming), 8 writers.
    pub fn new(seed: u64, writes: Writes) -> Self {
        Self {
            seed,
            products: 24,
            clients: 6,
            writers: 8,
            stayers: 0,
            writes,
            catch_up_limit: Duration::from_secs(60),
        }
    }
}

/// What the writers did.
#[derive(Debug, Default, Clone)]
pub struct WriterStats {
    pub single: u64,
    pub multi: u64,
    pub delete_insert: u64,
    pub rolled_back: u64,
    pub savepoint_rolled_back: u64,
    pub long_open: u64,
    /// Transactions that failed (their changes may or may not have committed; the changelog
    /// says which).
    pub errors: u64,
    pub first_error: Option<String>,
}

impl WriterStats {
    fn add(&mut self, other: &Self) {
        self.single += other.single;
        self.multi += other.multi;
        self.delete_insert += other.delete_insert;
        self.rolled_back += other.rolled_back;
        self.savepoint_rolled_back += other.savepoint_rolled_back;
        self.long_open += other.long_open;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// One change as a client received it.
#[derive(Debug, Clone)]
struct Received {
    product: i64,
    seq: u64,
    action: String,
    body: Value,
    /// Index into [`ClientLog::streams`].
    stream: usize,
}

/// One subscription stream of a client (one WebSocket connection that got going).
#[derive(Debug, Clone)]
struct Stream {
    instance: usize,
    since: Option<u64>,
    /// The ack's seq, or the snapshot's after a reset.
    began_at: u64,
    reset: bool,
    opened: Duration,
}

impl std::fmt::Display for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance {} at {:.2?}, since {}, {} {}",
            self.instance,
            self.opened,
            self.since.map_or("-".to_owned(), |s| s.to_string()),
            if self.reset { "reset+snapshot" } else { "ack" },
            self.began_at
        )
    }
}

/// The last `reset` a client got: the snapshot that replaced its state.
#[derive(Debug, Clone)]
struct ResetPoint {
    /// Changes received before it are history the snapshot replaced.
    index: usize,
    snapshot_seq: u64,
    state: BTreeMap<i64, Value>,
}

#[derive(Debug, Default)]
struct ClientLog {
    first_ack: Option<u64>,
    streams: Vec<Stream>,
    received: Vec<Received>,
    reset: Option<ResetPoint>,
    resets: usize,
    connections: usize,
    failed_starts: usize,
    anomalies: Vec<String>,
    finished: bool,
}

/// One client's verdict.
#[derive(Debug)]
pub struct ClientReport {
    pub products: usize,
    pub received: usize,
    pub expected: usize,
    pub missing: Vec<u64>,
    pub duplicated: Vec<u64>,
    pub out_of_order: Vec<u64>,
    pub phantom: Vec<String>,
    /// Committed seqs delivered with another product, action or body.
    pub mismatched: Vec<String>,
    /// Where each run of missing seqs fell: the streams delivering its neighbours.
    pub gaps: Vec<String>,
    pub resets: usize,
    pub connections: usize,
    pub failed_starts: usize,
    pub anomalies: Vec<String>,
    pub finished: bool,
    /// With a reset: whether its state ended equal to the table (None without a reset).
    pub final_state_matches: Option<bool>,
}

impl ClientReport {
    fn ok(&self) -> bool {
        self.missing.is_empty()
            && self.duplicated.is_empty()
            && self.out_of_order.is_empty()
            && self.phantom.is_empty()
            && self.mismatched.is_empty()
            && self.anomalies.is_empty()
            && self.finished
            && self.final_state_matches != Some(false)
    }
}

/// The whole run.
#[derive(Debug)]
pub struct Outcome {
    pub seed: u64,
    pub fault: String,
    pub last_seq: u64,
    pub writers: WriterStats,
    pub clients: Vec<ClientReport>,
    pub elapsed: Duration,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = &self.writers;
        writeln!(
            f,
            "seed {} fault [{}] last seq {} in {:.1?}; writers: {} single, {} multi-row, {} delete+insert, {} long-open, {} rolled back, {} savepoints rolled back, {} errors{}",
            self.seed,
            self.fault,
            self.last_seq,
            self.elapsed,
            w.single,
            w.multi,
            w.delete_insert,
            w.long_open,
            w.rolled_back,
            w.savepoint_rolled_back,
            w.errors,
            w.first_error
                .as_ref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default(),
        )?;
        for (n, c) in self.clients.iter().enumerate() {
            writeln!(
                f,
                "  client {n}: {} products, received {}, expected {}, missing {}, duplicated {}, out of order {}, phantom {}, mismatched {}, resets {}, connections {} ({} failed starts), finished {}{}{}",
                c.products,
                c.received,
                c.expected,
                c.missing.len(),
                c.duplicated.len(),
                c.out_of_order.len(),
                c.phantom.len(),
                c.mismatched.len(),
                c.resets,
                c.connections,
                c.failed_starts,
                c.finished,
                c.final_state_matches
                    .map(|m| format!(", final state equals table: {m}"))
                    .unwrap_or_default(),
                if c.ok() { "" } else { "  <-- FAILED" },
            )?;
            let head = |seqs: &[u64]| {
                seqs.iter()
                    .take(20)
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            if !c.missing.is_empty() {
                writeln!(f, "    missing seqs: {}", head(&c.missing))?;
            }
            for gap in c.gaps.iter().take(5) {
                writeln!(f, "    gap: {gap}")?;
            }
            if !c.duplicated.is_empty() {
                writeln!(f, "    duplicated seqs: {}", head(&c.duplicated))?;
            }
            if !c.out_of_order.is_empty() {
                writeln!(f, "    out-of-order seqs: {}", head(&c.out_of_order))?;
            }
            for phantom in c.phantom.iter().take(10) {
                writeln!(f, "    phantom: {phantom}")?;
            }
            for mismatch in c.mismatched.iter().take(10) {
                writeln!(f, "    mismatched: {mismatch}")?;
            }
            for anomaly in c.anomalies.iter().take(10) {
                writeln!(f, "    anomaly: {anomaly}")?;
            }
        }
        Ok(())
    }
}

impl Outcome {
    /// Panics with the whole report unless every client got exactly what was committed.
    pub fn assert_exact(&self) {
        assert!(
            self.clients.iter().all(ClientReport::ok),
            "seed {}: delivery was not exact (replay with ROWCAST_TEST_SEED={}):\n{self}",
            self.seed,
            self.seed
        );
    }
}

/// The ids of `count` new products, created through `app`'s REST API.
pub async fn create_ids(app: &TestApp, count: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    for n in 0..count {
        let created = app.create_product(product(&format!("p{n}"))).await;
        ids.push(created["productId"].as_i64().unwrap());
    }
    ids
}

/// Runs the scenario: products created through `api`, clients roaming over `ws_urls`, writers
/// and the oracle on `pool` (which should reach the database directly, not through a fault).
/// With [`Writes::Mixed`], `fault` runs after the warm-up and returns a description of what it
/// did. Returns the verdict; call [`Outcome::assert_exact`] on it.
pub async fn run<F>(
    api: &TestApp,
    ws_urls: &[String],
    pool: &PgPool,
    scenario: &Scenario,
    fault: F,
) -> Outcome
where
    F: Future<Output = String>,
{
    let started = Instant::now();
    let seed = scenario.seed;
    install_archive(pool).await;
    let ids = create_ids(api, scenario.products).await;
    let mut rng = StdRng::seed_from_u64(seed);

    let mut clients = Vec::new();
    let mut subsets = Vec::new();
    let mut done_senders = Vec::new();
    for n in 0..scenario.clients {
        // Each client learns, once the writers are done, the last seq among its products.
        let (done_tx, done) = watch::channel(None);
        done_senders.push(done_tx);
        let subset: Vec<i64> = ids
            .iter()
            .copied()
            .filter(|_| rng.random_bool(0.4))
            .collect();
        let subset = if subset.is_empty() {
            vec![ids[n % ids.len()]]
        } else {
            subset
        };
        subsets.push(subset.clone());
        clients.push(tokio::spawn(roaming_client(
            ws_urls.to_vec(),
            (n < scenario.stayers).then_some(n % ws_urls.len()),
            subset,
            seed.wrapping_add(n as u64),
            done,
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (stop_tx, stop) = watch::channel(false);
    let writers: Vec<_> = (0..scenario.writers)
        .map(|w| {
            let pool = pool.clone();
            let ids = ids.clone();
            let writes = scenario.writes;
            let stop = stop.clone();
            let seed = seed ^ (w as u64 + 100);
            tokio::spawn(async move {
                match writes {
                    Writes::SingleRows(count) => {
                        let mut rng = StdRng::seed_from_u64(seed);
                        for _ in 0..count {
                            add_one_unit(&pool, ids[rng.random_range(0..ids.len())]).await;
                        }
                        WriterStats {
                            single: count as u64,
                            ..WriterStats::default()
                        }
                    }
                    Writes::Mixed { .. } => mixed_writer(pool, ids, seed, w, stop).await,
                }
            })
        })
        .collect();
    let fault_description = match scenario.writes {
        Writes::SingleRows(_) => "none".to_owned(),
        Writes::Mixed { warmup, settle } => {
            tokio::time::sleep(warmup).await;
            let description = fault.await;
            eprintln!("fault done at {:.1?}: {description}", started.elapsed());
            tokio::time::sleep(settle).await;
            description
        }
    };
    stop_tx.send(true).unwrap();
    let mut writer_stats = WriterStats::default();
    for writer in writers {
        let stats = tokio::time::timeout(Duration::from_secs(60), writer)
            .await
            .expect("writers stop")
            .unwrap();
        writer_stats.add(&stats);
    }
    let last: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM test_change_archive")
        .fetch_one(pool)
        .await
        .unwrap();
    let last = u64::try_from(last.unwrap_or(0)).unwrap();
    let give_up = Instant::now() + scenario.catch_up_limit;
    for (done_tx, subset) in done_senders.iter().zip(&subsets) {
        let target: Option<i64> = sqlx::query_scalar(
            "SELECT max(seq) FROM test_change_archive WHERE product_id = ANY($1)",
        )
        .bind(subset)
        .fetch_one(pool)
        .await
        .unwrap();
        done_tx
            .send(Some((u64::try_from(target.unwrap_or(0)).unwrap(), give_up)))
            .unwrap();
    }

    let mut reports = Vec::new();
    for (client, subset) in clients.into_iter().zip(subsets) {
        let log = tokio::time::timeout(scenario.catch_up_limit + Duration::from_secs(15), client)
            .await
            .expect("client finishes")
            .unwrap();
        reports.push(verdict(pool, &subset, log, last).await);
    }
    let outcome = Outcome {
        seed,
        fault: fault_description,
        last_seq: last,
        writers: writer_stats,
        clients: reports,
        elapsed: started.elapsed(),
    };
    eprint!("{outcome}");
    outcome
}

/// The oracle: a copy of every changelog row, made in the committing transaction by a trigger
/// on `product_changes`, which retention does not prune (a test with a short retention still
/// knows everything that was committed).
async fn install_archive(pool: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS test_change_archive (LIKE product_changes INCLUDING ALL);
         CREATE OR REPLACE FUNCTION test_archive_change() RETURNS trigger
         LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO test_change_archive VALUES (NEW.*);
             RETURN NULL;
         END
         $$;
         CREATE OR REPLACE TRIGGER test_archive_change AFTER INSERT ON product_changes
             FOR EACH ROW EXECUTE FUNCTION test_archive_change();",
    )
    .execute(pool)
    .await
    .expect("install the changelog archive");
}

/// The committed changes to `products` with seq in (after, upto], as (product, seq, action,
/// body), in seq order.
async fn committed(
    pool: &PgPool,
    products: &[i64],
    after: u64,
    upto: u64,
) -> Vec<(i64, u64, String, Value)> {
    let rows: Vec<(i64, i64, String, String)> = sqlx::query_as(
        "SELECT product_id, seq, action, product::text FROM test_change_archive
         WHERE product_id = ANY($1) AND seq > $2 AND seq <= $3 ORDER BY seq",
    )
    .bind(products)
    .bind(i64::try_from(after).unwrap())
    .bind(i64::try_from(upto).unwrap())
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(p, s, action, body)| {
            (
                p,
                u64::try_from(s).unwrap(),
                action,
                serde_json::from_str(&body).unwrap(),
            )
        })
        .collect()
}

async fn verdict(pool: &PgPool, subset: &[i64], log: ClientLog, last: u64) -> ClientReport {
    let mut anomalies = log.anomalies;
    // Order and doubles over everything received (a reset does not excuse either).
    let mut seen = HashSet::new();
    let mut duplicated = Vec::new();
    let mut out_of_order = Vec::new();
    let mut highest = 0;
    let mut phantom = Vec::new();
    let mut mismatched = Vec::new();
    for change in &log.received {
        if !seen.insert(change.seq) {
            duplicated.push(change.seq);
        } else if change.seq < highest {
            out_of_order.push(change.seq);
        }
        highest = highest.max(change.seq);
        if change.body["productName"]
            .as_str()
            .is_some_and(|name| name.starts_with(PHANTOM))
        {
            phantom.push(format!(
                "seq {} carries a rolled-back write: {}",
                change.seq, change.body
            ));
        }
        if !subset.contains(&change.product) {
            anomalies.push(format!(
                "seq {} is for product {}, not subscribed",
                change.seq, change.product
            ));
        }
    }
    // Exactness from the client's starting point: its first ack, or the snapshot of its last
    // reset, which replaced everything before it.
    let (start, from_index) = match (&log.reset, log.first_ack) {
        (Some(reset), _) => (Some(reset.snapshot_seq), reset.index),
        (None, first_ack) => (first_ack, 0),
    };
    let Some(start) = start else {
        anomalies.push("never got a subscribe ack".to_owned());
        return ClientReport {
            products: subset.len(),
            received: log.received.len(),
            expected: 0,
            missing: Vec::new(),
            duplicated,
            out_of_order,
            phantom,
            mismatched,
            gaps: Vec::new(),
            resets: log.resets,
            connections: log.connections,
            failed_starts: log.failed_starts,
            anomalies,
            finished: log.finished,
            final_state_matches: None,
        };
    };
    let expected = committed(pool, subset, start, last).await;
    let expected_seqs: BTreeMap<u64, &(i64, u64, String, Value)> =
        expected.iter().map(|change| (change.1, change)).collect();
    let tail: Vec<&Received> = log.received[from_index..]
        .iter()
        .filter(|change| change.seq <= last)
        .collect();
    let received_seqs: HashSet<u64> = tail.iter().map(|change| change.seq).collect();
    let missing: Vec<u64> = expected_seqs
        .keys()
        .copied()
        .filter(|seq| !received_seqs.contains(seq))
        .collect();
    let gaps = explain_gaps(&expected_seqs, &received_seqs, &log.received, &log.streams);
    for change in &tail {
        match expected_seqs.get(&change.seq) {
            None if change.seq > start => phantom.push(format!(
                "seq {} (product {}) was delivered but is not a committed change to these products",
                change.seq, change.product
            )),
            None => anomalies.push(format!(
                "seq {} delivered although the stream began after {start}",
                change.seq
            )),
            Some((product, _, action, body))
                if *product != change.product
                    || *action != change.action
                    || *body != change.body =>
            {
                mismatched.push(format!(
                    "seq {} delivered as {} {} but committed as {action} {body}",
                    change.seq, change.action, change.body
                ));
            }
            Some(_) => {}
        }
    }
    let final_state_matches = match &log.reset {
        None => None,
        Some(reset) => {
            let mut state = reset.state.clone();
            for change in &log.received[reset.index..] {
                if change.action == "DELETE" {
                    state.remove(&change.product);
                } else {
                    state.insert(change.product, change.body.clone());
                }
            }
            Some(state == products_in_table(pool, subset).await)
        }
    };
    ClientReport {
        products: subset.len(),
        received: log.received.len(),
        expected: expected.len(),
        missing,
        duplicated,
        out_of_order,
        phantom,
        mismatched,
        gaps,
        resets: log.resets,
        connections: log.connections,
        failed_starts: log.failed_starts,
        anomalies,
        finished: log.finished,
        final_state_matches,
    }
}

/// For each run of consecutive missing seqs (in the committed order of the client's
/// products): the received changes just before and after it, and the streams they came on.
fn explain_gaps(
    expected: &BTreeMap<u64, &(i64, u64, String, Value)>,
    received_seqs: &HashSet<u64>,
    received: &[Received],
    streams: &[Stream],
) -> Vec<String> {
    let mut runs: Vec<(u64, u64, usize)> = Vec::new();
    let mut open: Option<(u64, u64, usize)> = None;
    for seq in expected.keys().copied() {
        if received_seqs.contains(&seq) {
            runs.extend(open.take());
        } else {
            open = Some(open.map_or((seq, seq, 1), |(first, _, n)| (first, seq, n + 1)));
        }
    }
    runs.extend(open);
    let describe = |change: Option<&Received>| {
        change.map_or("none".to_owned(), |change| {
            format!(
                "seq {} on stream #{} ({})",
                change.seq, change.stream, streams[change.stream]
            )
        })
    };
    runs.iter()
        .map(|&(first, last, count)| {
            let before = received
                .iter()
                .filter(|change| change.seq < first)
                .max_by_key(|change| change.seq);
            let after = received
                .iter()
                .filter(|change| change.seq > last)
                .min_by_key(|change| change.seq);
            format!(
                "{count} missing from {first} to {last}; before: {}; after: {}",
                describe(before),
                describe(after)
            )
        })
        .collect()
}

/// How a (re)subscription began.
enum Start {
    /// Ack (and snapshot, after a reset) read; changes follow.
    Streaming,
    /// The connection failed or closed first: reconnect.
    Retry,
}

/// Sends the subscribe (resuming after `position` when known) and reads up to where changes
/// begin: `subscribed`, or `reset`, `subscribed`, `snapshot`.
async fn start_stream(
    client: &mut WsClient,
    instance: usize,
    products: &[i64],
    position: &mut Option<u64>,
    log: &mut ClientLog,
    opened: Duration,
) -> Start {
    let since = *position;
    let command = match since {
        Some(since) => json!({"command": "subscribe", "productIDs": products, "since": since}),
        None => json!({"command": "subscribe", "productIDs": products}),
    };
    if client.try_send_json(&command).await.is_err() {
        return Start::Retry;
    }
    let Ok(Some(message)) = client.next_or_closed(Duration::from_secs(10)).await else {
        return Start::Retry;
    };
    match message["type"].as_str() {
        Some("subscribed") => {
            let Some(seq) = message["seq"].as_u64() else {
                log.anomalies.push(format!("ack without a seq: {message}"));
                return Start::Retry;
            };
            if let Some(since) = since {
                if seq != since {
                    log.anomalies
                        .push(format!("resume from {since} acked with seq {seq}"));
                }
            }
            log.first_ack.get_or_insert(seq);
            position.get_or_insert(seq);
            log.streams.push(Stream {
                instance,
                since,
                began_at: seq,
                reset: false,
                opened,
            });
            Start::Streaming
        }
        Some("reset") => {
            log.resets += 1;
            take_snapshot(client, instance, since, position, log, opened).await
        }
        _ => {
            log.anomalies.push(format!(
                "unexpected message before the stream began: {message}"
            ));
            Start::Retry
        }
    }
}

/// After a `reset` (when subscribing, or in the middle of a stream): reads the `subscribed`
/// and the `snapshot` that follow, and makes the snapshot the client's new state.
async fn take_snapshot(
    client: &mut WsClient,
    instance: usize,
    since: Option<u64>,
    position: &mut Option<u64>,
    log: &mut ClientLog,
    opened: Duration,
) -> Start {
    loop {
        let Ok(Some(message)) = client.next_or_closed(Duration::from_secs(10)).await else {
            return Start::Retry;
        };
        match message["type"].as_str() {
            Some("subscribed") => {} // the snapshot follows, with this seq
            Some("snapshot") => {
                let seq = message["seq"].as_u64().unwrap();
                let state = message["products"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| (p["productId"].as_i64().unwrap(), p.clone()))
                    .collect();
                log.reset = Some(ResetPoint {
                    index: log.received.len(),
                    snapshot_seq: seq,
                    state,
                });
                *position = Some(seq);
                log.streams.push(Stream {
                    instance,
                    since,
                    began_at: seq,
                    reset: true,
                    opened,
                });
                return Start::Streaming;
            }
            _ => {
                log.anomalies
                    .push(format!("unexpected message after a reset: {message}"));
                return Start::Retry;
            }
        }
    }
}

/// One client that reads for a while, disconnects, and resumes (on any instance, or always on
/// `stay_on`, then without disconnecting by itself) until it has everything up to the target
/// it is sent once the writers are done.
async fn roaming_client(
    urls: Vec<String>,
    stay_on: Option<usize>,
    products: Vec<i64>,
    seed: u64,
    done: watch::Receiver<Option<(u64, Instant)>>,
) -> ClientLog {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut log = ClientLog::default();
    // The seq the stream is complete up to: the last change, the snapshot, or the first ack.
    let mut position: Option<u64> = None;
    let started = Instant::now();
    let hard_limit = started + CLIENT_HARD_LIMIT;
    loop {
        let give_up = done.borrow().map_or(hard_limit, |(_, give_up)| give_up);
        if Instant::now() >= give_up.min(hard_limit) {
            return log;
        }
        let instance = stay_on.unwrap_or_else(|| rng.random_range(0..urls.len()));
        let Ok(mut client) = WsClient::try_connect(&urls[instance]).await else {
            log.failed_starts += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        log.connections += 1;
        let opened = started.elapsed();
        if let Start::Retry = start_stream(
            &mut client,
            instance,
            &products,
            &mut position,
            &mut log,
            opened,
        )
        .await
        {
            log.failed_starts += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..150))).await;
            continue;
        }
        let stay = if stay_on.is_some() {
            CLIENT_HARD_LIMIT
        } else {
            Duration::from_millis(rng.random_range(20..250))
        };
        let until = Instant::now() + stay;
        loop {
            let finished = *done.borrow();
            let left = until.saturating_duration_since(Instant::now());
            if finished.is_none() && left.is_zero() {
                break; // roam: disconnect and resume elsewhere
            }
            if finished.is_some_and(|(_, give_up)| Instant::now() >= give_up) {
                return log;
            }
            match client
                .next_or_closed(left.clamp(Duration::from_millis(100), Duration::from_millis(500)))
                .await
            {
                Ok(Some(message)) => {
                    if message["type"] == "reset" {
                        // Retention overtook this stream: a snapshot replaces the state.
                        log.resets += 1;
                        let since = message["since"].as_u64().or(position);
                        let opened = started.elapsed();
                        match take_snapshot(
                            &mut client,
                            instance,
                            since,
                            &mut position,
                            &mut log,
                            opened,
                        )
                        .await
                        {
                            Start::Streaming => continue,
                            Start::Retry => break,
                        }
                    }
                    if message["type"] != "change" {
                        log.anomalies
                            .push(format!("unexpected message in the stream: {message}"));
                        continue;
                    }
                    let seq = message["seq"].as_u64().unwrap();
                    if message["conflated"] == json!(true) {
                        log.anomalies.push(format!(
                            "seq {seq} is marked conflated: versions before it were skipped"
                        ));
                    }
                    log.received.push(Received {
                        product: message["product"]["productId"].as_i64().unwrap(),
                        seq,
                        action: message["action"].as_str().unwrap_or("").to_owned(),
                        body: message["product"].clone(),
                        stream: log.streams.len() - 1,
                    });
                    position = Some(seq);
                }
                Ok(None) => {
                    if let Some((target, _)) = finished {
                        if position.unwrap_or(0) >= target {
                            log.finished = true;
                            return log;
                        }
                    }
                }
                Err(_) => break, // evicted or dropped: resume
            }
        }
    }
}

/// One writer of the mixed workload. Every transaction locks rows in ascending id order, so
/// writers never deadlock one another; the first two products are only written by writer 0's
/// long-open transactions.
async fn mixed_writer(
    pool: PgPool,
    ids: Vec<i64>,
    seed: u64,
    writer: usize,
    stop: watch::Receiver<bool>,
) -> WriterStats {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut stats = WriterStats::default();
    let hard_limit = Instant::now() + CLIENT_HARD_LIMIT;
    // The long-open transactions have two products to themselves: held row locks would
    // otherwise stall every other writer that wants those rows (tenfold fewer writes).
    let (reserved, shared) = ids.split_at(2.min(ids.len() - 1));
    let mut n = 0_u64;
    while !*stop.borrow() && Instant::now() < hard_limit {
        n += 1;
        let roll = rng.random_range(0..100);
        let pick_from = |ids: &[i64], rng: &mut StdRng, count: usize| {
            let mut picked: Vec<i64> = Vec::new();
            while picked.len() < count.min(ids.len()) {
                let id = ids[rng.random_range(0..ids.len())];
                if !picked.contains(&id) {
                    picked.push(id);
                }
            }
            picked.sort_unstable();
            picked
        };
        let pick = |rng: &mut StdRng, count: usize| pick_from(shared, rng, count);
        let result: Result<(), sqlx::Error> = async {
            if writer == 0 && roll < 30 {
                // Long-open: holds its row locks (and stays uncommitted) across whatever
                // happens meanwhile.
                let count = rng.random_range(1..=2);
                let rows = pick_from(reserved, &mut rng, count);
                let hold = Duration::from_millis(rng.random_range(300..1500));
                let mut tx = pool.begin().await?;
                for id in &rows {
                    bump(&mut tx, *id, Some(format!("long-{writer}-{n}"))).await?;
                }
                tokio::time::sleep(hold).await;
                tx.commit().await?;
                stats.long_open += 1;
            } else if roll < 55 {
                let id = pick(&mut rng, 1)[0];
                let mut connection = pool.acquire().await?;
                bump(&mut connection, id, None).await?;
                stats.single += 1;
            } else if roll < 72 {
                let count = rng.random_range(2..=4);
                let rows = pick(&mut rng, count);
                let mut tx = pool.begin().await?;
                for id in &rows {
                    let name = rng.random_bool(0.5).then(|| format!("multi-{writer}-{n}"));
                    bump(&mut tx, *id, name).await?;
                }
                tx.commit().await?;
                stats.multi += 1;
            } else if roll < 77 {
                let id = pick(&mut rng, 1)[0];
                let mut tx = pool.begin().await?;
                // Another writer may re-insert the row between this DELETE (which then finds
                // nothing) and the INSERT: hence ON CONFLICT, an UPDATE then.
                sqlx::query("DELETE FROM products WHERE product_id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
                     VALUES ($1, 'Acme', '9.99', 0, $2)
                     ON CONFLICT (product_id) DO UPDATE
                     SET units_available = 0, product_name = excluded.product_name",
                )
                .bind(id)
                .bind(format!("reborn-{writer}-{n}"))
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                stats.delete_insert += 1;
            } else if roll < 88 {
                let count = rng.random_range(1..=3);
                let rows = pick(&mut rng, count);
                let mut tx = pool.begin().await?;
                for id in &rows {
                    bump(&mut tx, *id, Some(format!("{PHANTOM}-{writer}-{n}"))).await?;
                }
                tx.rollback().await?;
                stats.rolled_back += 1;
            } else {
                // Committed, but the middle row's change was in a savepoint rolled back.
                let rows = pick(&mut rng, 3);
                let mut tx = pool.begin().await?;
                bump(&mut tx, rows[0], None).await?;
                sqlx::query("SAVEPOINT doomed").execute(&mut *tx).await?;
                bump(&mut tx, rows[1], Some(format!("{PHANTOM}-{writer}-{n}"))).await?;
                sqlx::query("ROLLBACK TO SAVEPOINT doomed")
                    .execute(&mut *tx)
                    .await?;
                bump(&mut tx, rows[2], None).await?;
                tx.commit().await?;
                stats.savepoint_rolled_back += 1;
            }
            Ok(())
        }
        .await;
        if let Err(err) = result {
            stats.errors += 1;
            if stats.first_error.is_none() {
                stats.first_error = Some(err.to_string());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..4))).await;
    }
    stats
}

/// Adds a unit to `id`, and renames it if `name` is given.
async fn bump(
    connection: &mut sqlx::PgConnection,
    id: i64,
    name: Option<String>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE products SET units_available = units_available + 1,
                             product_name = coalesce($2, product_name)
         WHERE product_id = $1",
    )
    .bind(id)
    .bind(name)
    .execute(connection)
    .await?;
    Ok(())
}

/// A description of what a stats snapshot says about the listener, for fault reports.
pub fn listener_summary(stats: &Value) -> String {
    let mut out = String::new();
    let listener = &stats["listener"];
    let _ = write!(
        out,
        "connected {}, reconnects {}, from changelog {}, last seq {}",
        listener["connected"],
        listener["reconnects"],
        listener["changesReadFromChangelog"],
        listener["lastSeq"]
    );
    out
}
