-- Segments are LZ4 already: PostgreSQL must not try to compress them again (pglz over
-- compressed bytes is all cost, no gain).
ALTER TABLE event_segments ALTER COLUMN data SET STORAGE EXTERNAL;
-- What the sealer needs without decompressing: raw size (to cut batches), the earliest event
-- timestamp (only segments with events stamped before the last sealed window are decoded to
-- flag late ones) and the screenshots Ingest stored for its events. NULL min_ts marks a
-- segment from before these columns: the sealer decodes it.
ALTER TABLE event_segments ADD COLUMN raw_bytes integer NOT NULL DEFAULT 0;
-- Segments written before: their raw size is the LZ4 block's prefix (little-endian u32).
UPDATE event_segments
SET raw_bytes = get_byte(data, 0) + (get_byte(data, 1) << 8) + (get_byte(data, 2) << 16)
              + (get_byte(data, 3) << 24)
WHERE length(data) >= 4;
ALTER TABLE event_segments ADD COLUMN min_ts timestamptz;
ALTER TABLE event_segments ADD COLUMN screenshots text[] NOT NULL DEFAULT '{}';

-- A window may be sealed as several batches (each small enough for one message).
ALTER TABLE event_batches DROP CONSTRAINT event_batches_stream_id_window_start_key;
ALTER TABLE event_batches ADD UNIQUE (stream_id, window_start, first_seq);

-- Consumer lag and retention look at batches by the time they were sealed.
CREATE INDEX event_batches_by_sealed_at ON event_batches (sealed_at);

-- The subscriber (one SubscribeBatches call) a delivery went to: a member holds at most
-- `prefetch` unacknowledged batches, so a group's batches spread over its members.
ALTER TABLE event_deliveries ADD COLUMN member uuid;
CREATE INDEX event_deliveries_in_flight ON event_deliveries (group_name, member)
    WHERE acked_at IS NULL;
