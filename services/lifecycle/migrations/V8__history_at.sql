-- history_prune deletes by age.
CREATE INDEX IF NOT EXISTS history_at ON history (at);
