//! `writes`: the write-path cost of rowcast's change trigger as a ratio. In one run, on a
//! scratch database created for the run (and dropped after), the same `UPDATE` load runs
//! against the products table in up to four variants:
//!
//! - `none`      — notify triggers disabled;
//! - `bare`      — only a bare `pg_notify('bench_bare', <id>)` row trigger;
//! - `unordered` — rowcast's schema as it was after the migration named by
//!   `--unordered-through` (default `0002`: the immediate `pg_notify` row trigger, no
//!   advisory lock, no changelog): those migrations only, applied in a Postgres schema of
//!   their own (`bench_unordered`, seeded alike), which the writers of these cells put on
//!   their `search_path`. Later migrations that drop or replace what it uses cannot touch
//!   it. Left out (and the report says so) when no migration has that prefix;
//! - `rowcast`   — rowcast's own trigger(s) after all its migrations (`--migrations-dir`;
//!   since 0003 the commit-ordered deferred trigger), or the stand-in
//!   `sql/baseline_schema.sql` trigger when those are not there yet (the report says which).
//!
//! Each cell (variant × writer count) is W connections committing single-row UPDATEs for
//! `--secs` after `--warmup-secs`; per writer count the variants alternate for
//! `--repeats` rounds and the median is reported, so background load on a shared machine
//! hits all of them alike. A listener connection LISTENs on every notify
//! channel, as rowcast's listener would, and notifications must equal commits (the
//! correctness counter of this scenario). Only triggers whose function calls NOTIFY are
//! switched; any other trigger of rowcast's schema stays on in all variants.
//!
//! With `--rowcast-bin`, two more variants on a second scratch database (see
//! `writes_replication`): `replication`, rowcast with `--source replication`, and
//! `replication-async`, the same with `--replication-commit async`.
//!
//! Beside commits/s each cell reports the CPU of the writers' own backends per measured
//! commit (`/proc/<backend pid>/stat`, local Postgres only): where the trigger body runs.
//! The listener's backend and the WAL writer are not in it.

use super::Outcome;
use super::writes_replication::Replication;
use crate::svg::Series;
use anyhow::{Context, bail};
use serde_json::json;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

#[derive(Debug, Clone, clap::Args)]
pub struct WritesArgs {
    /// Postgres to create the scratch database on (needs CREATEDB).
    #[arg(
        long,
        env = "BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Writer counts (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub writers: Vec<usize>,
    /// Measured seconds per cell.
    #[arg(long, default_value_t = 3)]
    pub secs: u64,
    /// Rounds over the variants per writer count; the median commits/s is reported.
    /// Alternating short cells spreads background load over all variants alike.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Unmeasured seconds before each cell.
    #[arg(long, default_value_t = 1)]
    pub warmup_secs: u64,
    /// Rows in the table (writers update disjoint rows, so they never wait on row locks).
    #[arg(long, default_value_t = 1024)]
    pub rows: usize,
    /// rowcast's migrations (`*.sql`, applied in name order; `*.down.sql` skipped).
    #[arg(long, default_value = "../migrations")]
    pub migrations_dir: PathBuf,
    /// `synchronous_commit` for the writers: `on` includes the WAL flush in every commit
    /// (realistic), `off` isolates the CPU cost of the trigger.
    #[arg(long, default_value = "on")]
    pub synchronous_commit: String,
    /// File-name prefix of the migration whose NOTIFY trigger(s) form the `unordered`
    /// variant (applied up to and including it, copied, then the rest applied). Empty: no
    /// `unordered` variant.
    #[arg(long, default_value = "0002")]
    pub unordered_through: String,
    /// A rowcast binary: adds the `replication` variant (rowcast `--source replication` on a
    /// second scratch database; needs `wal_level=logical`).
    #[arg(long)]
    pub rowcast_bin: Option<PathBuf>,
}

const BASELINE_SCHEMA: &str = include_str!("../../sql/baseline_schema.sql");
/// Postgres schema that holds rowcast's schema as of `--unordered-through`.
const UNORDERED_SCHEMA: &str = "bench_unordered";

/// One seeded `products` table and how to load it.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// Qualified name (for VACUUM).
    name: String,
    /// `search_path` the writers set (None: the connection's default); the trigger bodies
    /// resolve their unqualified names through it.
    search_path: Option<String>,
    update_sql: String,
    pk: String,
    ids: Vec<i64>,
    notify_triggers: Vec<String>,
    channels: Vec<String>,
}

struct Schema {
    source: String,
    /// All migrations: `none`, `bare` and `rowcast` run here.
    main: Table,
    /// Migrations up to `--unordered-through`, in schema `bench_unordered`.
    unordered: Option<Table>,
    /// Where the `unordered` table came from, or why there is none.
    unordered_source: String,
    channels: Vec<String>,
    /// Settings of the Postgres server that decide commit cost.
    server: serde_json::Value,
}

impl Schema {
    fn variants(&self) -> Vec<&'static str> {
        let mut v = vec!["none", "bare"];
        if self.unordered.is_some() {
            v.push("unordered");
        }
        v.push("rowcast");
        v
    }

    fn table(&self, variant: &str) -> &Table {
        match (variant, &self.unordered) {
            ("unordered", Some(t)) => t,
            _ => &self.main,
        }
    }
}

pub async fn run(args: &WritesArgs) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let admin_cfg = Config::from_str(&args.database_url).context("parse --database-url")?;
    let admin = connect(&admin_cfg)
        .await
        .context("connect to --database-url")?;
    let db = format!("rowcast_bench_writes_{}", std::process::id());
    let cfg = fresh_database(&admin, &admin_cfg, &db).await?;
    let (mut replication, replication_source) = match &args.rowcast_bin {
        None => (None, "not measured (no --rowcast-bin)".to_owned()),
        Some(bin) => {
            match Replication::prepare(&admin, &admin_cfg, &format!("{db}_repl"), bin, args).await {
                Ok(Ok(r)) => (
                    Some(r),
                    format!("rowcast {} --source replication", bin.display()),
                ),
                Ok(Err(reason)) => (None, reason),
                Err(e) => {
                    let _ = admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .await;
                    return Err(e.context("prepare the replication variant"));
                }
            }
        }
    };
    let result = run_in(&cfg, args, &mut replication, &replication_source, &mut out).await;
    // Always drop the scratch databases, also after a failure.
    let removed = match replication {
        Some(r) => r.remove(&admin).await,
        None => Ok(()),
    };
    let dropped = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
    result?;
    removed?;
    dropped?;
    Ok(out)
}

/// rowcast's `--replication-commit` for a replication variant.
fn replication_commit(variant: &str) -> &'static str {
    if variant == "replication-async" {
        "async"
    } else {
        "sync"
    }
}

async fn run_in(
    cfg: &Config,
    args: &WritesArgs,
    replication: &mut Option<Replication>,
    replication_source: &str,
    out: &mut Outcome,
) -> anyhow::Result<()> {
    let client = connect(cfg).await?;
    let schema = prepare(&client, args).await?;
    let listener = Listener::start(cfg, &schema.channels).await?;
    let mut variants = schema.variants();
    if replication.is_some() {
        variants.extend(["replication", "replication-async"]);
    }
    out.summary.push(format!(
        "variants: {} (rowcast = all migrations, the notify trigger; unordered: {}; replication: {replication_source}); server: {}",
        variants.join(", "),
        schema.unordered_source,
        schema.server
    ));
    let mut cells = Vec::new();
    let mut by_variant: Vec<Vec<(f64, f64)>> = vec![Vec::new(); variants.len()];
    let mut ratios = Vec::new();
    for &w in &args.writers {
        let w = w.clamp(1, schema.main.ids.len());
        let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        let n_variants = variants.len();
        for (rep, vi) in (0..args.repeats.max(1)).flat_map(|r| (0..n_variants).map(move |v| (r, v)))
        {
            let variant = &variants[vi];
            set_variant(&client, &schema, variant).await?;
            let replica = match replication.as_mut() {
                Some(r) if variant.starts_with("replication") => {
                    r.start(replication_commit(variant)).await?;
                    r.vacuum().await?;
                    Some(r)
                }
                _ => None,
            };
            let (table, cell_cfg) = match &replica {
                Some(r) => (&r.table, &r.cfg),
                None => (schema.table(variant), cfg),
            };
            if replica.is_none() {
                client
                    .batch_execute(&format!("VACUUM {}", table.name))
                    .await?;
            }
            let before = listener.count.load(Ordering::Acquire);
            let rows_before = match &replica {
                Some(r) => r.changelog_rows().await?,
                None => 0,
            };
            let machine = crate::procstat::MachineCpu::now();
            let pg0 = crate::procstat::cpu_of_comm("postgres");
            let (commits, measured, secs, errors, backend_cpu) =
                run_cell(cell_cfg, table, w, args).await?;
            // The writers' own backends over the measured window (None: Postgres not local).
            let backend_us = backend_cpu.map(|c| c * 1e6 / measured.max(1) as f64);
            let busy = machine.busy_since(&crate::procstat::MachineCpu::now()) * 100.0;
            let pg_cpu = (crate::procstat::cpu_of_comm("postgres") - pg0).max(0.0);
            // The reader writes one changelog row per commit: all of them, once caught up.
            let caught_up = match replica {
                Some(r) => {
                    let (rows, waited) = r.wait_for_rows(rows_before + commits).await?;
                    r.stop().await;
                    let written = rows - rows_before;
                    if written != commits {
                        out.failures.push(format!(
                            "replication × {w}: {commits} commits but {written} changelog rows"
                        ));
                    }
                    Some((written, waited))
                }
                None => None,
            };
            // Notifications are delivered after commit; give the listener a moment.
            let want = if *variant == "none" || variant.starts_with("replication") {
                0
            } else {
                commits
            };
            let deadline = Instant::now() + Duration::from_secs(5);
            while listener.count.load(Ordering::Acquire) - before < want
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let notes = listener.count.load(Ordering::Acquire) - before;
            let rate = measured as f64 / secs;
            rates[vi].push(rate);
            if notes != want {
                out.failures.push(format!(
                    "{variant} × {w}: {commits} commits but {notes} notifications"
                ));
            }
            if errors > 0 {
                out.failures
                    .push(format!("{variant} × {w}: {errors} failed updates"));
            }
            out.summary.push(format!(
                "{variant:>11} × {w:>2} writers (round {}): {rate:>8.0} commits/s ({commits} commits, {}, writer backends {} µs CPU/commit, machine {busy:.0}% busy)",
                rep + 1,
                caught_up.map_or_else(
                    || format!("{notes} notifications"),
                    |(rows, waited)| format!("{rows} changelog rows, reader caught up {waited:.2} s after")
                ),
                backend_us.map_or("?".to_owned(), |u| format!("{u:.0}"))
            ));
            cells.push(json!({
                "variant": variant, "writers": w, "round": rep + 1, "commits_per_s": rate, "measured_commits": measured,
                "measured_s": secs, "total_commits": commits, "notifications": notes, "errors": errors,
                "changelog_rows": caught_up.map(|c| c.0), "reader_caught_up_after_s": caught_up.map(|c| c.1),
                "machine_busy_pct": busy, "postgres_cpu_s": pg_cpu,
                "postgres_cpu_us_per_commit": pg_cpu * 1e6 / commits.max(1) as f64,
                "writer_backends_cpu_s": backend_cpu,
                "writer_backend_cpu_us_per_commit": backend_us,
            }));
        }
        let tps: Vec<f64> = rates.iter().map(|v| median(&mut v.clone())).collect();
        for (vi, t) in tps.iter().enumerate() {
            by_variant[vi].push((w as f64, *t));
        }
        let of = |name: &str| variants.iter().position(|v| *v == name).map(|i| tps[i]);
        let (none, bare, rowcast) = (
            of("none").unwrap_or(f64::NAN),
            of("bare").unwrap_or(f64::NAN),
            of("rowcast").unwrap_or(f64::NAN),
        );
        let unordered = of("unordered");
        let medians: serde_json::Map<String, serde_json::Value> = variants
            .iter()
            .zip(&tps)
            .map(|(v, t)| ((*v).to_owned(), json!(t)))
            .collect();
        let mut r = json!({
            "writers": w,
            "median_commits_per_s": medians,
            "rowcast_vs_bare": rowcast / bare,
            "bare_vs_none": bare / none,
            "rowcast_vs_none": rowcast / none,
        });
        let mut line = format!(
            "           medians at {w}: none {none:.0}, bare {bare:.0}, {}rowcast {rowcast:.0} commits/s; rowcast/bare {:.3}, bare/none {:.3}, rowcast/none {:.3}",
            unordered.map_or(String::new(), |u| format!("unordered {u:.0}, ")),
            rowcast / bare,
            bare / none,
            rowcast / none
        );
        if let Some(u) = unordered {
            r["rowcast_vs_unordered"] = json!(rowcast / u);
            r["unordered_vs_bare"] = json!(u / bare);
            line += &format!(
                ", rowcast/unordered {:.3}, unordered/bare {:.3}",
                rowcast / u,
                u / bare
            );
        }
        if let Some(repl) = of("replication") {
            r["replication_vs_none"] = json!(repl / none);
            r["replication_vs_rowcast"] = json!(repl / rowcast);
            line += &format!(
                "; replication {repl:.0}: replication/none {:.3}, replication/rowcast {:.3}",
                repl / none,
                repl / rowcast
            );
        }
        if let Some(repl) = of("replication-async") {
            r["replication_async_vs_none"] = json!(repl / none);
            line += &format!(
                "; replication-async {repl:.0}: replication-async/none {:.3}",
                repl / none
            );
        }
        out.summary.push(line);
        ratios.push(r);
    }
    for (vi, points) in by_variant.into_iter().enumerate() {
        out.series.push(Series {
            name: variants[vi].to_owned(),
            points,
            dash: 0,
            group: vi,
        });
    }
    out.result = json!({
        "trigger_source": schema.source,
        "update_sql": schema.main.update_sql,
        "notify_triggers": schema.main.notify_triggers,
        "variants": variants,
        "unordered_triggers": schema.unordered.as_ref().map(|t| &t.notify_triggers),
        "unordered_source": schema.unordered_source,
        "server": schema.server,
        "channels": schema.channels,
        "synchronous_commit": args.synchronous_commit,
        "replication_source": replication_source,
        "rows": schema.main.ids.len(),
        "secs_per_cell": args.secs,
        "repeats": args.repeats,
        "cells": cells,
        "ratios": ratios,
    });
    Ok(())
}

/// Creates `db` anew (dropping a leftover of that name) and returns `admin_cfg` pointed at it.
pub(super) async fn fresh_database(
    admin: &Client,
    admin_cfg: &Config,
    db: &str,
) -> anyhow::Result<Config> {
    // Separate statements: DROP/CREATE DATABASE refuse to run inside the implicit
    // transaction of a multi-statement simple query.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let mut cfg = admin_cfg.clone();
    cfg.dbname(db);
    Ok(cfg)
}

pub(super) async fn connect(cfg: &Config) -> anyhow::Result<Client> {
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        // Ends when the client drops or the server goes away; the next query reports it.
        let _ = conn.await;
    });
    Ok(client)
}

/// Applies rowcast's migrations (or the stand-in), seeds rows, and finds what to switch;
/// with `--unordered-through`, first builds the earlier schema in its own Postgres schema.
async fn prepare(client: &Client, args: &WritesArgs) -> anyhow::Result<Schema> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(&args.migrations_dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    let n = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    n.ends_with(".sql") && !n.ends_with(".down.sql")
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let file_name = |f: &PathBuf| {
        f.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned()
    };
    let list = |fs: &[PathBuf]| fs.iter().map(file_name).collect::<Vec<_>>().join(", ");

    // The `unordered` variant: migrations up to and including `--unordered-through`, in a
    // schema of their own, so that later migrations (which drop or replace what it uses)
    // cannot touch it. Its NOTIFY triggers stay on: only `unordered` cells write its table.
    let split = if args.unordered_through.is_empty() {
        None
    } else {
        files
            .iter()
            .rposition(|f| file_name(f).starts_with(&args.unordered_through))
            .map(|i| i + 1)
    };
    let mut unordered = None;
    let unordered_source = match split {
        None if args.unordered_through.is_empty() => {
            "not measured (--unordered-through is empty)".to_owned()
        }
        None => format!(
            "not measured (no migration named {}* in {})",
            args.unordered_through,
            args.migrations_dir.display()
        ),
        Some(k) if k == files.len() => format!(
            "not measured ({} is the last migration: unordered would equal rowcast)",
            list(&files[k - 1..])
        ),
        Some(k) => {
            client
                .batch_execute(&format!(
                    "CREATE SCHEMA {UNORDERED_SCHEMA}; SET search_path = {UNORDERED_SCHEMA}"
                ))
                .await?;
            apply(client, &files[..k]).await?;
            let mut t = inspect_and_seed(client, args, Some(UNORDERED_SCHEMA))
                .await
                .with_context(|| {
                    format!("prepare the unordered variant ({})", list(&files[..k]))
                })?;
            for tg in &t.notify_triggers {
                client
                    .batch_execute(&format!("ALTER TABLE products ENABLE TRIGGER {tg}"))
                    .await?;
            }
            client.batch_execute("RESET search_path").await?;
            t.notify_triggers = t
                .notify_triggers
                .iter()
                .map(|tg| format!("{UNORDERED_SCHEMA}.{tg}"))
                .collect();
            unordered = Some(t);
            format!(
                "rowcast migrations {} only, in schema {UNORDERED_SCHEMA}",
                list(&files[..k])
            )
        }
    };

    let source = if files.is_empty() {
        client
            .batch_execute(BASELINE_SCHEMA)
            .await
            .context("apply stand-in schema")?;
        format!(
            "stand-in trigger bench/sql/baseline_schema.sql (no migrations found in {})",
            args.migrations_dir.display()
        )
    } else {
        apply(client, &files).await?;
        format!(
            "rowcast migrations: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let main = inspect_and_seed(client, args, None)
        .await
        .with_context(|| format!("prepare {source}"))?;
    let pk = &main.pk;
    client
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION bench_bare_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify('bench_bare', (CASE WHEN TG_OP = 'DELETE' THEN OLD.{pk} ELSE NEW.{pk} END)::text); RETURN NULL; END $$; \
             CREATE TRIGGER bench_bare_notify AFTER INSERT OR UPDATE OR DELETE ON products FOR EACH ROW EXECUTE FUNCTION bench_bare_notify(); \
             ALTER TABLE products DISABLE TRIGGER bench_bare_notify; ANALYZE products;"
        ))
        .await?;
    let mut channels: Vec<String> = main
        .channels
        .iter()
        .chain(unordered.iter().flat_map(|t: &Table| &t.channels))
        .cloned()
        .collect();
    channels.push("bench_bare".into());
    channels.sort();
    channels.dedup();

    let settings = client
        .query(
            "SELECT name, setting FROM pg_settings WHERE name IN \
             ('server_version', 'fsync', 'wal_sync_method', 'full_page_writes', 'wal_level', 'commit_delay', 'shared_buffers', 'data_directory') \
             ORDER BY name",
            &[],
        )
        .await
        .unwrap_or_default();
    let server = serde_json::Value::Object(
        settings
            .iter()
            .map(|r| (r.get::<_, String>(0), json!(r.get::<_, String>(1))))
            .collect(),
    );
    Ok(Schema {
        source,
        main,
        unordered,
        unordered_source,
        channels,
        server,
    })
}

/// Applies migration files in order.
async fn apply(client: &Client, files: &[PathBuf]) -> anyhow::Result<()> {
    for f in files {
        let sql = std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
        client
            .batch_execute(&sql)
            .await
            .with_context(|| format!("apply {}", f.display()))?;
    }
    Ok(())
}

/// Finds the `products` table of the current `search_path`, its NOTIFY triggers (left
/// disabled) and an integer column to bump, and seeds `--rows` rows.
pub(super) async fn inspect_and_seed(
    client: &Client,
    args: &WritesArgs,
    schema: Option<&str>,
) -> anyhow::Result<Table> {
    let pk: String = client
        .query_one(
            "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
             WHERE i.indrelid = 'products'::regclass AND i.indisprimary LIMIT 1",
            &[],
        )
        .await
        .context("products needs a primary key")?
        .get(0);
    let cols = client
        .query(
            "SELECT column_name::text, data_type::text, column_default IS NOT NULL OR is_identity = 'YES' OR is_generated <> 'NEVER', \
                    is_nullable = 'YES' \
             FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = 'products' ORDER BY ordinal_position",
            &[],
        )
        .await?;
    let int_types = ["integer", "bigint", "smallint"];
    let bump = cols
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .filter(|(n, t)| *n != pk && int_types.contains(&t.as_str()))
        .map(|(n, _)| n)
        .max_by_key(|n| n == "units_available")
        .context("products has no integer column to update")?;
    let (mut names, mut values) = (Vec::new(), Vec::new());
    for r in &cols {
        let (name, ty, has_default, nullable): (String, String, bool, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        if has_default || nullable {
            continue;
        }
        let v = match ty.as_str() {
            "text" | "character varying" => "'rowcast-bench'",
            "numeric" | "double precision" | "real" => "1.50",
            "integer" | "bigint" | "smallint" => "1",
            "boolean" => "false",
            t if t.starts_with("timestamp") => "now()",
            "uuid" => "gen_random_uuid()",
            other => bail!("cannot seed column {name} of type {other}"),
        };
        names.push(name);
        values.push(v);
    }
    let notify_rows = client
        .query(
            "SELECT t.tgname::text, p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
             WHERE t.tgrelid = 'products'::regclass AND NOT t.tgisinternal AND p.prosrc ILIKE '%notify%' \
               AND t.tgname NOT LIKE 'bench\\_%'",
            &[],
        )
        .await?;
    if notify_rows.is_empty() {
        bail!("no NOTIFY trigger on products");
    }
    let notify_triggers: Vec<String> = notify_rows.iter().map(|r| r.get(0)).collect();
    let channels: Vec<String> = notify_rows
        .iter()
        .flat_map(|r| notify_channels(r.get(1)))
        .collect();

    // Seed with the notify triggers off: the setup is not what we measure.
    for t in &notify_triggers {
        client
            .batch_execute(&format!("ALTER TABLE products DISABLE TRIGGER {t}"))
            .await?;
    }
    client
        .batch_execute(&format!(
            "INSERT INTO products ({}) SELECT {} FROM generate_series(1, {}); ANALYZE products;",
            names.join(", "),
            values.join(", "),
            args.rows
        ))
        .await?;
    let ids: Vec<i64> = client
        .query(
            &format!("SELECT {pk}::bigint FROM products ORDER BY 1"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok(Table {
        name: schema.map_or("products".to_owned(), |s| format!("{s}.products")),
        search_path: schema.map(str::to_owned),
        update_sql: format!("UPDATE products SET {bump} = {bump} + 1 WHERE {pk} = $1::bigint"),
        pk,
        ids,
        notify_triggers,
        channels,
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Channel names in `pg_notify('name', …)` calls of a function body.
fn notify_channels(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    // ASCII lowercasing keeps byte offsets, so positions found in `lower` index `src`
    // (channel names are case-sensitive and are taken from `src`).
    let lower = src.to_ascii_lowercase();
    let mut at = 0;
    while let Some(i) = lower[at..].find("pg_notify(") {
        at += i + "pg_notify(".len();
        let t = src[at..].trim_start();
        if let Some(q) = t.strip_prefix('\'') {
            if let Some(end) = q.find('\'') {
                out.push(q[..end].to_owned());
            }
        }
    }
    out
}

async fn set_variant(client: &Client, schema: &Schema, variant: &str) -> anyhow::Result<()> {
    let on_off = |on: bool| if on { "ENABLE" } else { "DISABLE" };
    let (rowcast_on, bare_on) = (variant == "rowcast", variant == "bare");
    let mut sql = String::new();
    // The `unordered` table's triggers stay on; only `unordered` cells write that table.
    for t in &schema.main.notify_triggers {
        sql += &format!("ALTER TABLE products {} TRIGGER {t};", on_off(rowcast_on));
    }
    sql += &format!(
        "ALTER TABLE products {} TRIGGER bench_bare_notify;",
        on_off(bare_on)
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// Runs one cell; returns (all commits, commits in the measured window, window seconds,
/// errors, CPU seconds of the writers' backends in the measured window — `None` when the
/// backends are not processes on this machine).
async fn run_cell(
    cfg: &Config,
    table: &Table,
    writers: usize,
    args: &WritesArgs,
) -> anyhow::Result<(u64, u64, f64, u64, Option<f64>)> {
    let mut backend_pids = Vec::new();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let measured = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for wi in 0..writers {
        let client = connect(cfg).await?;
        client
            .batch_execute(&format!(
                "SET synchronous_commit = {};{}",
                args.synchronous_commit,
                table
                    .search_path
                    .as_ref()
                    .map_or(String::new(), |p| format!(" SET search_path = {p};"))
            ))
            .await?;
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await?
            .get(0);
        backend_pids.push(pid as u32);
        let stmt = client.prepare(&table.update_sql).await?;
        let mine: Vec<i64> = table
            .ids
            .iter()
            .skip(wi)
            .step_by(writers)
            .copied()
            .collect();
        let (measuring, stop, measured) = (measuring.clone(), stop.clone(), measured.clone());
        tasks.push(tokio::spawn(async move {
            let (mut commits, mut errors) = (0u64, 0u64);
            let mut i = 0;
            // Bounded by `stop`, which the coordinator sets after warmup + secs.
            while !stop.load(Ordering::Acquire) {
                match client.execute(&stmt, &[&mine[i % mine.len()]]).await {
                    Ok(_) => {
                        commits += 1;
                        if measuring.load(Ordering::Acquire) {
                            measured.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => errors += 1,
                }
                i += 1;
            }
            (commits, errors)
        }));
    }
    let pb = crate::progress::timed(args.warmup_secs + args.secs, format!("writes × {writers}"));
    tokio::time::sleep(Duration::from_secs(args.warmup_secs)).await;
    pb.set_position(args.warmup_secs);
    // Summed utime+stime of the writers' backends; None if any is not visible in /proc.
    let backends_cpu = || -> Option<f64> {
        backend_pids
            .iter()
            .map(|&p| {
                // A pid from a Postgres in another pid namespace may name some other process.
                let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).ok()?;
                (comm.trim() == "postgres")
                    .then(|| crate::procstat::sample(p).map(|s| s.cpu_s))
                    .flatten()
            })
            .sum()
    };
    let cpu0 = backends_cpu();
    measuring.store(true, Ordering::Release);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    measuring.store(false, Ordering::Release);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1 = backends_cpu();
    stop.store(true, Ordering::Release);
    pb.finish_and_clear();
    let (mut commits, mut errors) = (0, 0);
    for t in tasks {
        let (c, e) = t.await?;
        commits += c;
        errors += e;
    }
    let backend_cpu = cpu0.zip(cpu1).map(|(a, b)| (b - a).max(0.0));
    Ok((
        commits,
        measured.load(Ordering::Acquire),
        secs,
        errors,
        backend_cpu,
    ))
}

/// A connection that LISTENs on the notify channels and counts what arrives.
struct Listener {
    count: Arc<AtomicU64>,
    _client: Client,
}

impl Listener {
    async fn start(cfg: &Config, channels: &[String]) -> anyhow::Result<Self> {
        let (client, mut conn) = cfg.connect(NoTls).await?;
        let count = Arc::new(AtomicU64::new(0));
        let c = count.clone();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
            use futures_util::StreamExt;
            while let Some(Ok(m)) = messages.next().await {
                if let AsyncMessage::Notification(_) = m {
                    c.fetch_add(1, Ordering::AcqRel);
                }
            }
        });
        for ch in channels {
            client.batch_execute(&format!("LISTEN \"{ch}\"")).await?;
        }
        Ok(Self {
            count,
            _client: client,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_channels() {
        assert_eq!(
            super::notify_channels("perform pg_notify( 'product_change', x); PG_NOTIFY('b', y)"),
            vec!["product_change", "b"]
        );
    }
}
