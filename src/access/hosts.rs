//! The Host allowlist, against DNS rebinding: a page on `attacker.example` whose name is made
//! to resolve to 127.0.0.1 is, to the browser, of the same origin as rowcast, so it could read
//! REST responses, write products and open WebSockets (its `Origin` names the host it sent the
//! request to, so the origin check passes). What it cannot change is the name it addressed:
//! the `Host` header (HTTP/1.1) or the `:authority` (HTTP/2, the request URI's authority) says
//! `attacker.example`. So every request must name one of rowcast's names, or it gets 421
//! Misdirected Request (`unknown_host`), whatever its route: REST, WebSocket, event stream,
//! operator endpoints, static pages.
//!
//! - **Health checks pass** (`/healthz`, `/readyz`): load balancers probe by address, with
//!   whatever `Host` they like, and those two answer nothing a page could use.
//! - **Only the name is compared, not the port**: the attack always carries the attacker's name,
//!   and a proxy may forward a port of its own.
//! - **Default**: when every listener (`--listen`, and `--tls-listen` with TLS) is on a loopback
//!   address, the loopback names `localhost`, `127.0.0.1` and `[::1]`; otherwise no check,
//!   since a server on 0.0.0.0 cannot know the names it is reached by.
//! - **`--allowed-host`** gives the list explicitly; the loopback names stay allowed, because a
//!   rebinding page can never send them (the browser sends the page's own name) and local tools
//!   and probes use them.
//!
//! Imports `config` and `http_error`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::HEALTH_PATHS;
use crate::config::{AccessSettings, HostName};

/// What a loopback listener is always reached by; the self-signed certificate names the same.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// The names requests may be addressed to, or none to check; cheap to clone.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Option<Arc<[HostName]>>);

impl AllowedHosts {
    /// `--allowed-host` plus the loopback names when given; else the loopback names when every
    /// listener is on loopback, else no check (see the module doc).
    pub fn from_settings(settings: &AccessSettings, listening: &[SocketAddr]) -> Self {
        let all_loopback = listening
            .iter()
            .all(|addr| addr.ip().to_canonical().is_loopback());
        if settings.allowed_hosts.is_empty() && !all_loopback {
            return Self(None);
        }
        let names = LOOPBACK_NAMES
            .iter()
            .filter_map(|name| HostName::parse(name).ok())
            .chain(settings.allowed_hosts.iter().cloned())
            .collect();
        Self(Some(names))
    }

    /// Every authority the request carries must name an allowed host: the URI's (HTTP/2, or an
    /// HTTP/1.1 absolute-form target) and the `Host` header, when present; one of them must be.
    fn check(&self, request: &Request) -> Result<(), UnknownHost> {
        let Some(allowed) = &self.0 else {
            return Ok(());
        };
        let from_uri = request
            .uri()
            .authority()
            .map(|authority| authority.as_str());
        let from_header = match request.headers().get(header::HOST) {
            Some(value) => Some(value.to_str().map_err(|_| UnknownHost::Unreadable)?),
            None => None,
        };
        if from_uri.is_none() && from_header.is_none() {
            return Err(UnknownHost::Missing);
        }
        for authority in from_uri.into_iter().chain(from_header) {
            let host = HostName::from_authority(authority).ok_or(UnknownHost::Unreadable)?;
            if !allowed.contains(&host) {
                return Err(UnknownHost::Named(host));
            }
        }
        Ok(())
    }
}

/// Why a request's host was refused: 421 `unknown_host`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnknownHost {
    /// A name that is not one of rowcast's.
    #[error(
        "this server does not answer to the host \"{0}\"; if that is its name, start rowcast with --allowed-host {0}"
    )]
    Named(HostName),
    /// No `Host` header and no authority.
    #[error("the request names no host (Host header); this server answers only to its own names")]
    Missing,
    /// A `Host` that is not a plain `host[:port]`.
    #[error("the request's Host is not a host name")]
    Unreadable,
}

impl IntoResponse for UnknownHost {
    fn into_response(self) -> Response {
        crate::http_error::respond(
            StatusCode::MISDIRECTED_REQUEST,
            "unknown_host",
            self.to_string(),
        )
    }
}

/// Middleware for the whole router: refuses a request addressed to a host that is not one of
/// rowcast's, before any route (or guard, or limit) sees it. Health checks pass.
pub async fn guard_host(
    State(hosts): State<AllowedHosts>,
    request: Request,
    next: Next,
) -> Response {
    if !HEALTH_PATHS.contains(&request.uri().path()) {
        if let Err(refused) = hosts.check(&request) {
            tracing::debug!(reason = %refused, "request for another host refused");
            return refused.into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(args: &[&str], listening: &[&str]) -> AllowedHosts {
        let cli = <crate::config::Cli as clap::Parser>::try_parse_from(
            std::iter::once("rowcast").chain(args.iter().copied()),
        )
        .unwrap();
        let listening: Vec<SocketAddr> = listening.iter().map(|a| a.parse().unwrap()).collect();
        AllowedHosts::from_settings(&cli.config.access, &listening)
    }

    fn request(uri: &str, host: Option<&str>) -> Request {
        let mut builder = Request::builder().uri(uri);
        if let Some(host) = host {
            builder = builder.header(header::HOST, host);
        }
        builder.body(axum::body::Body::empty()).unwrap()
    }

    #[test]
    fn on_loopback_only_loopback_names_pass_whatever_the_port() {
        let hosts = hosts(&[], &["127.0.0.1:8080", "[::1]:8443"]);
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "LOCALHOST",
            "localhost.:1",
            "[::1]:8443",
            "[0::1]",
        ] {
            assert_eq!(
                hosts.check(&request("/products", Some(host))),
                Ok(()),
                "{host}"
            );
        }
        let refused = hosts.check(&request("/products", Some("rebind.example:8080")));
        assert!(
            matches!(&refused, Err(UnknownHost::Named(name)) if name.as_str() == "rebind.example")
        );
        assert_eq!(
            refused.unwrap_err().to_string(),
            "this server does not answer to the host \"rebind.example\"; if that is its name, \
             start rowcast with --allowed-host rebind.example"
        );
        assert_eq!(
            hosts.check(&request("/products", None)),
            Err(UnknownHost::Missing)
        );
        assert_eq!(
            hosts.check(&request("/products", Some("a b"))),
            Err(UnknownHost::Unreadable)
        );
        // HTTP/2 (`:authority`) and absolute-form targets: the URI's authority counts, and a
        // Host header beside it must agree.
        assert_eq!(
            hosts.check(&request("http://localhost:8080/products", None)),
            Ok(())
        );
        assert!(
            hosts
                .check(&request("http://rebind.example:8080/products", None))
                .is_err()
        );
        assert!(
            hosts
                .check(&request(
                    "http://localhost:8080/products",
                    Some("rebind.example")
                ))
                .is_err()
        );
    }

    #[test]
    fn elsewhere_nothing_is_checked_unless_names_are_given() {
        let open = hosts(&[], &["0.0.0.0:8080"]);
        assert_eq!(open.check(&request("/", Some("anything.example"))), Ok(()));
        let open = hosts(&[], &["127.0.0.1:8080", "10.0.0.5:8443"]);
        assert_eq!(open.check(&request("/", Some("anything.example"))), Ok(()));

        let named = hosts(
            &[
                "--allowed-host",
                "Rowcast.Example",
                "--allowed-host",
                "10.0.0.5",
            ],
            &["0.0.0.0:8080"],
        );
        for host in ["rowcast.example:443", "10.0.0.5:8080", "localhost:8080"] {
            assert_eq!(named.check(&request("/", Some(host))), Ok(()), "{host}");
        }
        assert!(named.check(&request("/", Some("other.example"))).is_err());
    }

    #[test]
    fn names_with_ports_are_refused_at_start() {
        let parsed = <crate::config::Cli as clap::Parser>::try_parse_from([
            "rowcast",
            "--allowed-host",
            "rowcast.example:8080",
        ]);
        assert!(parsed.unwrap_err().to_string().contains("without a port"));
    }
}
