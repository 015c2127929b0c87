-- Media: quarantined files and the outcome of each file's processing. The job queue
-- (`jobs`, `schedules`) and the outbox come from the shared crates' migrations.

-- Files the scanner flagged. A row stays after release (released_at set) so the next run
-- does not scan the file again.
CREATE TABLE quarantine (
    file_id        uuid PRIMARY KEY,
    owner_id       text NOT NULL,
    signature      text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    released_at    timestamptz,
    released_by    text
);

CREATE INDEX quarantine_held ON quarantine (quarantined_at DESC, file_id DESC)
    WHERE released_at IS NULL;

-- One row per file and final status Media announced: a run retried after it set the
-- status in Files announces it (media.ready / failed / quarantined) once, not twice.
CREATE TABLE outcomes (
    file_id    uuid NOT NULL,
    status     text NOT NULL CHECK (status IN ('ready', 'failed', 'quarantined')),
    reason     text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (file_id, status)
);
