-- Streams are named per owner: two users' "desk" are two streams. The key Ingest keeps is
-- {owner}/{stream} (neither part can hold a '/'); clients keep using their own names. Streams
-- named before are renamed in place; objects already stored keep their keys (rows name them).
-- Old names stay resolvable for the keys stored under them (events/{stream}/screens/...):
-- each old name belonged to one owner, so its objects are that stream's, nobody else's.
CREATE TABLE event_stream_old_names (
    old_name  text PRIMARY KEY,
    stream_id text NOT NULL
);
INSERT INTO event_stream_old_names (old_name, stream_id)
SELECT stream_id, owner_id || '/' || stream_id FROM event_streams;

ALTER TABLE event_segments DROP CONSTRAINT IF EXISTS event_segments_stream_id_fkey;
ALTER TABLE event_batches DROP CONSTRAINT IF EXISTS event_batches_stream_id_fkey;

UPDATE event_segments s SET stream_id = st.owner_id || '/' || st.stream_id
FROM event_streams st WHERE s.stream_id = st.stream_id;
UPDATE event_batches b SET stream_id = st.owner_id || '/' || st.stream_id
FROM event_streams st WHERE b.stream_id = st.stream_id;
UPDATE event_readers r SET stream_id = st.owner_id || '/' || st.stream_id
FROM event_streams st WHERE r.stream_id = st.stream_id;
UPDATE event_streams SET stream_id = owner_id || '/' || stream_id;

ALTER TABLE event_segments ADD CONSTRAINT event_segments_stream_id_fkey
    FOREIGN KEY (stream_id) REFERENCES event_streams (stream_id);
ALTER TABLE event_batches ADD CONSTRAINT event_batches_stream_id_fkey
    FOREIGN KEY (stream_id) REFERENCES event_streams (stream_id);
