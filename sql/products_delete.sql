-- Delete a product; the trigger announces the deleted row.
DELETE FROM products
WHERE product_id = $1
