-- Every current row, by id, read in the same snapshot as changelog_latest_seq.sql: the snapshot
-- of a subscribe-all (sent to the client in pages).
SELECT product_id, manufacturer, price_per_unit, units_available, product_name
FROM products
ORDER BY product_id
