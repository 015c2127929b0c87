-- When a file's variant charge step began: a step older than an hour is taken as stuck (its
-- SetVariants died and none came since), and usage recounts stop waiting for it.
ALTER TABLE files ADD COLUMN variant_charge_pending_at timestamptz;
