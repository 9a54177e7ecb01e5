-- The highest seq retention lets go: older than $1 seconds, or beyond the newest $2 rows.
SELECT greatest(
    coalesce((SELECT max(seq) FROM product_changes
              WHERE committed_at < clock_timestamp() - make_interval(secs => $1)), 0),
    coalesce((SELECT seq FROM product_changes ORDER BY seq DESC OFFSET $2 LIMIT 1), 0))
