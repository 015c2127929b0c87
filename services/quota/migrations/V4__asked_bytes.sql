-- What a reservation asked for under its idempotency key, so that the key used again for
-- another amount is refused instead of answered with the first hold. `bytes` changes with
-- Resize, so it cannot say. NULL on rows from before: those keys are not checked.
-- (One table per migration: each ALTER takes its table's lock for a moment, never both.)
ALTER TABLE reservations ADD COLUMN asked_bytes bigint;
