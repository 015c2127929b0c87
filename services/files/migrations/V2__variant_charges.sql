-- Variant bytes already charged to the owner's usage (Quota.Charge), so a retried
-- SetVariants charges only what is still missing and a purge debits exactly what was charged.
ALTER TABLE files ADD COLUMN variant_bytes_charged bigint NOT NULL DEFAULT 0
    CHECK (variant_bytes_charged >= 0);
