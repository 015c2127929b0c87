-- Files: file metadata, variants and the outbox of file events.

CREATE TABLE files (
    id              uuid PRIMARY KEY,
    owner_id        text NOT NULL,
    display_name    text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('video', 'image', 'audio', 'document', 'other')),
    mime_type       text NOT NULL,
    size_bytes      bigint NOT NULL CHECK (size_bytes >= 0),
    sha256          text NOT NULL,
    storage_key     text NOT NULL UNIQUE,
    status          text NOT NULL CHECK (status IN ('processing', 'ready', 'failed', 'quarantined')),
    status_reason   text NOT NULL DEFAULT '',
    tags            text[] NOT NULL DEFAULT '{}',
    favorite        boolean NOT NULL DEFAULT false,
    width           integer NOT NULL DEFAULT 0,
    height          integer NOT NULL DEFAULT 0,
    duration_ms     bigint NOT NULL DEFAULT 0,
    codec           text NOT NULL DEFAULT '',
    package_name    text NOT NULL DEFAULT '',
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    UNIQUE (owner_id, idempotency_key)
);

CREATE INDEX files_live_by_created ON files (owner_id, created_at, id) WHERE deleted_at IS NULL;
CREATE INDEX files_live_by_name ON files (owner_id, (display_name COLLATE "C"), id) WHERE deleted_at IS NULL;
CREATE INDEX files_live_by_size ON files (owner_id, size_bytes, id) WHERE deleted_at IS NULL;
CREATE INDEX files_trash ON files (owner_id, deleted_at, id) WHERE deleted_at IS NOT NULL;
CREATE INDEX files_tags ON files USING gin (tags);

CREATE TABLE variants (
    file_id     uuid NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    name        text NOT NULL,
    mime_type   text NOT NULL,
    size_bytes  bigint NOT NULL CHECK (size_bytes >= 0),
    width       integer NOT NULL DEFAULT 0,
    height      integer NOT NULL DEFAULT 0,
    storage_key text NOT NULL DEFAULT '',
    inline_data bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (file_id, name)
);

-- Written in the same transaction as the change it announces; a relay publishes it.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    topic        text NOT NULL,
    key          text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);

CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
