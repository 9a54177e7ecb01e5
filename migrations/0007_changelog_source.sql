-- Where the changelog's rows come from: the row trigger (`--source notify`, the default) or the
-- one elected replication reader that decodes the WAL (`--source replication`, src/replication).
--
-- Why a row and not a setting: the switch between the two must be one commit that every writer
-- of `products` is ordered against. The switch (sql/replication_switch_on.sql) takes ACCESS
-- EXCLUSIVE on `products`, disables the triggers of migrations 0003/0005, sets `source` and
-- emits a transactional logical message in the same transaction. So in commit order, every
-- transaction that the trigger recorded comes before the marker and none after it; the reader
-- skips products changes until it has decoded the marker (`armed`), and records every one
-- after. `applied_lsn` is the end of the last transaction the reader wrote to the changelog, in
-- the same transaction as those rows: a stream resent from the slot's older confirmed position
-- after a crash is skipped up to it, so no change is written twice.
--
-- Owner only, like the changelog (migration 0005).
CREATE TABLE changelog_source (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    source      text    NOT NULL DEFAULT 'notify' CHECK (source IN ('notify', 'replication')),
    armed       boolean NOT NULL DEFAULT false,
    applied_lsn pg_lsn
);
INSERT INTO changelog_source DEFAULT VALUES;
REVOKE ALL ON changelog_source FROM PUBLIC;
