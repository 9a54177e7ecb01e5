-- Forgets instances that died without leaving, with their counts (ON DELETE CASCADE): those
-- whose heartbeat expired, and at once those whose liveness lock is free (migration 0009: the
-- session that held it ended, so the process died or lost its database). $1 is the caller.
-- Taking a free lock here only lasts until this statement commits. A live instance's lock is
-- held by its own session, so no other session can take it, and an instance takes its lock
-- before its heartbeat names it.
DELETE FROM presence_instances
WHERE expires_at < now()
   OR (instance_id <> $1
       AND lock_key IS NOT NULL
       AND pg_try_advisory_xact_lock(1919907696, lock_key))
