-- Hands the changelog from the row trigger to the replication reader (see migration 0007).
-- ACCESS EXCLUSIVE waits for every transaction that changed `products` to end and holds off new
-- ones until this commits, so in commit order each products transaction is either before the
-- marker (recorded by the trigger) or after it (recorded by the reader). REPLICA IDENTITY FULL:
-- the WAL then carries the whole old row of an UPDATE or DELETE (a DELETE's change is the old
-- row; an UPDATE leaves large unchanged TOASTed values out of the new row). Runs only while
-- source is 'notify'; the caller checks that in the same transaction.
LOCK TABLE products IN ACCESS EXCLUSIVE MODE;
ALTER TABLE products
    DISABLE TRIGGER product_change,
    DISABLE TRIGGER product_truncate,
    REPLICA IDENTITY FULL;
UPDATE changelog_source SET source = 'replication', armed = false, applied_lsn = NULL;
SELECT pg_logical_emit_message(true, 'rowcast', 'source=replication');
