-- Job queue (stowage-jobs). Workers claim due rows with FOR UPDATE SKIP LOCKED; a claim lapses
-- at locked_until, after which another worker may take the job again.

CREATE TABLE jobs (
    id            uuid PRIMARY KEY,
    kind          text NOT NULL,
    key           text NOT NULL UNIQUE,
    payload       jsonb NOT NULL,
    state         text NOT NULL DEFAULT 'queued'
                  CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'dead')),
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts  integer NOT NULL CHECK (max_attempts >= 1),
    last_error    text,
    run_at        timestamptz NOT NULL DEFAULT now(),
    -- The claim a worker must present to record the outcome: a worker whose claim lapsed and
    -- was taken over cannot overwrite the newer state.
    claim         uuid,
    locked_until  timestamptz,
    locked_by     text,
    traceparent   text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- When a worker may next take the job: its run time, or for a running job the moment its
    -- claim lapses. One column lets one index serve both cases in claim order.
    due_at        timestamptz GENERATED ALWAYS AS
                  (CASE WHEN state = 'running' THEN locked_until ELSE run_at END) STORED,
    CHECK (state <> 'running' OR (claim IS NOT NULL AND locked_until IS NOT NULL))
);

CREATE INDEX jobs_due ON jobs (due_at) WHERE state IN ('queued', 'failed', 'running');
CREATE INDEX jobs_by_created ON jobs (created_at, id);
CREATE INDEX jobs_by_state_created ON jobs (state, created_at, id);
