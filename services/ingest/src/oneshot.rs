//! The one-shot upload: reserve → stream to the store while hashing → sniff → register →
//! commit. Any failure before registration releases the reservation and removes the blob.

use std::sync::Arc;

use bytes::BytesMut;
use chrono::{Datelike, Utc};
use futures::{Stream, StreamExt};
use object_store::{ObjectStoreExt, WriteMultipart, path::Path as ObjectPath};
use sha2::{Digest, Sha256};
use stowage_blob::keys;
use stowage_proto::v1::{self as pb, upload_request::Part};
use stowage_runtime::{
    mesh::{FilesApi, QuotaApi},
    status::retry_may_pass,
    validate,
};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    sessions::Meta,
    sniff::{AllowedTypes, Registration, SNIFF_LEN, Sniffed, sniff},
    uploads::{NewUpload, UploadRow, Uploads},
};

/// Everything an upload needs.
#[derive(Clone)]
pub struct Uploader {
    /// Upload rows.
    pub uploads: Uploads,
    /// The object store.
    pub store: Arc<dyn object_store::ObjectStore>,
    /// Quota.
    pub quota: Arc<dyn QuotaApi>,
    /// Files.
    pub files: Arc<dyn FilesApi>,
    /// Largest file accepted.
    pub max_file_size: u64,
    /// Free bytes a local-disk store keeps: an upload that would leave less is refused.
    pub min_free: u64,
    /// Multipart part size.
    pub part_size: usize,
    /// Cancelled at shutdown: in-flight uploads stop and clean up.
    pub shutdown: CancellationToken,
    /// Root of a local-disk store, whose unfinished multipart writes are `{key}#{n}` files
    /// that deleting the key does not remove.
    pub local_root: Option<std::path::PathBuf>,
    /// What status new files are registered with.
    pub registration: Registration,
    /// The content types taken.
    pub allowed: AllowedTypes,
    /// How often an upload still receiving marks its row as alive: under half the idle time
    /// after which any sweep takes it for abandoned (see [`TOUCH_EVERY_MAX`]).
    pub touch_every: std::time::Duration,
}

/// Validated header of an upload.
struct Header {
    size: u64,
    meta: pb::UploadMetadata,
    tags: Vec<String>,
    expected_sha256: Option<String>,
    idempotency_key: Option<String>,
}

fn check_header(h: pb::UploadHeader, max: u64) -> Result<Header> {
    let meta = h.metadata.unwrap_or_default();
    let checked = Meta::from_proto(meta.clone(), "header.metadata")?;
    if h.size_bytes > max {
        return Err(Error::invalid(
            "header.size_bytes",
            format!("{} bytes is above the limit of {max}", h.size_bytes),
        ));
    }
    validate::idempotency_key(&h.idempotency_key)
        .map_err(|why| Error::invalid("header.idempotency_key", why))?;
    Ok(Header {
        size: h.size_bytes,
        tags: checked.tags,
        expected_sha256: (!checked.expected_sha256.is_empty()).then_some(checked.expected_sha256),
        idempotency_key: (!h.idempotency_key.is_empty()).then_some(h.idempotency_key),
        meta,
    })
}

pub(crate) fn kind_proto(kind: &str) -> pb::FileKind {
    match kind {
        "video" => pb::FileKind::Video,
        "image" => pb::FileKind::Image,
        "audio" => pb::FileKind::Audio,
        "document" => pb::FileKind::Document,
        _ => pb::FileKind::Other,
    }
}

/// How often a one-shot upload still receiving marks its row as alive, at most: half the
/// shortest idle time `SweepUploads` accepts (60 s).
pub const TOUCH_EVERY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// The first bytes of an upload, read before anything is held.
struct Head {
    bytes: BytesMut,
    /// The stream ended within them.
    ended: bool,
}

/// Refuses a stream that carries more than its header declared.
fn check_not_over(header: &Header, received: u64) -> Result<()> {
    if received > header.size {
        return Err(Error::invalid(
            "header.size_bytes",
            format!(
                "the stream carries more than the declared {} bytes",
                header.size
            ),
        ));
    }
    Ok(())
}

/// Refuses a stream that ended at another length than its header declared.
fn check_length(header: &Header, received: u64) -> Result<()> {
    if received != header.size {
        return Err(Error::invalid(
            "header.size_bytes",
            format!(
                "declared {} bytes but the stream carried {received}",
                header.size
            ),
        ));
    }
    Ok(())
}

/// What the byte-receiving phase produced.
struct Received {
    key: ObjectPath,
    sniffed: Sniffed,
    size: u64,
    sha256: String,
}

/// Most files one UploadFiles call carries.
pub const MAX_FILES_PER_CALL: usize = 10;

impl Uploader {
    /// Stores `files` of `owner` (an UploadFiles call), each as its own one-shot upload, side
    /// by side: one refused (over the quota, a bad name) leaves the others stored. The results
    /// are in the files' order. The call is refused whole only when it is malformed: no files,
    /// more than `MAX_FILES_PER_CALL`, or one idempotency key given twice.
    pub async fn upload_files(
        &self,
        owner: &str,
        files: Vec<pb::UploadFile>,
    ) -> Result<Vec<pb::UploadFileResult>> {
        if files.is_empty() || files.len() > MAX_FILES_PER_CALL {
            return Err(Error::invalid(
                "files",
                format!("1 to {MAX_FILES_PER_CALL} files per call"),
            ));
        }
        let mut keys = std::collections::HashSet::new();
        if files
            .iter()
            .any(|f| !f.idempotency_key.is_empty() && !keys.insert(f.idempotency_key.as_str()))
        {
            return Err(Error::invalid(
                "files.idempotency_key",
                "is given to two files of the call",
            ));
        }
        let uploads = files.into_iter().enumerate().map(|(i, file)| async move {
            let header = pb::UploadHeader {
                size_bytes: file.data.len() as u64,
                metadata: file.metadata,
                idempotency_key: file.idempotency_key,
            };
            let messages = [Part::Header(header), Part::Data(file.data)]
                .map(|part| Ok(pb::UploadRequest { part: Some(part) }));
            match self.upload(owner, futures::stream::iter(messages)).await {
                Ok(file) => pb::UploadFileResult {
                    file: Some(file),
                    ..Default::default()
                },
                Err(error) => {
                    let status = match error {
                        // Upload names its header's fields; these are the file's.
                        Error::InvalidArgument { field, reason } => {
                            let field = match field.strip_prefix("header.").unwrap_or(field) {
                                "size_bytes" => "data",
                                other => other,
                            };
                            stowage_runtime::status::invalid_argument(
                                &format!("files[{i}].{field}"),
                                reason,
                            )
                        }
                        Error::TypeNotAllowed { mime, allowed, .. } => {
                            stowage_runtime::status::invalid_argument(
                                &format!("files[{i}].data"),
                                format!("the content is {mime}; this deployment takes {allowed}"),
                            )
                        }
                        other => Status::from(other),
                    };
                    pb::UploadFileResult {
                        file: None,
                        code: status.code() as i32,
                        message: status.message().to_owned(),
                    }
                }
            }
        });
        Ok(futures::future::join_all(uploads).await)
    }

    /// Runs a one-shot upload from `stream` for `owner`.
    pub async fn upload<S>(&self, owner: &str, mut stream: S) -> Result<pb::File>
    where
        S: Stream<Item = Result<pb::UploadRequest, Status>> + Unpin + Send,
    {
        keys::validate_user_id(owner).map_err(|why| Error::invalid("user_id", why))?;
        let first = match stream.next().await {
            Some(Ok(msg)) => msg,
            Some(Err(status)) => return Err(Error::Stream(status)),
            None => {
                return Err(Error::invalid(
                    "header",
                    "the stream ended before the header",
                ));
            }
        };
        let Some(Part::Header(header)) = first.part else {
            return Err(Error::invalid(
                "header",
                "the first message must be the header",
            ));
        };
        let header = check_header(header, self.max_file_size)?;
        // A repeated key is answered from the upload that used it, without touching the quota.
        if let Some(key) = header.idempotency_key.as_deref()
            && let Some(row) = self.uploads.find(owner, key).await?
        {
            return self.repeated(row).await;
        }
        // The first bytes (at most SNIFF_LEN) pick the file's key, so that the row names it
        // from its first write on; reading them before the hold costs the quota nothing.
        let mut head = Head {
            bytes: BytesMut::new(),
            ended: false,
        };
        while !head.ended && head.bytes.len() < SNIFF_LEN {
            match self.next_data(&mut stream).await? {
                Some(data) => head.bytes.extend_from_slice(&data),
                None => head.ended = true,
            }
            check_not_over(&header, head.bytes.len() as u64)?;
        }
        if head.ended {
            check_length(&header, head.bytes.len() as u64)?;
        }
        let upload_id = Uuid::now_v7();
        let file_id = Uuid::now_v7();
        let sniffed = sniff(&head.bytes, &header.meta.display_name);
        // Refused before anything is held or stored.
        self.allowed.check(&sniffed, "data")?;
        let now = Utc::now();
        let key = keys::original(
            owner,
            sniffed.kind,
            now.year(),
            now.month(),
            &file_id.to_string(),
            &sniffed.extension,
        );
        crate::staging::check_store_room(self.local_root.as_deref(), header.size, self.min_free)?;
        // The hold comes next and is recorded with the row, in one write: a crash between
        // the two leaves a hold with no row, which Quota expires on its own.
        let reservation = match self
            .quota
            .reserve(pb::ReserveRequest {
                user_id: owner.to_owned(),
                bytes: header.size,
                ttl_seconds: 0,
                idempotency_key: format!("upload:{upload_id}"),
            })
            .await
        {
            Ok(r) => r.reservation.map(|r| r.id).unwrap_or_default(),
            Err(status) => return Err(status.into()),
        };
        let reservation_id =
            Uuid::parse_str(&reservation).map_err(|_| Status::internal("bad reservation id"))?;
        let started = self
            .uploads
            .start(NewUpload {
                id: upload_id,
                owner,
                idempotency_key: header.idempotency_key.as_deref(),
                declared_size: header.size,
                display_name: &header.meta.display_name,
                reservation: reservation_id,
                file_id,
                storage_key: key.as_ref(),
            })
            .await;
        let row = match started {
            Ok((row, true)) => row,
            Ok((row, false)) => {
                self.release(upload_id, &reservation).await;
                return self.repeated(row).await;
            }
            Err(error) => {
                self.release(upload_id, &reservation).await;
                return Err(error);
            }
        };

        let received = match self
            .receive(row.id, &header, head, key, sniffed, &mut stream)
            .await
        {
            Ok(received) => received,
            Err(error) => {
                self.fail(row.id, &reservation, None, &error).await;
                return Err(error);
            }
        };
        let registered = self
            .files
            .register_file(pb::RegisterFileRequest {
                owner_id: owner.to_owned(),
                file_id: row.file_id.to_string(),
                display_name: header.meta.display_name.clone(),
                kind: kind_proto(received.sniffed.kind) as i32,
                mime_type: received.sniffed.mime_type.clone(),
                size_bytes: received.size,
                sha256: received.sha256.clone(),
                storage_key: received.key.to_string(),
                tags: header.tags.clone(),
                package_name: header.meta.package_name.clone(),
                status: self.registration.status(
                    &received.sniffed,
                    &header.meta.display_name,
                    received.size,
                ) as i32,
                idempotency_key: row.id.to_string(),
            })
            .await;
        let file = match registered {
            Ok(r) => r
                .file
                .ok_or_else(|| Status::internal("file missing from response"))?,
            Err(status)
                if retry_may_pass(status.code()) || status.code() == tonic::Code::Internal =>
            {
                // The file may have been registered anyway (an internal error too says nothing
                // of what was committed before it): keep bytes and hold; the sweeper asks Files
                // later and either charges or cleans up.
                tracing::warn!(upload_id = %row.id, %status, "registration outcome unknown; left for the sweeper");
                return Err(Error::Peer(status));
            }
            Err(status) => {
                let error = Error::Peer(status);
                self.fail(row.id, &reservation, Some(&received.key), &error)
                    .await;
                return Err(error);
            }
        };
        // The file is visible now; the charge must follow. Commit is idempotent per
        // reservation, so retrying is safe. If Quota stays down (or this process dies), the
        // row stays `receiving` with its reservation; the sweeper finds the file registered
        // and commits then.
        let mut attempt = 0;
        loop {
            match self
                .quota
                .commit(pb::CommitRequest {
                    reservation_id: reservation.clone(),
                    bytes: received.size,
                })
                .await
            {
                Ok(_) => break,
                Err(status) if attempt < 4 && retry_may_pass(status.code()) => {
                    attempt += 1;
                    tracing::warn!(upload_id = %row.id, %status, attempt, "quota commit failed, retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                }
                Err(status) => {
                    tracing::error!(upload_id = %row.id, %status, "quota commit failed; left for the sweeper");
                    self.uploads
                        .set_state(
                            row.id,
                            "registered",
                            Some(received.key.as_ref()),
                            received.size,
                            None,
                        )
                        .await?;
                    return Err(status.into());
                }
            }
        }
        self.uploads
            .complete(row.id, received.size, Some(&received.sha256))
            .await?;
        Ok(file)
    }

    /// Answers a repeated idempotency key from the upload that first used it.
    async fn repeated(&self, row: UploadRow) -> Result<pb::File> {
        match row.state.as_str() {
            "completed" => {
                let file = self
                    .files
                    .get_file(pb::GetFileRequest {
                        file_id: row.file_id.to_string(),
                    })
                    .await?;
                file.file
                    .ok_or_else(|| Status::internal("file missing from response").into())
            }
            "receiving" | "registered" => Err(Error::InProgress),
            _ => Err(Error::invalid(
                "header.idempotency_key",
                "was used by an upload that failed; use a new key",
            )),
        }
    }

    /// Gives back a hold (best effort: it expires anyway).
    async fn release(&self, upload_id: Uuid, reservation: &str) {
        if let Err(status) = self
            .quota
            .release(pb::ReleaseRequest {
                reservation_id: reservation.to_owned(),
            })
            .await
        {
            tracing::warn!(%upload_id, %status, "release failed; the hold expires on its own");
        }
    }

    /// The next piece of data from `stream`, or `None` at its end.
    async fn next_data<S>(&self, stream: &mut S) -> Result<Option<bytes::Bytes>>
    where
        S: Stream<Item = Result<pb::UploadRequest, Status>> + Unpin + Send,
    {
        let message = tokio::select! {
            () = self.shutdown.cancelled() => return Err(Error::ShuttingDown),
            message = stream.next() => message,
        };
        match message {
            None => Ok(None),
            Some(Err(status)) => Err(Error::Stream(status)),
            Some(Ok(pb::UploadRequest {
                part: Some(Part::Data(data)),
            })) => Ok(Some(data)),
            Some(Ok(_)) => Err(Error::invalid(
                "data",
                "only the first message may be a header",
            )),
        }
    }

    /// Receives the bytes into the store under `key`, `head` first, hashing them on the way.
    async fn receive<S>(
        &self,
        upload_id: Uuid,
        header: &Header,
        head: Head,
        key: ObjectPath,
        sniffed: Sniffed,
        stream: &mut S,
    ) -> Result<Received>
    where
        S: Stream<Item = Result<pb::UploadRequest, Status>> + Unpin + Send,
    {
        let mut hasher = Sha256::new();
        hasher.update(&head.bytes);
        let mut received = head.bytes.len() as u64;
        let upload = self.store.put_multipart(&key).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, self.part_size);
        writer.put(head.bytes.freeze());
        let outcome: Result<()> = async {
            if head.ended {
                return Ok(());
            }
            let mut touched = std::time::Instant::now();
            while let Some(data) = self.next_data(stream).await? {
                // A row left untouched for long is taken for abandoned by the sweepers: a
                // long upload shows it is alive.
                if touched.elapsed() >= self.touch_every {
                    if let Err(error) = self.uploads.touch(upload_id).await {
                        tracing::warn!(%upload_id, %error, "cannot mark a long upload alive");
                    }
                    touched = std::time::Instant::now();
                }
                received += data.len() as u64;
                check_not_over(header, received)?;
                hasher.update(&data);
                writer.wait_for_capacity(4).await?;
                writer.put(data);
            }
            Ok(())
        }
        .await;
        if let Err(error) = outcome {
            if let Err(e) = writer.abort().await {
                tracing::warn!(error = %e, "abort of a partial upload failed; gc will remove it");
            }
            return Err(error);
        }
        let sha256 = hex::encode(hasher.finalize());
        let check = check_length(header, received).and_then(|()| {
            if header
                .expected_sha256
                .as_ref()
                .is_some_and(|e| *e != sha256)
            {
                return Err(Error::invalid(
                    "header.metadata.expected_sha256",
                    "does not match the bytes received",
                ));
            }
            Ok(())
        });
        if let Err(error) = check {
            let _ = writer.abort().await;
            return Err(error);
        }
        // On local disk the store flushes the file and its directories before this returns.
        writer.finish().await?;
        Ok(Received {
            key,
            sniffed,
            size: received,
            sha256,
        })
    }

    /// Finishes what crashed one-shot uploads left, `older_than` after they were last touched.
    /// An upload whose file Files has (its process died after registering it) gets the quota
    /// commit it missed and ends completed; one whose file Files does not have loses its
    /// partial blob and its reservation and ends failed. Safe on any number of replicas: each
    /// row is claimed by a conditional update. Returns how many were handled.
    pub async fn sweep_abandoned(&self, older_than: std::time::Duration) -> Result<usize> {
        let mut handled = 0;
        for row in self.uploads.claim_abandoned(older_than).await? {
            // A registration whose answer was lost may have succeeded: ask Files first, and
            // never delete the bytes of a file that exists.
            let registered: Option<u64> = if row.state != "receiving" {
                Some(row.received)
            } else {
                match self
                    .files
                    .get_file(pb::GetFileRequest {
                        file_id: row.file_id.to_string(),
                    })
                    .await
                {
                    Ok(r) => r.file.map(|f| f.size_bytes),
                    Err(status) if status.code() == tonic::Code::NotFound => None,
                    Err(status) => {
                        // The claim moved the row's clock: it comes round again later.
                        tracing::warn!(upload_id = %row.id, %status, "cannot tell whether an abandoned upload registered; later");
                        continue;
                    }
                }
            };
            match registered {
                None => {
                    if let Some(key) = &row.storage_key {
                        let _ = self.store.delete(&ObjectPath::from(key.as_str())).await;
                        if let Some(root) = self.local_root.clone() {
                            let key = key.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                remove_partial_writes(&root, &key)
                            })
                            .await;
                        }
                    }
                    if let Some(reservation) = row.reservation_id {
                        let _ = self
                            .quota
                            .release(pb::ReleaseRequest {
                                reservation_id: reservation.to_string(),
                            })
                            .await;
                    }
                    self.uploads
                        .set_state(row.id, "failed", None, row.received, Some("abandoned"))
                        .await?;
                    tracing::info!(upload_id = %row.id, "abandoned one-shot upload cleaned up");
                }
                Some(size) => {
                    let Some(reservation) = row.reservation_id else {
                        continue;
                    };
                    if let Err(status) = self
                        .quota
                        .commit(pb::CommitRequest {
                            reservation_id: reservation.to_string(),
                            bytes: size,
                        })
                        .await
                    {
                        tracing::warn!(upload_id = %row.id, %status, "late quota commit failed; will retry");
                        self.uploads
                            .set_state(row.id, "registered", None, size, None)
                            .await?;
                        continue;
                    }
                    self.uploads.complete(row.id, size, None).await?;
                    tracing::info!(upload_id = %row.id, "missed quota commit applied");
                }
            }
            handled += 1;
        }
        Ok(handled)
    }

    /// Undoes what a failed upload left: blob, reservation, row state.
    async fn fail(
        &self,
        upload_id: Uuid,
        reservation: &str,
        key: Option<&ObjectPath>,
        error: &Error,
    ) {
        if let Some(key) = key
            && let Err(e) = self.store.delete(key).await
        {
            tracing::warn!(%upload_id, error = %e, "blob delete after failed upload failed; gc will remove it");
        }
        self.release(upload_id, reservation).await;
        if let Err(e) = self
            .uploads
            .set_state(upload_id, "failed", None, 0, Some(&error.to_string()))
            .await
        {
            tracing::warn!(%upload_id, error = %e, "cannot mark upload failed");
        }
    }
}

/// Removes the `{key}#{n}` files a local-disk multipart write leaves when its process dies.
fn remove_partial_writes(root: &std::path::Path, key: &str) {
    let path = root.join(key);
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return;
    };
    let prefix = format!("{name}#");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
