-- Create a product with an id taken from the identity sequence.
INSERT INTO products (manufacturer, price_per_unit, units_available, product_name)
VALUES ($1, $2, $3, $4)
RETURNING product_id, manufacturer, price_per_unit, units_available, product_name
