//! Faults between rowcast and PostgreSQL while writers write and clients roam: every fault is
//! injected once, mid-run, into real connections (a TCP proxy between both rowcast instances and
//! the database; `pg_ctl restart -m immediate` of a private cluster), and afterwards every
//! client must have every committed change exactly once, in commit order, and never a
//! rolled-back one. The writers and the oracle reach the database directly, so a fault hits
//! rowcast only (except the restart, which hits everyone).
//!
//! Each test prints its seed; `ROWCAST_TEST_SEED=<n>` replays one.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::support::faults::{FaultProxy, PrivateCluster};
use crate::support::scenario::{self, Outcome, Scenario, Writes, listener_summary};
use crate::support::{TestApp, TestDatabase, spawn_instance};

/// `disconnect`: a client that falls behind is closed and resumes with `since` (conflation
/// would skip superseded changes, which the exact comparison would call missing).
const FLAGS: [&str; 6] = [
    "--slow-client-policy",
    "disconnect",
    "--outbox-capacity",
    "512",
    "--listener-max-backoff",
    "1s",
];

/// Writing before the fault, and after it before the writers stop.
const WARMUP: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(3);

/// Two rowcast instances on one database, both through one fault proxy.
struct Rig {
    one: TestApp,
    two: TestApp,
    proxy: FaultProxy,
    /// Straight to the database: the writers and the oracle.
    direct: PgPool,
}

impl Rig {
    async fn start(direct_url: &str) -> Self {
        Self::start_with(direct_url, &[]).await
    }

    /// With flags added to [`FLAGS`].
    async fn start_with(direct_url: &str, extra: &[&str]) -> Self {
        let proxy = FaultProxy::start(direct_url).await;
        let via_proxy = proxy.url_for(direct_url);
        let flags: Vec<&str> = FLAGS.iter().chain(extra).copied().collect();
        let one = spawn_instance(&via_proxy, &flags).await;
        let two = spawn_instance(&via_proxy, &flags).await;
        let direct = PgPoolOptions::new()
            .max_connections(12)
            .acquire_timeout(Duration::from_secs(3))
            .connect(direct_url)
            .await
            .expect("a direct pool");
        let connections = proxy.connections();
        assert!(
            connections.iter().any(|c| c.application_name.as_deref()
                == Some(crate::support::faults::LISTENER_APPLICATION)),
            "the LISTEN connections go through the proxy: {connections:?}"
        );
        Self {
            one,
            two,
            proxy,
            direct,
        }
    }

    fn urls(&self) -> [String; 2] {
        [self.one.ws_url.clone(), self.two.ws_url.clone()]
    }

    async fn listener_reconnects(&self) -> u64 {
        let mut total = 0;
        for app in [&self.one, &self.two] {
            let stats = app.stats().await;
            eprintln!("instance {}: {}", app.base_url, listener_summary(&stats));
            total += stats["listener"]["reconnects"].as_u64().unwrap_or(0);
        }
        total
    }
}

/// Six clients: one staying on each instance, four roaming.
fn scenario() -> Scenario {
    let mut scenario = Scenario::new(
        scenario::seed(),
        Writes::Mixed {
            warmup: WARMUP,
            settle: SETTLE,
        },
    );
    scenario.stayers = 2;
    scenario
}

/// Checks the outcome, and that the fault made at least one LISTEN connection reconnect (a
/// fault rowcast never noticed would prove little).
async fn conclude(rig: &Rig, outcome: &Outcome, expect_reconnect: bool) {
    let reconnects = rig.listener_reconnects().await;
    eprintln!(
        "proxy accepted {} connections; listener reconnects {reconnects}",
        rig.proxy.accepted()
    );
    outcome.assert_exact();
    if expect_reconnect {
        assert!(
            reconnects >= 1,
            "seed {}: the fault did not reach a LISTEN connection",
            outcome.seed
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_cut_all_connections_mid_run_loses_and_doubles_nothing() {
    let database = TestDatabase::create().await;
    let rig = Rig::start(&database.url).await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        let cut = rig.proxy.cut_all();
        format!("cut_all closed {cut} connections")
    })
    .await;
    conclude(&rig, &outcome, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_stalled_listen_connection_loses_and_doubles_nothing() {
    const STALL: Duration = Duration::from_secs(30);
    let database = TestDatabase::create().await;
    let rig = Rig::start(&database.url).await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        let stalled = rig.proxy.stall_one(STALL);
        tokio::time::sleep(STALL).await;
        format!("stalled {stalled:?} for {STALL:?}")
    })
    .await;
    conclude(&rig, &outcome, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_trickle_of_1_kb_per_second_loses_and_doubles_nothing() {
    const TRICKLE: Duration = Duration::from_secs(8);
    let database = TestDatabase::create().await;
    let rig = Rig::start(&database.url).await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        rig.proxy.trickle(1024, TRICKLE);
        tokio::time::sleep(TRICKLE).await;
        format!("trickle 1024 B/s for {TRICKLE:?}")
    })
    .await;
    conclude(&rig, &outcome, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_connections_cut_in_the_middle_of_a_server_message_lose_and_double_nothing() {
    let database = TestDatabase::create().await;
    let rig = Rig::start(&database.url).await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        let (armed, cut) = rig.proxy.cut_mid_message(Duration::from_secs(3)).await;
        format!("cut_mid_message: {cut} of {armed} armed connections cut mid-message")
    })
    .await;
    conclude(&rig, &outcome, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_an_immediate_postgres_restart_loses_and_doubles_nothing() {
    let cluster = PrivateCluster::start().await;
    let admin = PgPool::connect(&cluster.url("postgres")).await.unwrap();
    sqlx::query("CREATE DATABASE rowcast_faults")
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let rig = Rig::start(&cluster.url("rowcast_faults")).await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        let took = cluster.restart_immediate().await;
        format!("pg_ctl restart -m immediate, accepting again after {took:.1?}")
    })
    .await;
    conclude(&rig, &outcome, true).await;
    drop(rig);
    drop(cluster);
}

/// A LISTEN connection stalls while retention keeps only the newest 300 changes: by the time
/// the listener notices and catches up, what it missed is partly pruned. Roaming clients then
/// get resets and snapshots (legitimate); what must not happen is a gap without a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_a_stalled_listener_behind_a_short_retention_loses_nothing_without_a_reset() {
    const STALL: Duration = Duration::from_secs(10);
    let database = TestDatabase::create().await;
    let rig = Rig::start_with(
        &database.url,
        &[
            "--changelog-max-rows",
            "300",
            "--changelog-prune-interval",
            "100ms",
        ],
    )
    .await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        let stalled = rig.proxy.stall_one(STALL);
        tokio::time::sleep(STALL).await;
        format!("stalled {stalled:?} for {STALL:?}, changelog max rows 300")
    })
    .await;
    conclude(&rig, &outcome, true).await;
}

/// The control for the test above: the same short retention without a fault. Roaming clients
/// get resets and snapshots; every stream must still be exact after its last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_control_a_short_retention_without_a_fault_loses_nothing_without_a_reset() {
    let database = TestDatabase::create().await;
    let rig = Rig::start_with(
        &database.url,
        &[
            "--changelog-max-rows",
            "300",
            "--changelog-prune-interval",
            "100ms",
        ],
    )
    .await;
    let scenario = scenario();
    let outcome = scenario::run(&rig.one, &rig.urls(), &rig.direct, &scenario, async {
        tokio::time::sleep(Duration::from_secs(10)).await;
        "none for 10 s, changelog max rows 300".to_owned()
    })
    .await;
    conclude(&rig, &outcome, false).await;
}
