//! `App`: wiring. Builds everything that can fail (database, migrations, listening socket)
//! before anything is spawned, then runs the server until shutdown. The only module that
//! imports all the others.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use axum::extract::ws::Utf8Bytes;
use axum::routing::{any, get};
use sqlx::PgPool;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::api::{self, ApiState};
use crate::config::Config;
use crate::db::{self, changelog, embedded::EmbeddedPostgres};
use crate::distributor::DistributorHandle;
use crate::listener::Listener;
use crate::ops::{self, OpsState};
use crate::session::{self, SessionState};
use crate::shutdown::Shutdown;
use crate::sse::{self, SseState};

/// Database the embedded cluster serves rowcast from.
const EMBEDDED_DATABASE: &str = "rowcast";

/// A built, not yet running, rowcast.
#[derive(Debug)]
pub struct App {
    tcp: TcpListener,
    router: Router,
    pool: PgPool,
    config: Config,
    shutdown: Shutdown,
    embedded: Option<EmbeddedPostgres>,
}

/// Where the database comes from: the configured URL, or a private cluster we start.
async fn database(config: &Config) -> anyhow::Result<(String, Option<EmbeddedPostgres>)> {
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

/// Applies migrations and exits (`rowcast migrate`).
pub async fn migrate_only(config: &Config) -> anyhow::Result<()> {
    let (url, embedded) = database(config).await?;
    let pool = db::connect(&url, 1).await?;
    db::migrate(&pool).await?;
    pool.close().await;
    if let Some(cluster) = embedded {
        cluster.stop().await?;
    }
    Ok(())
}

impl App {
    /// Connects, migrates, binds, and spawns the distributor and the LISTEN task.
    pub async fn build(config: Config, shutdown: Shutdown) -> anyhow::Result<Self> {
        let (url, embedded) = database(&config).await?;
        let pool = db::connect(&url, config.db_max_connections).await?;
        db::migrate(&pool).await?;
        let tcp = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;

        // Everything committed after this position is published, by notification or by the
        // listener's catch-up from the changelog.
        let position = changelog::latest_seq(&pool).await?;
        let distributor = DistributorHandle::<Utf8Bytes>::spawn(config.limits, position);
        let (listener, listener_status) = Listener::new(
            &url,
            config.listener,
            distributor.clone(),
            pool.clone(),
            position,
        )?;
        shutdown.spawn(
            listener
                .run(shutdown.clone())
                .instrument(tracing::info_span!("listener")),
        );
        shutdown.spawn(
            changelog::run_retention(pool.clone(), config.changelog, shutdown.clone())
                .instrument(tracing::info_span!("changelog_retention")),
        );
        let events = SseState {
            distributor: distributor.clone(),
            pool: pool.clone(),
            shutdown: shutdown.clone(),
            max_subscriptions: config.limits.max_subscriptions,
        };

        let sessions = SessionState {
            distributor: distributor.clone(),
            limits: config.limits,
            heartbeat: config.heartbeat,
            shutdown: shutdown.clone(),
            pool: pool.clone(),
        };
        let router = Router::new()
            .merge(api::router(
                ApiState { pool: pool.clone() },
                config.limits.max_body_bytes,
            ))
            .merge(ops::router(OpsState {
                distributor,
                listener: listener_status,
            }))
            // `any`: HTTP/2 WebSockets arrive as CONNECT (RFC 8441), HTTP/1.1 ones as GET.
            .route("/websocket", any(session::upgrade).with_state(sessions))
            .route("/products/events", get(sse::events).with_state(events))
            .fallback(api::not_found)
            .method_not_allowed_fallback(api::method_not_allowed)
            .layer(tower_http::trace::TraceLayer::new_for_http());

        Ok(Self {
            tcp,
            router,
            pool,
            config,
            shutdown,
            embedded,
        })
    }

    /// The bound address (tests bind port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The REST pool (tests use it to write behind the API's back, like any other writer).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Serves until the shutdown is triggered, then closes sessions (1001), waits up to the
    /// grace period, and stops the embedded cluster.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            tcp,
            router,
            pool,
            config,
            shutdown,
            embedded,
        } = self;
        tracing::info!(address = %tcp.local_addr()?, "rowcast listening");
        let token = shutdown.token();
        let serve = axum::serve(tcp, router).with_graceful_shutdown(token.cancelled_owned());
        let grace = config.shutdown_grace;
        tokio::select! {
            result = serve => result.context("HTTP server failed")?,
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!("HTTP requests still open after the grace period; closing them");
            }
        }
        if !shutdown.wait(grace).await {
            tracing::warn!("some sessions did not finish within the grace period");
        }
        pool.close().await;
        if let Some(cluster) = embedded {
            cluster.stop().await?;
        }
        tracing::info!("rowcast stopped");
        Ok(())
    }
}
