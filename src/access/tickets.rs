//! Single-use tickets (`POST /ws-ticket`), shared by every instance on one database: a ticket
//! issued by one instance is honoured once by whichever instance it is presented to. Owns what a
//! ticket is (256 random bits, URL-safe base64) and its digest; the table and its queries are
//! `db::tickets`. The ticket's text is never stored nor logged, only its SHA-256.
//!
//! Why the database rather than signed tickets: a signature alone is valid any number of times
//! until it expires, so single use needs a shared "used" record anyway, and the database is the
//! one store every instance already shares. The price is a round trip on the REST pool per issue
//! and per redemption, a few hundred microseconds, paid once per WebSocket or event stream.

use std::time::Duration;

use crate::db::RestPool;
use base64::Engine as _;

use super::{Denied, sha256};
use crate::db;

/// Unused tickets held at once (across instances). Only token holders can create them, so this
/// bounds a buggy or compromised client's use of the table, not an anonymous attacker's;
/// expired ones are pruned first.
const MAX_OUTSTANDING_TICKETS: i64 = 10_000;

/// Issues and redeems tickets in the database.
#[derive(Debug, Clone)]
pub(super) struct Tickets {
    pub(super) ttl: Duration,
    pool: RestPool,
}

impl Tickets {
    pub(super) fn new(ttl: Duration, pool: RestPool) -> Self {
        Self { ttl, pool }
    }

    pub(super) async fn issue(&self) -> Result<String, Denied> {
        // 256 bits from the thread-local CSPRNG (ChaCha, seeded by the OS): unguessable.
        let bytes: [u8; 32] = rand::random();
        let ticket = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let stored = db::tickets::issue(
            &self.pool,
            &sha256(ticket.as_bytes()),
            self.ttl,
            MAX_OUTSTANDING_TICKETS,
        )
        .await
        .map_err(|err| unavailable(&err))?;
        if stored {
            Ok(ticket)
        } else {
            Err(Denied::TooManyTickets)
        }
    }

    /// Consumes the ticket: true if it was issued (by any instance), unused and unexpired.
    pub(super) async fn redeem(&self, ticket: &str) -> Result<bool, Denied> {
        db::tickets::redeem(&self.pool, &sha256(ticket.as_bytes()))
            .await
            .map_err(|err| unavailable(&err))
    }
}

/// The database did not answer: logged here once (without the ticket), answered 503.
fn unavailable(err: &sqlx::Error) -> Denied {
    tracing::error!(cause = %err, "ticket store unavailable");
    Denied::Unavailable
}
