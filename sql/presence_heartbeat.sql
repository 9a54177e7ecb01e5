-- Instance $1 is alive for $2 more seconds. `created` is true when its row was not there (the
-- first heartbeat, or the table was emptied by a crash or its row expired): then the instance
-- writes all its counts again.
INSERT INTO presence_instances (instance_id, expires_at)
VALUES ($1, now() + make_interval(secs => $2))
ON CONFLICT (instance_id) DO UPDATE SET expires_at = EXCLUDED.expires_at
RETURNING (xmax = 0) AS created
