-- Instance $1 stops: its counts go at once (ON DELETE CASCADE), not at expiry.
DELETE FROM presence_instances WHERE instance_id = $1
