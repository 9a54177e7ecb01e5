-- Changes to products $1 with $2 < seq <= $3, oldest first: at most $4 rows and, past the
-- first row, at most $5 bytes of change JSON: one page of a client's replay. Columns and the
-- NULL-seq row as in changelog_after.sql (the horizon tells the replay whether rows it still
-- needs may have been pruned while it was paging).
SELECT h.pruned_through, c.seq, c.action, c.product::text AS product,
       (extract(epoch FROM c.committed_at) * 1000000)::bigint::text AS committed_at, c.fetched
FROM changelog_horizon h
LEFT JOIN LATERAL (
    SELECT seq, action, product, committed_at, fetched
    FROM (SELECT seq, action, product, committed_at, bytes,
                 count(*) OVER () AS fetched,
                 sum(bytes) OVER (ORDER BY seq) AS running
          FROM (SELECT seq, action, product, committed_at, bytes
                FROM product_changes
                WHERE product_id = ANY($1) AND seq > $2 AND seq <= $3
                ORDER BY seq
                LIMIT $4) AS limited) AS measured
    WHERE running - bytes < $5
) AS c ON true
ORDER BY c.seq
