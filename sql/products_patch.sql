-- Change the given fields of an existing product (PATCH, JSON merge patch); NULL = keep.
-- No row returned = no such product.
UPDATE products
SET manufacturer    = coalesce($2, manufacturer),
    price_per_unit  = coalesce($3, price_per_unit),
    units_available = coalesce($4, units_available),
    product_name    = coalesce($5, product_name)
WHERE product_id = $1
RETURNING product_id, manufacturer, price_per_unit, units_available, product_name
