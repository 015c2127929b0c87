-- A file's variant charge moves one step at a time: the step in progress (its target total)
-- is recorded before Quota is asked, so a step interrupted anywhere is finished with the same
-- key and amount, and the count of steps names each (totals can come back to an earlier pair:
-- a variant replaced and rebuilt).
ALTER TABLE files ADD COLUMN variant_charge_moves bigint NOT NULL DEFAULT 0;
ALTER TABLE files ADD COLUMN variant_charge_pending bigint CHECK (variant_charge_pending >= 0);
