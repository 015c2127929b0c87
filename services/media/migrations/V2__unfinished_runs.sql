-- Runs of a file's processing that started making its variants and never came back: the
-- worker was killed (out of memory, evicted) or the job ran out of time. A file that did so
-- a few times fails instead of being tried for ever. The row goes when a run comes back.
CREATE TABLE unfinished_runs (
    file_id    uuid PRIMARY KEY,
    started    integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
