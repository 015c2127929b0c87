//! The Media gRPC service (admin): jobs, queue depth, quarantine, re-scans.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use stowage_jobs::{Job, JobCursor, JobState};
use stowage_proto::v1::{self as pb, media_server};
use stowage_runtime::{
    identity, paging,
    status::{page_size, parse_uuid},
    time::timestamp,
};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::{
    Media,
    error::{Error, Result},
    job_key,
};
use stowage_db::Cached;

/// The tonic service of Media.
#[derive(Clone, Debug)]
pub struct MediaGrpc {
    media: Arc<Media>,
}

impl MediaGrpc {
    /// The API over `media`.
    pub fn new(media: Arc<Media>) -> Self {
        Self { media }
    }

    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> media_server::MediaServer<Self> {
        media_server::MediaServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

fn state_to_proto(state: JobState) -> pb::JobState {
    match state {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Dead => pb::JobState::Dead,
    }
}

fn state_from_proto(value: i32) -> Result<Option<JobState>> {
    match pb::JobState::try_from(value) {
        Ok(pb::JobState::Unspecified) => Ok(None),
        Ok(pb::JobState::Queued) => Ok(Some(JobState::Queued)),
        Ok(pb::JobState::Running) => Ok(Some(JobState::Running)),
        Ok(pb::JobState::Succeeded) => Ok(Some(JobState::Succeeded)),
        Ok(pb::JobState::Failed) => Ok(Some(JobState::Failed)),
        Ok(pb::JobState::Dead) => Ok(Some(JobState::Dead)),
        Err(_) => Err(Error::invalid("state", "unknown job state")),
    }
}

fn job_to_proto(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id.to_string(),
        kind: job.kind.clone(),
        key: job.key.clone(),
        state: state_to_proto(job.state) as i32,
        attempts: job.attempts,
        max_attempts: job.max_attempts,
        last_error: job.last_error.clone().unwrap_or_default(),
        run_at: Some(timestamp(job.run_at)),
        created_at: Some(timestamp(job.created_at)),
        updated_at: Some(timestamp(job.updated_at)),
        file_id: job
            .payload
            .get("file_id")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    }
}

/// Position in the quarantine listing (newest first).
#[derive(serde::Serialize, serde::Deserialize)]
struct QuarantineCursor {
    at: DateTime<Utc>,
    id: Uuid,
}

impl Media {
    async fn list_quarantine(
        &self,
        size: i64,
        after: Option<QuarantineCursor>,
    ) -> Result<Vec<(Uuid, String, DateTime<Utc>)>> {
        let conn = self.pool.get().await?;
        let rows = match after {
            None => {
                conn.query_cached(
                    "SELECT file_id, signature, quarantined_at FROM media.quarantine
                     WHERE released_at IS NULL
                     ORDER BY quarantined_at DESC, file_id DESC LIMIT $1",
                    &[&(size + 1)],
                )
                .await?
            }
            Some(c) => {
                conn.query_cached(
                    "SELECT file_id, signature, quarantined_at FROM media.quarantine
                     WHERE released_at IS NULL AND (quarantined_at, file_id) < ($1, $2)
                     ORDER BY quarantined_at DESC, file_id DESC LIMIT $3",
                    &[&c.at, &c.id, &(size + 1)],
                )
                .await?
            }
        };
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    /// Runs a job again. A file whose processing failed for good goes back to processing,
    /// so the run does the work again instead of finding it finished.
    async fn retry(&self, job_id: Uuid) -> Result<Job> {
        let job = self.queue.get(job_id).await?;
        // A processing job's file; a re-scan's is left as it is (the re-scan reads it).
        let file_id = job
            .payload
            .get("file_id")
            .and_then(serde_json::Value::as_str)
            .filter(|_| job.kind == crate::PROCESS_JOB)
            .map(str::to_owned);
        // Only a job that is over runs again: one queued or running is refused before the
        // file is touched.
        if !job.state.is_requeueable() {
            return Err(stowage_jobs::Error::NotRequeueable {
                id: job_id,
                state: job.state,
            }
            .into());
        }
        // The file goes back to processing and its failure is forgotten before the job is
        // queued: a worker that claims it at once must find the work to do, not the failure.
        if let Some(file_id) = file_id {
            let file = match self
                .files
                .get_file(pb::GetFileRequest {
                    file_id: file_id.clone(),
                })
                .await
            {
                Ok(r) => r.file,
                Err(s) if s.code() == tonic::Code::NotFound => None,
                Err(s) => return Err(s.into()),
            };
            if file.is_some_and(|f| f.status == pb::FileStatus::Failed as i32) {
                self.files
                    .set_variants(pb::SetVariantsRequest {
                        file_id: file_id.clone(),
                        status: pb::FileStatus::Processing as i32,
                        ..Default::default()
                    })
                    .await?;
                if let Ok(id) = Uuid::parse_str(&file_id) {
                    delete_outcome(&self.pool, id, "failed").await?;
                }
            }
        }
        Ok(self.queue.requeue(job_id).await?)
    }

    /// Runs `file_id`'s job again when it is over (a file failed for good back to processing
    /// first, as [`retry`](Self::retry) does), or enqueues it when it never was. A job queued,
    /// running or waiting for its next attempt is left as it is: Lifecycle asks this of files
    /// long in processing, and a job given its attempts back each time would never end.
    pub(crate) async fn reprocess(&self, file_id: Uuid) -> Result<Job> {
        match self.queue.get_by_key(&job_key(&file_id)).await {
            Ok(job) if job.state.is_over() => match self.retry(job.id).await {
                // Claimed again meanwhile.
                Err(Error::Jobs(stowage_jobs::Error::NotRequeueable { id, .. })) => {
                    Ok(self.queue.get(id).await?)
                }
                other => other,
            },
            Ok(job) => Ok(job),
            Err(stowage_jobs::Error::JobNotFound(_)) => {
                let mut job = stowage_jobs::NewJob::new(
                    crate::PROCESS_JOB,
                    job_key(&file_id),
                    serde_json::json!({ "file_id": file_id }),
                );
                job.traceparent = stowage_telemetry::current_traceparent();
                let enqueued = self.queue.enqueue(job).await?;
                Ok(self.queue.get(enqueued.id).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Marks a quarantined file released by `admin` and runs its processing again, without
    /// the scan. Files is told first: were the release recorded first and Files then out of
    /// reach, the file would stay quarantined there and a retry would find nothing to release.
    async fn release(&self, file_id: Uuid, admin: &str) -> Result<pb::File> {
        let held = self
            .pool
            .get()
            .await?
            .query_opt_cached(
                "SELECT 1 FROM media.quarantine WHERE file_id = $1 AND released_at IS NULL",
                &[&file_id],
            )
            .await?;
        if held.is_none() {
            return Err(Error::NotFound(format!("quarantined file {file_id}")));
        }
        // Refused until the file's job is over (not queued, running or waiting to be tried
        // again). A run still scanning (its row written, its verdict not yet in Files) would
        // set the file quarantined after this release, with the row released and nothing left
        // to release it by; a run an admin retried, having read the file quarantined, would
        // announce that again and end, leaving the file in processing with no job to finish
        // it. A file not quarantined in Files whose job is over is a release that stopped
        // half-way, and is finished.
        match self.queue.get_by_key(&job_key(&file_id)).await {
            Ok(job) if !job.state.is_over() => {
                return Err(Error::FailedPrecondition(format!(
                    "file {file_id} has a media job queued, running or waiting to be tried again; release it once that job is done"
                )));
            }
            Ok(_) | Err(stowage_jobs::Error::JobNotFound(_)) => {}
            // Not known: the job may be running.
            Err(e) => return Err(e.into()),
        }
        let file = self
            .files
            .set_variants(pb::SetVariantsRequest {
                file_id: file_id.to_string(),
                status: pb::FileStatus::Processing as i32,
                ..Default::default()
            })
            .await?
            .file;
        // A release that raced this one recorded it already: the same outcome. The one that
        // records it announces who released the file, for its owner's history.
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let released = tx
            .execute_cached(
                "UPDATE media.quarantine SET released_at = now(), released_by = $2
                 WHERE file_id = $1 AND released_at IS NULL",
                &[&file_id, &admin],
            )
            .await?;
        if let (1, Some(file)) = (released, &file) {
            let payload = serde_json::json!({
                "file_id": file_id,
                "owner_id": file.owner_id,
                "admin": admin,
                "by": "system",
            });
            stowage_events::stage(
                &tx,
                crate::SCHEMA,
                stowage_events::topics::MEDIA_QUARANTINE_RELEASED,
                &file.id,
                &payload,
            )
            .await?;
        }
        tx.commit().await?;
        drop(conn);
        delete_outcome(&self.pool, file_id, "quarantined").await?;
        self.reprocess(file_id).await?;
        tracing::info!(%file_id, admin, "quarantined file released");
        file.ok_or_else(|| Error::NotFound(format!("file {file_id}")))
    }
}

/// Forgets that `file_id` was announced with `status`, so the next run announces again.
pub(crate) async fn delete_outcome(
    pool: &stowage_db::PgPool,
    file_id: Uuid,
    status: &str,
) -> Result<()> {
    pool.get()
        .await?
        .execute_cached(
            "DELETE FROM media.outcomes WHERE file_id = $1 AND status = $2",
            &[&file_id, &status],
        )
        .await?;
    Ok(())
}

#[tonic::async_trait]
impl media_server::Media for MediaGrpc {
    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::GetJobResponse>, Status> {
        identity(&request)?.require_admin()?;
        let id = parse_uuid("job_id", &request.get_ref().job_id)?;
        let job = self.media.queue().get(id).await.map_err(Error::from)?;
        Ok(Response::new(pb::GetJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        let state = state_from_proto(req.state)?;
        let size = page_size(req.page_size, 100, 1000)?;
        let query = paging::fingerprint(&("jobs", req.state));
        let before: Option<JobCursor> = paging::decode(&req.page_token, &query)?;
        let page = self
            .media
            .queue()
            .list(state, u32::try_from(size).unwrap_or(100), before)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListJobsResponse {
            jobs: page.jobs.iter().map(job_to_proto).collect(),
            next_page_token: page
                .next
                .map(|c| paging::encode(&query, &c))
                .unwrap_or_default(),
        }))
    }

    async fn retry_job(
        &self,
        request: Request<pb::RetryJobRequest>,
    ) -> Result<Response<pb::RetryJobResponse>, Status> {
        identity(&request)?.require_admin()?;
        let id = parse_uuid("job_id", &request.get_ref().job_id)?;
        let job = self.media.retry(id).await?;
        Ok(Response::new(pb::RetryJobResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn queue_stats(
        &self,
        request: Request<pb::QueueStatsRequest>,
    ) -> Result<Response<pb::QueueStatsResponse>, Status> {
        identity(&request)?.require_admin()?;
        let (depth, oldest) = self.media.queue().depth().await.map_err(Error::from)?;
        Ok(Response::new(pb::QueueStatsResponse {
            depth_by_state: JobState::ALL
                .into_iter()
                .map(|s| (s.as_str().to_owned(), depth.get(&s).copied().unwrap_or(0)))
                .collect(),
            oldest_queued_age_seconds: oldest.as_secs(),
        }))
    }

    async fn list_quarantine(
        &self,
        request: Request<pb::ListQuarantineRequest>,
    ) -> Result<Response<pb::ListQuarantineResponse>, Status> {
        identity(&request)?.require_admin()?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 100, 1000)?;
        let query = paging::fingerprint(&"quarantine");
        let after: Option<QuarantineCursor> = paging::decode(&req.page_token, &query)?;
        let mut rows = self.media.list_quarantine(size, after).await?;
        let next_page_token = paging::finish_page(&mut rows, size, &query, |(id, _, at)| {
            Some(QuarantineCursor { at: *at, id: *id })
        });
        let mut files = Vec::with_capacity(rows.len());
        for (file_id, signature, at) in rows {
            let file = match self
                .media
                .files
                .get_file(pb::GetFileRequest {
                    file_id: file_id.to_string(),
                })
                .await
            {
                Ok(r) => r.file,
                // Purged meanwhile; its row goes with the file.purged event.
                Err(s) if s.code() == tonic::Code::NotFound => continue,
                Err(s) => return Err(s),
            };
            files.push(pb::QuarantinedFile {
                file,
                signature,
                quarantined_at: Some(timestamp(at)),
            });
        }
        Ok(Response::new(pb::ListQuarantineResponse {
            files,
            next_page_token,
        }))
    }

    async fn reprocess(
        &self,
        request: Request<pb::ReprocessRequest>,
    ) -> Result<Response<pb::ReprocessResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let id = parse_uuid("file_id", &request.get_ref().file_id)?;
        let job = self.media.reprocess(id).await?;
        Ok(Response::new(pb::ReprocessResponse {
            job: Some(job_to_proto(&job)),
        }))
    }

    async fn rescan(
        &self,
        request: Request<pb::RescanRequest>,
    ) -> Result<Response<pb::RescanResponse>, Status> {
        identity(&request)?.require_admin()?;
        let uploaded_after = stowage_runtime::status::parse_time(
            "uploaded_after",
            request.get_ref().uploaded_after.as_ref(),
        )?;
        let files = self.media.mark_for_rescan(uploaded_after).await?;
        tracing::info!(files, ?uploaded_after, "re-scan asked for");
        Ok(Response::new(pb::RescanResponse { files }))
    }

    async fn release_quarantined(
        &self,
        request: Request<pb::ReleaseQuarantinedRequest>,
    ) -> Result<Response<pb::ReleaseQuarantinedResponse>, Status> {
        let caller = identity(&request)?;
        caller.require_admin()?;
        let id = parse_uuid("file_id", &request.get_ref().file_id)?;
        let file = self.media.release(id, &caller.user_id).await?;
        Ok(Response::new(pb::ReleaseQuarantinedResponse {
            file: Some(file),
        }))
    }
}
