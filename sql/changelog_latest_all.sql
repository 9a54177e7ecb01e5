-- The newest change of each product with $1 < seq <= $2 (those after seq $3 only), oldest first,
-- at most $4 rows and, past the first row, $5 bytes: the conflated replay of a subscribe-all
-- whose client stopped reading. As changelog_latest_per_product.sql without the product filter.
SELECT h.pruned_through, c.seq, c.action, c.product::text AS product,
       (extract(epoch FROM c.committed_at) * 1000000)::bigint::text AS committed_at, c.fetched, c.versions
FROM changelog_horizon h
LEFT JOIN LATERAL (
    SELECT seq, action, product, committed_at, fetched, versions
    FROM (SELECT seq, action, product, committed_at, bytes, versions,
                 count(*) OVER () AS fetched,
                 sum(bytes) OVER (ORDER BY seq) AS running
          FROM (SELECT seq, action, product, committed_at, bytes, versions
                FROM (SELECT DISTINCT ON (product_id) seq, action, product, committed_at, bytes,
                             count(*) OVER (PARTITION BY product_id) AS versions
                      FROM product_changes
                      WHERE seq > $1 AND seq <= $2
                      ORDER BY product_id, seq DESC) AS newest
                WHERE seq > $3
                ORDER BY seq
                LIMIT $4) AS limited) AS measured
    WHERE running - bytes < $5
) AS c ON true
ORDER BY c.seq
