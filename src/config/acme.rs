//! `--acme-*`: certificates obtained and renewed automatically from an ACME CA (Let's Encrypt
//! by default). Flattened into [`super::TlsSettings`]; `--acme-domain` is one of its certificate
//! sources. Imports nothing of ours but the duration parser.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::parse_duration;

/// Let's Encrypt's production directory: the CA most servers use, and free.
pub(super) const DEFAULT_ACME_DIRECTORY: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Renew 30 days before expiry, as Let's Encrypt advises for its 90-day certificates: a third of
/// the lifetime leaves weeks of retries if the CA is down.
pub(super) const DEFAULT_ACME_RENEW_BEFORE: &str = "30d";
/// Relative to the working directory, like the embedded cluster's data: a service manager
/// normally sets an absolute one.
pub(super) const DEFAULT_ACME_CACHE_DIR: &str = "acme-cache";

/// Automatic HTTPS certificates over ACME (TLS-ALPN-01 on the HTTPS listener).
#[derive(Debug, Clone, Args)]
pub struct AcmeSettings {
    /// Domain to obtain a certificate for over ACME (repeatable, or comma-separated in the
    /// variable). The CA validates it with TLS-ALPN-01 on the HTTPS listener, which must then be
    /// reachable on port 443 under that name.
    #[arg(
        long = "acme-domain",
        env = "ROWCAST_ACME_DOMAINS",
        value_delimiter = ',',
        group = "tls_source"
    )]
    pub domains: Vec<String>,

    /// The ACME directory URL of the CA.
    #[arg(long = "acme-directory", env = "ROWCAST_ACME_DIRECTORY", default_value = DEFAULT_ACME_DIRECTORY)]
    pub directory: String,

    /// Contact e-mail for the ACME account (expiry notices).
    #[arg(long = "acme-email", env = "ROWCAST_ACME_EMAIL")]
    pub email: Option<String>,

    /// Where the account key, the certificate and its key are kept (files 0600), reused across
    /// restarts so that a restart does not ask the CA again.
    #[arg(long = "acme-cache-dir", env = "ROWCAST_ACME_CACHE_DIR", default_value = DEFAULT_ACME_CACHE_DIR)]
    pub cache_dir: PathBuf,

    /// Extra root certificate (PEM) to trust for the ACME server's own HTTPS, e.g. a test CA's;
    /// when given, only this root is trusted for it.
    #[arg(long = "acme-directory-ca", env = "ROWCAST_ACME_DIRECTORY_CA")]
    pub directory_ca: Option<PathBuf>,

    /// Renew the certificate this long before it expires.
    #[arg(long = "acme-renew-before", env = "ROWCAST_ACME_RENEW_BEFORE",
          default_value = DEFAULT_ACME_RENEW_BEFORE, value_parser = parse_duration)]
    pub renew_before: Duration,
}
