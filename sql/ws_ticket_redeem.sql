-- Consumes the ticket whose digest is $1: one row if it was issued, unused and unexpired. One
-- statement, so of several instances presenting the same ticket at once exactly one gets the row.
DELETE FROM ws_tickets WHERE digest = $1 AND expires_at > now()
RETURNING 1
