//! `writes`: the write-path cost of rowcast's change trigger as a ratio. In one run, on a
//! scratch database created for the run (and dropped after), the same `UPDATE` load runs
//! against the products table in three variants:
//!
//! - `none`    — notify triggers disabled;
//! - `bare`    — only a bare `pg_notify('bench_bare', <id>)` row trigger;
//! - `rowcast` — rowcast's own trigger(s), from its migrations (`--migrations-dir`), or the
//!   stand-in `sql/baseline_schema.sql` trigger when those are not there yet (the report
//!   says which).
//!
//! Each cell (variant × writer count) is W connections committing single-row UPDATEs for
//! `--secs` after `--warmup-secs`; per writer count the three variants alternate for
//! `--repeats` rounds and the median is reported, so background load on a shared machine
//! hits all three alike. A listener connection LISTENs on every notify
//! channel, as rowcast's listener would, and notifications must equal commits (the
//! correctness counter of this scenario). Only triggers whose function calls NOTIFY are
//! switched; any other trigger of rowcast's schema stays on in all variants.

use super::Outcome;
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
    /// Rounds over the three variants per writer count; the median commits/s is reported.
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
}

const BASELINE_SCHEMA: &str = include_str!("../../sql/baseline_schema.sql");
const VARIANTS: [&str; 3] = ["none", "bare", "rowcast"];

struct Schema {
    source: String,
    update_sql: String,
    ids: Vec<i64>,
    notify_triggers: Vec<String>,
    channels: Vec<String>,
}

pub async fn run(args: &WritesArgs) -> anyhow::Result<Outcome> {
    let mut out = Outcome::default();
    let admin_cfg = Config::from_str(&args.database_url).context("parse --database-url")?;
    let admin = connect(&admin_cfg)
        .await
        .context("connect to --database-url")?;
    let db = format!("rowcast_bench_writes_{}", std::process::id());
    // Separate statements: DROP/CREATE DATABASE refuse to run inside the implicit
    // transaction of a multi-statement simple query.
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db}"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let mut cfg = admin_cfg.clone();
    cfg.dbname(&db);
    let result = run_in(&cfg, args, &mut out).await;
    // Always drop the scratch database, also after a failure.
    let dropped = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await;
    result?;
    dropped?;
    Ok(out)
}

async fn run_in(cfg: &Config, args: &WritesArgs, out: &mut Outcome) -> anyhow::Result<()> {
    let client = connect(cfg).await?;
    let schema = prepare(&client, args).await?;
    let listener = Listener::start(cfg, &schema.channels).await?;
    let mut cells = Vec::new();
    let mut by_variant: Vec<Vec<(f64, f64)>> = vec![Vec::new(); VARIANTS.len()];
    let mut ratios = Vec::new();
    for &w in &args.writers {
        let w = w.clamp(1, schema.ids.len());
        let mut rates: [Vec<f64>; 3] = Default::default();
        for (rep, vi) in
            (0..args.repeats.max(1)).flat_map(|r| (0..VARIANTS.len()).map(move |v| (r, v)))
        {
            let variant = &VARIANTS[vi];
            set_variant(&client, &schema, variant).await?;
            client.batch_execute("VACUUM products").await?;
            let before = listener.count.load(Ordering::Acquire);
            let machine = crate::procstat::MachineCpu::now();
            let pg0 = crate::procstat::cpu_of_comm("postgres");
            let (commits, measured, secs, errors) = run_cell(cfg, &schema, w, args).await?;
            let busy = machine.busy_since(&crate::procstat::MachineCpu::now()) * 100.0;
            let pg_cpu = (crate::procstat::cpu_of_comm("postgres") - pg0).max(0.0);
            // Notifications are delivered after commit; give the listener a moment.
            let want = if *variant == "none" { 0 } else { commits };
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
                "{variant:>8} × {w:>2} writers (round {}): {rate:>8.0} commits/s ({commits} commits, {notes} notifications, postgres {:.0} µs CPU/commit, machine {busy:.0}% busy)",
                rep + 1,
                pg_cpu * 1e6 / commits.max(1) as f64
            ));
            cells.push(json!({
                "variant": variant, "writers": w, "round": rep + 1, "commits_per_s": rate, "measured_commits": measured,
                "measured_s": secs, "total_commits": commits, "notifications": notes, "errors": errors,
                "machine_busy_pct": busy, "postgres_cpu_s": pg_cpu,
                "postgres_cpu_us_per_commit": pg_cpu * 1e6 / commits.max(1) as f64,
            }));
        }
        let tps = rates.clone().map(|mut v| median(&mut v));
        for (vi, t) in tps.iter().enumerate() {
            by_variant[vi].push((w as f64, *t));
        }
        let r = json!({
            "writers": w,
            "median_commits_per_s": { "none": tps[0], "bare": tps[1], "rowcast": tps[2] },
            "rowcast_vs_bare": tps[2] / tps[1],
            "bare_vs_none": tps[1] / tps[0],
            "rowcast_vs_none": tps[2] / tps[0],
        });
        out.summary.push(format!(
            "           medians at {w}: none {:.0}, bare {:.0}, rowcast {:.0} commits/s; rowcast/bare {:.3}, bare/none {:.3}, rowcast/none {:.3}",
            tps[0],
            tps[1],
            tps[2],
            tps[2] / tps[1],
            tps[1] / tps[0],
            tps[2] / tps[0]
        ));
        ratios.push(r);
    }
    for (vi, points) in by_variant.into_iter().enumerate() {
        out.series.push(Series {
            name: VARIANTS[vi].to_owned(),
            points,
            dash: 0,
            group: vi,
        });
    }
    out.result = json!({
        "trigger_source": schema.source,
        "update_sql": schema.update_sql,
        "notify_triggers": schema.notify_triggers,
        "channels": schema.channels,
        "synchronous_commit": args.synchronous_commit,
        "rows": schema.ids.len(),
        "secs_per_cell": args.secs,
        "repeats": args.repeats,
        "cells": cells,
        "ratios": ratios,
    });
    Ok(())
}

async fn connect(cfg: &Config) -> anyhow::Result<Client> {
    let (client, conn) = cfg.connect(NoTls).await?;
    tokio::spawn(async move {
        // Ends when the client drops or the server goes away; the next query reports it.
        let _ = conn.await;
    });
    Ok(client)
}

/// Applies rowcast's migrations (or the stand-in), seeds rows, and finds what to switch.
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
        for f in &files {
            let sql =
                std::fs::read_to_string(f).with_context(|| format!("read {}", f.display()))?;
            client
                .batch_execute(&sql)
                .await
                .with_context(|| format!("apply {}", f.display()))?;
        }
        format!(
            "rowcast migrations: {}",
            files
                .iter()
                .map(|f| f.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };

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
             WHERE t.tgrelid = 'products'::regclass AND NOT t.tgisinternal AND p.prosrc ILIKE '%notify%'",
            &[],
        )
        .await?;
    if notify_rows.is_empty() {
        bail!("no NOTIFY trigger on products in {source}");
    }
    let notify_triggers: Vec<String> = notify_rows.iter().map(|r| r.get(0)).collect();
    let mut channels: Vec<String> = notify_rows
        .iter()
        .flat_map(|r| notify_channels(r.get(1)))
        .collect();
    channels.push("bench_bare".into());
    channels.sort();
    channels.dedup();

    // Seed with the notify triggers off: the setup is not what we measure.
    for t in &notify_triggers {
        client
            .batch_execute(&format!("ALTER TABLE products DISABLE TRIGGER {t}"))
            .await?;
    }
    client
        .batch_execute(&format!(
            "INSERT INTO products ({}) SELECT {} FROM generate_series(1, {})",
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
    client
        .batch_execute(&format!(
            "CREATE OR REPLACE FUNCTION bench_bare_notify() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN PERFORM pg_notify('bench_bare', (CASE WHEN TG_OP = 'DELETE' THEN OLD.{pk} ELSE NEW.{pk} END)::text); RETURN NULL; END $$; \
             CREATE TRIGGER bench_bare_notify AFTER INSERT OR UPDATE OR DELETE ON products FOR EACH ROW EXECUTE FUNCTION bench_bare_notify(); \
             ALTER TABLE products DISABLE TRIGGER bench_bare_notify; ANALYZE products;"
        ))
        .await?;
    Ok(Schema {
        source,
        update_sql: format!("UPDATE products SET {bump} = {bump} + 1 WHERE {pk} = $1::bigint"),
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
    let (rowcast_on, bare_on) = match variant {
        "none" => (false, false),
        "bare" => (false, true),
        _ => (true, false),
    };
    let mut sql = String::new();
    for t in &schema.notify_triggers {
        sql += &format!(
            "ALTER TABLE products {} TRIGGER {t};",
            if rowcast_on { "ENABLE" } else { "DISABLE" }
        );
    }
    sql += &format!(
        "ALTER TABLE products {} TRIGGER bench_bare_notify;",
        if bare_on { "ENABLE" } else { "DISABLE" }
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// Runs one cell; returns (all commits, commits in the measured window, window seconds,
/// errors).
async fn run_cell(
    cfg: &Config,
    schema: &Schema,
    writers: usize,
    args: &WritesArgs,
) -> anyhow::Result<(u64, u64, f64, u64)> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let measured = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for wi in 0..writers {
        let client = connect(cfg).await?;
        client
            .batch_execute(&format!(
                "SET synchronous_commit = {}",
                args.synchronous_commit
            ))
            .await?;
        let stmt = client.prepare(&schema.update_sql).await?;
        let mine: Vec<i64> = schema
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
    measuring.store(true, Ordering::Release);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(args.secs)).await;
    measuring.store(false, Ordering::Release);
    let secs = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Release);
    pb.finish_and_clear();
    let (mut commits, mut errors) = (0, 0);
    for t in tasks {
        let (c, e) = t.await?;
        commits += c;
        errors += e;
    }
    Ok((commits, measured.load(Ordering::Acquire), secs, errors))
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
