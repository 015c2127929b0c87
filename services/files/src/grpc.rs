//! The Files gRPC service: thin handlers over [`Catalog`] and the store.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use stowage_blob::Blobs;
use stowage_proto::v1::{self as pb, files_server};
use stowage_runtime::{
    Identity, identity,
    mesh::QuotaApi,
    paging,
    status::{invalid_argument, page_size, parse_time, parse_uuid},
    time::timestamp,
    validate,
};
use tonic::{Request, Response, Status};
use tracing::Instrument;
use uuid::Uuid;

use crate::{
    catalog::{Catalog, Cursor, ListQuery, NewFile, PendingCharge, Purged, SortField, Viewer},
    download::{self, UrlSigner},
    error::Error,
    model::{FileStatus, Kind, VariantRecord},
};

/// The tonic service of Files.
#[derive(Clone)]
pub struct FilesGrpc {
    catalog: Catalog,
    blobs: Blobs,
    quota: Arc<dyn QuotaApi>,
    signer: UrlSigner,
    max_url_ttl: Duration,
    chunk: usize,
}

impl FilesGrpc {
    /// Files over `catalog` and `blobs`; purges debit usage through `quota`.
    pub fn new(
        catalog: Catalog,
        blobs: Blobs,
        quota: Arc<dyn QuotaApi>,
        signer: UrlSigner,
        max_url_ttl: Duration,
        chunk: usize,
    ) -> Self {
        Self {
            catalog,
            blobs,
            quota,
            signer,
            max_url_ttl,
            chunk,
        }
    }

    /// Debits the usage and removes the bytes of a purged file. Both are idempotent and,
    /// should either fail, Lifecycle's reconcilers (usage recount, blob GC) finish it.
    async fn after_purge(&self, id: Uuid, purged: &Purged) {
        if let Some(pending) = &purged.pending_move
            && let Err(status) = self.move_variant_usage(pending, id).await
        {
            tracing::warn!(file_id = %id, %status, "variant charge step before the purge's debit failed; reconciliation will repair it");
        }
        let debit = self
            .quota
            .debit(pb::DebitRequest {
                user_id: purged.owner_id.clone(),
                bytes: purged.bytes,
                idempotency_key: format!("purge:{id}"),
                reason: "file purged".into(),
            })
            .await;
        if let Err(status) = debit {
            tracing::warn!(file_id = %id, %status, "usage debit after purge failed; reconciliation will repair it");
        }
        for key in &purged.keys {
            if let Err(error) = self
                .blobs
                .store
                .delete(&ObjectPath::from(key.as_str()))
                .await
            {
                tracing::warn!(file_id = %id, key, %error, "blob delete after purge failed; gc will retry");
            }
        }
    }

    /// Brings the owner's usage in line with the file's variants, one recorded step at a
    /// time (see [`Catalog::begin_variant_move`]): a step interrupted anywhere is made again
    /// with the same key and amount by the next call (or the purge), so usage moves once.
    /// Calls for one file at once share the step in progress. A few steps at most per call:
    /// variants that keep changing are settled by the next SetVariants.
    async fn settle_variant_charge(&self, id: Uuid) -> Result<(), Status> {
        for _ in 0..4 {
            let Some(pending) = self.catalog.begin_variant_move(id).await? else {
                return Ok(());
            };
            self.move_variant_usage(&pending, id).await?;
            self.catalog.finish_variant_move(id, &pending).await?;
        }
        Ok(())
    }

    /// Moves the owner's usage by one step of a file's variant charge; the key names the step
    /// (its number, from what was charged to its target).
    async fn move_variant_usage(&self, pending: &PendingCharge, id: Uuid) -> Result<(), Status> {
        let idempotency_key = format!(
            "variants:{id}:{}:{}:{}",
            pending.moves, pending.charged, pending.total
        );
        if pending.total > pending.charged {
            self.quota
                .charge(pb::ChargeRequest {
                    user_id: pending.owner_id.clone(),
                    bytes: pending.total - pending.charged,
                    idempotency_key,
                    reason: "variants".into(),
                })
                .await?;
        } else if pending.total < pending.charged {
            self.quota
                .debit(pb::DebitRequest {
                    user_id: pending.owner_id.clone(),
                    bytes: pending.charged - pending.total,
                    idempotency_key,
                    reason: "variants replaced".into(),
                })
                .await?;
        }
        Ok(())
    }

    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> files_server::FilesServer<Self> {
        files_server::FilesServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }

    fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.blobs.store)
    }
}

fn viewer(caller: &Identity) -> Viewer<'_> {
    if caller.is_privileged() {
        Viewer::Privileged
    } else {
        Viewer::Owner(&caller.user_id)
    }
}

/// Most bytes a variant keeps inline.
const MAX_INLINE_BYTES: usize = 1024;

/// Most variants one SetVariants records.
const MAX_VARIANTS: usize = 32;
/// Longest object store key a service may name.
const MAX_KEY_BYTES: usize = 1024;
/// Most files StorageStats lists as the largest.
const MAX_LARGEST: u32 = 100;

fn file_id(value: &str) -> Result<Uuid, Status> {
    parse_uuid("file_id", value)
}

#[tonic::async_trait]
impl files_server::Files for FilesGrpc {
    async fn register_file(
        &self,
        request: Request<pb::RegisterFileRequest>,
    ) -> Result<Response<pb::RegisterFileResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        stowage_blob::keys::validate_user_id(&req.owner_id)
            .map_err(|why| invalid_argument("owner_id", why))?;
        validate::display_name(&req.display_name)
            .map_err(|why| invalid_argument("display_name", why))?;
        let tags = validate::tags(&req.tags).map_err(|why| invalid_argument("tags", why))?;
        if req.storage_key.is_empty()
            || req.storage_key.len() > MAX_KEY_BYTES
            || req.storage_key.chars().any(char::is_control)
        {
            return Err(invalid_argument(
                "storage_key",
                format!("must be 1..={MAX_KEY_BYTES} bytes without control characters"),
            ));
        }
        validate::idempotency_key(&req.idempotency_key)
            .map_err(|why| invalid_argument("idempotency_key", why))?;
        if req.sha256.len() != 64 || !req.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid_argument("sha256", "must be 64 hex characters"));
        }
        validate::label(&req.mime_type).map_err(|why| invalid_argument("mime_type", why))?;
        validate::label(&req.package_name).map_err(|why| invalid_argument("package_name", why))?;
        // Unset is the default (other, ready); a value this version does not know is refused,
        // not taken for the default.
        let kind = match req.kind {
            0 => Kind::Other,
            k => Kind::from_proto(k).ok_or_else(|| invalid_argument("kind", "unknown kind"))?,
        };
        let status = match req.status {
            0 => FileStatus::Ready,
            s => FileStatus::from_proto(s)
                .ok_or_else(|| invalid_argument("status", "unknown status"))?,
        };
        let new = NewFile {
            id: file_id(&req.file_id)?,
            owner_id: req.owner_id,
            display_name: req.display_name,
            kind,
            mime_type: req.mime_type,
            size_bytes: req.size_bytes,
            sha256: req.sha256.to_ascii_lowercase(),
            storage_key: req.storage_key,
            tags,
            package_name: req.package_name,
            status,
            idempotency_key: (!req.idempotency_key.is_empty()).then_some(req.idempotency_key),
        };
        let file = self.catalog.register(new).await?;
        Ok(Response::new(pb::RegisterFileResponse {
            file: Some(file.to_proto(true)),
        }))
    }

    async fn get_file(
        &self,
        request: Request<pb::GetFileRequest>,
    ) -> Result<Response<pb::GetFileResponse>, Status> {
        let caller = identity(&request)?;
        let id = file_id(&request.get_ref().file_id)?;
        let file = self.catalog.get(id, viewer(&caller)).await?;
        Ok(Response::new(pb::GetFileResponse {
            file: Some(file.to_proto(caller.is_privileged())),
        }))
    }

    async fn list_files(
        &self,
        request: Request<pb::ListFilesRequest>,
    ) -> Result<Response<pb::ListFilesResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 50, 1000)?;
        let sort = match pb::FileSortField::try_from(req.sort_by) {
            Ok(pb::FileSortField::Unspecified | pb::FileSortField::CreatedAt) => SortField::Created,
            Ok(pb::FileSortField::Name) => SortField::Name,
            Ok(pb::FileSortField::Size) => SortField::Size,
            Err(_) => return Err(invalid_argument("sort_by", "unknown sort field")),
        };
        let ascending = match pb::SortDirection::try_from(req.direction) {
            Ok(pb::SortDirection::Asc) => true,
            Ok(pb::SortDirection::Desc) => false,
            Ok(pb::SortDirection::Unspecified) => sort == SortField::Name,
            Err(_) => return Err(invalid_argument("direction", "unknown direction")),
        };
        if req.kind != 0 && Kind::from_proto(req.kind).is_none() {
            return Err(invalid_argument("kind", "unknown kind"));
        }
        if req.status != 0 && FileStatus::from_proto(req.status).is_none() {
            return Err(invalid_argument("status", "unknown status"));
        }
        let status = FileStatus::from_proto(req.status);
        if status == Some(FileStatus::Quarantined) && !caller.is_privileged() {
            return Err(Status::permission_denied(
                "listing quarantined files needs the admin scope",
            ));
        }
        if req.name_contains.chars().count() > validate::MAX_NAME_CHARS
            || req.name_contains.chars().any(char::is_control)
        {
            return Err(invalid_argument(
                "name_contains",
                "must be at most 255 characters without control characters",
            ));
        }
        validate::label(&req.package_name).map_err(|why| invalid_argument("package_name", why))?;
        let mut any_tags =
            validate::tags(&req.any_tags).map_err(|why| invalid_argument("any_tags", why))?;
        any_tags.sort();
        let query = ListQuery {
            kind: Kind::from_proto(req.kind),
            any_tags,
            favorite: req.favorite,
            name_contains: (!req.name_contains.is_empty()).then_some(req.name_contains),
            package_name: (!req.package_name.is_empty()).then_some(req.package_name),
            status,
            sort,
            ascending,
        };
        let fingerprint = paging::fingerprint(&query);
        let after: Option<Cursor> = paging::decode(&req.page_token, &fingerprint)?;
        let mut files = self
            .catalog
            .list(&caller.user_id, &query, after.as_ref(), size + 1)
            .await?;
        let next_page_token = paging::finish_page(&mut files, size, &fingerprint, |f| {
            Some(query.cursor_after(f))
        });
        Ok(Response::new(pb::ListFilesResponse {
            files: files.iter().map(|f| f.to_proto(false)).collect(),
            next_page_token,
        }))
    }

    async fn update_file(
        &self,
        request: Request<pb::UpdateFileRequest>,
    ) -> Result<Response<pb::UpdateFileResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let id = file_id(&req.file_id)?;
        if let Some(name) = &req.display_name {
            validate::display_name(name).map_err(|why| invalid_argument("display_name", why))?;
        }
        let tags = if req.replace_tags {
            Some(validate::tags(&req.tags).map_err(|why| invalid_argument("tags", why))?)
        } else if !req.tags.is_empty() {
            return Err(invalid_argument(
                "replace_tags",
                "must be true when tags are given",
            ));
        } else {
            None
        };
        if req.replace_tags && !(req.add_tags.is_empty() && req.remove_tags.is_empty()) {
            return Err(invalid_argument(
                "add_tags",
                "add_tags and remove_tags do not go with replace_tags",
            ));
        }
        let add = validate::tags(&req.add_tags).map_err(|why| invalid_argument("add_tags", why))?;
        let remove =
            validate::tags(&req.remove_tags).map_err(|why| invalid_argument("remove_tags", why))?;
        let file = self
            .catalog
            .update(
                id,
                &caller.user_id,
                crate::catalog::Change {
                    display_name: req.display_name.as_deref(),
                    tags: tags.as_deref(),
                    add_tags: &add,
                    remove_tags: &remove,
                    favorite: req.favorite,
                },
            )
            .await?;
        Ok(Response::new(pb::UpdateFileResponse {
            file: Some(file.to_proto(false)),
        }))
    }

    async fn delete_file(
        &self,
        request: Request<pb::DeleteFileRequest>,
    ) -> Result<Response<pb::DeleteFileResponse>, Status> {
        let caller = identity(&request)?;
        let id = file_id(&request.get_ref().file_id)?;
        let file = self.catalog.soft_delete(id, &caller.user_id).await?;
        Ok(Response::new(pb::DeleteFileResponse {
            file: Some(file.to_proto(false)),
        }))
    }

    async fn restore_file(
        &self,
        request: Request<pb::RestoreFileRequest>,
    ) -> Result<Response<pb::RestoreFileResponse>, Status> {
        let caller = identity(&request)?;
        let id = file_id(&request.get_ref().file_id)?;
        let file = self.catalog.restore(id, &caller.user_id).await?;
        Ok(Response::new(pb::RestoreFileResponse {
            file: Some(file.to_proto(false)),
        }))
    }

    async fn list_trash(
        &self,
        request: Request<pb::ListTrashRequest>,
    ) -> Result<Response<pb::ListTrashResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 50, 1000)?;
        let fingerprint = paging::fingerprint(&"trash");
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode(&req.page_token, &fingerprint)?;
        let mut files = self
            .catalog
            .list_trash(&caller.user_id, after.as_ref(), size + 1)
            .await?;
        let next_page_token = paging::finish_page(&mut files, size, &fingerprint, |f| {
            f.deleted_at.map(|at| (at, f.id))
        });
        Ok(Response::new(pb::ListTrashResponse {
            files: files.iter().map(|f| f.to_proto(false)).collect(),
            next_page_token,
        }))
    }

    async fn purge_file(
        &self,
        request: Request<pb::PurgeFileRequest>,
    ) -> Result<Response<pb::PurgeFileResponse>, Status> {
        let caller = identity(&request)?;
        let id = file_id(&request.get_ref().file_id)?;
        let trashed_before =
            parse_time("trashed_before", request.get_ref().trashed_before.as_ref())?;
        // Once the row is gone there is no second chance (a retry finds nothing), so the
        // whole purge runs in its own task: a caller that hangs up mid-way cannot leave the
        // usage or the bytes behind.
        let this = self.clone();
        let viewer_owner = match viewer(&caller) {
            Viewer::Owner(owner) => Some(owner.to_owned()),
            Viewer::Privileged => None,
        };
        // An admin's purge is recorded with who did it (the owner's history says so); a
        // service's (retention) is routine.
        let admin = (caller.admin && !caller.service).then(|| caller.user_id.clone());
        let purged = tokio::spawn(
            async move {
                let viewer = viewer_owner
                    .as_deref()
                    .map_or(Viewer::Privileged, Viewer::Owner);
                let purged = this
                    .catalog
                    .delete_row(id, viewer, trashed_before, admin.as_deref())
                    .await?;
                this.after_purge(id, &purged).await;
                Ok::<_, Error>(purged)
            }
            .instrument(tracing::Span::current()),
        )
        .await
        .map_err(|e| Status::internal(format!("purge task: {e}")))??;
        Ok(Response::new(pb::PurgeFileResponse {
            freed_bytes: purged.bytes,
        }))
    }

    async fn download(
        &self,
        request: Request<pb::DownloadRequest>,
    ) -> Result<Response<tonic::codegen::BoxStream<pb::DownloadResponse>>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let id = file_id(&req.file_id)?;
        let file = self.catalog.get(id, viewer(&caller)).await?;
        if file.deleted_at.is_some() && !caller.is_privileged() {
            return Err(Error::FailedPrecondition("file is in trash; restore it first").into());
        }
        let target = download::target(&file, &req.variant, self.catalog.holds_unscanned())?;
        let (offset, length) = req.range.map_or((0, None), |r| (r.offset, r.length));
        let range = download::resolve_range(target.size, offset, length)?;
        let header = pb::DownloadResponse {
            header: Some(pb::DownloadHeader {
                file: Some(file.to_proto(caller.is_privileged())),
                total_size: target.size,
                offset: range.start,
                length: range.end - range.start,
                mime_type: target.mime_type.clone(),
            }),
            data: Vec::new(),
        };
        let body = download::read(self.store(), &target, range, self.chunk).await?;
        if !caller.is_privileged() {
            self.catalog.note_download(&file).await;
        }
        let stream = futures::stream::once(async move { Ok(header) }).chain(body.map(|chunk| {
            chunk
                .map(|data| pb::DownloadResponse {
                    header: None,
                    data: data.to_vec(),
                })
                .map_err(Status::from)
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_download_url(
        &self,
        request: Request<pb::GetDownloadUrlRequest>,
    ) -> Result<Response<pb::GetDownloadUrlResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.into_inner();
        let id = file_id(&req.file_id)?;
        let ttl = download::url_ttl(req.expires_in_seconds, self.max_url_ttl)?;
        let file = self.catalog.get(id, viewer(&caller)).await?;
        if file.deleted_at.is_some() {
            return Err(Error::FailedPrecondition("file is in trash; restore it first").into());
        }
        // Only admins and services see it, and a link is a bearer's: the link would serve
        // it to anyone who has it, so it serves it to no one.
        if file.status == FileStatus::Quarantined {
            return Err(Error::FailedPrecondition(
                "file is quarantined: no link serves it (Download with the admin scope does)",
            )
            .into());
        }
        download::target(&file, &req.variant, self.catalog.holds_unscanned())?;
        let expires_at =
            Utc::now() + chrono::Duration::seconds(i64::try_from(ttl.as_secs()).unwrap_or(3600));
        let url = self
            .signer
            .sign(&id, &req.variant, expires_at.timestamp(), req.attachment);
        Ok(Response::new(pb::GetDownloadUrlResponse {
            url,
            expires_at: Some(timestamp(expires_at)),
        }))
    }

    async fn set_variants(
        &self,
        request: Request<pb::SetVariantsRequest>,
    ) -> Result<Response<pb::SetVariantsResponse>, Status> {
        identity(&request)?.require_service()?;
        let req = request.into_inner();
        let id = file_id(&req.file_id)?;
        if req.status != 0 && FileStatus::from_proto(req.status).is_none() {
            return Err(invalid_argument("status", "unknown status"));
        }
        if req.variants.len() > MAX_VARIANTS {
            return Err(invalid_argument(
                "variants",
                format!("at most {MAX_VARIANTS} in one call"),
            ));
        }
        if req.status_reason.chars().count() > 1024 || req.status_reason.contains('\0') {
            return Err(invalid_argument(
                "status_reason",
                "must be at most 1024 characters, without NUL",
            ));
        }
        validate::label(&req.codec).map_err(|why| invalid_argument("codec", why))?;
        for (field, value) in [("width", req.width), ("height", req.height)] {
            if i32::try_from(value).is_err() {
                return Err(invalid_argument(field, "must be at most 2147483647"));
            }
        }
        if i64::try_from(req.duration_ms).is_err() {
            return Err(invalid_argument("duration_ms", "is too large"));
        }
        let variants: Vec<VariantRecord> = req
            .variants
            .into_iter()
            .map(|v| {
                if !download::variant_name_ok(&v.name) {
                    return Err(invalid_argument(
                        "variants.name",
                        download::VARIANT_NAME_RULE,
                    ));
                }
                validate::label(&v.mime_type)
                    .map_err(|why| invalid_argument("variants.mime_type", why))?;
                if v.storage_key.len() > MAX_KEY_BYTES
                    || v.storage_key.chars().any(char::is_control)
                {
                    return Err(invalid_argument(
                        "variants.storage_key",
                        format!("must be at most {MAX_KEY_BYTES} bytes without control characters"),
                    ));
                }
                if v.size_bytes > crate::catalog::MAX_FILE_BYTES {
                    return Err(invalid_argument(
                        "variants.size_bytes",
                        "is beyond what a file can hold",
                    ));
                }
                if i32::try_from(v.width).is_err() || i32::try_from(v.height).is_err() {
                    return Err(invalid_argument(
                        "variants.width",
                        "width and height must be at most 2147483647",
                    ));
                }
                // Downloads send `size_bytes` as the length of what they serve: the bytes
                // kept inline, or an object in the store.
                if !v.inline_data.is_empty() && v.inline_data.len() as u64 != v.size_bytes {
                    return Err(invalid_argument(
                        "variants.size_bytes",
                        "differs from the length of inline_data",
                    ));
                }
                // Inline bytes are a placeholder (a thumbhash, some dozens of bytes), sent with
                // every listing of the file: a picture goes to the store.
                if v.inline_data.len() > MAX_INLINE_BYTES {
                    return Err(invalid_argument(
                        "variants.inline_data",
                        format!("must be at most {MAX_INLINE_BYTES} bytes; store larger ones"),
                    ));
                }
                if v.inline_data.is_empty() && v.storage_key.is_empty() {
                    return Err(invalid_argument(
                        "variants.storage_key",
                        "is required without inline_data",
                    ));
                }
                Ok(VariantRecord {
                    name: v.name,
                    mime_type: v.mime_type,
                    size_bytes: v.size_bytes,
                    width: v.width,
                    height: v.height,
                    storage_key: v.storage_key,
                    inline_data: (!v.inline_data.is_empty()).then_some(v.inline_data),
                    written_at: None,
                })
            })
            .collect::<Result<_, Status>>()?;
        let file = self
            .catalog
            .set_variants(
                id,
                &variants,
                FileStatus::from_proto(req.status),
                &req.status_reason,
                req.width,
                req.height,
                req.duration_ms,
                &req.codec,
            )
            .await?;
        self.settle_variant_charge(id).await?;
        Ok(Response::new(pb::SetVariantsResponse {
            file: Some(file.to_proto(true)),
        }))
    }

    async fn list_expired_trash(
        &self,
        request: Request<pb::ListExpiredTrashRequest>,
    ) -> Result<Response<pb::ListExpiredTrashResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        let before =
            stowage_runtime::status::parse_time("deleted_before", req.deleted_before.as_ref())?
                .ok_or_else(|| invalid_argument("deleted_before", "is required"))?;
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = paging::fingerprint(&("expired_trash", before));
        let after: Option<(DateTime<Utc>, Uuid)> = paging::decode(&req.page_token, &fingerprint)?;
        let mut files = self.catalog.expired_trash(before, after, size + 1).await?;
        let next_page_token = paging::finish_page(&mut files, size, &fingerprint, |f| {
            f.deleted_at.map(|at| (at, f.id))
        });
        Ok(Response::new(pb::ListExpiredTrashResponse {
            files: files.iter().map(|f| f.to_proto(true)).collect(),
            next_page_token,
        }))
    }

    async fn usage_by_owner(
        &self,
        request: Request<pb::UsageByOwnerRequest>,
    ) -> Result<Response<pb::UsageByOwnerResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        let size = page_size(req.page_size, 100, 1000)?;
        let fingerprint = paging::fingerprint(&(
            "usage_by_owner",
            &req.owner_id,
            &req.after_owner_id,
            &req.until_owner_id,
        ));
        let token_after: Option<String> = paging::decode(&req.page_token, &fingerprint)?;
        let non_empty = |id: &str| (!id.is_empty()).then(|| id.to_owned());
        for (field, id) in [
            ("owner_id", &req.owner_id),
            ("after_owner_id", &req.after_owner_id),
            ("until_owner_id", &req.until_owner_id),
        ] {
            if !id.is_empty() {
                stowage_blob::keys::validate_user_id(id)
                    .map_err(|why| invalid_argument(field, why))?;
            }
        }
        let only = non_empty(&req.owner_id);
        // A page token is always past the range's start.
        let after = token_after.or_else(|| non_empty(&req.after_owner_id));
        let until = non_empty(&req.until_owner_id);
        let mut owners = self
            .catalog
            .usage_by_owner(
                only.as_deref(),
                after.as_deref(),
                until.as_deref(),
                size + 1,
            )
            .await?;
        let next_page_token =
            paging::finish_page(&mut owners, size, &fingerprint, |(owner, ..)| {
                Some(owner.clone())
            });
        Ok(Response::new(pb::UsageByOwnerResponse {
            owners: owners
                .into_iter()
                .map(
                    |(owner_id, stored_bytes, file_count, charges_in_flight)| pb::OwnerUsage {
                        owner_id,
                        stored_bytes,
                        file_count,
                        charges_in_flight,
                    },
                )
                .collect(),
            next_page_token,
        }))
    }

    async fn find_keys(
        &self,
        request: Request<pb::FindKeysRequest>,
    ) -> Result<Response<pb::FindKeysResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let keys = request.into_inner().keys;
        stowage_blob::keys::validate_key_list(&keys)
            .map_err(|why| invalid_argument("keys", why))?;
        let referenced = self.catalog.find_keys(&keys).await?;
        Ok(Response::new(pb::FindKeysResponse { referenced }))
    }

    async fn list_originals(
        &self,
        request: Request<pb::ListOriginalsRequest>,
    ) -> Result<Response<pb::ListOriginalsResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        let before =
            stowage_runtime::status::parse_time("created_before", req.created_before.as_ref())?
                .ok_or_else(|| invalid_argument("created_before", "is required"))?;
        let size = page_size(req.page_size, 100, 1000)?;
        if req.status != 0 && FileStatus::from_proto(req.status).is_none() {
            return Err(invalid_argument("status", "unknown status"));
        }
        let status = FileStatus::from_proto(req.status);
        let fingerprint = paging::fingerprint(&("originals", before, req.status));
        let after: Option<Uuid> = paging::decode(&req.page_token, &fingerprint)?;
        let mut files = self
            .catalog
            .list_originals(before, status, after, size + 1)
            .await?;
        let next_page_token = paging::finish_page(&mut files, size, &fingerprint, |f| Some(f.id));
        Ok(Response::new(pb::ListOriginalsResponse {
            originals: files
                .iter()
                .map(|f| pb::Original {
                    file_id: f.id.to_string(),
                    storage_key: f.storage_key.clone(),
                    size_bytes: f.size_bytes,
                    status: f.status.to_proto() as i32,
                })
                .collect(),
            next_page_token,
        }))
    }

    async fn trash_owner_files(
        &self,
        request: Request<pb::TrashOwnerFilesRequest>,
    ) -> Result<Response<pb::TrashOwnerFilesResponse>, Status> {
        identity(&request)?.require_privileged()?;
        let req = request.into_inner();
        stowage_blob::keys::validate_user_id(&req.owner_id)
            .map_err(|why| invalid_argument("owner_id", why))?;
        let created_before = parse_time("created_before", req.created_before.as_ref())?;
        let trashed = self
            .catalog
            .trash_all(&req.owner_id, created_before)
            .await?;
        Ok(Response::new(pb::TrashOwnerFilesResponse { trashed }))
    }

    async fn storage_stats(
        &self,
        request: Request<pb::StorageStatsRequest>,
    ) -> Result<Response<pb::StorageStatsResponse>, Status> {
        let caller = identity(&request)?;
        let req = request.get_ref();
        if req.largest > MAX_LARGEST {
            return Err(invalid_argument(
                "largest",
                format!("must be at most {MAX_LARGEST}"),
            ));
        }
        let owner = if req.all_users {
            caller.require_admin()?;
            None
        } else {
            Some(caller.user_id.as_str())
        };
        let (totals, largest) = self.catalog.stats(owner, i64::from(req.largest)).await?;
        Ok(Response::new(pb::StorageStatsResponse {
            total_bytes: totals.total_bytes,
            file_count: totals.file_count,
            variant_bytes: totals.variant_bytes,
            trashed_count: totals.trashed_count,
            available_bytes: self.blobs.available_bytes(),
            count_by_kind: totals.by_kind.into_iter().collect(),
            as_of: Some(timestamp(Utc::now())),
            largest_files: largest.iter().map(|f| f.to_proto(false)).collect(),
        }))
    }
}
