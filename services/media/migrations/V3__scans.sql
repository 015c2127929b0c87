-- The last clean scan of each file uploaded within the re-scan window, and what made it:
-- clamd's VERSION (engine / signature version / date) and the signature version in it
-- (NULL when clamd reports none: databases of one's own only). A file scanned with older
-- signatures than clamd has now, or asked for by an admin after its scan began (Media.Rescan),
-- is scanned again (`media.rescan`): `job_key` is the key of its job, `queued_at` when it
-- was queued.
CREATE TABLE scans (
    file_id     uuid PRIMARY KEY,
    uploaded_at timestamptz NOT NULL,
    scanner     text NOT NULL,
    signatures  bigint,
    scanned_at  timestamptz NOT NULL DEFAULT now(),
    asked_at    timestamptz,
    queued_at   timestamptz,
    job_key     text
);

-- Files a check looks at, newest first.
CREATE INDEX scans_to_check ON scans (uploaded_at DESC, file_id DESC) WHERE queued_at IS NULL;
-- Re-scans queued long ago, whose job may be dead or lost.
CREATE INDEX scans_queued ON scans (queued_at) WHERE queued_at IS NOT NULL;
-- Files out of the window.
CREATE INDEX scans_by_upload ON scans (uploaded_at);
