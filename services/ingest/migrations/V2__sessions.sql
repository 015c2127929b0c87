-- Resumable sessions: the upload row carries the offset, the running SHA-256 state and the
-- staging state; each staged part is one row. A session is written under a row lock, so two
-- writers (on any replicas) can never both append at one offset.

ALTER TABLE uploads DROP CONSTRAINT uploads_state_check;
ALTER TABLE uploads ADD CONSTRAINT uploads_state_check
    CHECK (state IN ('receiving', 'open', 'completing', 'registered', 'completed', 'failed', 'aborted', 'expired'));

ALTER TABLE uploads
    ADD COLUMN resumable    boolean NOT NULL DEFAULT false,
    ADD COLUMN metadata     jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN expires_at   timestamptz,
    ADD COLUMN hash_state   bytea,
    ADD COLUMN multipart_id text,
    ADD COLUMN mime_type    text,
    ADD COLUMN kind         text,
    ADD COLUMN sha256       text,
    ADD COLUMN placed       boolean NOT NULL DEFAULT false;

CREATE INDEX uploads_open_by_expiry ON uploads (expires_at) WHERE state IN ('open', 'completing');

CREATE TABLE upload_parts (
    upload_id    uuid NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    part_number  integer NOT NULL CHECK (part_number >= 0),
    start_offset bigint NOT NULL,
    size_bytes   bigint NOT NULL,
    -- Native multipart: the store's part id. Part objects (local disk): empty.
    part_id      text NOT NULL DEFAULT '',
    -- Bytes held back because they were too small for a native part (below the store's
    -- minimum part size and not the last part); they live in a staging object until merged.
    pending      boolean NOT NULL DEFAULT false,
    PRIMARY KEY (upload_id, part_number)
);
