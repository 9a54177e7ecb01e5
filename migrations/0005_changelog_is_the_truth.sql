-- The changelog becomes the only source of what subscribers receive; notifications are hints.
--
-- Why: any database login may NOTIFY on any channel, so a payload proves nothing. What rowcast
-- delivers is now read from product_changes, which only this trigger can write: it runs as
-- SECURITY DEFINER (as the owner who ran the migrations), and nobody else is granted the
-- changelog, its sequence or its horizon. That also lets any role that may write `products`
-- (SELECT/INSERT/UPDATE/DELETE granted, nothing more) trigger pushes, without being able to
-- forge history.
--
-- Also here:
-- * Ids: generated ids stop at 2^53-1 (ProductId::MAX), the largest integer a browser keeps
--   exact; nextval past it fails with SQLSTATE 2200H, which the API answers with a JSON 409.
-- * Key changes: an UPDATE of product_id is recorded as DELETE of the old id, then INSERT of
--   the new one, so subscribers of either id hear of it.
-- * TRUNCATE: recorded as one DELETE per product (before the rows go), so resume, replay and
--   live delivery treat it like any other deletes.
-- * `bytes`: each change's JSON size, so reads can be bounded by bytes without detoasting.
-- * The notification carries only seq, action and productId (a hint; older rowcast versions on
--   the same database read such a stub from the changelog too, so rolling upgrades still work).

-- Ids ------------------------------------------------------------------------------------------

DO $$
DECLARE
    max_id constant bigint := 9007199254740991;
    seq_name text := pg_get_serial_sequence('products', 'product_id');
BEGIN
    -- A sequence already past the cap (possible before this migration) is parked at it: later
    -- generated ids then fail cleanly instead of producing ids the API cannot serve.
    IF (SELECT coalesce(last_value, 0) FROM pg_sequences
        WHERE schemaname = current_schema() AND sequencename = 'products_product_id_seq') > max_id
    THEN
        ALTER TABLE products ALTER COLUMN product_id SET MAXVALUE 9007199254740991 RESTART 9007199254740991;
        PERFORM setval(seq_name, max_id, true);
    ELSE
        ALTER TABLE products ALTER COLUMN product_id SET MAXVALUE 9007199254740991;
    END IF;
END
$$;

-- NOT VALID: rows written by the old bug stay readable by SQL (the API skips them); every new
-- row is checked.
ALTER TABLE products
    ADD CONSTRAINT products_product_id_max CHECK (product_id <= 9007199254740991) NOT VALID;

-- Bytes ----------------------------------------------------------------------------------------

ALTER TABLE product_changes ADD COLUMN bytes integer;
UPDATE product_changes SET bytes = octet_length(product::text);
ALTER TABLE product_changes ALTER COLUMN bytes SET NOT NULL;

-- Nobody but the owner touches the changelog -------------------------------------------------

REVOKE ALL ON product_changes, changelog_horizon FROM PUBLIC;
REVOKE ALL ON SEQUENCE product_change_seq FROM PUBLIC;

-- The row trigger ------------------------------------------------------------------------------

CREATE OR REPLACE FUNCTION record_product_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    changed    products;
    action     text := TG_OP;
    change_seq bigint;
    body       json;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSIF TG_OP = 'UPDATE' AND OLD.product_id <> NEW.product_id THEN
        -- A key change: the old id disappears first, then the new one appears (see the loop).
        changed := OLD;
        action := 'DELETE';
    ELSE
        changed := NEW;
    END IF;
    -- Held until this transaction's commit is complete: see migration 0003.
    PERFORM pg_advisory_xact_lock(1919906675, 1);
    LOOP
        change_seq := nextval('product_change_seq');
        body := json_build_object(
            'productId',      changed.product_id,
            'manufacturer',   changed.manufacturer,
            'pricePerUnit',   changed.price_per_unit,
            'unitsAvailable', changed.units_available,
            'productName',    changed.product_name);
        INSERT INTO product_changes (seq, product_id, action, product, committed_at, bytes)
        VALUES (change_seq, changed.product_id, action, body, clock_timestamp(),
                octet_length(body::text));
        PERFORM pg_notify('product_change', json_build_object(
            'seq', change_seq, 'action', action, 'productId', changed.product_id)::text);
        EXIT WHEN NOT (TG_OP = 'UPDATE' AND action = 'DELETE');
        changed := NEW;
        action := 'INSERT';
    END LOOP;
    RETURN NULL;
END
$$;

-- TRUNCATE -------------------------------------------------------------------------------------

CREATE FUNCTION record_products_truncate() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
DECLARE
    deleted bigint;
BEGIN
    -- No earlier change of this transaction is still unrecorded: PostgreSQL refuses TRUNCATE
    -- while the table has pending (deferred) trigger events.
    PERFORM pg_advisory_xact_lock(1919906675, 1);
    INSERT INTO product_changes (seq, product_id, action, product, committed_at, bytes)
    SELECT nextval('product_change_seq'), product_id, 'DELETE', body, clock_timestamp(),
           octet_length(body::text)
    FROM (SELECT product_id, json_build_object(
                     'productId',      product_id,
                     'manufacturer',   manufacturer,
                     'pricePerUnit',   price_per_unit,
                     'unitsAvailable', units_available,
                     'productName',    product_name) AS body
          FROM products
          ORDER BY product_id) AS gone;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    -- One hint for the whole statement: the listener reads every change after its position.
    IF deleted > 0 THEN
        PERFORM pg_notify('product_change', json_build_object(
            'seq', currval('product_change_seq'), 'action', 'TRUNCATE')::text);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER product_truncate
    BEFORE TRUNCATE ON products
    FOR EACH STATEMENT EXECUTE FUNCTION record_products_truncate();

-- SECURITY DEFINER functions must not resolve names through a schema a caller can write to.
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION record_product_change() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION record_products_truncate() SET search_path = pg_catalog, %I, pg_temp',
                   current_schema());
END
$$;
