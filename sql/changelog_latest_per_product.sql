-- The newest change of each of products $1 with $2 < seq <= $3 (those after seq $4 only), oldest
-- first, at most $5 rows and, past the first row, $6 bytes: a conflated replay for a client that
-- stopped reading. `versions` says how many changes the returned one stands for (> 1: the client
-- is told the others were skipped). Columns otherwise as in changelog_after.sql.
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
                      WHERE product_id = ANY($1) AND seq > $2 AND seq <= $3
                      ORDER BY product_id, seq DESC) AS newest
                WHERE seq > $4
                ORDER BY seq
                LIMIT $5) AS limited) AS measured
    WHERE running - bytes < $6
) AS c ON true
ORDER BY c.seq
