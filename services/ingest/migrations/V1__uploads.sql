-- Ingest: one row per upload, whatever door it came through. The row exists before any byte
-- is stored or any quota is held, so a crash at any point leaves something a sweeper can find.

CREATE TABLE uploads (
    id              uuid PRIMARY KEY,
    owner_id        text NOT NULL,
    idempotency_key text,
    state           text NOT NULL CHECK (state IN ('receiving', 'registered', 'completed', 'failed', 'aborted', 'expired')),
    declared_size   bigint CHECK (declared_size >= 0),
    received_bytes  bigint NOT NULL DEFAULT 0,
    reservation_id  uuid,
    file_id         uuid NOT NULL,
    storage_key     text,
    display_name    text NOT NULL,
    failure         text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (owner_id, idempotency_key)
);

CREATE INDEX uploads_unfinished ON uploads (updated_at) WHERE state IN ('receiving', 'registered');
