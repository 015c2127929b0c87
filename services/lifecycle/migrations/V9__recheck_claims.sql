-- A recheck is claimed for a while (a lease) instead of deleted when it starts, and deleted
-- when done: a process that dies in the middle leaves it to run again once the lease ends.
-- A new request for the user clears the claim (its own burst follows).
ALTER TABLE rechecks ADD COLUMN claim uuid;
