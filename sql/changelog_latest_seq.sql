-- The newest seq handed out to a committed change (0 before the first), never below what
-- retention pruned, so it stays right when the changelog is empty.
SELECT greatest(
    coalesce((SELECT max(seq) FROM product_changes), 0),
    (SELECT pruned_through FROM changelog_horizon))
