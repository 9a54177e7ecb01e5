-- WebSocket tickets live in the database, so that every instance on it honours them.
--
-- Why: behind a load balancer without sticky sessions, `POST /ws-ticket` and the WebSocket (or
-- event stream) that presents the ticket may reach different instances; a ticket kept in one
-- instance's memory was refused by all the others.
--
-- Only the SHA-256 digest of a ticket is stored: a copy of this table (a backup, a replica)
-- opens nothing. A ticket is redeemed by one `DELETE ... RETURNING` (sql/ws_ticket_redeem.sql):
-- of two instances presenting the same ticket at once, exactly one deletes the row, so a ticket
-- stays single-use across instances. Expired rows are pruned whenever a ticket is issued
-- (sql/ws_ticket_issue.sql); they can never be redeemed in the meantime.
CREATE TABLE ws_tickets (
    digest     bytea       PRIMARY KEY CHECK (octet_length(digest) = 32),
    expires_at timestamptz NOT NULL
);

-- The prune on issue and the outstanding-ticket bound look up by expiry.
CREATE INDEX ws_tickets_expires_at ON ws_tickets (expires_at);

-- Tickets are credentials: nobody but the owner (rowcast's migrating role) may read or forge
-- them, as migration 0005 does for the changelog.
REVOKE ALL ON ws_tickets FROM PUBLIC;
