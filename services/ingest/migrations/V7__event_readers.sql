-- Consumer groups that read each stream (recorded when a batch of the stream is delivered to
-- the group, refreshed at most once a minute). A batch's stored screenshots are deleted once
-- every group reading its stream has acknowledged it, not at the first acknowledgement.
CREATE TABLE event_readers (
    stream_id  text NOT NULL,
    group_name text NOT NULL,
    last_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_id, group_name)
);
