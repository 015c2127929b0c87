-- Lifecycle: the runs of its scheduled jobs and the policy they follow. The job queue and
-- its schedules come from the shared crate's migration.

CREATE TABLE runs (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    examined    bigint NOT NULL DEFAULT 0,
    acted       bigint NOT NULL DEFAULT 0,
    failed      bigint NOT NULL DEFAULT 0,
    dry_run     boolean NOT NULL,
    error       text NOT NULL DEFAULT '',
    report      text[] NOT NULL DEFAULT '{}'
);

CREATE INDEX runs_newest ON runs (started_at DESC, id DESC);
CREATE INDEX runs_by_name ON runs (name, started_at DESC, id DESC);

-- One row: the policy in force (defaults in code until an admin sets one).
CREATE TABLE policy (
    id         boolean PRIMARY KEY DEFAULT true CHECK (id),
    policy     jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
