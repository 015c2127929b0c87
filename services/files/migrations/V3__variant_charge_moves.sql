-- Moves of a file's variant charge so far. A move's idempotency key names it with the
-- marks it moves between: variant totals can come back to an earlier pair (a variant
-- replaced and rebuilt), and such a move must not be taken for a retry of the first.
ALTER TABLE files ADD COLUMN variant_charge_moves bigint NOT NULL DEFAULT 0;
