//! TLS to PostgreSQL for the LISTEN connection (tokio-postgres), and the plain-words reading of a
//! TLS failure for both the pools and the listener.
//!
//! The pools get TLS from sqlx's own rustls backend; the listener gets it here, from a small
//! [`MakeTlsConnect`] over tokio-rustls rather than the `tokio-postgres-rustls` crate, so that
//! the verification rules are written once, next to the `sslmode` table in [`super::target`],
//! and both connections verify alike: `prefer` and `require` encrypt without verifying (as libpq
//! and sqlx do), `verify-ca` checks the chain but not the name, `verify-full` checks both. Roots
//! are `sslrootcert` when given, else the Mozilla roots (webpki-roots, as sqlx uses).
//!
//! The crypto provider is *ring*, passed explicitly: the server side (`crate::tls`) installs the
//! same one as the process default, and no second provider is linked.
//!
//! Channel binding is not offered (SCRAM without `-PLUS`): tokio-postgres only uses it when the
//! stream reports a binding, and sqlx does not offer it either, so both connections authenticate
//! the same way. Imports nothing of ours.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// How much a TLS connection to PostgreSQL checks (from `sslmode`; `disable`/`allow` never get
/// here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypt only (`prefer`, `require`).
    Nothing,
    /// The chain must lead to a trusted root (`verify-ca`).
    Chain,
    /// The chain, and the certificate must name the host (`verify-full`).
    ChainAndName,
}

/// The TLS inputs of a connection, from `sslrootcert`, `sslcert` and `sslkey`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA certificates to trust instead of the Mozilla roots.
    pub root_cert: Option<PathBuf>,
    /// Client certificate chain, for servers that ask for one.
    pub client_cert: Option<PathBuf>,
    /// The client certificate's key.
    pub client_key: Option<PathBuf>,
}

/// Why a TLS client configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A PEM file could not be read.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// "sslrootcert", "sslcert" or "sslkey".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        source: rustls::pki_types::pem::Error,
    },
    /// `sslrootcert` holds no usable CA certificate.
    #[error("sslrootcert {0} holds no usable CA certificate")]
    NoRoots(PathBuf),
    /// The URL holds PEM text instead of a file name.
    #[error("{0} must name a PEM file (PEM text in the URL is not supported)")]
    InlinePem(&'static str),
    /// Only one of `sslcert` and `sslkey` was given.
    #[error("sslcert and sslkey must be given together")]
    HalfClientCert,
    /// rustls refused the roots, the client key or the protocol versions.
    #[error("invalid TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The verifier could not be built from the roots.
    #[error("invalid sslrootcert: {0}")]
    Verifier(#[from] rustls::client::VerifierBuilderError),
}

/// Builds the rustls client configuration for `verify` with `files`.
pub fn client_config(verify: Verify, files: &TlsFiles) -> Result<ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots(files.root_cert.as_deref())?);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone()).build()?;
    let verifier = Arc::new(Verifier {
        verify,
        webpki,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|source| pem("sslcert", cert, source))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|source| pem("sslkey", key, source))?;
            builder.with_client_auth_cert(chain, key)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(TlsSetupError::HalfClientCert),
    })
}

fn pem(what: &'static str, path: &Path, source: rustls::pki_types::pem::Error) -> TlsSetupError {
    TlsSetupError::Pem {
        what,
        path: path.to_owned(),
        source,
    }
}

fn roots(root_cert: Option<&Path>) -> Result<RootCertStore, TlsSetupError> {
    let Some(path) = root_cert else {
        return Ok(RootCertStore::from_iter(
            webpki_roots::TLS_SERVER_ROOTS.iter().cloned(),
        ));
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|source| pem("sslrootcert", path, source))?;
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsSetupError::NoRoots(path.to_owned()));
    }
    Ok(store)
}

/// Checks as much as `verify` asks for; handshake signatures are always checked, so even
/// `require` talks to whoever holds the key of the certificate it was shown.
#[derive(Debug)]
struct Verifier {
    verify: Verify,
    webpki: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.verify == Verify::Nothing {
            return Ok(ServerCertVerified::assertion());
        }
        let verdict = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            // verify-ca: a trusted chain is enough; the name is not this mode's business.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.verify == Verify::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// tokio-postgres's TLS hook: one per connection target, cheap to clone.
#[derive(Debug, Clone)]
pub struct MakeRustlsConnect(Arc<ClientConfig>);

impl MakeRustlsConnect {
    /// Wraps a client configuration from [`client_config`].
    pub fn new(config: ClientConfig) -> Self {
        Self(Arc::new(config))
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = std::convert::Infallible;

    /// tokio-postgres asks for a connector before it knows whether TLS will be used, with an
    /// empty `domain` for a Unix socket; the name is therefore checked only in `connect`.
    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            domain: domain.to_owned(),
        })
    }
}

/// One handshake to one host.
#[derive(Debug)]
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    domain: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let server_name = ServerName::try_from(self.domain)
                .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
            let connector = tokio_rustls::TlsConnector::from(self.config);
            let stream = connector.connect(server_name, stream).await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// An established TLS connection to PostgreSQL.
#[derive(Debug)]
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// A TLS failure in plain words, or None when `err` (from sqlx or tokio-postgres) is not one.
/// `host` is the host connected to, `sslmode` the mode asked for, `root_cert` the `sslrootcert`.
pub fn describe_failure(
    err: &(dyn std::error::Error + 'static),
    host: &str,
    sslmode: &str,
    root_cert: Option<&Path>,
) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        if let Some(rustls) = rustls_error(current) {
            return Some(describe_rustls(rustls, host, sslmode, root_cert));
        }
        // Neither library types this case: sqlx says "server does not support TLS",
        // tokio-postgres "server does not support TLS" too (both answer the server's 'N').
        if current.to_string().contains("does not support TLS") {
            return Some(format!(
                "the server does not support TLS but sslmode={sslmode}"
            ));
        }
        cause = current.source();
    }
    None
}

/// tokio-rustls reports handshake failures as `io::Error`s carrying the rustls error.
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(rustls) = err.downcast_ref::<rustls::Error>() {
        return Some(rustls);
    }
    err.downcast_ref::<io::Error>()
        .and_then(io::Error::get_ref)
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn describe_rustls(
    err: &rustls::Error,
    host: &str,
    sslmode: &str,
    root_cert: Option<&Path>,
) -> String {
    // sqlx 0.8.6's verify-ca verifier forgives only rustls's old `NotValidForName`, not the
    // `NotValidForNameContext` rustls 0.23 now reports, so the pools check the name anyway.
    let verify_ca_note = if sslmode == "verify-ca" {
        " (the pools' TLS, sqlx 0.8, checks the name even under sslmode=verify-ca: connect by \
         a name the certificate holds)"
    } else {
        ""
    };
    match err {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            presented,
            ..
        }) => format!(
            "certificate for '{}' does not match host '{host}'{verify_ca_note}",
            presented
                .iter()
                .map(|name| bare_name(name))
                .collect::<Vec<_>>()
                .join("', '")
        ),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName) => {
            format!("the server's certificate does not match host '{host}'{verify_ca_note}")
        }
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => match root_cert {
            Some(path) => format!(
                "certificate signed by an unknown CA: not one in sslrootcert {}",
                path.display()
            ),
            None => "certificate signed by an unknown CA; set sslrootcert".to_owned(),
        },
        // webpki found a trusted CA with the issuer's name, but its key did not sign the
        // certificate: another CA that happens to share the name.
        rustls::Error::InvalidCertificate(CertificateError::BadSignature) => match root_cert {
            Some(path) => format!(
                "certificate signed by an unknown CA: a CA in sslrootcert {} has its issuer's \
                 name but did not sign it",
                path.display()
            ),
            None => "certificate signed by an unknown CA; set sslrootcert".to_owned(),
        },
        rustls::Error::InvalidCertificate(CertificateError::Expired) => {
            "the server's certificate has expired".to_owned()
        }
        other => format!("TLS handshake failed: {other}"),
    }
}

/// rustls presents names as `DnsName("db.example")` or `IpAddress(…)`; people write
/// `db.example`.
fn bare_name(presented: &str) -> &str {
    presented
        .split_once('"')
        .and_then(|(_, rest)| rest.rsplit_once('"'))
        .map_or(presented, |(name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presented_names_are_shown_bare() {
        assert_eq!(bare_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(bare_name("127.0.0.1"), "127.0.0.1");
    }

    #[test]
    fn a_name_mismatch_reads_as_one() {
        let err = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("127.0.0.1").unwrap(),
            presented: vec!["DnsName(\"db.example\")".to_owned()],
        });
        let io = io::Error::new(io::ErrorKind::InvalidData, err);
        assert_eq!(
            describe_failure(&io, "127.0.0.1", "verify-full", None).as_deref(),
            Some("certificate for 'db.example' does not match host '127.0.0.1'")
        );
    }
}
