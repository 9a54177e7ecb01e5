-- Changes to products $1 with $2 < seq <= $3, oldest first, at most $4: a client's replay
-- between the position it asked for and where its live stream starts.
SELECT seq, action, product::text AS product
FROM product_changes
WHERE product_id = ANY($1) AND seq > $2 AND seq <= $3
ORDER BY seq
LIMIT $4
