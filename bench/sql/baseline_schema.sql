-- Schema and change trigger of the Node.js baseline server (bench/baseline-node), and the
-- stand-in "rowcast-like" trigger of `rowcast-bench writes` when rowcast's own migrations
-- are not found. Idempotent: the baseline runs it at every start.
--
-- The payload is the one the baseline LISTENs for on `product_change`:
-- {"action":"INSERT|UPDATE|DELETE","product":{…wire shape…}}.

CREATE TABLE IF NOT EXISTS products (
    product_id      BIGSERIAL PRIMARY KEY,
    manufacturer    TEXT NOT NULL,
    price_per_unit  NUMERIC(12, 2) NOT NULL,
    units_available INTEGER NOT NULL,
    product_name    TEXT NOT NULL
);

CREATE OR REPLACE FUNCTION product_change_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r products;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('product_change', json_build_object(
        'action', TG_OP,
        'product', json_build_object(
            'productId', r.product_id,
            'manufacturer', r.manufacturer,
            'pricePerUnit', r.price_per_unit::text,
            'unitsAvailable', r.units_available,
            'productName', r.product_name))::text);
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS product_change_notify ON products;
CREATE TRIGGER product_change_notify
    AFTER INSERT OR UPDATE OR DELETE ON products
    FOR EACH ROW EXECUTE FUNCTION product_change_notify();
