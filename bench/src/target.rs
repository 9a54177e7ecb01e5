//! Which servers a run measures. A target is a name, a base URL (`http://` or `https://`)
//! and optionally the server's pid; the WebSocket URL is derived (`http→ws`, `https→wss`,
//! path `/websocket`).
//!
//! Spec syntax on the command line: `NAME=URL[,pid=PID][,ca=PEM][,insecure]`, e.g.
//! `rowcast=http://127.0.0.1:18080`, `floor=http://127.0.0.1:18090,pid=1234` or
//! `rowcast=https://127.0.0.1:18443,ca=/tmp/ca.pem`. Without a pid the process listening on
//! the URL's port is looked up in /proc. A TLS target needs `ca=` or `insecure` (or the
//! run-wide `--tls-ca` / `--tls-insecure`, see `tls`).

use crate::tls::{self, Trust};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;

/// `http` or `https` (and the matching `ws`/`wss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Scheme {
    Plain,
    Tls,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Target {
    pub name: String,
    pub base_url: String,
    pub ws_url: String,
    #[serde(skip)]
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    #[serde(skip)]
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    /// How the certificate of a TLS target is checked (None: plain, or not set yet).
    pub tls_trust: Option<Trust>,
    /// The client configuration built from `tls_trust`, shared by every connection.
    #[serde(skip)]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target `{0}`: expected NAME=URL[,pid=PID][,ca=PEM][,insecure]")]
    Syntax(String),
    #[error("target `{0}`: URL must start with http:// or https:// (or ws:// / wss://)")]
    Scheme(String),
    #[error("target `{0}`: cannot resolve host:port")]
    Resolve(String),
    #[error("target `{0}`: bad pid")]
    Pid(String),
    #[error(
        "target `{0}`: an https/wss target needs `,ca=PEM` (or --tls-ca) or `,insecure` (or --tls-insecure)"
    )]
    NoTrust(String),
    #[error("target `{spec}`: {source}")]
    Tls { spec: String, source: tls::TlsError },
}

impl Target {
    /// Parses `NAME=URL[,pid=PID][,ca=PEM][,insecure]`; `ws_path` is appended to form the
    /// WebSocket URL. A TLS target without `ca=`/`insecure` takes `default_trust`.
    pub fn parse(spec: &str, ws_path: &str) -> Result<Self, TargetError> {
        Self::parse_with(spec, ws_path, None)
    }

    /// `parse`, with the trust to use for a TLS target whose spec names none.
    pub fn parse_with(
        spec: &str,
        ws_path: &str,
        default_trust: Option<&Trust>,
    ) -> Result<Self, TargetError> {
        let (name, rest) = spec
            .split_once('=')
            .ok_or_else(|| TargetError::Syntax(spec.into()))?;
        let mut parts = rest.split(',');
        let url = parts.next().unwrap_or_default().trim_end_matches('/');
        let mut pid = None;
        let mut trust = None;
        for p in parts {
            if let Some(v) = p.strip_prefix("pid=") {
                pid = Some(v.parse().map_err(|_| TargetError::Pid(spec.into()))?);
            } else if let Some(v) = p.strip_prefix("ca=") {
                trust = Some(Trust::Ca(PathBuf::from(v)));
            } else if p == "insecure" {
                trust = Some(Trust::Insecure);
            } else {
                return Err(TargetError::Syntax(spec.into()));
            }
        }
        let (scheme, hostport) =
            if let Some(h) = url.strip_prefix("http://").or(url.strip_prefix("ws://")) {
                (Scheme::Plain, h)
            } else if let Some(h) = url.strip_prefix("https://").or(url.strip_prefix("wss://")) {
                (Scheme::Tls, h)
            } else {
                return Err(TargetError::Scheme(spec.into()));
            };
        let hostport = hostport.split('/').next().unwrap_or_default();
        let default_port = if scheme == Scheme::Tls { 443 } else { 80 };
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h.to_owned(),
                p.parse().map_err(|_| TargetError::Syntax(spec.into()))?,
            ),
            None => (hostport.to_owned(), default_port),
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| TargetError::Resolve(spec.into()))?;
        let (http, ws) = match scheme {
            Scheme::Plain => ("http", "ws"),
            Scheme::Tls => ("https", "wss"),
        };
        let (tls_trust, tls) = match scheme {
            Scheme::Plain => (None, None),
            Scheme::Tls => {
                let trust = trust
                    .or_else(|| default_trust.cloned())
                    .ok_or_else(|| TargetError::NoTrust(spec.into()))?;
                let config = tls::client_config(&trust).map_err(|source| TargetError::Tls {
                    spec: spec.into(),
                    source,
                })?;
                (Some(trust), Some(config))
            }
        };
        Ok(Self {
            name: name.to_owned(),
            base_url: format!("{http}://{host}:{port}"),
            ws_url: format!("{ws}://{host}:{port}{ws_path}"),
            scheme,
            host,
            port,
            addr,
            pid,
            tls_trust,
            tls,
        })
    }

    /// The `Host` header value.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Fills `pid` from the listening port when it was not given. Returns the pid if known.
    pub fn resolve_pid(&mut self) -> Option<u32> {
        if self.pid.is_none() {
            self.pid = crate::procstat::pid_listening_on(self.port);
        }
        self.pid
    }

    /// Server CPU/RSS now, if the pid is known and alive.
    pub fn sample(&self) -> Option<crate::procstat::ProcSample> {
        self.pid.and_then(crate::procstat::sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_tls() {
        let t = Target::parse("r=http://127.0.0.1:18080/", "/websocket").unwrap();
        assert_eq!(t.ws_url, "ws://127.0.0.1:18080/websocket");
        assert_eq!(t.scheme, Scheme::Plain);
        assert_eq!(t.pid, None);
        assert!(t.tls.is_none());
        let t = Target::parse("r=https://127.0.0.1:8443,pid=12,insecure", "/websocket").unwrap();
        assert_eq!(t.ws_url, "wss://127.0.0.1:8443/websocket");
        assert_eq!(t.pid, Some(12));
        assert_eq!(t.tls_trust, Some(Trust::Insecure));
        assert!(t.tls.is_some());
        assert!(Target::parse("nourl", "/w").is_err());
        assert!(Target::parse("x=ftp://a:1", "/w").is_err());
        assert!(Target::parse("x=http://127.0.0.1:1,what=1", "/w").is_err());
    }

    #[test]
    fn tls_targets_need_a_trust_and_take_the_run_wide_one() {
        let e = Target::parse("r=https://127.0.0.1:8443", "/w").unwrap_err();
        assert!(matches!(e, TargetError::NoTrust(_)), "{e}");
        let t =
            Target::parse_with("r=https://127.0.0.1:8443", "/w", Some(&Trust::Insecure)).unwrap();
        assert_eq!(t.tls_trust, Some(Trust::Insecure));
        // A CA file that is not there is an error at parse time, not at the first connect.
        let e = Target::parse("r=https://127.0.0.1:8443,ca=/nonexistent/ca.pem", "/w").unwrap_err();
        assert!(matches!(e, TargetError::Tls { .. }), "{e}");
    }
}
