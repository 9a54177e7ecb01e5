-- Every committed change gets a sequence number in commit order and is kept in a changelog, so
-- clients can resume (`since`), take consistent snapshots, and rowcast can catch up after its
-- LISTEN connection was down. Replaces the immediate trigger of 0002.
--
-- Why a deferred constraint trigger with an advisory lock: a sequence value taken when the row
-- changes is ordered by statement time, not commit time (transaction A can take 5, B take 6 and
-- commit first). Deferred to commit time, each transaction first takes one transaction-level
-- advisory lock, which it holds until its commit is complete and visible; only then does the
-- next committing transaction get its numbers. So seq order is commit order, and when a reader
-- has seen seq N, every lower seq is committed and visible. The serialization covers only the
-- commit itself, where NOTIFY already serializes committing transactions.

CREATE SEQUENCE product_change_seq AS bigint;

CREATE TABLE product_changes (
    seq          bigint      PRIMARY KEY,
    product_id   bigint      NOT NULL,
    action       text        NOT NULL CHECK (action IN ('INSERT', 'UPDATE', 'DELETE')),
    -- product_json() of the new row (the old row for DELETE): the REST representation.
    product      json        NOT NULL,
    committed_at timestamptz NOT NULL
);

-- Replay for a set of products after a position.
CREATE INDEX product_changes_product_seq ON product_changes (product_id, seq);

-- Everything with seq <= pruned_through may have been deleted by retention; a client resuming
-- from before it gets a reset and a snapshot instead of a replay with holes.
CREATE TABLE changelog_horizon (
    singleton      boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    pruned_through bigint  NOT NULL DEFAULT 0
);
INSERT INTO changelog_horizon DEFAULT VALUES;

DROP TRIGGER product_change ON products;
DROP FUNCTION notify_product_change();

CREATE FUNCTION record_product_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    changed    products;
    change_seq bigint;
    body       json;
    payload    text;
BEGIN
    IF TG_OP = 'DELETE' THEN
        changed := OLD;
    ELSE
        changed := NEW;
    END IF;
    -- Held until this transaction's commit is complete: see the header.
    PERFORM pg_advisory_xact_lock(1919906675, 1);
    change_seq := nextval('product_change_seq');
    body := product_json(changed);
    INSERT INTO product_changes (seq, product_id, action, product, committed_at)
    VALUES (change_seq, changed.product_id, TG_OP, body, clock_timestamp());
    payload := json_build_object('seq', change_seq, 'action', TG_OP, 'product', body)::text;
    -- pg_notify refuses payloads of 8000 bytes or more, and that error would fail the write.
    -- Large rows are announced by seq alone; the listener reads them from the changelog.
    IF octet_length(payload) >= 7900 THEN
        payload := json_build_object('seq', change_seq, 'action', TG_OP,
                                     'productId', changed.product_id)::text;
    END IF;
    PERFORM pg_notify('product_change', payload);
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER product_change
    AFTER INSERT OR UPDATE OR DELETE ON products
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION record_product_change();
