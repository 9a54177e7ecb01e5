-- Instance $1's watchers of products $2 are now $3 (same length): rows with 0 are deleted, the
-- others inserted or updated. One statement, so a reader never sees half a batch.
WITH counts AS (
    SELECT product_id, watchers FROM unnest($2::bigint[], $3::int[]) AS t(product_id, watchers)
), removed AS (
    DELETE FROM presence_counts p
    USING counts c
    WHERE p.instance_id = $1 AND p.product_id = c.product_id AND c.watchers = 0
)
INSERT INTO presence_counts (instance_id, product_id, watchers)
SELECT $1, product_id, watchers FROM counts WHERE watchers > 0
ON CONFLICT (instance_id, product_id) DO UPDATE SET watchers = EXCLUDED.watchers
