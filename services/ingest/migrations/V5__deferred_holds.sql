-- While a session's length is deferred, its reservation grows with the bytes received: the
-- bytes the current reservation holds. NULL: the declared size (rows written before this).
-- No constraint, so adding it does not scan the table.
ALTER TABLE uploads ADD COLUMN held_bytes bigint;
