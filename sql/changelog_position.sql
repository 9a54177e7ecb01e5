-- Where the changelog stands, read in one snapshot: its newest seq (never below the horizon, so
-- it stays right when retention emptied the table) with that change's commit time, the horizon,
-- and the commit time of the change at seq $1 (NULL if there is none). A reader compares the
-- last change it published with that row to notice a database whose history was rewound or
-- replaced (a restore, a failover to a lagging replica, a re-created database).
SELECT greatest(coalesce(newest.seq, 0), h.pruned_through) AS latest,
       (extract(epoch FROM newest.committed_at) * 1000000)::bigint::text AS latest_committed_at,
       h.pruned_through,
       (SELECT (extract(epoch FROM committed_at) * 1000000)::bigint::text
        FROM product_changes WHERE seq = $1) AS committed_at_of
FROM changelog_horizon h
LEFT JOIN LATERAL (SELECT seq, committed_at FROM product_changes ORDER BY seq DESC LIMIT 1)
    AS newest ON true
