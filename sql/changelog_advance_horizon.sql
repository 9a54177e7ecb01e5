-- Announce a cut before deleting up to it, so a resume from before it is answered with a reset
-- even while rows are still being removed. Never moves backwards (several instances prune).
UPDATE changelog_horizon SET pruned_through = greatest(pruned_through, $1)
