-- Changes to any product with $1 < seq <= $2, oldest first: at most $3 rows and, past the first
-- row, at most $4 bytes of change JSON: one page of a subscribe-all's replay (a resume, or a gap
-- its queue left). As changelog_for_products.sql without the product filter: a separate
-- statement, so that neither plan has to serve both shapes.
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
                WHERE seq > $1 AND seq <= $2
                ORDER BY seq
                LIMIT $3) AS limited) AS measured
    WHERE running - bytes < $4
) AS c ON true
ORDER BY c.seq
