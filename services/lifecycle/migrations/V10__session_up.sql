-- Whether the user's worker session is up: the time of the latest "up" while it is (NULL when
-- it went down or never came up). Reports describe one session per user. A user whose session
-- is up is not inactive, however long since anything else they did; Redis keeps the same
-- state for quick reads, this column decides.
ALTER TABLE activity ADD COLUMN session_up_at timestamptz;

-- Sessions reported before this column: the latest session report of each user says.
UPDATE activity a SET session_up_at = h.at
FROM (SELECT DISTINCT ON (user_id) user_id, event, at FROM history
      WHERE event IN ('session_up', 'session_down')
      ORDER BY user_id, at DESC, id DESC) h
WHERE h.user_id = a.user_id AND h.event = 'session_up';
