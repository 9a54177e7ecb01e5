//! How the LISTEN task connects: its LISTEN connection (tokio-postgres, which yields
//! notifications) and the connection of its changelog reads (sqlx, the queries clients' resumes
//! use), both from the pools' parse of the database URL with the same TLS rules.

use std::time::Duration;

use super::ConnectionEnded;
use crate::config::ListenerSettings;
use crate::db::{PgTarget, tls::MakeRustlsConnect};

/// How the LISTEN connection connects: the parsed database URL (the pools' own [`PgTarget`],
/// TLS included) with the listener's name, timeouts and keepalives.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    target: PgTarget,
    /// The changelog reads' connection: the pools' options, named `rowcast-listener-reads`.
    reads: sqlx::postgres::PgConnectOptions,
    /// How long opening the reads' connection may take.
    reads_timeout: Duration,
}

impl ConnectOptions {
    /// The LISTEN connection to `target`.
    pub fn new(target: &PgTarget, settings: &ListenerSettings) -> Self {
        let mut config = target.listen_config();
        config
            .application_name("rowcast-listener")
            .connect_timeout(settings.health_timeout)
            .keepalives(true)
            .keepalives_idle(settings.health_interval)
            .keepalives_interval(Duration::from_secs(1))
            .keepalives_retries(3);
        Self {
            config,
            tls: target.connector(),
            target: target.clone(),
            reads: target
                .pool_options()
                .application_name("rowcast-listener-reads"),
            reads_timeout: settings.health_timeout,
        }
    }

    pub(super) async fn connect_reads(&self) -> Result<sqlx::PgConnection, ConnectionEnded> {
        use sqlx::ConnectOptions as _;
        match tokio::time::timeout(self.reads_timeout, self.reads.connect()).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(err)) => Err(ConnectionEnded::ReadConnection(err)),
            Err(_) => Err(ConnectionEnded::ReadConnectionTimeout(self.reads_timeout)),
        }
    }

    pub(super) async fn connect(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<
                tokio_postgres::Socket,
                crate::db::tls::RustlsStream<tokio_postgres::Socket>,
            >,
        ),
        ConnectionEnded,
    > {
        self.config.connect(self.tls.clone()).await.map_err(|err| {
            match self.target.describe_tls_failure(&err) {
                Some(message) => ConnectionEnded::Tls {
                    message,
                    source: err,
                },
                None => ConnectionEnded::Connect(err),
            }
        })
    }
}
