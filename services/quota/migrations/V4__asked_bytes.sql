-- What a call asked for under its idempotency key, so that the key used again for another
-- amount (or another kind of movement) is refused instead of answered with the first effect.
-- A reservation's `bytes` changes with Resize and a debit's `delta_bytes` is capped at the
-- usage, so neither can say it. NULL on rows from before: those keys are not checked.
ALTER TABLE reservations ADD COLUMN asked_bytes bigint;
ALTER TABLE ledger ADD COLUMN asked_bytes bigint;
