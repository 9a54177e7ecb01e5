-- After a client chose id $1, move the identity sequence past it so that later generated ids do
-- not collide with it. Never moves the sequence backwards; a race between two such calls can
-- leave it behind, which the generated-id insert survives by retrying on a duplicate key.
SELECT setval(pg_get_serial_sequence('products', 'product_id'), $1)
FROM pg_sequences
WHERE schemaname = current_schema()
  AND sequencename = 'products_product_id_seq'
  AND coalesce(last_value, 0) < $1
