-- One page of products in id order (keyset pagination: rows after the last id the client saw).
-- $1 = after (exclusive), $2 = page size; the API asks for one extra row to know if more follow.
SELECT product_id, manufacturer, price_per_unit, units_available, product_name
FROM products
-- Rows above 2^53-1 (possible only before migration 0005) are not served: the API cannot name them.
WHERE product_id > $1 AND product_id <= 9007199254740991
ORDER BY product_id
LIMIT $2
