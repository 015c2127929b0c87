-- Activity and inactivity notices, debounced per-user rechecks and the per-user history.

-- Last activity per user (from file and upload events, and reported logins and sessions),
-- and where the user is in the inactivity notice cycle.
CREATE TABLE activity (
    user_id        text PRIMARY KEY,
    last_active_at timestamptz NOT NULL,
    -- When the notice is due (set when the user is found inactive, spread over the grace).
    notice_due_at  timestamptz,
    notice_sent_at timestamptz
);

CREATE INDEX activity_quiet ON activity (last_active_at) WHERE notice_due_at IS NULL;
CREATE INDEX activity_notice_due ON activity (notice_due_at)
    WHERE notice_due_at IS NOT NULL AND notice_sent_at IS NULL;

-- A recheck waiting for its user's burst of events to end: each event pushes `due_at`
-- back; `first_at` bounds the wait under a steady stream.
CREATE TABLE rechecks (
    user_id  text PRIMARY KEY,
    first_at timestamptz NOT NULL DEFAULT now(),
    due_at   timestamptz NOT NULL
);

CREATE TABLE history (
    id         bigserial PRIMARY KEY,
    user_id    text NOT NULL,
    event      text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    detail     jsonb NOT NULL DEFAULT '{}',
    dedupe_key text NOT NULL,
    UNIQUE (user_id, event, dedupe_key)
);

CREATE INDEX history_by_user ON history (user_id, at DESC, id DESC);
