-- Replace every field of an existing product (PUT). No row returned = no such product.
UPDATE products
SET manufacturer = $2, price_per_unit = $3, units_available = $4, product_name = $5
WHERE product_id = $1
RETURNING product_id, manufacturer, price_per_unit, units_available, product_name
