-- Hands the changelog back to the row trigger (`rowcast replication drop`). Changes the reader
-- had not written yet are lost with the slot, so the horizon jumps past a fresh seq: every
-- subscriber and every resume from before it gets a reset and a snapshot, never a silent gap.
LOCK TABLE products IN ACCESS EXCLUSIVE MODE;
ALTER TABLE products
    ENABLE TRIGGER product_change,
    ENABLE TRIGGER product_truncate,
    REPLICA IDENTITY DEFAULT;
UPDATE changelog_source SET source = 'notify', armed = false, applied_lsn = NULL;
UPDATE changelog_horizon SET pruned_through = greatest(pruned_through, nextval('product_change_seq'));
SELECT pg_notify('product_change', json_build_object('seq', pruned_through)::text)
FROM changelog_horizon;
