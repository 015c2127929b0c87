-- When a noticed user's files may go to trash, fixed when the notice is sent (now + the grace
-- then in force): a grace shortened afterwards does not move the deadline the notice gave.
-- Notices sent before this column keep the grace of the policy in force.
ALTER TABLE activity ADD COLUMN clean_after timestamptz;
