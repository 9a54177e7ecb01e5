-- Changes to any product after seq $1, oldest first: at most $2 rows and, past the first row,
-- at most $3 bytes of change JSON (bounded by bytes as well as rows: a product can be ~1 MB).
-- Each row also carries, read in the same snapshot:
-- * pruned_through: changes at or below it may be gone, so a reader whose position is below it
--   has a gap it must announce (retention announces a cut before deleting up to it);
-- * fetched: rows considered before the byte cut, so the reader knows whether more follow;
-- * committed_at_of: the commit time of the change at seq $1 (NULL if none), so the reader can
--   tell that the history still continues from the change it published last.
-- With no change after $1 there is one row whose seq is NULL (the horizon is still read).
-- Commit times are microseconds since the Unix epoch, as text: identities for the reader to
-- compare, the same whatever the session's TimeZone and DateStyle.
-- Rows cut by the byte budget are never detoasted: only rows that pass are cast to text.
SELECT h.pruned_through,
       (SELECT (extract(epoch FROM committed_at) * 1000000)::bigint::text
        FROM product_changes WHERE seq = $1) AS committed_at_of,
       c.seq, c.action, c.product::text AS product,
       (extract(epoch FROM c.committed_at) * 1000000)::bigint::text AS committed_at, c.fetched
FROM changelog_horizon h
LEFT JOIN LATERAL (
    SELECT seq, action, product, committed_at, fetched
    FROM (SELECT seq, action, product, committed_at, bytes,
                 count(*) OVER () AS fetched,
                 sum(bytes) OVER (ORDER BY seq) AS running
          FROM (SELECT seq, action, product, committed_at, bytes
                FROM product_changes
                WHERE seq > $1
                ORDER BY seq
                LIMIT $2) AS limited) AS measured
    WHERE running - bytes < $3
) AS c ON true
ORDER BY c.seq
