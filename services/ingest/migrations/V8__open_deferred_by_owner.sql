-- Sessions of unknown length hold no quota, so each owner may keep only so many open
-- (Ingest counts them at CreateUpload).
CREATE INDEX uploads_open_deferred_by_owner ON uploads (owner_id)
    WHERE state = 'open' AND declared_size IS NULL;
