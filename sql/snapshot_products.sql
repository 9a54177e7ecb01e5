-- The current rows of products $1, read in the same snapshot as changelog_latest_seq.sql.
SELECT product_id, manufacturer, price_per_unit, units_available, product_name
FROM products
WHERE product_id = ANY($1)
ORDER BY product_id
