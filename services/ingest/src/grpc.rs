//! The Ingest gRPC service: thin handlers over [`Uploader`] and [`Sessions`]. Event streams
//! answer UNIMPLEMENTED until they land.

use futures::StreamExt;
use stowage_proto::v1::{self as pb, ingest_server};
use stowage_runtime::{Identity, identity, status::parse_uuid};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    error::Error,
    links::{MAX_LINK_SECONDS, UploadLinks},
    oneshot::Uploader,
    sessions::{Checksum, ChunkIn, Meta, Sessions},
    streams::EventStreams,
};

/// Largest chunk of a unary PutChunk (grpc-web).
pub const MAX_PUT_CHUNK: usize = 4 * 1024 * 1024;

/// The tonic service of Ingest.
#[derive(Clone)]
pub struct IngestGrpc {
    uploader: Uploader,
    sessions: Sessions,
    shutdown: CancellationToken,
    streams: Option<EventStreams>,
    links: Option<UploadLinks>,
}

impl IngestGrpc {
    /// Serves one-shot uploads through `uploader` and sessions through `sessions`.
    pub fn new(uploader: Uploader, sessions: Sessions, shutdown: CancellationToken) -> Self {
        Self {
            uploader,
            sessions,
            shutdown,
            streams: None,
            links: None,
        }
    }

    /// Signs upload links with `links` (CreateUpload's `link_seconds`).
    pub fn with_links(mut self, links: UploadLinks) -> Self {
        self.links = Some(links);
        self
    }

    /// Also serves event streams through `streams`.
    pub fn with_streams(mut self, streams: EventStreams) -> Self {
        self.streams = Some(streams);
        self
    }

    fn streams(&self) -> Result<&EventStreams, Status> {
        self.streams
            .as_ref()
            .ok_or_else(|| Status::unimplemented("event streams are not enabled in this process"))
    }

    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> ingest_server::IngestServer<Self> {
        ingest_server::IngestServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

fn chunk_in(chunk: Option<pb::Chunk>) -> Result<ChunkIn, Status> {
    let chunk =
        chunk.ok_or_else(|| stowage_runtime::status::invalid_argument("chunk", "is required"))?;
    let checksum = if chunk.sha256.is_empty() {
        None
    } else {
        let digest = hex::decode(&chunk.sha256)
            .ok()
            .filter(|d| d.len() == 32)
            .ok_or_else(|| {
                stowage_runtime::status::invalid_argument(
                    "chunk.sha256",
                    "must be 64 hex characters",
                )
            })?;
        Some(Checksum::Sha256(digest))
    };
    Ok(ChunkIn {
        offset: chunk.offset,
        data: chunk.data,
        checksum,
        size: chunk.size_bytes,
    })
}

/// A file as its caller may see it: Files answers Ingest (a service) with the store's keys,
/// which end users are not shown (as Files does not show them).
fn as_seen_by(caller: &Identity, mut file: pb::File) -> pb::File {
    if !caller.is_privileged() {
        file.storage_key.clear();
        for variant in &mut file.variants {
            variant.storage_key.clear();
        }
    }
    file
}

fn session(s: crate::sessions::Session) -> Option<pb::UploadSession> {
    Some(s.to_proto())
}

#[tonic::async_trait]
impl ingest_server::Ingest for IngestGrpc {
    async fn append_events(
        &self,
        request: Request<Streaming<pb::AppendEventsRequest>>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::AppendEventsResponse>>, Status> {
        let owner = identity(&request)?.user_id;
        let streams = self.streams()?.clone();
        let mut frames = request.into_inner();
        // Frames are read and handed on without waiting for earlier acknowledgements (the
        // byte budget bounds what is in flight); answers go back in order.
        let (answers, pending) = tokio::sync::mpsc::channel(1024);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let frame = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = frames.next() => match next {
                        Some(Ok(frame)) => frame,
                        Some(Err(_)) | None => return,
                    },
                };
                let stream_id = frame.stream_id.clone();
                let submitted = streams.submit(&owner, frame).await;
                if answers.send((stream_id, submitted)).await.is_err() {
                    return;
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(pending).then(
            |(stream_id, submitted)| async move {
                let durable = match submitted {
                    Ok(answer) => answer
                        .await
                        .map_err(|_| Status::unavailable("writer stopped; re-send"))?,
                    Err(error) => Err(error),
                }
                .map_err(Status::from)?;
                Ok(pb::AppendEventsResponse {
                    stream_id,
                    durable_seq: durable,
                })
            },
        );
        Ok(Response::new(Box::pin(out)))
    }

    async fn put_events(
        &self,
        request: Request<pb::PutEventsRequest>,
    ) -> Result<Response<pb::PutEventsResponse>, Status> {
        let owner = identity(&request)?.user_id;
        let streams = self.streams()?.clone();
        let frame = request
            .into_inner()
            .frame
            .ok_or_else(|| stowage_runtime::status::invalid_argument("frame", "is required"))?;
        // On a task of its own: a caller that goes away mid-call must not cut the frame off
        // between storing its screenshots and handing it to the writer (or forgetting them).
        let durable = tokio::spawn(async move {
            let answer = streams.submit(&owner, frame).await.map_err(frame_status)?;
            answer
                .await
                .map_err(|_| Status::unavailable("writer stopped; re-send"))?
                .map_err(frame_status)
        })
        .await
        .map_err(|_| Status::internal("the frame's task failed"))??;
        Ok(Response::new(pb::PutEventsResponse {
            durable_seq: durable,
        }))
    }

    async fn subscribe_batches(
        &self,
        request: Request<pb::SubscribeBatchesRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::SubscribeBatchesResponse>>, Status> {
        let owner = stream_owner(&request)?;
        let req = request.into_inner();
        let group = if !req.observe {
            consumer_group(owner.as_deref(), &req.consumer_group)?
        } else if !req.consumer_group.is_empty() {
            return Err(stowage_runtime::status::invalid_argument(
                "consumer_group",
                "must be empty when observing",
            ));
        } else {
            String::new()
        };
        if req.stream_ids.len() > MAX_SUBSCRIBED_STREAMS {
            return Err(stowage_runtime::status::invalid_argument(
                "stream_ids",
                format!("at most {MAX_SUBSCRIBED_STREAMS} streams (none: all the caller's)"),
            ));
        }
        for id in &req.stream_ids {
            // A user names their own streams; a service or admin names them {owner}/{stream}.
            match owner {
                Some(_) => crate::streams::validate_stream_id(id).map_err(|_| {
                    stowage_runtime::status::invalid_argument(
                        "stream_ids",
                        "each must be 1..=128 characters of [A-Za-z0-9_.-]",
                    )
                })?,
                None => crate::streams::validate_stream_key(id)?,
            }
        }
        let streams = self.streams()?.clone();
        let mut after: i64 = if req.cursor.is_empty() {
            if req.observe {
                streams
                    .newest_cursor(owner.as_deref(), &req.stream_ids)
                    .await?
            } else {
                0
            }
        } else {
            req.cursor.parse().map_err(|_| {
                stowage_runtime::status::invalid_argument("cursor", "is not a batch cursor")
            })?
        };
        let slot = streams.subscription_slot(owner.as_deref())?;
        let shutdown = self.shutdown.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // This call is one member of its group.
        let member = uuid::Uuid::new_v4();
        tokio::spawn(async move {
            // Held while the subscription lives.
            let _slot = slot;
            loop {
                let batches = if req.observe {
                    streams
                        .observe_batches(owner.as_deref(), after, &req.stream_ids)
                        .await
                } else {
                    streams
                        .claim_batches(owner.as_deref(), &group, member, after, &req.stream_ids)
                        .await
                };
                let batches = match batches {
                    Ok(b) => b,
                    Err(error) => {
                        let _ = tx.send(Err(Status::from(error))).await;
                        return;
                    }
                };
                let idle = batches.is_empty();
                for batch in batches {
                    after = after.max(batch.cursor.parse().unwrap_or(after));
                    let message = pb::SubscribeBatchesResponse { batch: Some(batch) };
                    if tx.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                if idle {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tx.closed() => return,
                        () = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn ack_batch(
        &self,
        request: Request<pb::AckBatchRequest>,
    ) -> Result<Response<pb::AckBatchResponse>, Status> {
        let owner = stream_owner(&request)?;
        let req = request.into_inner();
        let group = consumer_group(owner.as_deref(), &req.consumer_group)?;
        let batch = parse_uuid("batch_id", &req.batch_id)?;
        let deleted = self.streams()?.ack(owner.as_deref(), &group, batch).await?;
        Ok(Response::new(pb::AckBatchResponse {
            screenshots_deleted: deleted,
        }))
    }

    async fn get_screenshot(
        &self,
        request: Request<pb::GetScreenshotRequest>,
    ) -> Result<Response<pb::GetScreenshotResponse>, Status> {
        let owner = stream_owner(&request)?;
        let req = request.into_inner();
        let data = self
            .streams()?
            .screenshot(owner.as_deref(), &req.storage_key)
            .await?;
        Ok(Response::new(pb::GetScreenshotResponse { data }))
    }

    async fn find_upload_keys(
        &self,
        request: Request<pb::FindUploadKeysRequest>,
    ) -> Result<Response<pb::FindUploadKeysResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let keys = request.into_inner().keys;
        stowage_blob::keys::validate_key_list(&keys)
            .map_err(|why| stowage_runtime::status::invalid_argument("keys", why))?;
        let in_use = self.uploader.uploads.keys_in_use(&keys).await?;
        Ok(Response::new(pb::FindUploadKeysResponse { in_use }))
    }

    async fn sweep_staging(
        &self,
        request: Request<pb::SweepStagingRequest>,
    ) -> Result<Response<pb::SweepStagingResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        if !(3600..=MAX_SWEEP_AGE_SECONDS).contains(&req.max_age_seconds) {
            return Err(stowage_runtime::status::invalid_argument(
                "max_age_seconds",
                format!("must be 3600..={MAX_SWEEP_AGE_SECONDS}"),
            ));
        }
        let max_age = std::time::Duration::from_secs(req.max_age_seconds);
        let (mut examined, mut keys, mut removed, mut failed) = self
            .sessions
            .sweep_staging(max_age, req.dry_run)
            .await
            .map_err(Status::from)?;
        if let Some(streams) = &self.streams {
            // The staging sweep's work stands whatever becomes of this one.
            match streams.sweep_stray_screenshots(max_age, req.dry_run).await {
                Ok((seen, stray, gone, failures)) => {
                    examined += seen;
                    keys.extend(stray.into_iter().take(1000usize.saturating_sub(keys.len())));
                    removed += gone;
                    failed += failures;
                }
                Err(error) => {
                    failed += 1;
                    tracing::warn!(%error, "stray screenshots not swept");
                }
            }
        }
        Ok(Response::new(pb::SweepStagingResponse {
            examined,
            keys,
            removed,
            failed,
        }))
    }

    async fn sweep_uploads(
        &self,
        request: Request<pb::SweepUploadsRequest>,
    ) -> Result<Response<pb::SweepUploadsResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        if !(60..=MAX_SWEEP_IDLE_SECONDS).contains(&req.idle_seconds) {
            return Err(stowage_runtime::status::invalid_argument(
                "idle_seconds",
                format!("must be 60..={MAX_SWEEP_IDLE_SECONDS}"),
            ));
        }
        let limit = match req.limit {
            0 => 1000,
            n if n > 10_000 => {
                return Err(stowage_runtime::status::invalid_argument(
                    "limit",
                    "must be at most 10000",
                ));
            }
            n => i64::from(n),
        };
        // Sessions end at the expiry their clients were told, not before.
        let (mut examined, ended, mut failed) = self
            .sessions
            .sweep_expired(limit, req.dry_run)
            .await
            .map_err(Status::from)?;
        let mut upload_ids: Vec<String> = ended.iter().map(ToString::to_string).collect();
        if !req.dry_run {
            // One-shot uploads whose connection died long ago (their bytes never completed).
            let idle = std::time::Duration::from_secs(req.idle_seconds);
            match self.uploader.sweep_abandoned(idle).await {
                Ok(n) => examined += n as u64,
                Err(error) => {
                    failed += 1;
                    tracing::warn!(%error, "abandoned one-shot uploads not swept");
                }
            }
            // Completions interrupted by a crash are finished, not abandoned.
            if let Err(error) = self.sessions.finish_interrupted(limit).await {
                failed += 1;
                tracing::warn!(%error, "interrupted completions not finished");
            }
        }
        upload_ids.sort();
        Ok(Response::new(pb::SweepUploadsResponse {
            examined,
            upload_ids,
            failed,
        }))
    }

    async fn create_upload(
        &self,
        request: Request<pb::CreateUploadRequest>,
    ) -> Result<Response<pb::CreateUploadResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let owner = if req.user_id.is_empty() || req.user_id == caller.user_id {
            caller.user_id
        } else {
            caller.require_privileged()?;
            req.user_id
        };
        if req.link_seconds > MAX_LINK_SECONDS {
            return Err(stowage_runtime::status::invalid_argument(
                "link_seconds",
                format!("must be at most {MAX_LINK_SECONDS}"),
            ));
        }
        let links = match (req.link_seconds, &self.links) {
            (0, _) => None,
            (_, Some(links)) => Some(links),
            (_, None) => {
                return Err(Status::failed_precondition(
                    "link_seconds: upload links are not served here",
                ));
            }
        };
        let meta = Meta::from_proto(req.metadata.unwrap_or_default(), "metadata")?;
        let key = (!req.idempotency_key.is_empty()).then_some(req.idempotency_key.as_str());
        let s = self
            .sessions
            .create(&owner, req.size_bytes, meta, key)
            .await?;
        let upload_url = links.map_or_else(String::new, |links| {
            let expires = chrono::Utc::now().timestamp() + i64::from(req.link_seconds);
            links.sign(&s.id, &owner, expires)
        });
        Ok(Response::new(pb::CreateUploadResponse {
            session: session(s),
            upload_url,
        }))
    }

    async fn write_chunks(
        &self,
        request: Request<Streaming<pb::WriteChunksRequest>>,
    ) -> Result<Response<pb::WriteChunksResponse>, Status> {
        let caller = identity(&request)?;
        let mut stream = request.into_inner();
        // The next message is received while the current chunk is staged and recorded (one
        // read ahead: a stream holds at most two chunks), so the client keeps sending instead of
        // waiting for each chunk's write and commit.
        let (ahead, mut received) = tokio::sync::mpsc::channel(1);
        let receive = async move {
            while let Some(message) = stream.next().await {
                let failed = message.is_err();
                if ahead.send(message).await.is_err() || failed {
                    break;
                }
            }
        };
        let apply = async {
            let mut upload = None;
            let mut writer: Option<crate::ChunkStream> = None;
            let written: Result<(), Status> = async {
                loop {
                    if received.is_empty()
                        && let Some(w) = writer.as_mut()
                    {
                        // Nothing in flight from the client: record what is pending and let
                        // go of the session until more comes.
                        w.pause().await?;
                    }
                    let message = tokio::select! {
                        () = self.shutdown.cancelled() => return Err(Error::ShuttingDown.into()),
                        m = received.recv() => m,
                    };
                    let Some(message) = message else {
                        return Ok(());
                    };
                    let message = message?;
                    let id = match upload {
                        Some(id) => id,
                        None => {
                            let id = parse_uuid("upload_id", &message.upload_id)?;
                            upload = Some(id);
                            id
                        }
                    };
                    writer
                        .get_or_insert_with(|| self.sessions.chunk_stream(id, &caller.user_id))
                        .write(chunk_in(message.chunk)?)
                        .await?;
                }
            }
            .await;
            let last = match writer {
                Some(w) => w.settle(written).await?,
                None => written.map(|()| None)?,
            };
            let s = match (last, upload) {
                (Some(s), _) => s,
                (None, Some(id)) => self.sessions.get(id, &caller.user_id).await?,
                (None, None) => {
                    return Err(stowage_runtime::status::invalid_argument(
                        "upload_id",
                        "the stream carried no message",
                    ));
                }
            };
            Ok(Response::new(pb::WriteChunksResponse {
                session: session(s),
            }))
        };
        tokio::pin!(receive, apply);
        let mut receiving = true;
        loop {
            tokio::select! {
                result = &mut apply => return result,
                () = &mut receive, if receiving => receiving = false,
            }
        }
    }

    async fn put_chunk(
        &self,
        request: Request<pb::PutChunkRequest>,
    ) -> Result<Response<pb::PutChunkResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let id = parse_uuid("upload_id", &req.upload_id)?;
        let chunk = chunk_in(req.chunk)?;
        if chunk.data.len() > MAX_PUT_CHUNK {
            return Err(stowage_runtime::status::invalid_argument(
                "chunk.data",
                "at most 4 MiB per PutChunk",
            ));
        }
        let s = self
            .sessions
            .write_chunk(id, &caller.user_id, chunk)
            .await?;
        Ok(Response::new(pb::PutChunkResponse {
            session: session(s),
        }))
    }

    async fn get_upload(
        &self,
        request: Request<pb::GetUploadRequest>,
    ) -> Result<Response<pb::GetUploadResponse>, Status> {
        let caller = identity(&request)?;
        let id = parse_uuid("upload_id", &request.get_ref().upload_id)?;
        let s = self.sessions.get(id, &caller.user_id).await?;
        Ok(Response::new(pb::GetUploadResponse {
            session: session(s),
        }))
    }

    async fn complete_upload(
        &self,
        request: Request<pb::CompleteUploadRequest>,
    ) -> Result<Response<pb::CompleteUploadResponse>, Status> {
        let caller = identity(&request)?;
        let id = parse_uuid("upload_id", &request.get_ref().upload_id)?;
        let file = self.sessions.complete(id, &caller.user_id).await?;
        Ok(Response::new(pb::CompleteUploadResponse {
            file: Some(as_seen_by(&caller, file)),
        }))
    }

    async fn abort_upload(
        &self,
        request: Request<pb::AbortUploadRequest>,
    ) -> Result<Response<pb::AbortUploadResponse>, Status> {
        let caller = identity(&request)?;
        let id = parse_uuid("upload_id", &request.get_ref().upload_id)?;
        let s = self.sessions.abort(id, &caller.user_id).await?;
        Ok(Response::new(pb::AbortUploadResponse {
            session: session(s),
        }))
    }

    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let caller = identity(&request)?;
        let stream = request.into_inner();
        let file = self.uploader.upload(&caller.user_id, stream).await?;
        Ok(Response::new(pb::UploadResponse {
            file: Some(as_seen_by(&caller, file)),
        }))
    }

    async fn upload_files(
        &self,
        request: Request<pb::UploadFilesRequest>,
    ) -> Result<Response<pb::UploadFilesResponse>, Status> {
        let caller = identity(&request)?;
        let files = request.into_inner().files;
        let mut results = self.uploader.upload_files(&caller.user_id, files).await?;
        for result in &mut results {
            result.file = result.file.take().map(|f| as_seen_by(&caller, f));
        }
        Ok(Response::new(pb::UploadFilesResponse { results }))
    }
}

/// Whose streams a call may touch: the caller's own, or (`None`) everyone's for a service
/// or admin.
fn stream_owner<T>(request: &Request<T>) -> Result<Option<String>, Status> {
    let caller = identity(request)?;
    Ok((!caller.is_privileged()).then_some(caller.user_id))
}

/// Most streams one subscription names.
const MAX_SUBSCRIBED_STREAMS: usize = 100;

/// The consumer group `group` of a caller who reads `owner`'s streams (`None`: a service or
/// admin, who reads everyone's), as it is kept: a user's groups are their own,
/// `{owner}/{group}`, so that a user naming a group as a service's does not take or
/// acknowledge that service's batches. A group is named by 1..=128 bytes without control
/// characters, and a service's or admin's without `/`.
fn consumer_group(owner: Option<&str>, group: &str) -> Result<String, Status> {
    if group.is_empty() || group.len() > 128 || group.chars().any(char::is_control) {
        return Err(stowage_runtime::status::invalid_argument(
            "consumer_group",
            "must be 1..=128 bytes without control characters",
        ));
    }
    match owner {
        Some(owner) => Ok(format!("{owner}/{group}")),
        None if group.contains('/') => Err(stowage_runtime::status::invalid_argument(
            "consumer_group",
            "of a service or admin has no '/' (users' groups are kept as {owner}/{group})",
        )),
        None => Ok(group.to_owned()),
    }
}

/// An error of a frame sent in a `PutEventsRequest`, a refused field named as the request
/// holds it (`frame.first_seq`).
fn frame_status(error: Error) -> Status {
    match error {
        Error::InvalidArgument { field, reason } => {
            stowage_runtime::status::invalid_argument(&format!("frame.{field}"), reason)
        }
        Error::SeqGap { .. } => {
            let mut status = Status::from(error);
            let message = format!("frame.{}", status.message());
            let metadata = std::mem::take(status.metadata_mut());
            status = Status::with_metadata(status.code(), message, metadata);
            status
        }
        other => Status::from(other),
    }
}

/// Oldest staging a sweep may be asked to keep: ten years (a larger age is not a sweep).
const MAX_SWEEP_AGE_SECONDS: u64 = 10 * 366 * 24 * 3600;

/// Longest idle time a sweep of one-shot uploads may be given: thirty days.
const MAX_SWEEP_IDLE_SECONDS: u64 = 30 * 24 * 3600;
