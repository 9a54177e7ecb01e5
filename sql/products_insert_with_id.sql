-- Create a product with an id chosen by the client; a duplicate id violates products_pkey (409).
INSERT INTO products (product_id, manufacturer, price_per_unit, units_available, product_name)
VALUES ($1, $2, $3, $4, $5)
RETURNING product_id, manufacturer, price_per_unit, units_available, product_name
