-- Quota: accounts, reservations and the append-only usage ledger.

CREATE TABLE accounts (
    user_id        text PRIMARY KEY,
    limit_bytes    bigint NOT NULL CHECK (limit_bytes >= 0),
    used_bytes     bigint NOT NULL DEFAULT 0 CHECK (used_bytes >= 0),
    reserved_bytes bigint NOT NULL DEFAULT 0 CHECK (reserved_bytes >= 0),
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE reservations (
    id              uuid PRIMARY KEY,
    user_id         text NOT NULL REFERENCES accounts (user_id),
    bytes           bigint NOT NULL CHECK (bytes >= 0),
    state           text NOT NULL CHECK (state IN ('held', 'committed', 'released', 'expired')),
    committed_bytes bigint,
    idempotency_key text,
    expires_at      timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, idempotency_key)
);

CREATE INDEX reservations_held_by_expiry ON reservations (expires_at) WHERE state = 'held';
CREATE INDEX reservations_held_by_user ON reservations (user_id) WHERE state = 'held';

-- Every change of used_bytes has exactly one row here; the sum of delta_bytes per user is
-- the user's usage.
CREATE TABLE ledger (
    id              bigserial PRIMARY KEY,
    user_id         text NOT NULL REFERENCES accounts (user_id),
    delta_bytes     bigint NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('commit', 'debit', 'reconcile')),
    reservation_id  uuid,
    idempotency_key text NOT NULL UNIQUE,
    reason          text,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ledger_by_user ON ledger (user_id, id);
