//! TLS for the HTTPS listener: the rustls `ServerConfig` (TLS 1.2 and 1.3 only, rustls's
//! forward-secret AEAD suites only, ALPN `h2` then `http/1.1`), certificate loading from PEM
//! files, the self-signed development certificate, and reloading the certificate on SIGHUP.
//!
//! The certificate sits behind [`ReloadableCert`], a resolver the `ServerConfig` asks on every
//! handshake: a reload swaps the certified key for new handshakes only, so connections that are
//! open (and the WebSockets on them) are not touched. A reload that fails (missing file, key that
//! does not match) logs the cause and keeps serving the old certificate.
//!
//! With `--acme-domain` the certificate comes from the `acme` module, which swaps it in through
//! [`ServerTls::install`] exactly as a reload does, and answers TLS-ALPN-01 (RFC 8737)
//! validations through [`ServerTls::set_challenge`]: a handshake offering only `acme-tls/1`
//! gets the challenge certificate for its SNI name instead of the served one. Until the first
//! certificate is issued, a self-signed one for the domains is served.
//!
//! One crypto provider, *ring*, is used explicitly for the server and installed as the process
//! default once: rustls panics when two dependencies enable different providers and nobody
//! chose. Imports `config` and `shutdown`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once, RwLock};

use base64::Engine as _;
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsSettings;
use crate::shutdown::Shutdown;

/// Names the self-signed certificate is valid for: what a developer types on this machine.
const SELF_SIGNED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// The ALPN protocol of TLS-ALPN-01 validation handshakes (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Why the TLS setup or a reload failed. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// "certificate chain" or "private key".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    /// The key is unusable (unsupported type) or does not belong to the certificate.
    #[error("the key in {path} cannot be used with the certificate: {source}")]
    Key {
        /// The key file.
        path: PathBuf,
        /// rustls's verdict.
        source: rustls::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The protocol versions could not be set (a provider without TLS 1.2/1.3 suites).
    #[error("cannot build the TLS configuration: {0}")]
    Config(rustls::Error),
}

/// The crypto provider rowcast uses. Installed as the process default once, so that clients
/// built elsewhere in the process (and tests) agree with the server.
fn provider() -> Arc<CryptoProvider> {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // Err means another provider was installed first (an embedding program chose); ours is
        // still passed explicitly to the server below, so that is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Where the certificate comes from.
#[derive(Debug, Clone)]
enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
    },
    SelfSigned,
    /// Issued by an ACME CA; until then self-signed for these names.
    Acme {
        names: Vec<String>,
    },
}

/// The HTTPS side of the server: the acceptor for new connections and the certificate behind it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    cert: Arc<ReloadableCert>,
    source: Source,
}

impl ServerTls {
    /// Builds the TLS configuration, or None when TLS is off. Loads (or generates) the
    /// certificate now, so a bad file stops the start instead of the first handshake.
    pub fn from_settings(settings: &TlsSettings) -> Result<Option<Self>, TlsError> {
        // Installed even when TLS is off: any TLS client in the process (database, webhooks)
        // then finds one provider instead of panicking over two.
        let provider = provider();
        let source = match (&settings.cert, &settings.key, settings.self_signed) {
            (Some(cert), Some(key), _) => Source::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            (_, _, true) => Source::SelfSigned,
            _ if !settings.acme.domains.is_empty() => Source::Acme {
                names: settings.acme.domains.clone(),
            },
            // clap requires cert and key together; anything else means TLS is off.
            _ => return Ok(None),
        };
        let key = load(&source, &provider)?;
        let cert = Arc::new(ReloadableCert {
            current: RwLock::new(Arc::new(key)),
            challenges: RwLock::default(),
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            // Modern TLS only: 1.2 and 1.3. The ring provider's suites are all ECDHE + AEAD
            // (AES-GCM, ChaCha20-Poly1305): no CBC, RC4, 3DES, static RSA or SHA-1 MACs.
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        // h2 first: a client offering both gets HTTP/2 (and WebSockets over it, RFC 8441).
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        if matches!(source, Source::Acme { .. }) {
            // Last: rustls picks by server preference among what the client offers, and only a
            // validating CA offers this one (alone).
            config.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
        }
        let tls = Self {
            config: Arc::new(config),
            cert,
            source,
        };
        match &tls.source {
            Source::SelfSigned => tracing::warn!(
                names = ?SELF_SIGNED_NAMES,
                sha256_fingerprint = %tls.fingerprint(),
                spki_sha256_base64 = %tls.spki_pin(),
                "serving a self-signed certificate generated at start; browsers warn until it is \
                 trusted (compare the fingerprint); use --tls-cert/--tls-key in production"
            ),
            Source::Files { cert, .. } => tracing::info!(
                cert = %cert.display(),
                sha256_fingerprint = %tls.fingerprint(),
                "TLS certificate loaded; send SIGHUP to reload it"
            ),
            Source::Acme { names } => tracing::info!(
                ?names,
                "HTTPS certificates come from ACME; a self-signed one serves until the first"
            ),
        }
        Ok(Some(tls))
    }

    /// The acceptor for new connections; it always uses the current certificate.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.clone())
    }

    /// Re-reads the certificate and key files and serves them to new handshakes. On error the
    /// old certificate stays. A self-signed certificate is kept as it is (a new one would only
    /// break the trust a developer gave the old one).
    pub fn reload(&self) -> Result<(), TlsError> {
        if matches!(self.source, Source::SelfSigned | Source::Acme { .. }) {
            return Ok(());
        }
        let key = load(&self.source, &self.config.crypto_provider().clone())?;
        self.cert.replace(key);
        Ok(())
    }

    /// Serves `key` to new handshakes from now on; open connections keep theirs (as a reload).
    pub fn install(&self, key: CertifiedKey) {
        self.cert.replace(key);
    }

    /// The crypto provider the server uses, for building certified keys that fit it.
    pub fn crypto_provider(&self) -> &Arc<CryptoProvider> {
        self.config.crypto_provider()
    }

    /// Answers TLS-ALPN-01 validations for `name` with `key` (None: stop answering them).
    pub fn set_challenge(&self, name: &str, key: Option<CertifiedKey>) {
        let mut challenges = self
            .cert
            .challenges
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match key {
            Some(key) => challenges.insert(name.to_ascii_lowercase(), Arc::new(key)),
            None => challenges.remove(&name.to_ascii_lowercase()),
        };
    }

    /// The current leaf certificate (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        CertificateDer::from(leaf_der(&self.cert.current()).to_vec())
    }

    /// SHA-256 of the current leaf certificate, as browsers show it (`AB:CD:…`).
    pub fn fingerprint(&self) -> String {
        let leaf = self.cert.current();
        let digest = ring::digest::digest(&ring::digest::SHA256, leaf_der(&leaf));
        let mut out = String::with_capacity(95);
        for (i, byte) in digest.as_ref().iter().enumerate() {
            if i > 0 {
                out.push(':');
            }
            let _ = write!(out, "{byte:02X}");
        }
        out
    }

    /// Base64 SHA-256 of the current certificate's public key (SPKI): the pin Chromium's
    /// `--ignore-certificate-errors-spki-list` and HPKP-style tools take.
    pub fn spki_pin(&self) -> String {
        let leaf = self.cert.current();
        let spki = leaf
            .key
            .public_key()
            .map(|spki| ring::digest::digest(&ring::digest::SHA256, spki.as_ref()));
        spki.map(|digest| base64::engine::general_purpose::STANDARD.encode(digest.as_ref()))
            .unwrap_or_default()
    }

    /// Registers the SIGHUP handler now — the step that can fail — so a SIGHUP sent once
    /// `App::build` returned reloads instead of killing the process; the returned task does
    /// the reloads once spawned. None for a self-signed certificate: it has no file to re-read.
    pub fn watch_sighup(&self) -> std::io::Result<Option<SighupReload>> {
        #[cfg(unix)]
        if let Source::Files { cert, .. } = &self.source {
            use tokio::signal::unix::{SignalKind, signal};
            return Ok(Some(SighupReload {
                tls: self.clone(),
                cert: cert.clone(),
                hangup: signal(SignalKind::hangup())?,
            }));
        }
        Ok(None)
    }
}

/// The certificate reload task: re-reads the files on every SIGHUP until shutdown. Built by
/// [`ServerTls::watch_sighup`], run by `app` once everything that can fail has been built.
#[derive(Debug)]
pub struct SighupReload {
    tls: ServerTls,
    cert: PathBuf,
    #[cfg(unix)]
    hangup: tokio::signal::unix::Signal,
}

impl SighupReload {
    /// Reloads on every SIGHUP until shutdown.
    pub async fn run(self, shutdown: Shutdown) {
        #[cfg(unix)]
        {
            let Self {
                tls,
                cert,
                mut hangup,
            } = self;
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    received = hangup.recv() => if received.is_none() { return },
                }
                match tls.reload() {
                    Ok(()) => tracing::info!(
                        cert = %cert.display(),
                        sha256_fingerprint = %tls.fingerprint(),
                        "TLS certificate reloaded; new connections use it"
                    ),
                    Err(err) => tracing::error!(
                        cause = %err,
                        "TLS certificate reload failed; still serving the previous one"
                    ),
                }
            }
        }
        #[cfg(not(unix))]
        let _ = (self, shutdown);
    }
}

fn leaf_der(key: &CertifiedKey) -> &[u8] {
    // A CertifiedKey is only built from a non-empty chain (`load` checks), so there is a leaf.
    key.cert.first().map_or(&[], |leaf| leaf.as_ref())
}

/// Reads (or generates) a certificate chain and its key, and checks that they belong together.
fn load(source: &Source, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    // Blocking file reads: called at start and on SIGHUP only, for files of a few KiB.
    let (chain, key, key_path) = match source {
        Source::Files { cert, key } => {
            let chain = read_chain(cert)?;
            let der = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
                what: "private key",
                path: key.clone(),
                source,
            })?;
            (chain, der, key.as_path())
        }
        Source::SelfSigned | Source::Acme { .. } => {
            let names = match source {
                Source::Acme { names } => names.clone(),
                _ => SELF_SIGNED_NAMES.map(str::to_owned).to_vec(),
            };
            let generated = rcgen::generate_simple_self_signed(names)?;
            let key = PrivateKeyDer::Pkcs8(generated.signing_key.serialize_der().into());
            (
                vec![generated.cert.der().clone()],
                key,
                Path::new("(generated)"),
            )
        }
    };
    CertifiedKey::from_der(chain, key, provider).map_err(|source| TlsError::Key {
        path: key_path.to_owned(),
        source,
    })
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        what: "certificate chain",
        path: path.to_owned(),
        source,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(chain)
}

/// The certificate new handshakes get; swapped whole by a reload.
#[derive(Debug)]
struct ReloadableCert {
    current: RwLock<Arc<CertifiedKey>>,
    /// TLS-ALPN-01 challenge certificates by lowercase SNI name, while an order is pending.
    challenges: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl ReloadableCert {
    fn current(&self) -> Arc<CertifiedKey> {
        // A poisoned lock only means a panic elsewhere while swapping an Arc: the value inside
        // is still a whole certificate, so keep serving it.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn replace(&self, key: CertifiedKey) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(key);
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let validating = hello
            .alpn()
            .is_some_and(|mut offered| offered.any(|proto| proto == ACME_TLS_ALPN));
        if validating {
            // RFC 8737: a validation gets the challenge certificate or no handshake at all,
            // never the served certificate.
            let name = hello.server_name()?.to_ascii_lowercase();
            return self
                .challenges
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&name)
                .cloned();
        }
        Some(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(args: &[&str]) -> TlsSettings {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(
            std::iter::once("rowcast").chain(args.iter().copied()),
        )
        .unwrap();
        cli.config.tls
    }

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, generated.cert.pem()).unwrap();
        std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("rowcast-tls-{:x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn off_without_a_certificate_source() {
        assert!(ServerTls::from_settings(&settings(&[])).unwrap().is_none());
    }

    #[test]
    fn self_signed_offers_h2_then_http1_and_has_a_fingerprint() {
        let tls = ServerTls::from_settings(&settings(&["--tls-self-signed"]))
            .unwrap()
            .unwrap();
        assert_eq!(tls.config.alpn_protocols, [&b"h2"[..], &b"http/1.1"[..]]);
        let fingerprint = tls.fingerprint();
        assert_eq!(fingerprint.len(), 32 * 3 - 1, "{fingerprint}");
        assert_eq!(tls.spki_pin().len(), 44);
    }

    #[test]
    fn reload_swaps_the_certificate_and_keeps_the_old_one_on_error() {
        let dir = temp_dir();
        let (cert, key) = write_pair(&dir, "a");
        let tls = ServerTls::from_settings(&settings(&[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ]))
        .unwrap()
        .unwrap();
        let first = tls.fingerprint();

        let (cert_b, key_b) = write_pair(&dir, "b");
        std::fs::copy(&cert_b, &cert).unwrap();
        std::fs::copy(&key_b, &key).unwrap();
        tls.reload().unwrap();
        let second = tls.fingerprint();
        assert_ne!(first, second);

        // A key that does not match the certificate is refused; the served one stays.
        std::fs::copy(&cert_b, &cert).unwrap();
        write_pair(&dir, "c");
        std::fs::copy(dir.join("c.key"), &key).unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::Key { .. })));
        std::fs::write(&cert, "not pem").unwrap();
        assert!(matches!(tls.reload(), Err(TlsError::NoCertificate(_))));
        assert_eq!(tls.fingerprint(), second);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Keys as `openssl` writes them by default for RSA (PKCS#1, `RSA PRIVATE KEY`) and EC
    /// (SEC1, `EC PRIVATE KEY`), besides the PKCS#8 of the other tests. Skipped without openssl.
    #[test]
    fn rsa_and_ec_keys_in_their_traditional_pem_forms_load() {
        let dir = temp_dir();
        let openssl = |args: &[&str]| {
            std::process::Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .map(|out| assert!(out.status.success(), "{out:?}"))
        };
        if openssl(&["version"]).is_err() {
            eprintln!("skipped: no openssl binary");
            return;
        }
        for (name, keygen) in [
            (
                "rsa",
                &["genrsa", "-traditional", "-out", "rsa.key", "2048"][..],
            ),
            (
                "ec",
                &[
                    "ecparam",
                    "-name",
                    "prime256v1",
                    "-genkey",
                    "-noout",
                    "-out",
                    "ec.key",
                ][..],
            ),
        ] {
            openssl(keygen).unwrap();
            let key = format!("{name}.key");
            let cert = format!("{name}.crt");
            let header = std::fs::read_to_string(dir.join(&key)).unwrap();
            assert!(header.starts_with(&format!("-----BEGIN {} PRIVATE KEY", name.to_uppercase())));
            openssl(&[
                "req",
                "-new",
                "-x509",
                "-key",
                &key,
                "-out",
                &cert,
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
            ])
            .unwrap();
            let cert = dir.join(cert);
            let key = dir.join(key);
            let tls = ServerTls::from_settings(&settings(&[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ]));
            assert!(matches!(tls, Ok(Some(_))), "{name}: {tls:?}");
        }
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn key_without_cert_and_both_sources_are_refused_by_the_parser() {
        let parse = |args: &[&str]| {
            <crate::config::Cli as clap::Parser>::try_parse_from(
                std::iter::once("rowcast").chain(args.iter().copied()),
            )
        };
        assert!(parse(&["--tls-key", "k.pem"]).is_err());
        assert!(parse(&["--tls-cert", "c.pem"]).is_err());
        assert!(parse(&["--tls-self-signed", "--tls-cert", "c", "--tls-key", "k"]).is_err());
        assert!(parse(&["--http-redirect"]).is_err());
        assert!(parse(&["--http-redirect", "--tls-self-signed"]).is_ok());
    }
}
