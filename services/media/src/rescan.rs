//! Re-scans: files scanned clean are scanned again when the scanner's signatures change.
//!
//! Malware is often recognised days after it spreads: a file that scanned clean at upload
//! may be found by the next signature update. Each clean scan is recorded in `media.scans`
//! with what clamd said it scans with (`zVERSION`: engine, signature version, their date);
//! the `media.rescan` schedule (`media.rescan_check` jobs, every
//! `STOWAGE_MEDIA__RESCAN_INTERVAL`) reads the signature version clamd reports now and queues
//! a `media.rescan` job for each file uploaded within `STOWAGE_MEDIA__RESCAN_WINDOW` that was
//! scanned with older ones. A file found now goes back to processing, whose run scans it
//! again and quarantines it as any infected upload (the one path to quarantine, with its
//! guards against a concurrent release). Databases of one's own do not change the version
//! clamd reports: an admin asks for a re-scan with `Media.Rescan`.
//!
//! Re-scans run in a worker of their own, one at a time, so that a wave of them after an
//! update never holds new uploads back.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stowage_db::Cached;
use stowage_jobs::{Handler, Job, JobError, NewJob};
use stowage_proto::v1 as pb;
use uuid::Uuid;

use crate::{
    Media,
    clamd::{ScanError, Verdict, signature_version},
    error::{Error, Result},
    grpc::delete_outcome,
    process::{payload_file_id, retry_status, scanner_unavailable},
};

/// Name of the schedule that looks for files to scan again.
pub const RESCAN_SCHEDULE: &str = "media.rescan";
/// Kind of the job that looks for files scanned with older signatures and queues their
/// re-scans.
pub const RESCAN_CHECK_JOB: &str = "media.rescan_check";
/// Kind of the job that scans one file again.
pub const RESCAN_JOB: &str = "media.rescan";

/// Files queued per transaction of a check.
const CHECK_PAGE: i64 = 1000;

/// Most re-scans one check queues, and no more than fall due (at [`RESCAN_PACE`]) before the
/// next; the rest (the oldest files) wait for the next check.
const MAX_QUEUED_PER_CHECK: u64 = 50_000;

/// Rows of files out of the window deleted per statement.
const PRUNE_BATCH: i64 = 10_000;

/// A re-scan queued this long ago whose job is over and the file not scanned since (the job
/// dead after a long scanner outage, or lost) is queued again.
const STALE_QUEUED: Duration = Duration::from_secs(24 * 3600);

/// Time between two re-scans a check queues: at most ten a second fall due, which one
/// worker per replica takes one at a time (slower scans fall behind: a backlog then says
/// re-scans cannot keep up).
pub const RESCAN_PACE: Duration = Duration::from_millis(100);

impl Media {
    /// Whether re-scans run here: a scanner, and a window.
    pub fn rescans_on(&self) -> bool {
        self.scanner.is_some() && !self.settings.rescan_window.is_zero()
    }

    /// Uploads at or after this are within the re-scan window.
    fn window_start(&self) -> DateTime<Utc> {
        Utc::now()
            - chrono::Duration::from_std(self.settings.rescan_window)
                .unwrap_or(chrono::Duration::MAX)
    }

    /// A check: forgets the scans of files that left the window, then queues a re-scan of
    /// every file in it scanned with older signatures than clamd reports now (or with none
    /// reported), or asked for by an admin, newest first, spread out at [`RESCAN_PACE`].
    /// Returns how many it queued.
    pub async fn queue_rescans(&self) -> Result<u64, JobError> {
        let Some(scanner) = self.scanner.as_ref().filter(|_| self.rescans_on()) else {
            return Ok(0);
        };
        let version = scanner.version().await.map_err(scanner_unavailable)?;
        let current = signature_version(&version);
        let window_start = self.window_start();
        let stale = Utc::now() - chrono::Duration::from_std(STALE_QUEUED).unwrap_or_default();
        let mut conn = self.pool.get().await.map_err(JobError::retry)?;
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
        // Queued long ago, or asked for by an admin since, and its job over without a scan
        // (dead in a long scanner outage) or gone: queued again.
        conn.execute_cached(
            "UPDATE media.scans s SET queued_at = NULL, job_key = NULL
             WHERE (queued_at < $1 OR asked_at > queued_at)
               AND NOT EXISTS (SELECT 1 FROM media.jobs j WHERE j.key = s.job_key
                                 AND j.state IN ('queued', 'running', 'failed'))",
            &[&stale],
        )
        .await
        .map_err(JobError::retry)?;
        let start = Utc::now();
        let pace = chrono::Duration::from_std(RESCAN_PACE).unwrap_or_default();
        let mut queued: u64 = 0;
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        // No more than fall due before the next check: waves do not pile up.
        let most = (self.settings.rescan_interval.as_millis() / RESCAN_PACE.as_millis().max(1))
            .clamp(1, u128::from(MAX_QUEUED_PER_CHECK)) as u64;
        while queued < most {
            // A page at a time, each in a transaction: the jobs exist exactly when their rows
            // say so, and a check running beside this one takes other rows.
            let tx = conn.transaction().await.map_err(JobError::retry)?;
            let (after_at, after_id) = (after.map(|a| a.0), after.map(|a| a.1));
            let due: Vec<(Uuid, DateTime<Utc>)> = tx
                .query_cached(
                    "SELECT file_id, uploaded_at FROM media.scans
                     WHERE queued_at IS NULL AND uploaded_at >= $1
                       AND ($4::timestamptz IS NULL OR (uploaded_at, file_id) < ($4, $5::uuid))
                       AND (coalesce(signatures, -1) < $2::bigint OR asked_at IS NOT NULL)
                     ORDER BY uploaded_at DESC, file_id DESC LIMIT $3
                     FOR UPDATE SKIP LOCKED",
                    &[&window_start, &current, &CHECK_PAGE, &after_at, &after_id],
                )
                .await
                .map_err(JobError::retry)?
                .iter()
                .map(|row| (row.get(0), row.get(1)))
                .collect();
            let Some(&(last_id, last_at)) = due.last() else {
                break;
            };
            after = Some((last_at, last_id));
            let mut keys = Vec::with_capacity(due.len());
            let mut ids = Vec::with_capacity(due.len());
            for (file_id, _) in &due {
                // One job per queueing: a file queued again (its job dead, an admin's request)
                // gets a new one. Due one after another, so that a wave of them never stands
                // as a backlog before the worker (and its alert) nor takes clamd whole.
                let key = format!("rescan:{file_id}:{}", start.timestamp_micros());
                let mut job =
                    NewJob::new(RESCAN_JOB, &key, serde_json::json!({ "file_id": file_id }));
                job.run_at = Some(start + pace * i32::try_from(queued).unwrap_or(i32::MAX));
                self.queue
                    .enqueue_in(&tx, job)
                    .await
                    .map_err(JobError::retry)?;
                keys.push(key);
                ids.push(*file_id);
                queued += 1;
            }
            tx.execute_cached(
                "UPDATE media.scans s SET queued_at = $3, job_key = q.key
                 FROM unnest($1::uuid[], $2::text[]) AS q(file_id, key)
                 WHERE s.file_id = q.file_id",
                &[&ids, &keys, &start],
            )
            .await
            .map_err(JobError::retry)?;
            tx.commit().await.map_err(JobError::retry)?;
        }
        if queued > 0 {
            tracing::info!(queued, scanner = %version, "files queued to be scanned again with the scanner's current signatures");
            metrics::counter!("stowage_media_rescans_queued_total").increment(queued);
        }
        Ok(queued)
    }

    /// Scans `file_id` again. A file in processing is scanned by its run (started again if
    /// it has none); one quarantined or released by an admin leaves re-scans. Found now, the
    /// file goes back to processing and its processing job runs again: that run scans it
    /// and quarantines it.
    async fn rescan(&self, file_id: Uuid, job_key: &str) -> Result<(), JobError> {
        let started = tokio::time::Instant::now();
        let Some(scanner) = &self.scanner else {
            return Ok(());
        };
        // Still to do? Not for a file scanned since (a second job for it), out of the window
        // or out of re-scans.
        let row = self
            .pool
            .get()
            .await
            .map_err(JobError::retry)?
            .query_opt_cached(
                "SELECT signatures, asked_at IS NOT NULL FROM media.scans
                 WHERE file_id = $1 AND uploaded_at >= $2",
                &[&file_id, &self.window_start()],
            )
            .await
            .map_err(JobError::retry)?;
        let Some(row) = row else {
            return Ok(());
        };
        let (signatures, asked): (Option<i64>, bool) = (row.get(0), row.get(1));
        let seen = self.read_scanner(scanner).await?;
        let older = seen
            .signatures()
            .is_some_and(|current| signatures.unwrap_or(-1) < current);
        if !asked && !older {
            // Free for the next check (this job's mark, not a later one's).
            self.pool
                .get()
                .await
                .map_err(JobError::retry)?
                .execute_cached(
                    "UPDATE media.scans SET queued_at = NULL, job_key = NULL
                     WHERE file_id = $1 AND job_key = $2",
                    &[&file_id, &job_key],
                )
                .await
                .map_err(JobError::retry)?;
            return Ok(());
        }
        let file = match self.get_file(file_id).await? {
            Some(file) if self.released(file_id).await?.is_none() => file,
            // Gone, held or released: not scanned again.
            _ => return self.forget_scan(file_id).await,
        };
        let status = pb::FileStatus::try_from(file.status).unwrap_or_default();
        match status {
            pb::FileStatus::Ready | pb::FileStatus::Failed => {}
            pb::FileStatus::Processing => {
                // Its run scans it (one whose start was lost is started: idempotent).
                self.reprocess(file_id).await.map_err(JobError::retry)?;
                return Ok(());
            }
            pb::FileStatus::Quarantined | pb::FileStatus::Unspecified => {
                return self.forget_scan(file_id).await;
            }
        }
        match self.scan_stored(scanner, &file, started).await? {
            Ok(Verdict::Clean) => self.record_clean_scan(&file, file_id, &seen).await,
            Ok(Verdict::Infected(signature)) => {
                tracing::warn!(%file_id, owner = %file.owner_id, signature, "a file that scanned clean is found by the scanner's new signatures; processed again to quarantine it");
                metrics::counter!("stowage_media_rescans_found_total").increment(1);
                // Announced again after a release, as a file quarantined at upload is.
                for announced in ["ready", "failed"] {
                    delete_outcome(&self.pool, file_id, announced)
                        .await
                        .map_err(JobError::retry)?;
                }
                self.files
                    .set_variants(pb::SetVariantsRequest {
                        file_id: file.id.clone(),
                        status: pb::FileStatus::Processing as i32,
                        ..Default::default()
                    })
                    .await
                    .map_err(|s| retry_status("Files.SetVariants", &s))?;
                self.reprocess(file_id).await.map_err(JobError::retry)?;
                // Its run records it again if it scans clean then.
                self.forget_scan(file_id).await
            }
            // Scannable when it was scanned (a lower limit since?): it stays as it is, and
            // counts as tried with these signatures; the next ones try it again.
            Err(ScanError::Refused(why)) => {
                tracing::warn!(%file_id, %why, "a re-scan was refused by the scanner; the file stays as it is");
                self.pool
                    .get()
                    .await
                    .map_err(JobError::retry)?
                    .execute_cached(
                        "UPDATE media.scans SET signatures = greatest(signatures, $2),
                             queued_at = NULL, job_key = NULL,
                             asked_at = CASE WHEN asked_at < $3 THEN NULL ELSE asked_at END
                         WHERE file_id = $1",
                        &[&file_id, &seen.signatures(), &seen.began],
                    )
                    .await
                    .map_err(JobError::retry)?;
                Ok(())
            }
            Err(error @ ScanError::Input(_)) => Err(JobError::retry(error)),
            Err(error @ ScanError::Unavailable(_)) => Err(scanner_unavailable(error)),
        }
    }

    /// `file_id` leaves re-scans.
    async fn forget_scan(&self, file_id: Uuid) -> Result<(), JobError> {
        self.pool
            .get()
            .await
            .map_err(JobError::retry)?
            .execute_cached("DELETE FROM media.scans WHERE file_id = $1", &[&file_id])
            .await
            .map_err(JobError::retry)?;
        Ok(())
    }

    /// Asks for a re-scan of every file uploaded within the window, or at or after
    /// `uploaded_after` when that is later, whatever scanned it, and queues a check that
    /// queues them (a file already queued is scanned by the job it has, which begins after
    /// this request). Returns how many files were marked.
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
                "UPDATE media.scans SET asked_at = now() WHERE uploaded_at >= $1",
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
        self.0.rescan(payload_file_id(job)?, &job.key).await
    }
}
