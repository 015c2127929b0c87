-- A ledger entry's idempotency key is unique per user, not across users: two services (or
-- one, for two users) that pick the same key for different users each move their own usage.
ALTER TABLE ledger DROP CONSTRAINT ledger_idempotency_key_key;
ALTER TABLE ledger ADD CONSTRAINT ledger_user_key UNIQUE (user_id, idempotency_key);
