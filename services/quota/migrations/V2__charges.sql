-- Derived bytes (variants made by Media) are charged to their owner's usage.
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('commit', 'debit', 'charge', 'reconcile'));
