-- Where each published event sits in its Redis stream (the entry id XADD gave it, split into
-- its two numbers so rows compare as entries do) and when every consumer group had
-- acknowledged it ("settled"). Rows published before these columns have no entry id: they
-- are left out of settling, as they were before.
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS stream_ms bigint;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS stream_seq bigint;
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS settled_at timestamptz;
CREATE INDEX IF NOT EXISTS outbox_unsettled ON outbox (topic, stream_ms, stream_seq)
    WHERE settled_at IS NULL AND stream_ms IS NOT NULL;

-- How many entries the relays have added to each topic's stream, as Redis counts them
-- (XINFO STREAM's entries-added): Redis counting fewer has lost some.
CREATE TABLE IF NOT EXISTS outbox_streams (
    topic text PRIMARY KEY,
    added bigint NOT NULL
);

-- A consumer group's failed attempts at an event, while it is retried.
CREATE TABLE IF NOT EXISTS event_failures (
    consumer   text NOT NULL,
    event_id   uuid NOT NULL,
    failures   integer NOT NULL,
    last_error text NOT NULL,
    failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS event_failures_at ON event_failures (failed_at);

-- Events a consumer group gave up on after its last attempt, for an operator: the event
-- whole, and why it failed.
CREATE TABLE IF NOT EXISTS dead_events (
    consumer    text NOT NULL,
    event_id    uuid NOT NULL,
    topic       text NOT NULL,
    key         text NOT NULL,
    payload     jsonb NOT NULL,
    traceparent text,
    occurred_at timestamptz NOT NULL,
    failures    integer NOT NULL,
    last_error  text NOT NULL,
    dead_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS dead_events_at ON dead_events (dead_at);
