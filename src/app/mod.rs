//! `App`: wiring. [`App::build`] does everything that can fail (database pools, migrations, both
//! listening sockets, the certificate with its SIGHUP handler or cached ACME certificate, access
//! settings, the LISTEN URL) before anything is spawned, then starts the tasks and builds the
//! router around one [`AppState`]; [`App::run`] serves until shutdown.
//!
//! Imports every module that has a part to build, start or route: `access`, `acme`, `api`,
//! `config`, `db`, `distributor`, `hardening`, `health`, `listener`, `memory`, `metrics`,
//! `presence`, `product`, `protocol`, `replication`, `retention`, `serve`, `session`, `shutdown`, `sse`, `tls` and `web`.
//! Nothing imports `app`; the routers below it are generic over the state (`FromRef`), so they
//! need not.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::extract::FromRef;
use axum::middleware::from_fn_with_state;
use axum::routing::{any, get};
use rowcast_embedded_postgres::EmbeddedPostgres;
use tokio::net::TcpListener;
use tracing::Instrument;

mod commands;

use commands::{database, replication_names};
pub use commands::{migrate_only, replication_drop};

use crate::access::{self, Access, AllowedHosts};
use crate::acme::{Renewal, TlsWatch};
use crate::api;
use crate::config::{Budgets, Config, Heartbeat, Limits, ReplicationCommit, Source, TlsSettings};
use crate::db::replication::ReplicationNames;
use crate::db::{self, HistoryReader, PgTarget, PoolSizes, Pools, RestPool, changelog};
use crate::distributor::DistributorHandle;
use crate::hardening;
use crate::health::{self, ViewsCache};
use crate::listener::{self, ConnectOptions, Listener, ListenerWatch};
use crate::memory;
use crate::metrics::Metrics;
use crate::presence;
use crate::product::Seq;
use crate::protocol::Frame;
use crate::replication::Reader;
use crate::retention;
use crate::serve::{self, Connections, Handshake, TransportStats};
use crate::session::{self, SessionState};
use crate::shutdown::Shutdown;
use crate::sse::{self, SseState};
use crate::tls::{ServerTls, SighupReload};

/// What the handlers share, behind one reference count: axum clones the router's state for every
/// request, and cloning a dozen handles each time was rowcast's costliest user-space frame under
/// REST writes (`bench/results/puts-flame.svg`). One value for the whole router; each handler
/// extracts only the part it uses (`State<RestPool>`, `State<SessionState>`, …) through `FromRef`
/// — one impl per field's type below (the pool for REST and `/readyz`; the distributor, listener,
/// history, views, transport, TLS and metrics handles for `/stats`, `/readyz` and `/metrics`), and
/// the composite views of the WebSocket and event-stream handlers — so no module below `app` needs
/// to know this type.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Declares [`Shared`] and, for each field's type, its extraction on its own
/// (`State<RestPool>`, …).
macro_rules! shared_state {
    ($($(#[$doc:meta])* $field:ident: $ty:ty,)*) => {
        /// The fields of [`AppState`].
        #[derive(Debug)]
        pub struct Shared {
            $($(#[$doc])* $field: $ty,)*
        }

        $(impl FromRef<AppState> for $ty {
            fn from_ref(state: &AppState) -> Self {
                state.$field.clone()
            }
        })*
    };
}

shared_state! {
    /// The REST pool (REST handlers and `/readyz`).
    pool: RestPool,
    /// Where replays and snapshots are read: the history pool behind its queue.
    history: HistoryReader,
    /// Where subscriptions live.
    distributor: DistributorHandle<Frame>,
    /// The distributor's walked views, asked for at most once a second.
    views: ViewsCache,
    /// The LISTEN task's latest status.
    listener: ListenerWatch,
    /// Connection counters (open, refused, timeouts, WebSockets by HTTP version).
    transport: TransportStats,
    /// The served certificate and its ACME renewals.
    tls: TlsWatch,
    /// This App's metrics registry.
    metrics: Metrics,
    /// Process shutdown; sessions and event streams end on it.
    shutdown: Shutdown,
    /// Per-session limits.
    limits: Limits,
    /// Budgets (sessions use the command rate).
    budgets: Budgets,
    /// Ping cadence and patience.
    heartbeat: Heartbeat,
    /// When authenticated event streams end to renew their credential (`Access`).
    stream_rotation: Option<std::time::Duration>,
}

/// The WebSocket upgrade handler's view.
impl FromRef<AppState> for SessionState {
    fn from_ref(state: &AppState) -> Self {
        Self {
            distributor: state.distributor.clone(),
            limits: state.limits,
            budgets: state.budgets,
            heartbeat: state.heartbeat,
            shutdown: state.shutdown.clone(),
            history: state.history.clone(),
            metrics: state.metrics.clone(),
        }
    }
}

/// The event-stream handler's view.
impl FromRef<AppState> for SseState {
    fn from_ref(state: &AppState) -> Self {
        Self {
            distributor: state.distributor.clone(),
            history: state.history.clone(),
            shutdown: state.shutdown.clone(),
            max_subscriptions: state.limits.max_subscriptions,
            metrics: state.metrics.clone(),
            rotate_after: state.stream_rotation,
        }
    }
}

/// A built, not yet running, rowcast.
#[derive(Debug)]
pub struct App {
    tcp: TcpListener,
    /// The HTTPS listener, when TLS is configured.
    https: Option<Https>,
    router: Router,
    /// What the plain listener serves: the router, or redirects to HTTPS.
    plain_router: Router,
    connections: Connections,
    pools: Pools,
    config: Config,
    shutdown: Shutdown,
    embedded: Option<EmbeddedPostgres>,
}

/// The HTTPS listener and its certificate.
#[derive(Debug)]
struct Https {
    tcp: TcpListener,
    tls: ServerTls,
}

/// Binds `address`, naming it when that fails.
async fn bind(address: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

impl Https {
    /// Loads (or generates) the certificate, binds the HTTPS port and registers for SIGHUP, in
    /// that order: a bad file stops the start with the file named, before its port is taken.
    /// None when TLS is not configured. With ACME, serves the cached certificate, if any.
    async fn bind(settings: &TlsSettings) -> anyhow::Result<Option<(Self, Background)>> {
        let Some(tls) = ServerTls::from_settings(settings)? else {
            return Ok(None);
        };
        let acme = Renewal::new(&settings.acme, &tls)?;
        let tcp = bind(settings.listen).await?;
        let reload = tls
            .watch_sighup()
            .context("cannot watch SIGHUP for certificate reloads")?;
        Ok(Some((Self { tcp, tls }, Background { reload, acme })))
    }
}

/// The certificate's background tasks: SIGHUP reloads (files) or ACME renewal.
struct Background {
    reload: Option<SighupReload>,
    acme: Option<Renewal>,
}

/// What `App::build` starts once nothing can fail any more.
struct Start {
    pools: Pools,
    /// How the LISTEN task connects (parsed from the database URL).
    connect: ConnectOptions,
    /// The last seq committed before the start: the distributor publishes everything after it.
    position: Seq,
    /// With `--source replication`: where the reader connects and its slot's name.
    reader: Option<(PgTarget, ReplicationNames)>,
    /// The certificate reloads (TLS from files) or renewals (ACME), when TLS is on.
    background: Option<Background>,
    transport: TransportStats,
    tls: TlsWatch,
}

impl Start {
    /// Spawns the distributor and every background task (each under a named span), and returns
    /// the state the handlers share.
    fn spawn(self, config: &Config, access: &Access, shutdown: &Shutdown) -> AppState {
        let Self {
            pools,
            connect,
            position,
            reader,
            background,
            transport,
            tls,
        } = self;
        let distributor = DistributorHandle::<Frame>::spawn(
            config.limits,
            config.budgets,
            config.hardening.per_ip_limit_exempt.clone(),
            position,
        );
        // This App's own registry: nothing global, so in-process instances never mix numbers.
        let metrics = Metrics::new();
        let (handoff, inbox) = match reader {
            Some(_) => {
                let (sender, inbox) = listener::handoff();
                (Some(sender), Some(inbox))
            }
            None => (None, None),
        };
        let (listener, listener_status) = Listener::new(
            connect,
            config.listener,
            distributor.clone(),
            position,
            inbox,
            metrics.clone(),
        );
        shutdown.spawn(
            health::run_upkeep(metrics.clone(), shutdown.clone())
                .instrument(tracing::info_span!("metrics_upkeep")),
        );
        shutdown.spawn(
            listener
                .run(shutdown.clone())
                .instrument(tracing::info_span!("listener")),
        );
        if let Some(((target, names), handoff)) = reader.zip(handoff) {
            shutdown.spawn(
                Reader::new(
                    target,
                    names,
                    config.listener,
                    config.source.replication_commit,
                    handoff,
                    &metrics,
                )
                .run(shutdown.clone())
                .instrument(tracing::info_span!("replication_reader")),
            );
        }
        shutdown.spawn(
            memory::run_trimmer(distributor.clone(), shutdown.clone())
                .instrument(tracing::info_span!("memory_trimmer")),
        );
        shutdown.spawn(
            retention::run(pools.background.clone(), config.changelog, shutdown.clone())
                .instrument(tracing::info_span!("changelog_retention")),
        );
        shutdown.spawn(
            presence::run(
                pools.background.clone(),
                pools.presence_session.clone(),
                distributor.clone(),
                config.presence,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("presence")),
        );
        let Background { reload, acme } = background.unwrap_or(Background {
            reload: None,
            acme: None,
        });
        if let Some(acme) = acme {
            shutdown.spawn(
                acme.run(shutdown.clone())
                    .instrument(tracing::info_span!("acme_renewal")),
            );
        }
        if let Some(reload) = reload {
            shutdown.spawn(
                reload
                    .run(shutdown.clone())
                    .instrument(tracing::info_span!("tls_reload")),
            );
        }
        AppState(Arc::new(Shared {
            pool: pools.rest,
            history: pools.history,
            distributor,
            views: ViewsCache::default(),
            listener: listener_status,
            transport,
            tls,
            metrics,
            shutdown: shutdown.clone(),
            limits: config.limits,
            budgets: config.budgets,
            heartbeat: config.heartbeat,
            stream_rotation: access.stream_rotation(),
        }))
    }
}

/// Every route, its guards and limits, and the layers around them all.
fn router(state: AppState, access: &Access, hosts: AllowedHosts, config: &Config) -> Router {
    let hardening = &config.hardening;
    let metrics = state.metrics.clone();
    // Layers added later run first: the access guards refuse before a concurrency slot is
    // taken.
    let rest = hardening::limit_concurrency(
        api::router(config.limits.max_body_bytes),
        hardening.max_concurrent_requests,
    )
    .route_layer(from_fn_with_state(access.clone(), access::guard_requests));
    // With `--ops-token`, only dashboards and scrapers holding it; else like any read.
    let operations = Router::new()
        .merge(health::operations_router())
        .route_layer(from_fn_with_state(access.clone(), access::guard_operations));
    let websocket = hardening::limit_concurrency(
        // `any`: HTTP/2 WebSockets arrive as CONNECT (RFC 8441), HTTP/1.1 ones as GET.
        Router::new().route("/websocket", any(session::upgrade)),
        hardening.max_concurrent_upgrades,
    )
    .route_layer(from_fn_with_state(access.clone(), access::guard_websocket));
    let events = Router::new()
        .route("/products/events", get(sse::events))
        .route_layer(from_fn_with_state(
            access.clone(),
            access::guard_event_stream,
        ))
        // Added last, so it runs first: a request the handler would refuse (400) is refused
        // before the guard consumes its single-use ticket.
        .route_layer(from_fn_with_state(
            SseState::from_ref(&state),
            sse::check_request,
        ));
    let router = Router::new()
        .merge(rest)
        .merge(operations)
        .merge(websocket)
        .merge(events)
        // Probes never carry credentials.
        .merge(health::liveness_router())
        .merge(health::readiness_router())
        .with_state(state)
        .merge(access.routes())
        // Static pages and the API description: no data, so never guarded.
        .merge(crate::web::router())
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::method_not_allowed)
        // Around every route and the fallbacks, inside the outer layers so the refusal gets the
        // same security headers and JSON rewriting as any answer.
        .layer(from_fn_with_state(hosts, access::guard_host));
    hardening::outer_layers(
        router,
        config.limits.max_body_bytes,
        hardening.request_timeout,
        config.tls.http_redirect,
    )
    // Inside routing (`Router::layer` wraps each route), so the matched route is known.
    .layer(from_fn_with_state(metrics, health::time_requests))
    // Spans name the path only: WebSocket tickets travel in the query.
    .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(access::request_span))
    .layer(
        tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer::new([
            axum::http::header::AUTHORIZATION,
            axum::http::header::COOKIE,
        ]),
    )
    // The event-stream credential (`access`) travels out in `Set-Cookie`.
    .layer(
        tower_http::sensitive_headers::SetSensitiveResponseHeadersLayer::new([
            axum::http::header::SET_COOKIE,
        ]),
    )
}

/// What the plain HTTP listener serves: redirects to the HTTPS port `redirect_to`, when set,
/// else the router itself. Redirects are for rowcast's own names only, like everything else.
fn plain_router(router: &Router, hosts: AllowedHosts, redirect_to: Option<u16>) -> Router {
    match redirect_to {
        Some(port) => serve::redirect_to_https(port)
            // Load balancers probe health over plain HTTP and do not follow redirects.
            .route_service("/healthz", router.clone().into_service())
            .route_service("/readyz", router.clone().into_service())
            .layer(from_fn_with_state(hosts, access::guard_host)),
        None => router.clone(),
    }
}

impl App {
    /// Does everything that can fail — database, migrations, sockets, certificate, settings —
    /// and only then spawns the distributor and the background tasks, so a failed build leaves
    /// nothing running.
    pub async fn build(config: Config, shutdown: Shutdown) -> anyhow::Result<Self> {
        let (url, embedded) = database(&config).await?;
        let target = PgTarget::parse(&url)?;
        let pools = Pools::connect(
            &target,
            PoolSizes {
                rest: config.db_max_connections,
                history: config.history.connections,
                history_queue: config.history.queue,
                history_acquire_timeout: config.history.acquire_timeout,
            },
        )
        .await?;
        db::migrate_rest(&pools.rest).await?;
        let tcp = bind(config.listen).await?;
        let (https, background) = Https::bind(&config.tls).await?.unzip();
        let redirect_to = match &https {
            Some(https) if config.tls.http_redirect => Some(https.tcp.local_addr()?.port()),
            _ => None,
        };
        let access = Access::from_settings(&config.access, pools.rest.clone())?;
        // The configured addresses, not the bound ones: the same IPs, known before TLS binds.
        let listening: Vec<SocketAddr> = std::iter::once(config.listen)
            .chain(config.tls.enabled().then_some(config.tls.listen))
            .collect();
        let hosts = AllowedHosts::from_settings(&config.access, &listening);
        let connect = ConnectOptions::new(&target, &config.listener);
        // The source: notify refuses a database the reader writes; replication checks the
        // server and creates the publication now, so a missing privilege stops the start.
        let reader = match config.source.source {
            Source::Notify => {
                if config.source.replication_commit == ReplicationCommit::Async {
                    tracing::warn!(
                        "--replication-commit async has no effect with --source notify: \
                         the trigger's changelog rows commit with the writer's transaction"
                    );
                }
                db::replication::ensure_notify_mode(&pools.background).await?;
                None
            }
            Source::Replication => {
                let names = replication_names(&config, &target)?;
                db::replication::check_wal_level(&pools.background).await?;
                let session = db::replication::session(&target, "rowcast").await?;
                db::replication::ensure_publication(&session.client, &names)
                    .await
                    .context("creating the publication for --source replication")?;
                Some((target.clone(), names))
            }
        };
        // Everything committed after this position is published, by notification or by the
        // listener's catch-up from the changelog.
        let position = changelog::latest_seq(&pools.background).await?;

        // Nothing below fails.
        let connections = Connections::new(&config.hardening);
        let start = Start {
            pools: pools.clone(),
            connect,
            position,
            reader,
            tls: TlsWatch::new(
                https.as_ref().map(|https| &https.tls),
                background.as_ref().and_then(|tasks| tasks.acme.as_ref()),
            ),
            background,
            transport: connections.stats(),
        };
        let state = start.spawn(&config, &access, &shutdown);
        let router = router(state, &access, hosts.clone(), &config);
        let plain_router = plain_router(&router, hosts, redirect_to);
        Ok(Self {
            tcp,
            https,
            router,
            plain_router,
            connections,
            pools,
            config,
            shutdown,
            embedded,
        })
    }

    /// The bound address (tests bind port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The HTTPS listener's bound address, when TLS is configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.https
            .as_ref()
            .and_then(|https| https.tcp.local_addr().ok())
    }

    /// SHA-256 fingerprint of the certificate served now, when TLS is configured.
    pub fn tls_fingerprint(&self) -> Option<String> {
        self.https.as_ref().map(|https| https.tls.fingerprint())
    }

    /// Serves until the shutdown is triggered, then closes sessions (1001), waits up to the
    /// grace period, and stops the embedded cluster.
    pub async fn run(self) -> anyhow::Result<()> {
        let Self {
            tcp,
            https,
            router,
            plain_router,
            connections,
            pools,
            config,
            shutdown,
            embedded,
        } = self;
        tracing::info!(address = %tcp.local_addr()?, "rowcast listening (HTTP)");
        let plain = serve::serve(
            tcp,
            None,
            plain_router,
            connections.clone(),
            shutdown.clone(),
        );
        let secure = async {
            if let Some(Https { tcp, tls }) = https {
                tracing::info!(address = %tcp.local_addr()?, "rowcast listening (HTTPS)");
                let handshake = Handshake {
                    acceptor: tls.acceptor(),
                    timeout: config.tls.handshake_timeout,
                };
                serve::serve(tcp, Some(handshake), router, connections, shutdown.clone()).await;
            }
            anyhow::Ok(())
        };
        let serve = async {
            let ((), secure) = tokio::join!(plain, secure);
            secure
        };
        // One grace period from the moment shutdown begins, shared by open HTTP requests and
        // sessions (each used to get its own, so shutdown could take twice the grace).
        let grace = config.shutdown_grace;
        let mut serve = std::pin::pin!(serve);
        let served = tokio::select! {
            result = &mut serve => Some(result),
            () = shutdown.cancelled() => None,
        };
        let deadline = tokio::time::Instant::now() + grace;
        let served = match served {
            Some(result) => Some(result),
            None => tokio::time::timeout_at(deadline, &mut serve).await.ok(),
        };
        match served {
            Some(result) => result.context("HTTP server failed")?,
            None => {
                tracing::warn!("HTTP requests still open after the grace period; closing them");
            }
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if !shutdown.wait(left).await {
            tracing::warn!("some sessions did not finish within the grace period");
        }
        pools.close().await;
        if let Some(cluster) = embedded {
            cluster.stop().await?;
        }
        tracing::info!("rowcast stopped");
        Ok(())
    }
}
