-- While a session's length is deferred, its reservation grows with the bytes received: the
-- bytes the current reservation holds. NULL: the declared size (rows written before this).
ALTER TABLE uploads ADD COLUMN held_bytes bigint CHECK (held_bytes >= 0);
