-- Event streams: acknowledged frames as compressed micro-segments, sealed windows as batch
-- objects in the store, and each consumer group's deliveries.

CREATE TABLE event_streams (
    stream_id      text PRIMARY KEY,
    owner_id       text NOT NULL,
    -- Highest seq durably stored; frames at or below it are duplicates.
    durable_seq    bigint NOT NULL DEFAULT 0,
    -- End of the last sealed window: events stamped before it arrive late.
    sealed_until   timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE event_segments (
    id          bigserial PRIMARY KEY,
    stream_id   text NOT NULL REFERENCES event_streams (stream_id),
    first_seq   bigint NOT NULL,
    last_seq    bigint NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    -- lz4 of length-delimited stowage.v1.Event messages.
    data        bytea NOT NULL
);

CREATE INDEX event_segments_by_stream ON event_segments (stream_id, received_at, first_seq);

CREATE TABLE event_batches (
    seq          bigserial UNIQUE,
    id           uuid PRIMARY KEY,
    stream_id    text NOT NULL REFERENCES event_streams (stream_id),
    owner_id     text NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    first_seq    bigint NOT NULL,
    last_seq     bigint NOT NULL,
    event_count  integer NOT NULL,
    storage_key  text NOT NULL,
    screenshots  text[] NOT NULL DEFAULT '{}',
    late_seqs    bigint[] NOT NULL DEFAULT '{}',
    sealed_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, window_start)
);

CREATE INDEX event_batches_by_owner ON event_batches (owner_id, seq);

CREATE TABLE event_deliveries (
    group_name   text NOT NULL,
    batch_id     uuid NOT NULL REFERENCES event_batches (id),
    delivered_at timestamptz NOT NULL DEFAULT now(),
    acked_at     timestamptz,
    PRIMARY KEY (group_name, batch_id)
);
