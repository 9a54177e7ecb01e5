-- Forgets instances whose heartbeat expired (they died without leaving); their counts go with
-- them (ON DELETE CASCADE).
DELETE FROM presence_instances WHERE expires_at < now()
