-- One product by id.
SELECT product_id, manufacturer, price_per_unit, units_available, product_name
FROM products
WHERE product_id = $1
