//! Shared test harness: one private PostgreSQL cluster per test process (or the server named by
//! `DATABASE_URL`), a fresh database per test, and rowcast running in-process on 127.0.0.1:0.
//! Logs are silent unless `TEST_LOG` is set.

pub mod faults;
pub mod nginx;
pub mod pebble;
pub mod process;
pub mod scenario;
pub mod secure;
pub mod sse;
pub mod webdriver;
pub mod ws;

use std::sync::OnceLock;
use std::time::Duration;

use rowcast::config::Cli;
use rowcast::shutdown::Shutdown;
use rowcast::{App, telemetry};
use rowcast_embedded_postgres::EmbeddedPostgres;
use serde_json::{Value, json};
use sqlx::PgPool;

pub use sse::SseClient;
pub use ws::WsClient;

/// The admin URL of the Postgres every test database lives on.
fn admin_url() -> &'static str {
    static ADMIN_URL: OnceLock<String> = OnceLock::new();
    ADMIN_URL.get_or_init(|| {
        if std::env::var_os("TEST_LOG").is_some() {
            telemetry::init(rowcast::config::LogFormat::Text);
        }
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return url;
        }
        // The cluster lives on a thread that never ends, so it lives as long as the test
        // process; when the process exits, the cluster's watchdog stops it and deletes it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the test cluster");
            runtime.block_on(async move {
                let cluster = EmbeddedPostgres::start_ephemeral(&std::env::temp_dir())
                    .await
                    .expect("private PostgreSQL cluster for the tests");
                tx.send(cluster.url("postgres"))
                    .expect("test harness waits for the URL");
                std::future::pending::<()>().await;
                drop(cluster);
            });
        });
        rx.recv().expect("test cluster thread reports its URL")
    })
}

/// `url` with its database name replaced.
pub fn url_for_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A fresh, empty, randomly named database (migrations not applied); see [`TestDatabase`],
/// which drops it again.
async fn fresh_database() -> (String, String) {
    let name = format!("rowcast_test_{:016x}", rand::random::<u64>());
    let admin = PgPool::connect(admin_url())
        .await
        .expect("admin connection");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .expect("create test database");
    admin.close().await;
    let url = url_for_database(admin_url(), &name);
    (name, url)
}

#[tokio::test]
async fn a_test_database_is_dropped_with_its_guard() {
    let database = TestDatabase::create().await;
    let name = database.name.clone();
    let admin = PgPool::connect(admin_url()).await.unwrap();
    let exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT exists(SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert!(exists().await);
    drop(database);
    assert!(!exists().await, "dropped with its guard");
}

/// A fresh database (migrations not applied) that is dropped with this guard: the one way tests
/// get a database, so none is left behind on a shared `DATABASE_URL` server.
#[derive(Debug)]
pub struct TestDatabase {
    pub name: String,
    /// The direct URL (no proxy).
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        let (name, url) = fresh_database().await;
        Self { name, url }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        drop_database(std::mem::take(&mut self.name));
    }
}

/// Drops a test database, disconnecting whoever still uses it.
fn drop_database(name: String) {
    let admin = admin_url().to_owned();
    // Drop runs inside the test's runtime, which must not block on itself: use a thread.
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime for cleanup");
        runtime.block_on(async move {
            if let Ok(pool) = PgPool::connect(&admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        });
    })
    .join();
}

/// rowcast running in this process against its own database.
#[derive(Debug)]
pub struct TestApp {
    pub base_url: String,
    pub ws_url: String,
    /// A pool of the test's own, for writing behind the API's back and for inspection.
    pub pool: PgPool,
    pub http: reqwest::Client,
    pub shutdown: Shutdown,
    /// The database as the app sees it, for a second instance on the same database.
    pub database_url: String,
    /// The HTTPS listener, when the flags turn TLS on.
    pub tls_addr: Option<std::net::SocketAddr>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// Dropped with this app; None for a second instance sharing another's database.
    database: Option<TestDatabase>,
}

/// Starts rowcast with default settings.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// Starts rowcast with extra command-line flags (e.g. `["--outbox-capacity", "8"]`).
pub async fn spawn_app_with(flags: &[&str]) -> TestApp {
    let database = TestDatabase::create().await;
    let mut app = spawn_instance(&database.url, flags).await;
    app.database = Some(database);
    app
}

/// Starts another rowcast on an existing database (several instances, one database).
pub async fn spawn_instance(database_url: &str, flags: &[&str]) -> TestApp {
    let database_url = database_url.to_owned();
    let mut args = vec![
        "rowcast",
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        &database_url,
        // Used only when a test turns TLS on; a fixed port would collide between tests.
        "--tls-listen",
        "127.0.0.1:0",
    ];
    if !flags.contains(&"--shutdown-grace") {
        args.extend_from_slice(&["--shutdown-grace", "2s"]);
    }
    args.extend_from_slice(flags);
    let cli = <Cli as clap::Parser>::try_parse_from(args).expect("test flags parse");
    let shutdown = Shutdown::new();
    let app = App::build(cli.config, shutdown.clone())
        .await
        .expect("rowcast builds");
    let addr = app.local_addr().expect("bound address");
    let tls_addr = app.tls_addr();
    let pool = PgPool::connect(&database_url).await.expect("test pool");
    let server = tokio::spawn(app.run());
    let test_app = TestApp {
        base_url: format!("http://{addr}"),
        ws_url: format!("ws://{addr}/websocket"),
        database_url,
        tls_addr,
        pool,
        http: authorized_client(flags),
        shutdown,
        server: Some(server),
        database: None,
    };
    test_app.wait_for_listener().await;
    if flags
        .windows(2)
        .any(|pair| pair == ["--source", "replication"])
    {
        test_app.wait_for_replication().await;
    }
    test_app
}

/// Where the changelog's rows come from, for the tests that must hold in both modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The row trigger and NOTIFY (the default).
    Notify,
    /// The elected WAL reader.
    Replication,
}

impl Source {
    /// `flags` with this source's flag added.
    pub fn with<'a>(self, flags: &[&'a str]) -> Vec<&'a str> {
        let mut all = flags.to_vec();
        if self == Self::Replication {
            all.extend_from_slice(&["--source", "replication"]);
        }
        all
    }
}

/// Runs each `async fn name(source: Source)` given as two tests, `name::notify` and
/// `name::replication`: one body, both sources.
#[macro_export]
macro_rules! both_sources {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test]
                async fn notify() {
                    super::$name($crate::support::Source::Notify).await;
                }
                #[tokio::test]
                async fn replication() {
                    super::$name($crate::support::Source::Replication).await;
                }
            }
        )*
    };
}

/// A client that sends the app's operator token, else its API token (if the flags set one)
/// with every request, so the harness's own calls (`/stats`) work under `--ops-token` or
/// `--auth-reads`; tests of refusals use a client without it.
fn authorized_client(flags: &[&str]) -> reqwest::Client {
    let flag_value = |name: &str| {
        flags
            .iter()
            .position(|flag| *flag == name)
            .and_then(|at| flags.get(at + 1))
    };
    let token = flag_value("--ops-token").or_else(|| flag_value("--api-token"));
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}")
                .parse()
                .expect("a header-safe token"),
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .expect("HTTP client")
}

impl TestApp {
    /// Triggers shutdown and waits for the server to stop; returns how long that took.
    pub async fn stop(&mut self) -> Duration {
        let started = std::time::Instant::now();
        self.shutdown.trigger();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        started.elapsed()
    }

    /// GET /stats as JSON.
    pub async fn stats(&self) -> Value {
        get_json(&self.http, &format!("{}/stats", self.base_url)).await
    }

    /// GET /metrics as text.
    pub async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base_url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Waits until the LISTEN connection is up, so that writes made next are seen.
    pub async fn wait_for_listener(&self) {
        wait_until(Duration::from_secs(10), "the LISTEN connection", || async {
            self.stats().await["listener"]["connected"] == json!(true)
        })
        .await;
    }

    /// Waits until the replication reader has taken the changelog over from the trigger, so
    /// that the writes a test makes next travel through the WAL.
    pub async fn wait_for_replication(&self) {
        wait_until(
            Duration::from_secs(20),
            "the replication reader",
            || async {
                sqlx::query_scalar::<_, bool>(
                    "SELECT source = 'replication' AND armed FROM changelog_source",
                )
                .fetch_one(&self.pool)
                .await
                .unwrap_or(false)
            },
        )
        .await;
    }

    /// Waits until the distributor counts `sessions` sessions.
    pub async fn wait_for_sessions(&self, sessions: u64) {
        wait_until(Duration::from_secs(10), "the session count", || async {
            self.stats().await["sessions"] == json!(sessions)
        })
        .await;
    }

    /// Creates a product whose name is `name_bytes` long and returns its id: every change to it
    /// is that large, so a few hundred overflow a client's kernel buffers and queue.
    pub async fn create_heavy_product(&self, name_bytes: usize) -> i64 {
        let mut body = product("Heavy");
        body["productName"] = json!("h".repeat(name_bytes));
        self.create_product(body).await["productId"]
            .as_i64()
            .expect("the created product has an id")
    }

    /// Creates a product through the REST API and returns it once its INSERT has passed through
    /// the distributor, so a subscription made afterwards does not see that INSERT.
    pub async fn create_product(&self, body: Value) -> Value {
        let published = self.stats().await["changesPublished"].as_u64();
        let response = self
            .http
            .post(format!("{}/products", self.base_url))
            .json(&body)
            .send()
            .await
            .expect("POST /products");
        assert_eq!(response.status(), 201, "create failed: {body}");
        let created = response.json().await.expect("product JSON");
        wait_until(
            Duration::from_secs(10),
            "the INSERT reaching the distributor",
            || async { self.stats().await["changesPublished"].as_u64() > published },
        )
        .await;
        created
    }

    /// Sends a PATCH and returns the product.
    pub async fn patch_product(&self, id: i64, body: Value) -> Value {
        let response = self
            .http
            .patch(format!("{}/products/{id}", self.base_url))
            .json(&body)
            .send()
            .await
            .expect("PATCH");
        assert_eq!(response.status(), 200, "patch failed: {body}");
        response.json().await.expect("product JSON")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.trigger();
        if let Some(server) = self.server.take() {
            server.abort();
        }
        // The database goes after the server: dropping the guard drops it.
        self.database.take();
    }
}

/// GET `url` and its body as JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> Value {
    http.get(url)
        .send()
        .await
        .unwrap_or_else(|err| panic!("GET {url}: {err}"))
        .json()
        .await
        .unwrap_or_else(|err| panic!("GET {url}: no JSON: {err}"))
}

/// One committed change through the database directly (not REST): adds a unit to `id`.
pub async fn add_one_unit(pool: &PgPool, id: i64) {
    sqlx::query("UPDATE products SET units_available = units_available + 1 WHERE product_id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

/// Kills the LISTEN backend of the rowcast instances on `db`'s database; returns how many.
pub async fn terminate_listener(db: impl sqlx::PgExecutor<'_>) -> i64 {
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'rowcast-listener' AND datname = current_database()",
    )
    .fetch_one(db)
    .await
    .unwrap()
}

/// The committed changes to `products` after `after`, as (product, seq), in seq order.
pub async fn committed_changes(pool: &PgPool, products: &[i64], after: u64) -> Vec<(i64, u64)> {
    let rows: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT product_id, seq FROM product_changes
         WHERE product_id = ANY($1) AND seq > $2 ORDER BY seq",
    )
    .bind(products)
    .bind(i64::try_from(after).unwrap())
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(p, s)| (p, u64::try_from(s).unwrap()))
        .collect()
}

/// Waits until everything committed so far is in the changelog. With the trigger that holds at
/// commit; with `--source replication` the reader writes it a batch later, so this waits until
/// the slot has confirmed the WAL written up to now.
pub async fn wait_for_changelog(pool: &PgPool) {
    let replication: bool =
        sqlx::query_scalar("SELECT source = 'replication' FROM changelog_source")
            .fetch_one(pool)
            .await
            .unwrap();
    if !replication {
        return;
    }
    let now: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(20),
        "the changelog catching up",
        || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots
             WHERE database = current_database()",
            )
            .bind(&now)
            .fetch_optional(pool)
            .await
            .unwrap()
            .unwrap_or(false)
        },
    )
    .await;
}

/// Commits `count` updates of the lowest product id, one transaction each (a DO block that
/// COMMITs, sent over the simple query protocol, where that is allowed).
pub async fn commit_updates_one_by_one(pool: &PgPool, count: u32) {
    sqlx::raw_sql(&format!(
        "DO $$ BEGIN FOR i IN 1..{count} LOOP
             UPDATE products SET units_available = i
             WHERE product_id = (SELECT min(product_id) FROM products);
             COMMIT;
         END LOOP; END $$"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// The products with these ids, read from the table in the REST representation, by id.
pub async fn products_in_table(
    pool: &PgPool,
    ids: &[i64],
) -> std::collections::BTreeMap<i64, Value> {
    let rows: Vec<(i64, String, String, i32, String)> = sqlx::query_as(
        "SELECT product_id, manufacturer, price_per_unit, units_available, product_name
         FROM products WHERE product_id = ANY($1) ORDER BY product_id",
    )
    .bind(ids)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(id, m, p, u, n)| {
            (id, json!({"productId": id, "manufacturer": m, "pricePerUnit": p, "unitsAvailable": u, "productName": n}))
        })
        .collect()
}

/// A valid product body with the given name.
/// Creates a product through the REST API at `base` (a server of any kind: a child process, a
/// proxy); returns its id.
pub async fn post_product(http: &reqwest::Client, base: &str, name: &str) -> i64 {
    let response = http
        .post(format!("{base}/products"))
        .json(&product(name))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.unwrap()["productId"]
        .as_i64()
        .unwrap()
}

pub fn product(name: &str) -> Value {
    json!({"manufacturer": "Acme", "pricePerUnit": "9.99", "unitsAvailable": 10, "productName": name})
}

/// Polls `check` every 20 ms until it is true; fails the test after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not reach the expected state within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
