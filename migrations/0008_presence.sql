-- Presence: how many sockets of each rowcast instance watch each product, so that every
-- instance on this database can tell its clients the total (issue 16). Counts only, never who.
--
-- UNLOGGED: the rows are soft state that every live instance rewrites (a heartbeat each
-- `--presence-expiry`/5, its counts whenever they change); writing them to the WAL would cost
-- every subscribe a durable write for nothing. After a database crash PostgreSQL empties these
-- tables; each instance notices at its next heartbeat (its own row is gone) and writes all its
-- counts again. (Unlogged tables are not replicated: on a failover the same happens.)
--
-- An instance that dies leaves its rows behind: they stop counting once its heartbeat is older
-- than `expires_at` (readers join on it) and are deleted by the next heartbeat of any instance
-- (ON DELETE CASCADE), so the totals lose a dead instance's watchers within the expiry.
CREATE UNLOGGED TABLE presence_instances (
    instance_id bigint      PRIMARY KEY,
    expires_at  timestamptz NOT NULL
);

CREATE UNLOGGED TABLE presence_counts (
    instance_id bigint  NOT NULL REFERENCES presence_instances ON DELETE CASCADE,
    product_id  bigint  NOT NULL,
    watchers    integer NOT NULL CHECK (watchers > 0),
    PRIMARY KEY (instance_id, product_id)
);

-- The sums are read by product.
CREATE INDEX presence_counts_product ON presence_counts (product_id);

-- Only rowcast's own role reads and writes them, like the changelog and the tickets.
REVOKE ALL ON presence_instances, presence_counts FROM PUBLIC;
