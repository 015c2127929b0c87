-- What a user's notice said would follow its grace window: clean-up trashes only the files of
-- users whose notice said so, whatever the policy says now. Notices already sent take what
-- they said from their history record (written in the same transaction, moments later).
ALTER TABLE activity ADD COLUMN notice_action text;

UPDATE activity a SET notice_action = h.action
FROM (SELECT DISTINCT ON (user_id) user_id, at, detail->>'action_after_grace' AS action
      FROM history WHERE event = 'notice_sent'
      ORDER BY user_id, at DESC) h
WHERE a.notice_sent_at IS NOT NULL
  AND h.user_id = a.user_id
  -- The record's time is the service's clock, the column's the database's: a minute's leeway.
  AND h.at >= a.notice_sent_at - interval '1 minute';
