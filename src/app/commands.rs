//! The one-shot commands beside `serve` — `migrate`, `replication drop` — and what they share
//! with [`super::App::build`]: where the database comes from (the URL, or the embedded
//! cluster) and the replication names derived from it.

use anyhow::Context;
use rowcast_embedded_postgres::EmbeddedPostgres;

use crate::config::{Config, Source};
use crate::db::replication::ReplicationNames;
use crate::db::{self, PgTarget};
use crate::replication;

/// Database the embedded cluster serves rowcast from.
const EMBEDDED_DATABASE: &str = "rowcast";

/// Where the database comes from: the configured URL, or a private cluster we start.
pub(super) async fn database(
    config: &Config,
) -> anyhow::Result<(String, Option<EmbeddedPostgres>)> {
    if let Some(url) = &config.database_url {
        return Ok((url.clone(), None));
    }
    let cluster = EmbeddedPostgres::start(&config.embedded_data_dir)
        .await
        .context("starting the embedded PostgreSQL (set DATABASE_URL to use your own)")?;
    let admin = db::connect(&cluster.url("postgres"), 1).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(EMBEDDED_DATABASE)
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query(&format!("CREATE DATABASE {EMBEDDED_DATABASE}"))
            .execute(&admin)
            .await?;
    }
    admin.close().await;
    tracing::info!(data_dir = %config.embedded_data_dir.display(), "embedded PostgreSQL running");
    Ok((cluster.url(EMBEDDED_DATABASE), Some(cluster)))
}

/// The replication names for `url`'s database.
pub(super) fn replication_names(
    config: &Config,
    target: &PgTarget,
) -> anyhow::Result<ReplicationNames> {
    Ok(ReplicationNames::new(
        config.source.replication_name.as_deref(),
        target.database(),
    )?)
}

/// Applies migrations and exits (`rowcast migrate`); with `--source replication` also creates
/// the publication and, when no instance leads, the slot and the switch.
pub async fn migrate_only(config: &Config) -> anyhow::Result<()> {
    let (url, embedded) = database(config).await?;
    let pool = db::connect(&url, 1).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    if config.source.source == Source::Replication {
        let target = PgTarget::parse(&url)?;
        replication::prepare_for_migrate(&target, &replication_names(config, &target)?)
            .await
            .context("preparing logical replication")?;
    }
    if let Some(cluster) = embedded {
        cluster.stop().await?;
    }
    Ok(())
}

/// `rowcast replication drop`: the changelog goes back to the trigger; slot and publication go.
pub async fn replication_drop(config: &Config) -> anyhow::Result<()> {
    let (url, embedded) = database(config).await?;
    let target = PgTarget::parse(&url)?;
    let pool = db::connect(&url, 1).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    replication::drop_all(&target, &replication_names(config, &target)?)
        .await
        .context("dropping logical replication")?;
    if let Some(cluster) = embedded {
        cluster.stop().await?;
    }
    Ok(())
}
