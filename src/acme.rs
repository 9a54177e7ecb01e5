//! Automatic HTTPS certificates from an ACME CA (RFC 8555), like certmagic: owns the cache
//! directory (account credentials, certificate chain, its key; files 0600), the orders, the
//! TLS-ALPN-01 challenge certificates, and the renewal task with its counters.
//!
//! The challenge is TLS-ALPN-01 (RFC 8737) on the HTTPS listener: the CA connects to the
//! domain's port 443 offering ALPN `acme-tls/1`, and `tls` answers from the challenge map this
//! module fills. That needs no route on the plain listener (which may be redirecting, or not be
//! on port 80) and nothing in the serve loop: the certificate resolver answers during the
//! handshake.
//!
//! A certificate is swapped in through [`ServerTls::install`], as the SIGHUP reload does, so
//! open connections keep theirs. A failed order is logged and retried with backoff while the old
//! certificate keeps serving. [`TlsWatch`] is what `health` reads for `/stats` and `/metrics`.
//! Imports `config`, `tls` and `shutdown`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::AcmeSettings;
use crate::shutdown::Shutdown;
use crate::tls::ServerTls;

/// First wait after a failed order; doubled per failure up to [`MAX_BACKOFF`]. A second is
/// enough for a CA that blipped, and keeps tests short.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between failed orders: Let's Encrypt allows 5 failed validations per hour per
/// name, so retrying more often than hourly only burns that budget.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);
/// Shortest wait after a success, even when the new certificate is already inside the renewal
/// window (a lifetime shorter than `--acme-renew-before`): renewing in a loop would hit the CA's
/// rate limits.
const MIN_AFTER_SUCCESS: Duration = Duration::from_secs(3600);
/// How long to wait for the CA to validate and to issue.
const ORDER_TIMEOUT: Duration = Duration::from_secs(60);

/// RFC 8555 §6.7: the request's account key is not registered with the CA.
const ACCOUNT_GONE: &str = "urn:ietf:params:acme:error:accountDoesNotExist";

const ACCOUNT_FILE: &str = "account.json";
const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";

/// Why obtaining or loading a certificate failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// A cache file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA refused or could not be reached.
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// The cached account credentials do not parse.
    #[error("account credentials in {path}: {source}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A key or CSR could not be generated.
    #[error("cannot generate a key or CSR: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM certificate or key (cached or issued) does not parse.
    #[error("unreadable PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// The issued or cached certificate is unusable with its key, or not X.509.
    #[error("unusable certificate: {0}")]
    Certificate(String),
    /// The CA offered no TLS-ALPN-01 challenge for a name.
    #[error("the CA offers no tls-alpn-01 challenge for {0}")]
    NoChallenge(String),
    /// An authorization or the order ended in another state than expected.
    #[error("order not ready: {0}")]
    Order(String),
}

/// Renewal counters, shared with `/stats` and `/metrics`.
#[derive(Debug, Default)]
pub struct AcmeStatus {
    /// Orders started.
    pub attempts: AtomicU64,
    /// Orders that failed.
    pub failures: AtomicU64,
    /// Unix seconds when the served ACME certificate expires (0: none yet).
    pub expiry_unix: AtomicU64,
    /// The last failure, cleared by a success.
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// The renewal task, built by [`Renewal::new`] (which installs a cached certificate) and run by
/// `app` once everything that can fail has been built.
#[derive(Debug)]
pub struct Renewal {
    settings: AcmeSettings,
    /// `--acme-cache-dir/<key>`: see [`cache_key`].
    cache: PathBuf,
    tls: ServerTls,
    status: Arc<AcmeStatus>,
    /// When the served ACME certificate expires; None until one is served.
    expiry: Option<SystemTime>,
}

impl Renewal {
    /// None without `--acme-domain`. Creates the cache directory and serves its certificate, if
    /// it holds one for these domains, so that a restart does not ask the CA.
    pub fn new(settings: &AcmeSettings, tls: &ServerTls) -> Result<Option<Self>, AcmeError> {
        if settings.domains.is_empty() {
            return Ok(None);
        }
        let cache = settings.cache_dir.join(cache_key(settings));
        create_private_dir(&settings.cache_dir)?;
        create_private_dir(&cache)?;
        let mut renewal = Self {
            settings: settings.clone(),
            cache: cache.clone(),
            tls: tls.clone(),
            status: Arc::default(),
            expiry: None,
        };
        let cert = cache.join(CERT_FILE);
        let key = cache.join(KEY_FILE);
        if cert.exists() && key.exists() {
            match load_cached(&cert, &key, tls.crypto_provider()) {
                Ok((certified, expiry)) => {
                    tracing::info!(cert = %cert.display(), "serving the cached ACME certificate");
                    renewal.serve(certified, expiry);
                }
                // A damaged cache is not fatal: a new order replaces it.
                Err(err) => tracing::warn!(cause = %err, "ignoring the cached ACME certificate"),
            }
        }
        Ok(Some(renewal))
    }

    /// The counters `/stats` and `/metrics` read.
    pub fn status(&self) -> Arc<AcmeStatus> {
        self.status.clone()
    }

    fn serve(&mut self, key: CertifiedKey, expiry: SystemTime) {
        self.tls.install(key);
        self.expiry = Some(expiry);
        let unix = expiry
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.status.expiry_unix.store(unix, Ordering::Relaxed);
    }

    /// How long until the certificate is due for renewal (zero: now).
    fn until_due(&self) -> Duration {
        let Some(expiry) = self.expiry else {
            return Duration::ZERO;
        };
        let due = expiry
            .checked_sub(self.settings.renew_before)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        due.duration_since(SystemTime::now()).unwrap_or_default()
    }

    /// Obtains a certificate when none is served or the served one is due, until shutdown.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let wait = self.until_due();
            if !wait.is_zero() {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(wait) => {}
                }
            }
            self.status.attempts.fetch_add(1, Ordering::Relaxed);
            let outcome = tokio::select! {
                () = shutdown.cancelled() => return,
                outcome = self.obtain() => outcome,
            };
            let pause = match outcome {
                Ok((key, expiry)) => {
                    self.serve(key, expiry);
                    *lock(&self.status.last_error) = None;
                    backoff = MIN_BACKOFF;
                    tracing::info!(
                        sha256_fingerprint = %self.tls.fingerprint(),
                        expires = %humantime::format_rfc3339_seconds(expiry),
                        "ACME certificate installed; new connections use it"
                    );
                    // The loop then sleeps until the new certificate is due.
                    if self.until_due().is_zero() {
                        MIN_AFTER_SUCCESS
                    } else {
                        Duration::ZERO
                    }
                }
                Err(err) => {
                    self.status.failures.fetch_add(1, Ordering::Relaxed);
                    *lock(&self.status.last_error) = Some(err.to_string());
                    tracing::error!(
                        cause = %err,
                        retry_in = ?backoff,
                        "ACME order failed; still serving the previous certificate"
                    );
                    let pause = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    pause
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// One order: account, TLS-ALPN-01 for every name, CSR, certificate; cached on success.
    async fn obtain(&self) -> Result<(CertifiedKey, SystemTime), AcmeError> {
        let account = self.account().await?;
        let identifiers: Vec<Identifier> = self
            .settings
            .domains
            .iter()
            .map(|name| Identifier::Dns(name.clone()))
            .collect();
        let new_order = NewOrder::new(&identifiers);
        let mut order = match account.new_order(&new_order).await {
            Err(instant_acme::Error::Api(problem))
                if problem.r#type.as_deref() == Some(ACCOUNT_GONE) =>
            {
                // The CA no longer knows the cached account (deactivated, or a test CA that
                // was reset): register a new one rather than fail forever.
                tracing::warn!("the CA does not know the cached ACME account; creating a new one");
                let path = self.cache.join(ACCOUNT_FILE);
                std::fs::remove_file(&path).map_err(|source| AcmeError::Io { path, source })?;
                self.account().await?.new_order(&new_order).await?
            }
            other => other?,
        };
        // Removes the challenge certificates however this order ends.
        let _cleanup = ChallengeCleanup {
            tls: &self.tls,
            names: &self.settings.domains,
        };
        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization?;
            match authorization.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(AcmeError::Order(format!("authorization {other:?}"))),
            }
            let name = authorization.identifier().to_string();
            let mut challenge = authorization
                .challenge(ChallengeType::TlsAlpn01)
                .ok_or_else(|| AcmeError::NoChallenge(name.clone()))?;
            let certified = challenge_key(
                &name,
                challenge.key_authorization().digest().as_ref(),
                self.tls.crypto_provider(),
            )?;
            self.tls.set_challenge(&name, Some(certified));
            challenge.set_ready().await?;
        }
        let retries = RetryPolicy::new().timeout(ORDER_TIMEOUT);
        let status = order.poll_ready(&retries).await?;
        if status != OrderStatus::Ready {
            return Err(AcmeError::Order(format!("{status:?}")));
        }
        let key_pair = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(self.settings.domains.clone())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let csr = params.serialize_request(&key_pair)?;
        order.finalize_csr(csr.der()).await?;
        let chain_pem = order.poll_certificate(&retries).await?;
        let key_pem = key_pair.serialize_pem();
        let (certified, expiry) = parse(&chain_pem, &key_pem, self.tls.crypto_provider())?;
        let dir = &self.cache;
        write_private(&dir.join(KEY_FILE), key_pem.as_bytes())?;
        write_private(&dir.join(CERT_FILE), chain_pem.as_bytes())?;
        Ok((certified, expiry))
    }

    /// The cached account, or a new one (then cached).
    async fn account(&self) -> Result<Account, AcmeError> {
        let builder = || match &self.settings.directory_ca {
            Some(root) => Account::builder_with_root(root),
            None => Account::builder(),
        };
        let path = self.cache.join(ACCOUNT_FILE);
        if let Ok(json) = std::fs::read(&path) {
            let credentials: AccountCredentials =
                serde_json::from_slice(&json).map_err(|source| AcmeError::Credentials {
                    path: path.clone(),
                    source,
                })?;
            return Ok(builder()?.from_credentials(credentials).await?);
        }
        let contact = self
            .settings
            .email
            .as_ref()
            .map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();
        let (account, credentials) = builder()?
            .create(
                &NewAccount {
                    contact: &contacts,
                    terms_of_service_agreed: true,
                    only_return_existing: false,
                },
                self.settings.directory.clone(),
                None,
            )
            .await?;
        let json = serde_json::to_vec(&credentials).map_err(|source| AcmeError::Credentials {
            path: path.clone(),
            source,
        })?;
        write_private(&path, &json)?;
        Ok(account)
    }
}

/// The cache subdirectory for this CA and set of names: switching from a staging directory to
/// production, or changing the names, must not serve (or reuse the account of) the other one.
fn cache_key(settings: &AcmeSettings) -> String {
    let mut names: Vec<String> = settings
        .domains
        .iter()
        .map(|name| name.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let identity = format!("{}\n{}", settings.directory, names.join("\n"));
    let digest = ring::digest::digest(&ring::digest::SHA256, identity.as_bytes());
    // 16 bytes: collisions between one operator's configurations are not a concern.
    digest.as_ref()[..16]
        .iter()
        .fold(String::with_capacity(32), |mut hex, byte| {
            use std::fmt::Write as _;
            let _ = write!(hex, "{byte:02x}");
            hex
        })
}

struct ChallengeCleanup<'a> {
    tls: &'a ServerTls,
    names: &'a [String],
}

impl Drop for ChallengeCleanup<'_> {
    fn drop(&mut self) {
        for name in self.names {
            self.tls.set_challenge(name, None);
        }
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoned only by a panic while assigning a String: the value is still whole.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The RFC 8737 challenge certificate: self-signed for `name`, with the critical acmeIdentifier
/// extension holding the SHA-256 of the key authorization.
fn challenge_key(
    name: &str,
    digest: &[u8],
    provider: &CryptoProvider,
) -> Result<CertifiedKey, AcmeError> {
    let key_pair = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key_pair)?;
    let key = PrivateKeyDer::Pkcs8(key_pair.serialize_der().into());
    // Not `CertifiedKey::from_der`: its key check parses the certificate with webpki, which
    // refuses the critical acmeIdentifier extension this certificate exists to carry.
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|err| AcmeError::Certificate(err.to_string()))?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing_key))
}

fn load_cached(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, SystemTime), AcmeError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| AcmeError::Io {
            path: path.to_owned(),
            source,
        })
    };
    parse(&read(cert)?, &read(key)?, provider)
}

/// A PEM chain (leaf first) and key into a certified key, with the leaf's expiry.
fn parse(
    chain_pem: &str,
    key_pem: &str,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, SystemTime), AcmeError> {
    let chain =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let leaf = chain
        .first()
        .ok_or_else(|| AcmeError::Certificate("no certificate in the chain".into()))?;
    let expiry = not_after(leaf)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let certified = CertifiedKey::from_der(chain, key, provider)
        .map_err(|err| AcmeError::Certificate(err.to_string()))?;
    Ok((certified, expiry))
}

/// The leaf's notAfter.
pub fn not_after(leaf: &CertificateDer<'_>) -> Result<SystemTime, AcmeError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|err| AcmeError::Certificate(err.to_string()))?;
    let seconds = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
}

fn create_private_dir(dir: &Path) -> Result<(), AcmeError> {
    let io = |source| AcmeError::Io {
        path: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

/// Writes a secret: created 0600 (never readable by others, even for a moment), then renamed
/// over the old file so that a crash leaves the old or the new file, not half of one.
fn write_private(path: &Path, contents: &[u8]) -> Result<(), AcmeError> {
    use std::io::Write as _;
    let io = |source| AcmeError::Io {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(&temporary).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

/// What `/stats` and `/metrics` read about the served certificate; cheap to clone. Empty
/// without TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsWatch {
    tls: Option<ServerTls>,
    acme: Option<Arc<AcmeStatus>>,
}

/// `tls` in `/stats`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSnapshot {
    /// When the served certificate expires, in Unix seconds.
    certificate_expiry_unix: Option<u64>,
    /// SHA-256 of the served leaf (`AB:CD:…`).
    sha256_fingerprint: String,
    /// Renewal state, with `--acme-domain`.
    acme: Option<AcmeSnapshot>,
}

/// `tls.acme` in `/stats`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AcmeSnapshot {
    /// Orders started (the first certificate and every renewal or retry).
    pub renewal_attempts: u64,
    /// Orders that failed.
    pub renewal_failures: u64,
    /// Why the last order failed; null once one succeeded.
    pub last_renewal_error: Option<String>,
}

impl TlsWatch {
    /// Watches `tls` and, with ACME, the renewal counters.
    pub fn new(tls: Option<&ServerTls>, acme: Option<&Renewal>) -> Self {
        Self {
            tls: tls.cloned(),
            acme: acme.map(Renewal::status),
        }
    }

    /// The state now; None without TLS.
    pub fn snapshot(&self) -> Option<TlsSnapshot> {
        let tls = self.tls.as_ref()?;
        let expiry = not_after(&tls.leaf()).ok().and_then(|expiry| {
            let since = expiry.duration_since(SystemTime::UNIX_EPOCH).ok()?;
            Some(since.as_secs())
        });
        Some(TlsSnapshot {
            certificate_expiry_unix: expiry,
            sha256_fingerprint: tls.fingerprint(),
            acme: self.acme.as_ref().map(|status| AcmeSnapshot {
                renewal_attempts: status.attempts.load(Ordering::Relaxed),
                renewal_failures: status.failures.load(Ordering::Relaxed),
                last_renewal_error: lock(&status.last_error).clone(),
            }),
        })
    }
}

impl TlsSnapshot {
    /// When the served certificate expires, in Unix seconds.
    pub fn certificate_expiry_unix(&self) -> Option<u64> {
        self.certificate_expiry_unix
    }

    /// Renewal state, with `--acme-domain`.
    pub fn acme(&self) -> Option<&AcmeSnapshot> {
        self.acme.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> AcmeSettings {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(
            std::iter::once("rowcast").chain(args.iter().copied()),
        )
        .unwrap();
        cli.config.tls.acme
    }

    #[test]
    fn the_cache_is_per_directory_and_set_of_names() {
        let key = |args: &[&str]| cache_key(&settings(args));
        let base = key(&["--acme-domain", "a.example", "--acme-domain", "B.example"]);
        assert_eq!(base, key(&["--acme-domain", "b.example,a.example"]));
        assert_ne!(base, key(&["--acme-domain", "a.example"]));
        assert_ne!(
            base,
            key(&[
                "--acme-domain",
                "a.example,b.example",
                "--acme-directory",
                "https://acme-staging-v02.api.letsencrypt.org/directory",
            ])
        );
    }

    #[test]
    fn the_challenge_certificate_carries_the_critical_acme_identifier() {
        let provider = rustls::crypto::ring::default_provider();
        let key = challenge_key("example.com", &[7; 32], &provider).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).unwrap();
        // id-pe-acmeIdentifier, RFC 8737 §3.
        let extension = cert
            .extensions()
            .iter()
            .find(|ext| ext.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(extension.critical);
        assert!(extension.value.ends_with(&[7; 32]));
    }
}
