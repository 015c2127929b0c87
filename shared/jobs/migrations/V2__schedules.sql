-- Repeatable schedules (stowage-jobs). Ticks fall on multiples of the interval since the Unix
-- epoch, so every replica computes the same tick; a conditional update of next_run_at lets
-- exactly one of them enqueue it.

CREATE TABLE schedules (
    name                  text PRIMARY KEY,
    kind                  text NOT NULL,
    payload               jsonb NOT NULL,
    -- The interval the code declares, and the one an operator set, which wins while set.
    interval_ms           bigint NOT NULL CHECK (interval_ms >= 1000),
    override_interval_ms  bigint CHECK (override_interval_ms >= 1000),
    enabled               boolean NOT NULL DEFAULT true,
    next_run_at           timestamptz NOT NULL,
    last_run_at           timestamptz,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- The latest tick at or before `moment` of a schedule every `interval_ms` milliseconds.
CREATE FUNCTION jobs_tick_floor(moment timestamptz, interval_ms bigint) RETURNS timestamptz
    LANGUAGE sql STABLE STRICT
    AS $$
        SELECT to_timestamp(
            (floor(extract(epoch FROM moment) * 1000)::bigint / interval_ms * interval_ms) / 1000.0
        )
    $$;
