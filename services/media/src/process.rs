//! One file's processing: the `media.process` job.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Utc};
use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as ObjectPath};
use stowage_db::{Cached, PgPool};
use stowage_events::topics;
use stowage_jobs::{Handler, Job, JobError, Queue};
use stowage_proto::v1 as pb;
use stowage_runtime::mesh::FilesApi;
use tokio::{io::AsyncWriteExt, sync::Semaphore};
use tonic::Code;
use uuid::Uuid;

use crate::{
    Plan,
    clamd::{Clamd, ScanError, Verdict},
    imaging::{self, DecodeLimits, ImageError, Processed},
    plan,
    video::{ToolError, Tools},
};

/// Longest video (in ms) that also gets a browser-ready MP4 variant: two minutes, so the
/// transcode ends well within the tool's and the job's time limits on two cores.
pub const TRANSCODE_MAX_MS: u64 = 120_000;

/// How Media processes files.
#[derive(Clone, Debug)]
pub struct MediaSettings {
    /// Limits of every image decode.
    pub limits: DecodeLimits,
    /// Longest image decode and render.
    pub decode_timeout: Duration,
    /// Largest file copied locally for ffprobe / ffmpeg.
    pub max_video_size: u64,
    /// ffprobe / ffmpeg.
    pub tools: Tools,
    /// Image decodes at once (a bounded pool off the async runtime).
    pub decode_slots: usize,
    /// A run's time limit (the queue's job timeout): a transcode is given what is left of it.
    pub job_timeout: Duration,
    /// Files uploaded this long ago or less are scanned again when the scanner's signatures
    /// change (see [`crate::rescan`]); zero: never.
    pub rescan_window: Duration,
    /// How often re-scans are looked for.
    pub rescan_interval: Duration,
}

/// Time a run keeps after its scan for the rest of its work and to record the verdict.
const AFTER_SCAN: Duration = Duration::from_secs(30);

/// Time a run keeps after its transcode, to probe and store the copy and record the file.
const AFTER_TRANSCODE: Duration = Duration::from_secs(30);

/// Shortest transcode worth starting: with less time left the video keeps its poster only.
const MIN_TRANSCODE: Duration = Duration::from_secs(10);

/// Media's processing core, shared by the job handler and the admin API.
pub struct Media {
    pub(crate) pool: PgPool,
    pub(crate) queue: Queue,
    pub(crate) files: Arc<dyn FilesApi>,
    store: Arc<dyn ObjectStore>,
    pub(crate) scanner: Option<Clamd>,
    pub(crate) settings: MediaSettings,
    decode_slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media")
            .field("scanner", &self.scanner)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// What scans with, read before a scan begins (see [`Media::read_scanner`]).
pub(crate) struct Seen {
    /// clamd's VERSION; empty when re-scans are off.
    pub(crate) scanner: String,
    /// When the scan began, by the database's clock (which an admin's request for a re-scan
    /// is stamped with).
    pub(crate) began: DateTime<Utc>,
}

impl Seen {
    /// The signature version in [`Self::scanner`].
    pub(crate) fn signatures(&self) -> Option<i64> {
        crate::clamd::signature_version(&self.scanner)
    }
}

/// A scanner that does not answer: counted, and the job tried again later.
pub(crate) fn scanner_unavailable(error: ScanError) -> JobError {
    metrics::counter!("stowage_media_scan_unavailable_total").increment(1);
    JobError::retry(error)
}

/// How a run ends for the file.
enum Outcome {
    Ready(Derived),
    Failed(String),
    Quarantined(String),
}

/// What was derived from a file.
#[derive(Default)]
struct Derived {
    variants: Vec<pb::Variant>,
    width: u32,
    height: u32,
    duration_ms: u64,
    codec: String,
}

/// The store key of `file_id`'s `variant`: beside the owner's files, dated like the original
/// so a retried run writes the same keys (no duplicates, no orphans).
pub fn variant_key(
    owner: &str,
    created_at: DateTime<Utc>,
    file_id: &str,
    variant: &str,
    ext: &str,
) -> String {
    stowage_blob::keys::variant(
        owner,
        created_at.year(),
        created_at.month(),
        file_id,
        variant,
        ext,
    )
    .to_string()
}

/// When `file` was registered: its variants are filed under that month.
fn created_at(file: &pb::File) -> DateTime<Utc> {
    file.created_at
        .as_ref()
        .and_then(stowage_runtime::time::from_timestamp)
        .unwrap_or_else(Utc::now)
}

/// Why a call to a peer failed: tried again, unless the peer refused what was asked (then a
/// retry would be refused too, and the job ends with the reason).
pub(crate) fn retry_status(what: &str, status: &tonic::Status) -> JobError {
    let why = format!("{what}: {} {}", status.code(), status.message());
    if status.code() == Code::InvalidArgument {
        JobError::permanent(why)
    } else {
        JobError::retry(why)
    }
}

/// Most characters of a file's status reason (what Files takes).
const MAX_STATUS_REASON: usize = 1024;

/// `reason` cut to what Files takes, with an ellipsis when cut (a decoder's message may list a
/// whole header).
fn status_reason(reason: String) -> String {
    // A tool's message may hold anything; Files takes no NUL.
    let reason = if reason.contains('\0') {
        reason.replace('\0', "")
    } else {
        reason
    };
    if reason.chars().count() <= MAX_STATUS_REASON {
        return reason;
    }
    let mut cut: String = reason.chars().take(MAX_STATUS_REASON - 1).collect();
    cut.push('…');
    cut
}

impl Media {
    /// Deletes the working directories of jobs that ended without cleaning up (the process
    /// was killed) in `dir`: those whose lock no process holds (a running job holds its own;
    /// one whose lock file was made in the last 10 s is left, perhaps not yet taken), and
    /// those without a lock made longer than `older_than` ago. Returns how many.
    pub fn sweep_work_dirs(dir: &std::path::Path, older_than: std::time::Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        let mut swept = 0;
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(WORK_DIR_PREFIX)
            {
                continue;
            }
            let age = |path: &std::path::Path| {
                std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|at| at.elapsed().ok())
                    .unwrap_or_default()
            };
            let path = entry.path();
            let lock_path = path.join(WORK_DIR_LOCK);
            // Held while the directory goes, so that no job can take it meanwhile. The lock
            // file is written once, when made: its age, not the directory's (which moves with
            // every file a job writes), says whether its job may not have taken it yet.
            let (abandoned, _held) = match std::fs::File::open(&lock_path) {
                Ok(lock) => {
                    match nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
                    {
                        Ok(held) => (age(&lock_path) > WORK_DIR_LOCK_GRACE, Some(held)),
                        Err(_) => (false, None),
                    }
                }
                Err(_) => (age(&path) > older_than, None),
            };
            if abandoned && std::fs::remove_dir_all(&path).is_ok() {
                swept += 1;
            }
        }
        swept
    }

    /// Media over its database, queue, Files, the store and an optional scanner.
    pub fn new(
        pool: PgPool,
        queue: Queue,
        files: Arc<dyn FilesApi>,
        store: Arc<dyn ObjectStore>,
        scanner: Option<Clamd>,
        settings: MediaSettings,
    ) -> Self {
        let decode_slots = Arc::new(Semaphore::new(settings.decode_slots.max(1)));
        Self {
            pool,
            queue,
            files,
            store,
            scanner,
            settings,
            decode_slots,
        }
    }

    /// The job queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    pub(crate) async fn get_file(&self, file_id: Uuid) -> Result<Option<pb::File>, JobError> {
        match self
            .files
            .get_file(pb::GetFileRequest {
                file_id: file_id.to_string(),
            })
            .await
        {
            Ok(r) => Ok(r.file),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(retry_status("Files.GetFile", &s)),
        }
    }

    /// Runs the job of `file_id`.
    async fn process(&self, file_id: Uuid) -> Result<(), JobError> {
        let started = tokio::time::Instant::now();
        let Some(file) = self.get_file(file_id).await? else {
            tracing::info!(%file_id, "file gone before processing; nothing to do");
            return Ok(());
        };
        if file.status != pb::FileStatus::Processing as i32 {
            // Finished by an earlier run whose announcement may not have been written.
            return self.announce_existing(&file).await;
        }
        if let Some(outcome) = self.scan(&file, file_id, started).await? {
            return self.finish(&file, file_id, outcome).await;
        }
        let outcome = match plan(&file.mime_type, &file.display_name, file.size_bytes) {
            Plan::Plain => Outcome::Ready(Derived::default()),
            Plan::Refuse(reason) => Outcome::Failed(reason),
            plan => {
                let unfinished = self.run_started(file_id).await?;
                if unfinished >= MAX_UNFINISHED_RUNS {
                    let failed = Outcome::Failed(format!(
                        "processing did not finish in {unfinished} runs (the worker stopped or \
                         the job ran out of time); not tried again"
                    ));
                    let finished = self.finish(&file, file_id, failed).await;
                    // Failed now (finish says so with a permanent error): a RetryJob (say once
                    // the worker has more memory) starts counting again.
                    if !matches!(finished, Err(JobError::Retry(_))) {
                        self.run_returned(file_id).await?;
                    }
                    return finished;
                } else {
                    let derived = match plan {
                        Plan::Image => self.image(&file).await.map_err(Stopped::from),
                        Plan::Heif => self.heif(&file).await,
                        Plan::Video => self.video(&file, true, started).await,
                        _ => self.video(&file, false, started).await,
                    };
                    // Came back, well or not: not a run that stopped the worker; unless a tool
                    // was killed outright, which counts as one (the OOM killer would take the
                    // worker next), so a file killed every time fails after a few runs.
                    if !matches!(derived, Err(Stopped::Killed(_))) {
                        self.run_returned(file_id).await?;
                    }
                    derived?
                }
            }
        };
        self.finish(&file, file_id, outcome).await
    }

    /// Records that a run starts making `file_id`'s variants; returns how many runs before it
    /// started and never came back.
    async fn run_started(&self, file_id: Uuid) -> Result<i32, JobError> {
        let conn = self.pool.get().await.map_err(JobError::retry)?;
        let started: i32 = conn
            .query_one_cached(
                "INSERT INTO media.unfinished_runs (file_id, started) VALUES ($1, 1)
                 ON CONFLICT (file_id) DO UPDATE
                 SET started = unfinished_runs.started + 1, updated_at = now()
                 RETURNING started",
                &[&file_id],
            )
            .await
            .map_err(JobError::retry)?
            .get(0);
        Ok(started - 1)
    }

    /// Records that the run making `file_id`'s variants came back.
    async fn run_returned(&self, file_id: Uuid) -> Result<(), JobError> {
        let conn = self.pool.get().await.map_err(JobError::retry)?;
        conn.execute_cached(
            "DELETE FROM media.unfinished_runs WHERE file_id = $1",
            &[&file_id],
        )
        .await
        .map_err(JobError::retry)?;
        Ok(())
    }

    /// Scans the file when a scanner is configured and the file was not released by an
    /// admin. `Some` ends the run (quarantined); a scanner that cannot answer retries the job
    /// and leaves the file in processing.
    async fn scan(
        &self,
        file: &pb::File,
        file_id: Uuid,
        started: tokio::time::Instant,
    ) -> Result<Option<Outcome>, JobError> {
        let Some(scanner) = &self.scanner else {
            return Ok(None);
        };
        let released = self.released(file_id).await?;
        if released == Some(true) {
            tracing::info!(%file_id, "released by an admin; not scanned again");
            return Ok(None);
        }
        let seen = self.read_scanner(scanner).await?;
        let signature = match self.scan_stored(scanner, file, started).await? {
            Ok(Verdict::Clean) => {
                self.record_clean_scan(file, file_id, &seen).await?;
                if released == Some(false) {
                    // Held by an earlier run, clean now (new signatures, a larger size limit):
                    // a row left held would list a file that is not quarantined.
                    self.pool
                        .get()
                        .await
                        .map_err(JobError::retry)?
                        .execute_cached(
                            "DELETE FROM media.quarantine WHERE file_id = $1 AND released_at IS NULL",
                            &[&file_id],
                        )
                        .await
                        .map_err(JobError::retry)?;
                }
                return Ok(None);
            }
            Ok(Verdict::Infected(signature)) => signature,
            // Too big or malformed for the scanner: held back, an admin decides.
            Err(ScanError::Refused(why)) => format!("unscannable: {why}"),
            Err(error @ ScanError::Input(_)) => return Err(JobError::retry(error)),
            Err(error @ ScanError::Unavailable(_)) => return Err(scanner_unavailable(error)),
        };
        let conn = self.pool.get().await.map_err(JobError::retry)?;
        conn.execute_cached(
            "INSERT INTO media.quarantine (file_id, owner_id, signature) VALUES ($1, $2, $3)
             ON CONFLICT (file_id) DO UPDATE SET signature = $3, quarantined_at = now(),
                 released_at = NULL, released_by = NULL",
            &[&file_id, &file.owner_id, &signature],
        )
        .await
        .map_err(JobError::retry)?;
        Ok(Some(Outcome::Quarantined(signature)))
    }

    /// `Some(true)`: `file_id` was released from quarantine by an admin; `Some(false)`: it
    /// is held (by a run that may not have told Files before it failed); `None`: neither.
    pub(crate) async fn released(&self, file_id: Uuid) -> Result<Option<bool>, JobError> {
        Ok(self
            .pool
            .get()
            .await
            .map_err(JobError::retry)?
            .query_opt_cached(
                "SELECT released_at IS NOT NULL FROM media.quarantine WHERE file_id = $1",
                &[&file_id],
            )
            .await
            .map_err(JobError::retry)?
            .map(|row| row.get(0)))
    }

    /// What `scanner` scans with now, read before a scan (when re-scans are on): signatures
    /// that change during the scan make it look older, never newer.
    pub(crate) async fn read_scanner(&self, scanner: &Clamd) -> Result<Seen, JobError> {
        if self.settings.rescan_window.is_zero() {
            return Ok(Seen {
                scanner: String::new(),
                began: Utc::now(),
            });
        }
        let began: DateTime<Utc> = self
            .pool
            .get()
            .await
            .map_err(JobError::retry)?
            .query_one_cached("SELECT now()", &[])
            .await
            .map_err(JobError::retry)?
            .get(0);
        let scanner = scanner.version().await.map_err(scanner_unavailable)?;
        Ok(Seen { scanner, began })
    }

    /// Streams the stored `file` to `scanner` within what is left of the run's time. A file
    /// too large to scan in that time is refused (held for an admin) instead of being cut
    /// off and retried until its job is dead.
    pub(crate) async fn scan_stored(
        &self,
        scanner: &Clamd,
        file: &pb::File,
        started: tokio::time::Instant,
    ) -> Result<Result<Verdict, ScanError>, JobError> {
        let source = self
            .store
            .get(&ObjectPath::from(file.storage_key.as_str()))
            .await
            .map_err(JobError::retry)?;
        let reader =
            tokio_util::io::StreamReader::new(source.into_stream().map_err(std::io::Error::other));
        let left = self
            .settings
            .job_timeout
            .saturating_sub(started.elapsed())
            .saturating_sub(AFTER_SCAN);
        Ok(scanner.scan_within(reader, file.size_bytes, left).await)
    }

    /// Records that `file` scanned clean with what `seen` says, for re-scans: an admin's
    /// request made after the scan began stays, and so the file is scanned again.
    pub(crate) async fn record_clean_scan(
        &self,
        file: &pb::File,
        file_id: Uuid,
        seen: &Seen,
    ) -> Result<(), JobError> {
        let uploaded_at = created_at(file);
        let window = chrono::Duration::from_std(self.settings.rescan_window).unwrap_or_default();
        // Off, or uploaded before the window (a file reprocessed long after): not kept.
        if window.is_zero() || uploaded_at < Utc::now() - window {
            return Ok(());
        }
        self.pool
            .get()
            .await
            .map_err(JobError::retry)?
            .execute_cached(
                "INSERT INTO media.scans (file_id, uploaded_at, scanner, signatures)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (file_id) DO UPDATE SET scanner = $3, signatures = $4,
                     scanned_at = now(), queued_at = NULL, job_key = NULL,
                     asked_at = CASE WHEN scans.asked_at < $5 THEN NULL ELSE scans.asked_at END",
                &[
                    &file_id,
                    &uploaded_at,
                    &seen.scanner,
                    &seen.signatures(),
                    &seen.began,
                ],
            )
            .await
            .map_err(JobError::retry)?;
        Ok(())
    }

    async fn read_all(&self, key: &str, limit: u64) -> Result<bytes::Bytes, JobError> {
        let source = self
            .store
            .get(&ObjectPath::from(key))
            .await
            .map_err(JobError::retry)?;
        if source.meta.size > limit {
            return Err(JobError::permanent(format!(
                "{} bytes is more than the {limit} bytes Media decodes",
                source.meta.size
            )));
        }
        source.bytes().await.map_err(JobError::retry)
    }

    /// Decodes and renders with `make` in the bounded pool off the runtime, within the time bound.
    async fn render(
        &self,
        bytes: bytes::Bytes,
        make: fn(&[u8], &DecodeLimits) -> Result<Processed, ImageError>,
    ) -> Result<Result<Processed, ImageError>, JobError> {
        let slot = Arc::clone(&self.decode_slots)
            .acquire_owned()
            .await
            .map_err(|_| JobError::retry("shutting down"))?;
        let limits = self.settings.limits.clone();
        // The slot goes with the decode: one past its time runs on (a blocking thread cannot
        // be stopped) and keeps its slot until it ends, so the pool bounds the decodes that
        // run, not only the ones waited for.
        let task = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            make(&bytes, &limits)
        });
        match tokio::time::timeout(self.settings.decode_timeout, task).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(panic)) => Ok(Err(ImageError::Corrupt(format!(
                "decoder crashed: {panic}"
            )))),
            Err(_) => Ok(Err(ImageError::TooLarge(format!(
                "decoding took longer than {:?}",
                self.settings.decode_timeout
            )))),
        }
    }

    /// The failure of a picture too large to decode at all, before any byte is read.
    fn over_decode_limit(&self, file: &pb::File) -> Option<Outcome> {
        let limit = self.settings.limits.max_input;
        (file.size_bytes > limit).then(|| {
            Outcome::Failed(format!(
                "image of {} bytes is above the {limit}-byte decode limit",
                file.size_bytes
            ))
        })
    }

    async fn image(&self, file: &pb::File) -> Result<Outcome, JobError> {
        if let Some(failed) = self.over_decode_limit(file) {
            return Ok(failed);
        }
        let bytes = self
            .read_all(&file.storage_key, self.settings.limits.max_input)
            .await?;
        self.image_from(file, bytes).await
    }

    /// A HEIF / HEIC (a phone's photo) or AVIF picture: libheif converts it to PNG in a
    /// private directory (under the tools' time and memory limits), whose variants are then
    /// rendered as any image's; the file is described as what it is, not as the PNG.
    async fn heif(&self, file: &pb::File) -> Result<Outcome, Stopped> {
        if let Some(failed) = self.over_decode_limit(file) {
            return Ok(failed);
        }
        let (dir, path) = self.copied_to_work_dir(file).await?;
        let png = match self.settings.tools.heif_to_png(&path, dir.path()).await {
            Ok(png) => png,
            Err(ToolError::Unreadable(why)) => return Ok(Outcome::Failed(why)),
            Err(e) => return Err(e.into()),
        };
        drop(dir);
        let outcome = self.image_from(file, bytes::Bytes::from(png)).await?;
        Ok(match outcome {
            Outcome::Ready(mut derived) => {
                derived.codec = if file.mime_type.starts_with("image/avif") {
                    "avif"
                } else {
                    "heif"
                }
                .to_owned();
                Outcome::Ready(derived)
            }
            other => other,
        })
    }

    /// The variants of the picture `bytes` of `file`.
    async fn image_from(&self, file: &pb::File, bytes: bytes::Bytes) -> Result<Outcome, JobError> {
        // Without a scanner, a large JPEG's thumbnails are rendered and recorded first (a
        // fraction of the whole time), and the owner's lists show them while the preview renders.
        // With one, Files serves no variant of a file still processing: all in one decode.
        let first = if self.scanner.is_some() {
            imaging::process
        } else {
            imaging::thumbnails_or_all
        };
        let first = match self.render(bytes.clone(), first).await? {
            Ok(processed) => processed,
            Err(error) => return Ok(Outcome::Failed(error.to_string())),
        };
        let preview_pending = first.preview_pending;
        let first = self.store_rendered(file, first, true).await?;
        // A file purged meanwhile: `finish` finds that out again and deletes what was stored.
        if !preview_pending || !self.record_early(file, &first).await? {
            return Ok(Outcome::Ready(first));
        }
        // Should the preview fail, the file fails with the reason and keeps its thumbnails,
        // which count in its owner's usage and go with it like any variant.
        match self.render(bytes, imaging::preview).await? {
            Ok(processed) => {
                let preview = self.store_rendered(file, processed, true).await?;
                let mut variants = first.variants;
                variants.extend(preview.variants);
                Ok(Outcome::Ready(Derived {
                    variants,
                    ..preview
                }))
            }
            Err(error) => Ok(Outcome::Failed(error.to_string())),
        }
    }

    /// Records variants made ahead of the others, leaving the file processing; `false` when the
    /// file is gone.
    async fn record_early(&self, file: &pb::File, derived: &Derived) -> Result<bool, JobError> {
        self.set_variants(
            &file.id,
            derived,
            pb::FileStatus::Unspecified,
            String::new(),
        )
        .await
    }

    /// Records `derived` in Files with `status` (`Unspecified` leaves it); `false` when the file
    /// is gone.
    async fn set_variants(
        &self,
        file_id: &str,
        derived: &Derived,
        status: pb::FileStatus,
        reason: String,
    ) -> Result<bool, JobError> {
        let set = self
            .files
            .set_variants(pb::SetVariantsRequest {
                file_id: file_id.to_owned(),
                variants: derived.variants.clone(),
                status: status as i32,
                status_reason: reason,
                width: derived.width,
                height: derived.height,
                duration_ms: derived.duration_ms,
                codec: derived.codec.clone(),
            })
            .await;
        match set {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(retry_status("Files.SetVariants", &s)),
        }
    }

    /// Stores the variants of `processed` and describes them for Files.
    async fn store_rendered(
        &self,
        file: &pb::File,
        processed: Processed,
        with_size: bool,
    ) -> Result<Derived, JobError> {
        let created_at = created_at(file);
        let mut variants = Vec::with_capacity(processed.variants.len() + 1);
        for rendered in processed.variants {
            let key = variant_key(
                &file.owner_id,
                created_at,
                &file.id,
                rendered.name,
                rendered.ext,
            );
            let size = rendered.bytes.len() as u64;
            self.store
                .put(
                    &ObjectPath::from(key.as_str()),
                    PutPayload::from(rendered.bytes),
                )
                .await
                .map_err(JobError::retry)?;
            variants.push(pb::Variant {
                name: rendered.name.to_owned(),
                mime_type: rendered.mime_type.to_owned(),
                size_bytes: size,
                width: rendered.width,
                height: rendered.height,
                storage_key: key,
                inline_data: Vec::new(),
            });
        }
        if !processed.thumbhash.is_empty() {
            variants.push(pb::Variant {
                name: "thumbhash".into(),
                mime_type: "application/x-thumbhash".into(),
                size_bytes: processed.thumbhash.len() as u64,
                width: 0,
                height: 0,
                storage_key: String::new(),
                inline_data: processed.thumbhash,
            });
        }
        let (width, height) = if with_size {
            (processed.width, processed.height)
        } else {
            (0, 0)
        };
        Ok(Derived {
            variants,
            width,
            height,
            duration_ms: 0,
            codec: if with_size {
                processed.format.to_owned()
            } else {
                String::new()
            },
        })
    }

    /// `file` copied into a private directory of its own (the tools read this one file and
    /// nothing else), removed when the directory is dropped.
    async fn copied_to_work_dir(
        &self,
        file: &pb::File,
    ) -> Result<(WorkDir, std::path::PathBuf), JobError> {
        let dir = WorkDir::new().map_err(JobError::retry)?;
        let path = dir.path().join("input");
        let source = self
            .store
            .get(&ObjectPath::from(file.storage_key.as_str()))
            .await
            .map_err(JobError::retry)?;
        let mut out = tokio::fs::File::create(&path)
            .await
            .map_err(JobError::retry)?;
        let mut stream = source.into_stream();
        while let Some(chunk) = stream.try_next().await.map_err(JobError::retry)? {
            out.write_all(&chunk).await.map_err(JobError::retry)?;
        }
        out.flush().await.map_err(JobError::retry)?;
        Ok((dir, path))
    }

    /// Probes a video or a sound, and for a video makes its poster, its thumbnails and, up to
    /// [`TRANSCODE_MAX_MS`] long, a browser-ready MP4.
    async fn video(
        &self,
        file: &pb::File,
        is_video: bool,
        started: tokio::time::Instant,
    ) -> Result<Outcome, Stopped> {
        if file.size_bytes > self.settings.max_video_size {
            return Ok(Outcome::Failed(format!(
                "{} bytes is above the {}-byte limit of video and audio processing",
                file.size_bytes, self.settings.max_video_size
            )));
        }
        let (dir, path) = self.copied_to_work_dir(file).await?;
        let tools = &self.settings.tools;
        let probe = match tools.probe(&path).await {
            Ok(p) => p,
            Err(ToolError::Unreadable(why)) => return Ok(Outcome::Failed(why)),
            Err(e) => return Err(e.into()),
        };
        // A "video" with sound only (a voice memo in an MP4) is a sound: its length and codec,
        // no poster (ffprobe found neither stream: refused above).
        let mut derived = Derived {
            width: probe.width,
            height: probe.height,
            duration_ms: probe.duration_ms,
            codec: probe.codec.clone(),
            ..Derived::default()
        };
        if probe.has_video {
            // A frame a little into the clip (past fades from black), never past its end.
            let at = (probe.duration_ms / 10).min(3000);
            let frame = match tools.poster(&path, at).await {
                Ok(f) => f,
                Err(ToolError::Unreadable(why)) => return Ok(Outcome::Failed(why)),
                Err(e) => return Err(e.into()),
            };
            let poster = bytes::Bytes::from(frame);
            match self.render(poster.clone(), imaging::process).await? {
                Ok(processed) => {
                    let (w, h) = (processed.width, processed.height);
                    let rendered = self.store_rendered(file, processed, false).await?;
                    derived.variants = rendered.variants;
                    let key =
                        variant_key(&file.owner_id, created_at(file), &file.id, "poster", "jpg");
                    let size = poster.len() as u64;
                    self.store
                        .put(&ObjectPath::from(key.as_str()), PutPayload::from(poster))
                        .await
                        .map_err(JobError::retry)?;
                    derived.variants.push(pb::Variant {
                        name: "poster_jpeg".into(),
                        mime_type: "image/jpeg".into(),
                        size_bytes: size,
                        width: w,
                        height: h,
                        storage_key: key,
                        inline_data: Vec::new(),
                    });
                }
                Err(error) => return Ok(Outcome::Failed(format!("poster frame: {error}"))),
            }
            // An unknown length (0: some recorded WebM) could be any length: not transcoded.
            if is_video
                && (1..=TRANSCODE_MAX_MS).contains(&probe.duration_ms)
                && let Some(variant) = self
                    .transcoded(file, &path, probe.duration_ms, dir.path(), started)
                    .await?
            {
                derived.variants.push(variant);
            }
        }
        Ok(Outcome::Ready(derived))
    }

    /// The browser-ready MP4 of the video at `input` (see [`Tools::transcode`]), stored; `None`
    /// when ffmpeg could not make one in time: the file keeps its poster and thumbnails.
    async fn transcoded(
        &self,
        file: &pb::File,
        input: &std::path::Path,
        input_ms: u64,
        dir: &std::path::Path,
        started: tokio::time::Instant,
    ) -> Result<Option<pb::Variant>, JobError> {
        let tools = &self.settings.tools;
        // What is left of the run after the scan, the copy, the probe and the poster, less
        // what storing the copy needs: a slow transcode ends in time for the poster to be
        // kept, rather than the run being cut off and retried until the file fails.
        let left = self
            .settings
            .job_timeout
            .saturating_sub(started.elapsed())
            .saturating_sub(AFTER_TRANSCODE);
        if left < MIN_TRANSCODE {
            tracing::warn!(file_id = %file.id, ?left, "no time left for a web video; the file keeps its poster");
            return Ok(None);
        }
        let output = dir.join("web.mp4");
        let made = match tools.transcode(input, &output, left).await {
            Ok(()) => tools.probe(&output).await,
            Err(e) => Err(e),
        };
        let probe = match made {
            Ok(probe) => probe,
            Err(e @ ToolError::Unavailable(_)) => return Err(JobError::retry(e)),
            Err(e @ ToolError::Killed(_)) => {
                tracing::warn!(file_id = %file.id, error = %e, "no web video made; the file keeps its poster");
                return Ok(None);
            }
            Err(ToolError::Unreadable(why)) => {
                tracing::warn!(file_id = %file.id, %why, "no web video made; the file keeps its poster");
                return Ok(None);
            }
        };
        // ffmpeg stops at its size bound with a valid file and success: a copy that ends
        // early is not the video, and is not kept.
        if crate::video::cut_short(input_ms, probe.duration_ms) {
            tracing::warn!(file_id = %file.id, input_ms, output_ms = probe.duration_ms,
                "web video reached its size bound before the end; the file keeps its poster");
            return Ok(None);
        }
        let key = variant_key(
            &file.owner_id,
            created_at(file),
            &file.id,
            "video_720",
            "mp4",
        );
        let size = put_file(
            self.store.as_ref(),
            &ObjectPath::from(key.as_str()),
            &output,
        )
        .await
        .map_err(JobError::retry)?;
        Ok(Some(pb::Variant {
            name: "video_720_mp4".into(),
            mime_type: "video/mp4".into(),
            size_bytes: size,
            width: probe.width,
            height: probe.height,
            storage_key: key,
            inline_data: Vec::new(),
        }))
    }

    /// Records the outcome in Files, then announces it once.
    async fn finish(
        &self,
        file: &pb::File,
        file_id: Uuid,
        outcome: Outcome,
    ) -> Result<(), JobError> {
        let (status, reason, derived) = match outcome {
            Outcome::Ready(d) => (pb::FileStatus::Ready, String::new(), d),
            Outcome::Failed(r) => (pb::FileStatus::Failed, status_reason(r), Derived::default()),
            Outcome::Quarantined(s) => (
                pb::FileStatus::Quarantined,
                status_reason(s),
                Derived::default(),
            ),
        };
        let variant_names: Vec<String> = derived.variants.iter().map(|v| v.name.clone()).collect();
        let stored_keys: Vec<String> = derived
            .variants
            .iter()
            .filter(|v| !v.storage_key.is_empty())
            .map(|v| v.storage_key.clone())
            .collect();
        let recorded = match self
            .set_variants(&file_id.to_string(), &derived, status, reason.clone())
            .await
        {
            // Files refused the variants: the file fails with that, recorded and announced as
            // any failure, rather than staying in processing, where Lifecycle would run its job
            // again for ever. What was stored for it is left to blob_gc. (A quarantine refused
            // stays a retried error: it must not become a file that can be downloaded.)
            Err(JobError::Permanent(why)) if status == pb::FileStatus::Ready => {
                tracing::error!(%file_id, %why, "Files refused the variants; the file fails");
                let failed = Outcome::Failed(format!("processing's outcome was refused: {why}"));
                return Box::pin(self.finish(file, file_id, failed)).await;
            }
            other => other?,
        };
        if !recorded {
            // Purged while we worked: what we stored belongs to nobody.
            for key in &stored_keys {
                if let Err(error) = self.store.delete(&ObjectPath::from(key.as_str())).await {
                    tracing::warn!(%file_id, key, %error, "variant of a purged file not deleted; gc will");
                }
            }
            if status == pb::FileStatus::Quarantined {
                // Its purge was consumed before the row existed, so nothing else removes it.
                let conn = self.pool.get().await.map_err(JobError::retry)?;
                conn.execute_cached(
                    "DELETE FROM media.quarantine WHERE file_id = $1",
                    &[&file_id],
                )
                .await
                .map_err(JobError::retry)?;
            }
            tracing::info!(%file_id, "file purged while processing");
            return Ok(());
        }
        self.announce(file, file_id, status, &reason, &variant_names)
            .await?;
        metrics::counter!("stowage_media_files_total", "status" => status_name(status))
            .increment(1);
        if status == pb::FileStatus::Failed {
            tracing::warn!(%file_id, %reason, "media processing failed for good");
            // Dead at once with the reason, visible in ListJobs; RetryJob runs it again.
            return Err(JobError::permanent(reason));
        }
        Ok(())
    }

    /// Announces a file that an earlier run finished, unless that run already did.
    async fn announce_existing(&self, file: &pb::File) -> Result<(), JobError> {
        let status = pb::FileStatus::try_from(file.status).unwrap_or(pb::FileStatus::Unspecified);
        if !matches!(
            status,
            pb::FileStatus::Ready | pb::FileStatus::Failed | pb::FileStatus::Quarantined
        ) {
            return Ok(());
        }
        let file_id = Uuid::parse_str(&file.id).map_err(JobError::permanent)?;
        // The earlier run's SetVariants may have recorded the variants and then failed to
        // charge them (Quota unavailable): recording nothing more lets Files finish the charge,
        // which it would otherwise never be asked to make again.
        if !file.variants.is_empty()
            && !self
                .set_variants(
                    &file.id,
                    &Derived::default(),
                    pb::FileStatus::Unspecified,
                    String::new(),
                )
                .await?
        {
            tracing::info!(%file_id, "file purged before its announcement");
            return Ok(());
        }
        let names: Vec<String> = file.variants.iter().map(|v| v.name.clone()).collect();
        self.announce(file, file_id, status, &file.status_reason, &names)
            .await?;
        if status == pb::FileStatus::Failed {
            // Dead, as the run that failed it would have left it: ListJobs shows it with the
            // reason, and RetryJob runs it again.
            return Err(JobError::permanent(file.status_reason.clone()));
        }
        Ok(())
    }

    async fn announce(
        &self,
        file: &pb::File,
        file_id: Uuid,
        status: pb::FileStatus,
        reason: &str,
        variants: &[String],
    ) -> Result<(), JobError> {
        let name = status_name(status);
        let topic = match status {
            pb::FileStatus::Ready => topics::MEDIA_READY,
            pb::FileStatus::Quarantined => topics::MEDIA_QUARANTINED,
            _ => topics::MEDIA_FAILED,
        };
        let mut conn = self.pool.get().await.map_err(JobError::retry)?;
        let tx = conn.transaction().await.map_err(JobError::retry)?;
        let inserted = tx
            .execute_cached(
                "INSERT INTO media.outcomes (file_id, status, reason) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&file_id, &name, &reason],
            )
            .await
            .map_err(JobError::retry)?;
        if inserted == 1 {
            let mut payload = serde_json::json!({
                "file_id": file_id,
                "owner_id": file.owner_id,
                "status": name,
                "reason": reason,
                "variants": variants,
            });
            if status == pb::FileStatus::Quarantined {
                // For the owner's history (Lifecycle). Quarantines announced before it (a new
                // consumer group replays them) were released without saying so: not recorded.
                payload["history"] = serde_json::json!(true);
            }
            stowage_events::stage(&tx, crate::SCHEMA, topic, &file.id, &payload)
                .await
                .map_err(JobError::retry)?;
        }
        tx.commit().await.map_err(JobError::retry)?;
        Ok(())
    }
}

fn status_name(status: pb::FileStatus) -> &'static str {
    match status {
        pb::FileStatus::Ready => "ready",
        pb::FileStatus::Quarantined => "quarantined",
        pb::FileStatus::Failed => "failed",
        pb::FileStatus::Processing | pb::FileStatus::Unspecified => "processing",
    }
}

/// Name prefix of a job's working directory (under the system's temporary directory).
const WORK_DIR_PREFIX: &str = "stowage-media-";

/// The file in a working directory its job holds locked (`flock`) while it runs.
const WORK_DIR_LOCK: &str = "lock";

/// Age of its lock file under which a working directory whose lock is free is left: its job
/// may have made it and not yet taken the lock.
const WORK_DIR_LOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// A job's working directory, removed when dropped, and locked until then: the sweeper
/// removes one whose lock no process holds (its job's process was killed) at once, not after
/// an hour, so that a restarted container's left-overs do not fill the volume they share.
struct WorkDir {
    dir: tempfile::TempDir,
    _held: nix::fcntl::Flock<std::fs::File>,
}

impl WorkDir {
    fn new() -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix(WORK_DIR_PREFIX).tempdir()?;
        let lock = std::fs::File::create(dir.path().join(WORK_DIR_LOCK))?;
        let held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| std::io::Error::from(errno))?;
        Ok(Self { dir, _held: held })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

/// Runs of one file's processing that may start making its variants and never come back
/// (killed worker, job out of time) before the file fails: a file that kills the worker is
/// not tried for ever (Lifecycle's sweep of stuck files would start its job again each time).
const MAX_UNFINISHED_RUNS: i32 = 3;

/// The `media.process` job handler.
#[async_trait]
impl Handler for Media {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        self.process(payload_file_id(job)?).await
    }
}

/// The file a job of Media is about (`payload.file_id`).
pub(crate) fn payload_file_id(job: &Job) -> Result<Uuid, JobError> {
    job.payload
        .get("file_id")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| JobError::permanent("payload.file_id: missing or not a UUID"))
}

/// Why a run's work on a file stopped short of an outcome.
#[derive(Debug)]
enum Stopped {
    /// As any job fails (retried, or dead with its reason).
    Job(JobError),
    /// A tool was killed outright (see [`ToolError::Killed`]): retried, and counted as a run
    /// that did not come back.
    Killed(ToolError),
}

impl From<JobError> for Stopped {
    fn from(error: JobError) -> Self {
        Self::Job(error)
    }
}

/// A tool that could not run is a retry; one killed outright is [`Stopped::Killed`]. (An
/// unreadable file is an outcome, not a stop: callers take it first.)
impl From<ToolError> for Stopped {
    fn from(error: ToolError) -> Self {
        match error {
            ToolError::Killed(_) => Self::Killed(error),
            other => Self::Job(JobError::retry(other)),
        }
    }
}

impl From<Stopped> for JobError {
    fn from(stopped: Stopped) -> Self {
        match stopped {
            Stopped::Job(error) => error,
            Stopped::Killed(error) => JobError::retry(error),
        }
    }
}

/// Pieces a file is stored in by [`put_file`].
const PUT_PIECE: usize = 8 << 20;

/// Stores the file at `path` under `key` piece by piece (a web copy can be hundreds of MB:
/// never whole in memory); returns its size. A failure leaves nothing under `key`, and the
/// pieces sent are let go (`finish` aborts the upload itself when its last piece or the
/// completion fails), unless the job itself is cut off mid-way: a store's rule for unfinished
/// multipart uploads, or the sweep of old temporaries on local disk, removes those.
async fn put_file(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    path: &std::path::Path,
) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
    use tokio::io::AsyncReadExt;
    let mut input = tokio::fs::File::open(path).await?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(
        store.put_multipart(key).await?,
        PUT_PIECE,
    );
    let mut size = 0u64;
    let copied: Result<(), Box<dyn std::error::Error + Send + Sync>> = async {
        loop {
            let mut piece = bytes::BytesMut::with_capacity(PUT_PIECE);
            while piece.len() < PUT_PIECE {
                if input.read_buf(&mut piece).await? == 0 {
                    break;
                }
            }
            if piece.is_empty() {
                return Ok(());
            }
            size += piece.len() as u64;
            writer.wait_for_capacity(2).await?;
            writer.put(piece.freeze());
        }
    }
    .await;
    match copied {
        Ok(()) => {
            writer.finish().await?;
            Ok(size)
        }
        Err(error) => {
            let _ = writer.abort().await;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    /// A decoder's message that lists a whole header is cut to what Files takes (it refused
    /// the outcome, and the job retried it until dead, leaving the file processing); a peer's
    /// refusal of the request ends the job, anything else is tried again.
    #[test]
    fn reasons_fit_files_and_refusals_are_not_retried() {
        assert_eq!(status_reason("short".into()), "short");
        let exact = "é".repeat(MAX_STATUS_REASON);
        assert_eq!(status_reason(exact.clone()), exact);
        let long = status_reason(format!("bits per sample {:?}", vec![8u8; 600]));
        assert_eq!(long.chars().count(), MAX_STATUS_REASON);
        assert!(long.starts_with("bits per sample [8, 8") && long.ends_with('…'));
        let refused = tonic::Status::invalid_argument("status_reason: too long");
        assert!(matches!(
            retry_status("Files.SetVariants", &refused),
            JobError::Permanent(_)
        ));
        let down = tonic::Status::unavailable("no route");
        assert!(matches!(
            retry_status("Files.SetVariants", &down),
            JobError::Retry(_)
        ));
    }

    /// A file of several pieces and one of none are stored byte for byte; one that cannot be
    /// read leaves nothing under its key.
    #[tokio::test]
    async fn a_file_is_stored_piece_by_piece_whole() {
        let store = object_store::memory::InMemory::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let data: Vec<u8> = (0..PUT_PIECE * 2 + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        for (name, bytes) in [("big.mp4", &data[..]), ("empty.mp4", &[][..])] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("file");
            let key = ObjectPath::from(name);
            let size = put_file(&store, &key, &path).await.expect("stored");
            assert_eq!(size, bytes.len() as u64, "{name}");
            let stored = store
                .get(&key)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("bytes");
            assert!(stored[..] == *bytes, "{name}: the stored bytes differ");
        }
        let gone = ObjectPath::from("gone.mp4");
        assert!(
            put_file(&store, &gone, &dir.path().join("nothing"))
                .await
                .is_err()
        );
        assert!(
            store.head(&gone).await.is_err(),
            "nothing stored under the key"
        );
    }

    #[test]
    fn only_abandoned_working_directories_of_media_are_swept() {
        let parent = tempfile::tempdir().expect("temp dir");
        let make = |name: &str, age: Duration, lock: bool| {
            let dir = parent.path().join(name);
            std::fs::create_dir(&dir).expect("dir");
            let aged = if lock {
                let lock = dir.join(WORK_DIR_LOCK);
                std::fs::write(&lock, b"").expect("lock");
                lock
            } else {
                dir.clone()
            };
            // Written just now: a lock-holding directory itself is young (its job was at work).
            std::fs::write(dir.join("input"), b"video").expect("file");
            std::fs::File::open(&aged)
                .and_then(|f| f.set_modified(SystemTime::now() - age))
                .expect("mtime");
            dir
        };
        let (hour, minutes) = (Duration::from_secs(3600), Duration::from_secs(120));
        // Left by a killed process: a lock nobody holds, a few minutes old.
        let killed = make("stowage-media-killed", minutes, true);
        // A running job's, however old.
        let running = make("stowage-media-running", hour, true);
        let held = nix::fcntl::Flock::lock(
            std::fs::File::open(running.join(WORK_DIR_LOCK)).expect("open"),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .expect("held");
        // Just made, its lock perhaps not yet taken.
        let new = make("stowage-media-new", Duration::ZERO, true);
        // Without a lock (an older release's): by age alone.
        let old = make("stowage-media-old", hour, false);
        let young = make("stowage-media-young", minutes, false);
        let other = make("someone-else", hour, true);
        assert_eq!(
            Media::sweep_work_dirs(parent.path(), Duration::from_secs(600)),
            2
        );
        assert!(!killed.exists() && !old.exists());
        assert!(running.exists() && new.exists() && young.exists() && other.exists());
        drop(held);
        // A live job's own directory goes with it, lock and all.
        let dir = WorkDir::new().expect("work dir");
        let path = dir.path().to_path_buf();
        assert!(path.join(WORK_DIR_LOCK).exists());
        drop(dir);
        assert!(!path.exists());
    }
}
