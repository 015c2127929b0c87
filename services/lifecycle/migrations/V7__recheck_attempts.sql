-- A recheck whose recount failed (Files or Quota out of reach) is tried again after a backoff
-- that doubles with each attempt, a few times, instead of waiting for the next reconcile.
ALTER TABLE rechecks ADD COLUMN attempts integer NOT NULL DEFAULT 0;
