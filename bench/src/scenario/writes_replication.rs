//! The `replication` and `replication-async` variants of `writes` (with `--rowcast-bin`): the
//! same UPDATE load on a second scratch database run by rowcast with `--source replication`
//! (and `--replication-commit sync` or `async`) — no trigger in the
//! writers' transactions; rowcast's elected reader decodes the WAL and writes the changelog in
//! batches. rowcast runs only during this variant's cells (stopped with SIGTERM after each, so
//! its walsender decodes nothing while the other variants are measured); before a cell starts,
//! its walsender has read past the WAL the other variants wrote meanwhile. Its correctness counter:
//! changelog rows = commits once the reader has caught up (and how long that took).
//!
//! Needs `wal_level = logical` and a role that may create replication slots; otherwise the
//! variant is left out and the report says why.

use super::writes::{Table, WritesArgs, connect, fresh_database, inspect_and_seed};
use crate::rest::Rest;
use crate::target::Target;
use anyhow::{Context, bail};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config};

/// How long rowcast may take to serve and elect its reader.
const START_LIMIT: Duration = Duration::from_secs(60);
/// How long the reader may take to catch up after a cell.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

/// The replication database, its seeded table and how to run rowcast on it.
pub(super) struct Replication {
    pub(super) cfg: Config,
    pub(super) table: Table,
    client: Client,
    db: String,
    url: String,
    bin: std::path::PathBuf,
    rowcast: Option<Child>,
}

impl Replication {
    /// Creates `db`, lets rowcast migrate it and switch it to `replication`, seeds it, and stops
    /// rowcast again. `Ok(Err(reason))` when the server cannot do logical replication.
    pub(super) async fn prepare(
        admin: &Client,
        admin_cfg: &Config,
        db: &str,
        bin: &Path,
        args: &WritesArgs,
    ) -> anyhow::Result<Result<Self, String>> {
        let wal_level: String = admin.query_one("SHOW wal_level", &[]).await?.get(0);
        if wal_level != "logical" {
            return Ok(Err(format!(
                "not measured (wal_level is {wal_level}; the replication variant needs logical)"
            )));
        }
        let cfg = fresh_database(admin, admin_cfg, db).await?;
        let url = database_url(&cfg)?;
        let mut this = Self {
            client: connect(&cfg).await?,
            cfg,
            table: Table::default(),
            db: db.to_owned(),
            url,
            bin: bin.to_owned(),
            rowcast: None,
        };
        this.start("sync").await?;
        this.table = inspect_and_seed(&this.client, args, None)
            .await
            .context("seed the replication database")?;
        this.stop().await;
        Ok(Ok(this))
    }

    /// Starts rowcast with `--source replication --replication-commit <commit>` and waits until
    /// its reader streams.
    pub(super) async fn start(&mut self, commit: &str) -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(&self.bin)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--source", "replication"])
            .args(["--replication-commit", commit])
            .env("DATABASE_URL", &self.url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("start {}", self.bin.display()))?;
        self.rowcast = Some(child);
        let target = Target::parse_with(
            &format!("replication=http://127.0.0.1:{port}"),
            "/websocket",
            None,
        )?;
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(child) = self.rowcast.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("rowcast --source replication exited at start: {status}");
            }
            let ready = Rest::new(&target)
                .request(hyper::Method::GET, "/readyz", None)
                .await
                .is_ok_and(|(status, _)| status.is_success());
            let streaming: i64 = self
                .client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = current_database() AND active",
                    &[],
                )
                .await?
                .get(0);
            if ready && streaming > 0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("rowcast --source replication not streaming within {START_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The WAL the other variants wrote since the last replication cell must not be read
        // inside this one: wait until the walsender has gone past all of it.
        let now: String = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        loop {
            let past: Option<bool> = self
                .client
                .query_opt(
                    "SELECT s.sent_lsn >= $1::text::pg_lsn FROM pg_replication_slots r \
                     JOIN pg_stat_replication s ON s.pid = r.active_pid \
                     WHERE r.database = current_database()",
                    &[&now],
                )
                .await?
                .and_then(|row| row.get(0));
            if past == Some(true) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the replication stream did not reach {now} within {START_LIMIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops rowcast (SIGTERM, then its exit).
    pub(super) async fn stop(&mut self) {
        if let Some(mut child) = self.rowcast.take() {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }

    /// Changelog rows so far.
    pub(super) async fn changelog_rows(&self) -> anyhow::Result<u64> {
        let n: i64 = self
            .client
            .query_one("SELECT count(*) FROM product_changes", &[])
            .await?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Waits until the changelog has `want` rows; returns how many it has and how long the
    /// wait took.
    pub(super) async fn wait_for_rows(&self, want: u64) -> anyhow::Result<(u64, f64)> {
        let started = Instant::now();
        loop {
            let rows = self.changelog_rows().await?;
            if rows >= want || started.elapsed() > CATCH_UP_LIMIT {
                return Ok((rows, started.elapsed().as_secs_f64()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(super) async fn vacuum(&self) -> anyhow::Result<()> {
        self.client.batch_execute("VACUUM products").await?;
        Ok(())
    }

    /// Stops rowcast, drops its slot (a database with one cannot be dropped), then the database.
    pub(super) async fn remove(mut self, admin: &Client) -> anyhow::Result<()> {
        self.stop().await;
        drop(self.client);
        // The walsender may take a moment to let go of the slot.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let dropped = admin
                .query(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1",
                    &[&self.db],
                )
                .await;
            if dropped.is_ok() || Instant::now() > deadline {
                dropped?;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.db))
            .await?;
        Ok(())
    }
}

/// The URL rowcast is given for `cfg`'s database (TCP or a Unix socket directory).
fn database_url(cfg: &Config) -> anyhow::Result<String> {
    let user = cfg.get_user().unwrap_or("postgres");
    let db = cfg.get_dbname().context("no database name")?;
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let password = cfg
        .get_password()
        .map(|p| format!(":{}", String::from_utf8_lossy(p)))
        .unwrap_or_default();
    Ok(match cfg.get_hosts().first() {
        Some(Host::Unix(dir)) => format!(
            "postgres:///{db}?host={}&port={port}&user={user}",
            dir.display()
        ),
        Some(Host::Tcp(host)) => format!("postgres://{user}{password}@{host}:{port}/{db}"),
        None => format!("postgres://{user}{password}@localhost:{port}/{db}"),
    })
}
