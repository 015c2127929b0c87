-- The outbox of a producing service and the dedupe record of a consuming one, in that
-- service's schema (the search path points there). Files created its outbox before this
-- crate existed, hence IF NOT EXISTS and the added columns.

CREATE TABLE IF NOT EXISTS outbox (
    id           bigserial PRIMARY KEY,
    topic        text NOT NULL,
    key          text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz
);
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS event_id uuid NOT NULL DEFAULT gen_random_uuid();
ALTER TABLE outbox ADD COLUMN IF NOT EXISTS traceparent text;
CREATE INDEX IF NOT EXISTS outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS outbox_published ON outbox (published_at) WHERE published_at IS NOT NULL;

-- One row per event a consumer group has applied, written in the transaction of its effect.
CREATE TABLE IF NOT EXISTS consumed_events (
    consumer    text NOT NULL,
    event_id    uuid NOT NULL,
    consumed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX IF NOT EXISTS consumed_events_at ON consumed_events (consumed_at);
