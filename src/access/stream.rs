//! Stream credentials: what lets a browser's `EventSource` reconnect to `/products/events` under
//! `--auth-reads` without a new ticket and without the API token in a URL.
//!
//! An event stream opened with a valid ticket (or the bearer token) is answered with a cookie
//! `rowcast_stream` — HttpOnly, SameSite=Strict, Path=/products/events, Max-Age
//! `--stream-credential-ttl` (10 minutes) — holding `v1.<expiry unix seconds>.<HMAC-SHA256 tag>`. `EventSource` reconnects
//! with the same URL (whose ticket is spent) and sends the cookie; a valid cookie is accepted in
//! place of the ticket and renewed in the answer. Streams opened under `--auth-reads` end after half
//! of that lifetime (`sse`), so a long-lived stream reconnects, and renews its cookie, while the
//! old one is still valid; `Last-Event-ID` makes that reconnect gapless.
//!
//! Why signed and not stored: every instance shares the API token, so a key derived from it
//! verifies a cookie minted by any instance, with no database round trip per reconnect; and a
//! credential that must work many times needs no "used" record. Changing the API token revokes
//! every stream credential at once; single ones cannot be revoked (they expire instead).
//!
//! Threat model: the cookie opens only event streams (read-only, the same data `--auth-reads`
//! guards), only on this path, for at most its lifetime after the last (re)connect — a holder
//! who keeps reconnecting keeps renewing it, as the page it was set for does. HttpOnly
//! keeps it from page scripts; SameSite=Strict keeps other sites' pages from sending it (and
//! they could not read the stream anyway: no CORS headers). It is not marked Secure, because
//! rowcast cannot tell whether a TLS-terminating proxy sits in front; over plain HTTP it travels
//! as readable as the ticket. It is never logged (`Cookie` and `Set-Cookie` are sensitive
//! headers in the trace).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, header};
use base64::Engine as _;
use ring::hmac;

/// The cookie's name.
const COOKIE: &str = "rowcast_stream";
/// The only path the browser sends it to, and the only route that accepts it.
const PATH: &str = "/products/events";
/// Streams end after at least this, whatever the lifetime: a stream that ended at once would
/// only make its client reconnect in a loop.
const MIN_ROTATION: Duration = Duration::from_secs(1);
/// Version prefix, so the format can change without old cookies being misread.
const VERSION: &str = "v1";

/// Mints and checks stream credentials with a key derived from the API token.
#[derive(Debug)]
pub(super) struct StreamCredentials {
    key: hmac::Key,
    /// How long a credential stays valid after it was minted.
    lifetime: Duration,
}

impl StreamCredentials {
    /// `token_digest` is the SHA-256 of the API token, identical on every instance.
    pub(super) fn new(token_digest: &[u8; 32], lifetime: Duration) -> Self {
        // A key of its own (domain-separated), so a tag never doubles as anything else.
        let root = hmac::Key::new(hmac::HMAC_SHA256, token_digest);
        let derived = hmac::sign(&root, b"rowcast stream credential key v1");
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, derived.as_ref()),
            lifetime,
        }
    }

    /// When an authenticated stream ends: with half of its credential's lifetime to spare, so
    /// the reconnect that renews it comes in time even if the first attempt fails.
    pub(super) fn rotate_after(&self) -> Duration {
        (self.lifetime / 2).max(MIN_ROTATION)
    }

    fn mint(&self, now: SystemTime) -> String {
        let expiry = unix_seconds(now).saturating_add(self.lifetime.as_secs());
        let body = format!("{VERSION}.{expiry}");
        let tag = hmac::sign(&self.key, body.as_bytes());
        let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref());
        format!("{body}.{tag}")
    }

    /// True if `credential` was minted with this key and has not expired.
    fn verify(&self, credential: &str, now: SystemTime) -> bool {
        let Some((body, tag)) = credential.rsplit_once('.') else {
            return false;
        };
        let Some(expiry) = body
            .strip_prefix(VERSION)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|expiry| expiry.parse::<u64>().ok())
        else {
            return false;
        };
        let Ok(tag) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tag) else {
            return false;
        };
        // Constant time (ring), and the expiry is only trusted once the tag is.
        hmac::verify(&self.key, body.as_bytes(), &tag).is_ok() && unix_seconds(now) < expiry
    }

    /// True if the request carries a valid stream cookie.
    pub(super) fn presented(&self, headers: &HeaderMap, now: SystemTime) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .any(|(name, value)| name == COOKIE && self.verify(value, now))
    }

    /// A `Set-Cookie` value carrying a fresh credential.
    pub(super) fn set_cookie(&self, now: SystemTime) -> Option<HeaderValue> {
        let cookie = format!(
            "{COOKIE}={}; Max-Age={}; Path={PATH}; HttpOnly; SameSite=Strict",
            self.mint(now),
            self.lifetime.as_secs()
        );
        // Only ASCII digits, letters, '-', '_', '.', '=', ';' and spaces: always a valid value.
        HeaderValue::from_str(&cookie).ok()
    }
}

fn unix_seconds(time: SystemTime) -> u64 {
    // A clock before 1970 is a broken clock: treated as 1970, which expires everything minted.
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIFETIME: Duration = Duration::from_secs(600);

    fn headers(cookie: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_str(cookie).unwrap());
        headers
    }

    #[test]
    fn credentials_verify_until_they_expire_and_only_with_their_key() {
        let now = SystemTime::now();
        let credentials = StreamCredentials::new(&[7; 32], LIFETIME);
        let minted = credentials.mint(now);
        assert!(credentials.verify(&minted, now));
        assert!(credentials.verify(&minted, now + LIFETIME - Duration::from_secs(1)));
        assert!(!credentials.verify(&minted, now + LIFETIME + Duration::from_secs(1)));
        assert!(!StreamCredentials::new(&[8; 32], LIFETIME).verify(&minted, now));
        // A longer expiry with the old tag is refused.
        let (body, tag) = minted.rsplit_once('.').unwrap();
        let forged = format!("{body}9.{tag}");
        assert!(!credentials.verify(&forged, now));
        for garbage in ["", "v1", "v1.1", "v1.x.y", "v2.1.AAAA"] {
            assert!(!credentials.verify(garbage, now), "{garbage}");
        }
    }

    #[test]
    fn the_cookie_is_found_among_others_and_is_scoped() {
        let now = SystemTime::now();
        let credentials = StreamCredentials::new(&[7; 32], LIFETIME);
        let set = credentials.set_cookie(now).unwrap();
        let set = set.to_str().unwrap();
        for attribute in ["HttpOnly", "SameSite=Strict", "Path=/products/events"] {
            assert!(set.contains(attribute), "{set}");
        }
        let pair = set.split(';').next().unwrap();
        assert!(credentials.presented(&headers(&format!("a=b; {pair}; c=d")), now));
        assert!(!credentials.presented(&headers("a=b"), now));
        assert!(!credentials.presented(&headers("rowcast_stream=v1.9.AAAA"), now));
    }
}
