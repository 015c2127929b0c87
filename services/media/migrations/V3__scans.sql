-- The last clean scan of each file uploaded within the re-scan window, and what made it:
-- clamd's VERSION (engine / signature version / date). When clamd reports another, the
-- files scanned with the old one are scanned again (`media.rescan`); '' asks for it
-- whatever clamd reports (Media.Rescan).
CREATE TABLE scans (
    file_id     uuid PRIMARY KEY,
    uploaded_at timestamptz NOT NULL,
    scanner     text NOT NULL,
    scanned_at  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX scans_by_upload ON scans (uploaded_at DESC, file_id DESC);
