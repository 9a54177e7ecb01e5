-- Changes to any product after seq $1, oldest first, at most $2: the listener's catch-up after
-- its connection was down, and gap filling.
SELECT seq, action, product::text AS product
FROM product_changes
WHERE seq > $1
ORDER BY seq
LIMIT $2
