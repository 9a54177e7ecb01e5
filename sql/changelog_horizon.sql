-- Changes with seq at or below this may have been removed by retention.
SELECT pruned_through FROM changelog_horizon
