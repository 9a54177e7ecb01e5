-- Stores a new ticket's digest ($1) valid for $2 seconds, unless $3 unexpired tickets are
-- already outstanding (then no row is returned), and prunes expired ones on the way.
-- The count and the insert are not serialized across concurrent issuers, so the bound can be
-- passed by the number of tickets issued at the same instant: it bounds memory, not exactly.
WITH pruned AS (
    DELETE FROM ws_tickets WHERE expires_at <= now()
)
INSERT INTO ws_tickets (digest, expires_at)
SELECT $1, now() + make_interval(secs => $2)
WHERE (SELECT count(*) FROM ws_tickets WHERE expires_at > now()) < $3
RETURNING 1
