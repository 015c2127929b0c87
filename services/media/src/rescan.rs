//! Re-scans: files scanned clean are scanned again when the scanner's signatures change.
//!
//! Malware is often recognised days after it spreads: a file that scanned clean at upload
//! may be found by the next signature update. Each clean scan is recorded with the
//! scanner's version (`zVERSION`: engine, signature version and date) in `media.scans`;
//! the `media.rescan` schedule (`media.rescan_check` jobs, every
//! `STOWAGE_MEDIA__RESCAN_INTERVAL`) reads the version clamd reports now and queues a
//! `media.rescan` job for each file uploaded within `STOWAGE_MEDIA__RESCAN_WINDOW` whose
//! last scan was made with another. A file found now goes back to processing, whose run
//! scans it again and quarantines it as any infected upload (the one path to quarantine,
//! with its guards against a concurrent release). Databases of one's own do not change
//! the version clamd reports: an admin asks for a re-scan with `Media.Rescan`.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stowage_db::Cached;
use stowage_jobs::{Handler, Job, JobError, NewJob};
use stowage_proto::v1 as pb;
use uuid::Uuid;

use crate::{
    Media,
    clamd::{ScanError, Verdict},
    error::{Error, Result},
    process::retry_status,
};

/// Name of the schedule that looks for files to scan again.
pub const RESCAN_SCHEDULE: &str = "media.rescan";
/// Kind of the job that looks for files scanned with other signatures and queues their
/// re-scans.
pub const RESCAN_CHECK_JOB: &str = "media.rescan_check";
/// Kind of the job that scans one file again.
pub const RESCAN_JOB: &str = "media.rescan";

/// Files looked at per query of a check.
const CHECK_PAGE: i64 = 1000;

/// Most re-scans one check queues; files past them (the oldest) are queued by the next
/// check, as those queued now are recorded with the new version when they ran.
const MAX_QUEUED_PER_CHECK: u64 = 50_000;

/// Rows of files out of the window deleted per statement.
const PRUNE_BATCH: i64 = 10_000;

impl Media {
    /// Whether re-scans run here: a scanner, and a window.
    fn rescans_on(&self) -> bool {
        self.scanner.is_some() && !self.settings.rescan_window.is_zero()
    }

    /// Uploads at or after this are within the re-scan window.
    fn window_start(&self) -> DateTime<Utc> {
        Utc::now()
            - chrono::Duration::from_std(self.settings.rescan_window)
                .unwrap_or(chrono::Duration::MAX)
    }

    /// A check: forgets the scans of files that left the window, then queues a re-scan of
    /// every file in it whose last clean scan was made with another version than clamd's
    /// now. Returns how many jobs it queued.
    pub async fn queue_rescans(&self) -> Result<u64, JobError> {
        let Some(scanner) = self.scanner.as_ref().filter(|_| self.rescans_on()) else {
            return Ok(0);
        };
        let version = scanner.version().await.map_err(JobError::retry)?;
        let window_start = self.window_start();
        let conn = self.pool.get().await.map_err(JobError::retry)?;
        loop {
            let pruned = conn
                .execute_cached(
                    "DELETE FROM media.scans WHERE file_id IN
                         (SELECT file_id FROM media.scans WHERE uploaded_at < $1 LIMIT $2)",
                    &[&window_start, &PRUNE_BATCH],
                )
                .await
                .map_err(JobError::retry)?;
            if pruned < PRUNE_BATCH as u64 {
                break;
            }
        }
        let mut queued = 0;
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        'pages: loop {
            let rows = match after {
                None => {
                    conn.query_cached(
                        "SELECT file_id, uploaded_at, scanned_at FROM media.scans
                         WHERE uploaded_at >= $1 AND scanner <> $2
                         ORDER BY uploaded_at DESC, file_id DESC LIMIT $3",
                        &[&window_start, &version, &CHECK_PAGE],
                    )
                    .await
                }
                Some((at, id)) => {
                    conn.query_cached(
                        "SELECT file_id, uploaded_at, scanned_at FROM media.scans
                         WHERE uploaded_at >= $1 AND scanner <> $2
                           AND (uploaded_at, file_id) < ($4, $5)
                         ORDER BY uploaded_at DESC, file_id DESC LIMIT $3",
                        &[&window_start, &version, &CHECK_PAGE, &at, &id],
                    )
                    .await
                }
            }
            .map_err(JobError::retry)?;
            for row in &rows {
                let file_id: Uuid = row.get(0);
                let scanned_at: DateTime<Utc> = row.get(2);
                // One job per file and scan: a file scanned since (by its re-scan) gets a new
                // one at the next change, and a check finding it again meanwhile does not.
                let job = NewJob::new(
                    RESCAN_JOB,
                    format!("rescan:{file_id}:{}", scanned_at.timestamp_micros()),
                    serde_json::json!({ "file_id": file_id }),
                );
                if self
                    .queue
                    .enqueue_in(&conn, job)
                    .await
                    .map_err(JobError::retry)?
                    .created
                {
                    queued += 1;
                    if queued >= MAX_QUEUED_PER_CHECK {
                        tracing::info!(
                            queued,
                            "re-scans queued up to the most per check; the next check queues the rest"
                        );
                        break 'pages;
                    }
                }
            }
            match rows.last() {
                Some(last) if rows.len() as i64 == CHECK_PAGE => {
                    after = Some((last.get(1), last.get(0)));
                }
                _ => break,
            }
        }
        if queued > 0 {
            tracing::info!(queued, scanner = %version, "files queued to be scanned again with the scanner's current signatures");
            metrics::counter!("stowage_media_rescans_queued_total").increment(queued);
        }
        Ok(queued)
    }

    /// Scans `file_id` again. A file in processing is scanned by its run, one quarantined or
    /// released by an admin is left as it is. Found now, the file goes back to processing
    /// and its processing job runs again: that run scans it and quarantines it.
    async fn rescan(&self, file_id: Uuid) -> Result<(), JobError> {
        let started = tokio::time::Instant::now();
        let Some(scanner) = &self.scanner else {
            return Ok(());
        };
        let Some(file) = self.get_file(file_id).await? else {
            self.pool
                .get()
                .await
                .map_err(JobError::retry)?
                .execute_cached("DELETE FROM media.scans WHERE file_id = $1", &[&file_id])
                .await
                .map_err(JobError::retry)?;
            return Ok(());
        };
        let scannable = [pb::FileStatus::Ready as i32, pb::FileStatus::Failed as i32];
        if !scannable.contains(&file.status) || self.released(file_id).await?.is_some() {
            return Ok(());
        }
        let scanned = self.scan_stored(scanner, &file, started).await?;
        match scanned.verdict {
            Ok(Verdict::Clean) => {
                self.record_clean_scan(&file, file_id, &scanned.scanner)
                    .await
            }
            Ok(Verdict::Infected(signature)) => {
                tracing::warn!(%file_id, owner = %file.owner_id, signature, "a file that scanned clean is found by the scanner's new signatures; processed again to quarantine it");
                metrics::counter!("stowage_media_rescans_found_total").increment(1);
                self.files
                    .set_variants(pb::SetVariantsRequest {
                        file_id: file.id.clone(),
                        status: pb::FileStatus::Processing as i32,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| retry_status("Files.SetVariants", &s))?;
                self.reprocess(file_id).await.map_err(JobError::retry)?;
                Ok(())
            }
            // Scannable when it was scanned (a lower limit since?): it stays as it is, and
            // its scan as recorded, so the next change of signatures tries it again.
            Err(ScanError::Refused(why)) => {
                tracing::warn!(%file_id, %why, "a re-scan was refused by the scanner; the file stays as it is");
                Ok(())
            }
            Err(error @ ScanError::Input(_)) => Err(JobError::retry(error)),
            Err(error @ ScanError::Unavailable(_)) => {
                metrics::counter!("stowage_media_scan_unavailable_total").increment(1);
                Err(JobError::retry(error))
            }
        }
    }

    /// Marks every file uploaded within the window, or at or after `uploaded_after` when
    /// that is later, to be scanned again whatever scanned it, and queues a check that queues
    /// their re-scans. Returns how many files were marked.
    pub(crate) async fn mark_for_rescan(
        &self,
        uploaded_after: Option<DateTime<Utc>>,
    ) -> Result<u64> {
        if self.scanner.is_none() {
            return Err(Error::FailedPrecondition(
                "no scanner is configured (STOWAGE_MEDIA__CLAMD_URL)".into(),
            ));
        }
        if self.settings.rescan_window.is_zero() {
            return Err(Error::FailedPrecondition(
                "re-scans are off (STOWAGE_MEDIA__RESCAN_WINDOW is 0)".into(),
            ));
        }
        let since = uploaded_after.map_or(self.window_start(), |at| at.max(self.window_start()));
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let marked = tx
            .execute_cached(
                "UPDATE media.scans SET scanner = '' WHERE uploaded_at >= $1",
                &[&since],
            )
            .await?;
        self.queue
            .enqueue_in(
                &tx,
                NewJob::new(
                    RESCAN_CHECK_JOB,
                    format!("rescan-check:{}", Uuid::now_v7()),
                    serde_json::json!({}),
                ),
            )
            .await?;
        tx.commit().await?;
        Ok(marked)
    }

    /// The handler of `media.rescan_check` and `media.rescan` jobs.
    pub fn rescan_handler(self: &Arc<Self>) -> Arc<dyn Handler> {
        Arc::new(Rescans(self.clone()))
    }
}

struct Rescans(Arc<Media>);

#[async_trait]
impl Handler for Rescans {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        if job.kind == RESCAN_CHECK_JOB {
            return self.0.queue_rescans().await.map(|_| ());
        }
        let file_id = job
            .payload
            .get("file_id")
            .and_then(serde_json::Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| JobError::permanent("payload.file_id: missing or not a UUID"))?;
        self.0.rescan(file_id).await
    }
}
