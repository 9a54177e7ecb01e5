-- Instance $1 is alive for $2 more seconds, and holds its liveness lock under key $3 (NULL: it
-- holds none; migration 0009). `created` is true when its row was not there (the first
-- heartbeat, or the table was emptied by a crash, or its row expired or was swept): then the
-- instance writes all its counts again.
INSERT INTO presence_instances (instance_id, expires_at, lock_key)
VALUES ($1, now() + make_interval(secs => $2), $3)
ON CONFLICT (instance_id) DO UPDATE
    SET expires_at = EXCLUDED.expires_at, lock_key = EXCLUDED.lock_key
RETURNING (xmax = 0) AS created
