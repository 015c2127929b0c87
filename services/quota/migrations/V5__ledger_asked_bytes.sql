-- What a charge or debit asked for under its idempotency key (a debit's `delta_bytes` is
-- capped at the usage, so it cannot say): the key used again for another amount, or for the
-- other kind of movement, is refused. NULL on rows from before: not checked.
ALTER TABLE ledger ADD COLUMN IF NOT EXISTS asked_bytes bigint;
