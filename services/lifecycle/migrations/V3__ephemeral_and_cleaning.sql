-- Blobs with a time to live (event screenshots), and when an inactive user was cleaned.

CREATE TABLE ephemeral (
    storage_key     text PRIMARY KEY,
    owner           text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    acknowledged_at timestamptz
);

CREATE INDEX ephemeral_by_owner ON ephemeral (owner, created_at DESC);

ALTER TABLE activity ADD COLUMN cleaned_at timestamptz;
