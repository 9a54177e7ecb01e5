-- The reader's slot as the server sees it: NULL row when missing. wal_status 'lost' means the
-- server removed WAL the slot still needed (max_slot_wal_keep_size): the slot can never stream
-- again. lag_bytes: WAL written but not yet confirmed by rowcast; retained_bytes: WAL the server
-- keeps for the slot (what a stuck reader costs on disk).
SELECT wal_status,
       active_pid,
       confirmed_flush_lsn::text AS confirmed_flush_lsn,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint AS lag_bytes,
       coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint AS retained_bytes
FROM pg_replication_slots
WHERE slot_name = $1 AND database = current_database()
