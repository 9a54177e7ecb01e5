-- Every committed INSERT/UPDATE/DELETE of a product is announced on channel `product_change`.
-- NOTIFY is transactional: listeners see the notification only when (and if) the transaction
-- commits, and notifications from different transactions arrive in commit order. That is what
-- lets rowcast promise commit order per subscriber.

-- The product's JSON in notifications has exactly the REST representation's fields, names and
-- types (src/product.rs `Product`), so the listener parses it into the same type the API serves.
CREATE FUNCTION product_json(p products) RETURNS json
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT json_build_object(
        'productId',      p.product_id,
        'manufacturer',   p.manufacturer,
        'pricePerUnit',   p.price_per_unit,
        'unitsAvailable', p.units_available,
        'productName',    p.product_name)
$$;

CREATE FUNCTION notify_product_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    -- For DELETE the OLD row is sent, so subscribers learn what disappeared.
    PERFORM pg_notify('product_change', json_build_object(
        'action',  TG_OP,
        'product', product_json(CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END))::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER product_change
    AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION notify_product_change();
