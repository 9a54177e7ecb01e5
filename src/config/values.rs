//! Value types read from flags and from requests: browser origins, host names, address
//! prefixes, host and port, and secrets that never print. Parsed once here (by `http`'s `Authority` and
//! `ipnet`), compared everywhere else. Imports nothing of ours.

use std::net::IpAddr;

use super::MIN_API_TOKEN_LEN;

/// A browser origin, `scheme://host:port`, with the scheme's default port filled in and the host
/// lower-cased, so two spellings of one origin compare equal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `http` or `https`.
    pub scheme: String,
    /// Host name or address literal (IPv6 in brackets), lower case.
    pub host: String,
    /// Explicit or default port.
    pub port: u16,
}

impl Origin {
    /// Parses an origin as browsers send it (`https://example.com`, `http://localhost:8080`);
    /// a trailing slash is tolerated, a path is not.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bad = || format!("{text:?} is not an origin; use e.g. https://app.example.com");
        let (scheme, rest) = text.split_once("://").ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(bad()),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = split_host_port(rest).ok_or_else(bad)?;
        Ok(Self {
            scheme,
            host,
            port: port.unwrap_or(default_port),
        })
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets) into a lower-case host and the port, if any;
/// None if it is not a plain authority (user info, path, empty host, bad port). Parsed by
/// `http::uri::Authority`, the type requests carry.
pub fn split_host_port(authority: &str) -> Option<(String, Option<u16>)> {
    let parsed: axum::http::uri::Authority = authority.parse().ok()?;
    let host = parsed.host();
    // `Authority` accepts a port it cannot read as a u16 (and reports none): refuse it here.
    let after_host = parsed
        .as_str()
        .rsplit_once(']')
        .map_or(parsed.as_str(), |(_, rest)| rest);
    let port = parsed.port_u16();
    if parsed.as_str().contains('@')
        || host.is_empty()
        || (after_host.contains(':') && port.is_none())
    {
        return None;
    }
    Some((host.to_ascii_lowercase(), port))
}

/// A host name as the allowlist compares it: lower case, without a port or a final dot, IPv6
/// literals in brackets in their shortest form, so `LocalHost.`, `localhost:8080` and
/// `localhost` are one name, and so are `[0:0::1]` and `[::1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostName(String);

impl HostName {
    /// Parses a name for `--allowed-host`: a bare IPv6 address (`::1`) is accepted too; a port
    /// is refused, because ports are not compared and accepting one would suggest they were.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let bracketed;
        let text = if text.parse::<std::net::Ipv6Addr>().is_ok() {
            bracketed = format!("[{text}]");
            bracketed.as_str()
        } else {
            text
        };
        match split_host_port(text) {
            Some((_, Some(_))) => Err(format!(
                "{text:?}: give the host name without a port (ports are not compared)"
            )),
            Some((host, None)) => {
                Self::normalize(&host).ok_or_else(|| format!("{text:?} is not a host name"))
            }
            None => Err(format!(
                "{text:?} is not a host name; use e.g. rowcast.example.com"
            )),
        }
    }

    /// The host a request names in its authority (`Host` header or HTTP/2 `:authority`), port
    /// dropped; None if it is not a plain authority.
    pub fn from_authority(authority: &str) -> Option<Self> {
        let (host, _port) = split_host_port(authority)?;
        Self::normalize(&host)
    }

    fn normalize(host: &str) -> Option<Self> {
        if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            let ip: std::net::Ipv6Addr = inner.parse().ok()?;
            return Some(Self(format!("[{ip}]")));
        }
        // `example.com.` is the same name written fully qualified.
        let host = host.strip_suffix('.').unwrap_or(host);
        (!host.is_empty()).then(|| Self(host.to_owned()))
    }

    /// The name in its normal form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for HostName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An address prefix (`10.0.0.0/8`, `::1/128`, `::ffff:10.0.0.0/104`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix(ipnet::IpNet);

impl IpPrefix {
    /// Parses `addr/len` or a bare address (a prefix of full length).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let net = match text.parse::<ipnet::IpNet>() {
            Ok(net) => net,
            Err(_) => text
                .parse::<IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| {
                    format!("{text:?} is not an address or CIDR prefix (e.g. 10.0.0.0/8)")
                })?,
        };
        Ok(Self(net))
    }

    /// True if `ip` lies in the prefix. An IPv4 client may arrive as an IPv4-mapped IPv6
    /// address (a dual-stack socket) and a prefix may be written either way: both forms match.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let mapped = match ip.to_canonical() {
            IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
            v6 @ IpAddr::V6(_) => v6,
        };
        self.0.contains(&ip) || self.0.contains(&ip.to_canonical()) || self.0.contains(&mapped)
    }
}

/// A secret from the command line or environment: never shown by `Debug`, so a logged `Config`
/// cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Accepts a token of at least [`MIN_API_TOKEN_LEN`] characters (surrounding whitespace,
    /// e.g. a file's final newline, is not part of it).
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.chars().count() < MIN_API_TOKEN_LEN {
            return Err(format!(
                "the API token must be at least {MIN_API_TOKEN_LEN} characters long"
            ));
        }
        Ok(Self(text.to_owned()))
    }

    /// The secret itself, for the one place that compares it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_and_prefixes_parse_to_one_normal_form() {
        let origin = Origin::parse("HTTPS://App.Example.com/").unwrap();
        assert_eq!(origin.to_string(), "https://app.example.com:443");
        assert_eq!(
            origin,
            Origin::parse("https://app.example.com:443").unwrap()
        );
        assert_eq!(Origin::parse("http://[::1]:8080").unwrap().host, "[::1]");
        for bad in [
            "app.example.com",
            "ftp://x",
            "https://x/path",
            "https://u@x",
            "https://",
        ] {
            assert!(Origin::parse(bad).is_err(), "{bad}");
        }
        let net = IpPrefix::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.1".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        assert!(
            IpPrefix::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        for bad in ["10.0.0.0/33", "::1/129", "host", "10.0.0.0/x"] {
            assert!(IpPrefix::parse(bad).is_err(), "{bad}");
        }
        // An IPv4-mapped IPv6 prefix matches both spellings of its clients (the hand-written
        // version matched neither).
        let mapped = IpPrefix::parse("::ffff:10.0.0.0/104").unwrap();
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(mapped.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!mapped.contains("11.1.2.3".parse().unwrap()));
        assert_eq!(
            split_host_port("Example.COM:8080"),
            Some(("example.com".to_owned(), Some(8080)))
        );
        assert_eq!(split_host_port("[::1]"), Some(("[::1]".to_owned(), None)));
        let name = |text| HostName::parse(text).map(|name| name.to_string());
        assert_eq!(
            name("Rowcast.Example.COM."),
            Ok("rowcast.example.com".to_owned())
        );
        assert_eq!(name("::1"), Ok("[::1]".to_owned()));
        assert_eq!(name("[0:0::1]"), Ok("[::1]".to_owned()));
        assert_eq!(name("127.0.0.1"), Ok("127.0.0.1".to_owned()));
        for bad in [
            "",
            "example.com:8080",
            "[::1]:80",
            "u@x",
            "x/p",
            ".",
            "[nope]",
        ] {
            assert!(HostName::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            HostName::from_authority("LocalHost.:8080").map(|name| name.to_string()),
            Some("localhost".to_owned())
        );
        for bad in ["", "x:", "u@x", "x/p", "x:99999", "x y"] {
            assert_eq!(split_host_port(bad), None, "{bad:?}");
        }
    }
}
