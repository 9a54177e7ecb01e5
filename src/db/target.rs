//! The database URL, parsed once: [`PgTarget`] is the one source of truth the pools (sqlx) and
//! the LISTEN connection (tokio-postgres) both connect from, so they cannot disagree on host,
//! user, database or TLS.
//!
//! sqlx parses the URL (it reads every libpq parameter rowcast supports, `sslmode` with all six
//! values, `sslrootcert`, `sslcert`, `sslkey`, the `PG*` environment and `.pgpass`); the
//! listener's configuration is then derived from sqlx's parsed options, never from the URL text
//! (tokio-postgres would reject `sslrootcert` and `verify-full` anyway).
//!
//! `sslmode`, for both connections:
//!
//! | sslmode        | TLS                              | verifies                          |
//! |----------------|----------------------------------|-----------------------------------|
//! | `disable`      | never                            | —                                 |
//! | `allow`        | never (as sqlx; libpq would try TLS after a refusal) | —              |
//! | `prefer`       | if the server offers it, else plain text | nothing (as libpq without a root) |
//! | `require`      | always; fails if the server has none | nothing                        |
//! | `verify-ca`    | always                           | chain to `sslrootcert` (or Mozilla roots) |
//! | `verify-full`  | always                           | chain and host name               |
//!
//! Under `verify-ca` the pools check the name too: sqlx 0.8.6's verifier forgives only rustls's
//! old `NotValidForName`, not the `NotValidForNameContext` rustls 0.23 reports (see README).
//! The listener's verifier forgives both.
//!
//! Imports `db::tls` only.

use std::path::PathBuf;
use std::str::FromStr;

use pgwire_replication::{ReplicationConfig, SslMode, TlsConfig};
use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgSslMode};

use super::DbError;
use super::tls::{self, MakeRustlsConnect, TlsFiles, Verify};

/// Where the database is and how to talk to it, parsed once from the database URL.
#[derive(Debug, Clone)]
pub struct PgTarget {
    /// sqlx's parse of the URL: the pools connect with these.
    options: PgConnectOptions,
    /// The LISTEN connection's configuration, derived from `options`.
    listen: tokio_postgres::Config,
    /// The LISTEN connection's TLS, built from the same `sslmode` and files as the pools'.
    connector: MakeRustlsConnect,
    /// For error messages: the host (or socket directory) connected to.
    host: String,
    /// For error messages: the `sslmode` asked for, as written in URLs.
    sslmode: &'static str,
    /// For error messages: the `sslrootcert` given, if any.
    root_cert: Option<PathBuf>,
    /// The TLS files, for the replication stream's own TLS settings.
    files: TlsFiles,
}

impl PgTarget {
    /// Parses `url` (libpq URL syntax) and loads the TLS files it names, so that a missing or bad
    /// certificate is reported at start, before anything connects.
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let options = PgConnectOptions::from_str(url).map_err(DbError::InvalidUrl)?;
        // The rendering of sqlx's parse carries the two things sqlx has no getter for: the
        // password and the TLS file paths.
        let canonical = options.to_url_lossy();
        let file = |name: &'static str| -> Result<Option<PathBuf>, DbError> {
            let Some((_, value)) = canonical.query_pairs().find(|(key, _)| key == name) else {
                return Ok(None);
            };
            // sqlx renders a file as "file: <path>"; anything else is PEM text written into
            // the URL itself, which the LISTEN connection does not take.
            match value.strip_prefix("file: ") {
                Some(path) => Ok(Some(PathBuf::from(path))),
                None => Err(DbError::TlsSetup(tls::TlsSetupError::InlinePem(name))),
            }
        };
        let files = TlsFiles {
            root_cert: file("sslrootcert")?,
            client_cert: file("sslcert")?,
            client_key: file("sslkey")?,
        };
        let (mode, verify, sslmode) = match options.get_ssl_mode() {
            PgSslMode::Disable => (tokio_postgres::config::SslMode::Disable, None, "disable"),
            PgSslMode::Allow => (tokio_postgres::config::SslMode::Disable, None, "allow"),
            PgSslMode::Prefer => (
                tokio_postgres::config::SslMode::Prefer,
                Some(Verify::Nothing),
                "prefer",
            ),
            PgSslMode::Require => (
                tokio_postgres::config::SslMode::Require,
                Some(Verify::Nothing),
                "require",
            ),
            PgSslMode::VerifyCa => (
                tokio_postgres::config::SslMode::Require,
                Some(Verify::Chain),
                "verify-ca",
            ),
            PgSslMode::VerifyFull => (
                tokio_postgres::config::SslMode::Require,
                Some(Verify::ChainAndName),
                "verify-full",
            ),
        };
        // Without TLS the connector is never asked for a handshake; it is still built (with the
        // laxest check) so that the listener has one type of connector in every mode.
        let client = tls::client_config(verify.unwrap_or(Verify::Nothing), &files)
            .map_err(DbError::TlsSetup)?;

        let mut listen = tokio_postgres::Config::new();
        let host = match options.get_socket() {
            Some(dir) => {
                listen.host_path(dir);
                dir.display().to_string()
            }
            None => {
                listen.host(options.get_host());
                options.get_host().to_owned()
            }
        };
        listen
            .port(options.get_port())
            .user(options.get_username())
            .ssl_mode(mode);
        if let Some(database) = options.get_database() {
            listen.dbname(database);
        }
        if let Some(password) = canonical.password() {
            let password = percent_encoding::percent_decode_str(password).decode_utf8_lossy();
            listen.password(password.as_bytes());
        }
        if let Some(extra) = options.get_options() {
            listen.options(extra);
        }
        Ok(Self {
            options,
            listen,
            connector: MakeRustlsConnect::new(client),
            host,
            sslmode,
            root_cert: files.root_cert.clone(),
            files,
        })
    }

    /// What the pools connect with (each sets its own `application_name`).
    pub fn pool_options(&self) -> PgConnectOptions {
        self.options.clone()
    }

    /// What the LISTEN connection connects with (the listener adds its name and timeouts).
    pub fn listen_config(&self) -> tokio_postgres::Config {
        self.listen.clone()
    }

    /// The LISTEN connection's TLS connector.
    pub fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }

    /// The replication stream's connection (`--source replication`): same host, user, password,
    /// database and `sslmode`/files as the pools. `pgwire-replication` verifies with its own
    /// rustls (ring) setup; `prefer` and `allow` map to its `Prefer` and `Disable`.
    pub fn replication_config(&self, slot: &str, publication: &str) -> ReplicationConfig {
        let host = self
            .listen
            .get_hosts()
            .first()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(dir) => dir.display().to_string(),
            })
            .unwrap_or_else(|| self.host.clone());
        let password = self
            .listen
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let mode = match self.sslmode {
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => SslMode::Disable,
        };
        let mut tls = TlsConfig {
            mode,
            ca_pem_path: self.files.root_cert.clone(),
            ..TlsConfig::default()
        };
        if let (Some(cert), Some(key)) = (&self.files.client_cert, &self.files.client_key) {
            tls = tls.with_client_cert(cert, key);
        }
        let mut config = ReplicationConfig::new(
            host,
            self.listen.get_user().unwrap_or_default(),
            password,
            self.listen.get_dbname().unwrap_or_default(),
            slot,
            publication,
        )
        .with_port(self.listen.get_ports().first().copied().unwrap_or(5432))
        .with_tls(tls);
        if let Some(options) = self.listen.get_options() {
            config = config.with_options(options);
        }
        config
    }

    /// The database's name (the default replication name is made from it).
    pub fn database(&self) -> &str {
        self.listen.get_dbname().unwrap_or_default()
    }

    /// A TLS failure connecting to this target in plain words, or None when `err` is not one.
    pub fn describe_tls_failure(&self, err: &(dyn std::error::Error + 'static)) -> Option<String> {
        tls::describe_failure(err, &self.host, self.sslmode, self.root_cert.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_follows_the_parsed_url() {
        let target =
            PgTarget::parse("postgres://app:p%40ss@db.example:6543/shop?sslmode=require").unwrap();
        let listen = target.listen_config();
        assert_eq!(listen.get_user(), Some("app"));
        assert_eq!(listen.get_password(), Some(&b"p@ss"[..]));
        assert_eq!(listen.get_dbname(), Some("shop"));
        assert_eq!(listen.get_ports(), [6543]);
        assert_eq!(
            listen.get_hosts(),
            [tokio_postgres::config::Host::Tcp("db.example".into())]
        );
        assert_eq!(
            listen.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert!(matches!(
            target.pool_options().get_ssl_mode(),
            PgSslMode::Require
        ));
    }

    #[test]
    fn verify_modes_require_tls_on_the_listener() {
        for mode in ["verify-ca", "verify-full"] {
            let target = PgTarget::parse(&format!("postgres://u@h/d?sslmode={mode}")).unwrap();
            assert_eq!(
                target.listen_config().get_ssl_mode(),
                tokio_postgres::config::SslMode::Require
            );
        }
        let target = PgTarget::parse("postgres://u@h/d?sslmode=disable").unwrap();
        assert_eq!(
            target.listen_config().get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
    }

    #[test]
    fn a_missing_root_certificate_is_reported_at_parse() {
        let err =
            PgTarget::parse("postgres://u@h/d?sslmode=verify-full&sslrootcert=/nonexistent.pem")
                .unwrap_err();
        assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    }
}
