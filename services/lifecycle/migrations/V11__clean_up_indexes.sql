-- Statements that run every minute read only the rows they are about, not every user's.
-- Users whose notice said their files go to trash, not yet cleaned (clean_after_grace).
CREATE INDEX activity_trash_due ON activity (notice_sent_at)
    WHERE notice_sent_at IS NOT NULL AND cleaned_at IS NULL AND notice_action = 'trash';
-- Ephemeral blobs acknowledged or past their time (ephemeral_cleanup: the two combined).
CREATE INDEX ephemeral_acknowledged ON ephemeral (acknowledged_at)
    WHERE acknowledged_at IS NOT NULL;
CREATE INDEX ephemeral_expires ON ephemeral (expires_at);
