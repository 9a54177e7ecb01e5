-- Delete one small batch of changes at or below the cut, oldest first. Small batches and SKIP
-- LOCKED keep each transaction short; writers only insert new rows, so they never wait on it.
DELETE FROM product_changes
WHERE seq IN (SELECT seq FROM product_changes
              WHERE seq <= $1
              ORDER BY seq
              LIMIT $2
              FOR UPDATE SKIP LOCKED)
