-- Consumer groups that read each stream (recorded when a batch of the stream is delivered to
-- the group; every row of a group is refreshed, at most once a minute, whenever it is
-- delivered anything). A batch's stored screenshots are deleted once every group reading its
-- stream has acknowledged it, not at the first acknowledgement. A group delivered nothing
-- for the retention is forgotten.
CREATE TABLE event_readers (
    group_name text NOT NULL,
    stream_id  text NOT NULL,
    last_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_name, stream_id)
);
CREATE INDEX event_readers_by_stream ON event_readers (stream_id);

-- The groups reading already: those with deliveries kept.
INSERT INTO event_readers (group_name, stream_id)
SELECT DISTINCT d.group_name, b.stream_id
FROM event_deliveries d JOIN event_batches b ON b.id = d.batch_id;
