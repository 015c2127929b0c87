-- Where blob_gc stopped, per part of its pass: the last blob key looked at, or the page token
-- of the files still to check. A run goes on from here; a pass that ends starts over.
CREATE TABLE gc_cursors (
    part       text PRIMARY KEY,
    position   text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
