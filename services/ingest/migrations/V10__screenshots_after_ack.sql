-- Screenshots kept inline in events leave their batch once every group reading the stream has
-- acknowledged it, as stored ones are deleted then. Segments and batches say whether they hold
-- any (NULL: written before this column, not known; the batch is then read to find out).
ALTER TABLE event_segments ADD COLUMN inline_screenshots boolean;
ALTER TABLE event_batches ADD COLUMN inline_screenshots boolean;
-- Stored screenshots of a batch that its last acknowledgement spared (the dev option keeping
-- the newest N of a stream): a later acknowledgement of the stream deletes them once newer ones
-- take their place.
ALTER TABLE event_batches ADD COLUMN spared text[] NOT NULL DEFAULT '{}';
