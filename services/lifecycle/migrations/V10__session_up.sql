-- Whether the user's worker session is up: since when, while it is (NULL when it went down or
-- never came up). A user whose session is up is not inactive, however long since anything
-- else they did; Redis keeps the same state for quick reads, this column decides.
ALTER TABLE activity ADD COLUMN session_up_at timestamptz;
