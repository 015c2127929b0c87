-- blob_gc asks which keys unfinished uploads name (Ingest.FindUploadKeys).
CREATE INDEX uploads_unfinished_keys ON uploads (storage_key)
    WHERE state IN ('receiving', 'registered', 'open', 'completing');
