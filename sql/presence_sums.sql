-- Watchers of products $1 summed over every instance whose heartbeat has not expired. Products
-- nobody watches have no row.
SELECT c.product_id, sum(c.watchers)::bigint AS watchers
FROM presence_counts c
JOIN presence_instances i USING (instance_id)
WHERE i.expires_at > now() AND c.product_id = ANY($1)
GROUP BY c.product_id
