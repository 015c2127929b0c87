//! File metadata in PostgreSQL (schema `files`). Every change that announces itself writes
//! its outbox row in the same transaction.

use chrono::{DateTime, Utc};
use serde_json::json;
use std::{
    collections::HashMap,
    sync::{Arc, LazyLock, Mutex},
    time::{Duration, Instant},
};
use stowage_db::{Cached, GenericClient, PgPool};
use stowage_events::StageParams;
use stowage_runtime::validate;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::{
    error::{Error, Result},
    model::{FileRecord, FileStatus, Kind, VariantRecord, to_u64},
    model::{file_columns, variant_columns},
};

/// Who is asking: an owner sees only their own visible files; privileged callers see all.
#[derive(Clone, Copy, Debug)]
pub enum Viewer<'a> {
    /// An end user.
    Owner(&'a str),
    /// A service or an admin.
    Privileged,
}

impl Viewer<'_> {
    fn owner(&self) -> Option<&str> {
        match self {
            Viewer::Owner(o) => Some(o),
            Viewer::Privileged => None,
        }
    }
}

/// A new file to record.
#[derive(Clone, Debug)]
pub struct NewFile {
    /// Id chosen by the uploader (already part of the key).
    pub id: Uuid,
    /// Owner.
    pub owner_id: String,
    /// Display name.
    pub display_name: String,
    /// Kind.
    pub kind: Kind,
    /// MIME type.
    pub mime_type: String,
    /// Size.
    pub size_bytes: u64,
    /// SHA-256 hex.
    pub sha256: String,
    /// Key in the store.
    pub storage_key: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Producing app.
    pub package_name: String,
    /// Initial status.
    pub status: FileStatus,
    /// Idempotency key (upload id).
    pub idempotency_key: Option<String>,
}

/// What ListFiles sorts by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum SortField {
    /// Creation time.
    Created,
    /// Display name, byte order.
    Name,
    /// Size.
    Size,
}

/// Position after the last row of a page.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub enum Cursor {
    /// Created-at cursor.
    Created(DateTime<Utc>, Uuid),
    /// Name cursor.
    Name(String, Uuid),
    /// Size cursor.
    Size(i64, Uuid),
}

/// Filters and order of ListFiles.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ListQuery {
    /// Kind filter.
    pub kind: Option<Kind>,
    /// Any-of tags filter.
    pub any_tags: Vec<String>,
    /// Favourite filter.
    pub favorite: Option<bool>,
    /// Name substring (case-insensitive).
    pub name_contains: Option<String>,
    /// The app that made the files.
    pub package_name: Option<String>,
    /// Status filter.
    pub status: Option<FileStatus>,
    /// Sort key.
    pub sort: SortField,
    /// Ascending?
    pub ascending: bool,
}

impl ListQuery {
    /// The cursor after `file` for this query's sort.
    pub fn cursor_after(&self, file: &FileRecord) -> Cursor {
        match self.sort {
            SortField::Created => Cursor::Created(file.created_at, file.id),
            SortField::Name => Cursor::Name(file.display_name.clone(), file.id),
            SortField::Size => {
                Cursor::Size(i64::try_from(file.size_bytes).unwrap_or(i64::MAX), file.id)
            }
        }
    }
}

/// Totals for StorageStats.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Bytes of originals.
    pub total_bytes: u64,
    /// Files.
    pub file_count: u64,
    /// Bytes of variants.
    pub variant_bytes: u64,
    /// Files in trash.
    pub trashed_count: u64,
    /// Files per kind.
    pub by_kind: Vec<(String, u64)>,
}

/// Data a purge must clean up after the row is gone.
#[derive(Clone, Debug)]
pub struct Purged {
    /// Owner.
    pub owner_id: String,
    /// Keys to delete from the store.
    pub keys: Vec<String>,
    /// Bytes freed (original plus variants).
    pub bytes: u64,
    /// A step of the variant charge that was in progress: made before the debit.
    pub pending_move: Option<PendingCharge>,
}

/// The Files catalog.
#[derive(Clone, Debug)]
pub struct Catalog {
    pool: PgPool,
    hold_unscanned: bool,
    downloads: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Files [`Catalog::trash_all`] moves per transaction.
const TRASH_BATCH: i64 = 1000;

/// Most bytes one file (or one of its variants) may hold: a pebibyte. Sizes come from
/// services, but sums of them must stay within PostgreSQL's bigint (a storage total, a file's
/// variants), which sizes near `i64::MAX` would overflow.
pub const MAX_FILE_BYTES: u64 = 1 << 50;

/// Downloads announce activity at most this often per owner (per process).
const DOWNLOAD_EVENT_EVERY: Duration = Duration::from_secs(60);
/// Owners remembered for that; the memory is dropped past it.
const DOWNLOAD_MEMORY: usize = 100_000;

/// Variant bytes of a file not yet charged to (or debited from) its owner's usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingCharge {
    /// Owner whose usage moves.
    pub owner_id: String,
    /// Bytes of variants charged so far.
    pub charged: u64,
    /// Bytes of the variants recorded now.
    pub total: u64,
    /// Moves of the charge made so far: with the marks, it names the next move.
    pub moves: u64,
}

fn escape_like(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `by` of an event the owner caused (an upload, a delete, a restore, a purge from trash).
const BY_OWNER: &str = "owner";
/// `by` of an event a service caused on the owner's behalf (retention, clean-up of an inactive
/// account): not the owner's activity.
const BY_SYSTEM: &str = "system";

async fn outbox(
    tx: &impl GenericClient,
    topic: &str,
    file: &FileRecord,
    extra: serde_json::Value,
) -> Result<()> {
    let payload = event_payload(
        file.id,
        &file.owner_id,
        file.kind,
        &file.mime_type,
        file.size_bytes,
        &file.storage_key,
        extra,
    );
    stowage_events::stage(tx, crate::SCHEMA, topic, &file.id.to_string(), &payload).await?;
    Ok(())
}

/// What every file event carries, and `extra`.
fn event_payload(
    id: Uuid,
    owner_id: &str,
    kind: Kind,
    mime_type: &str,
    size_bytes: u64,
    storage_key: &str,
    extra: serde_json::Value,
) -> serde_json::Value {
    let mut payload = json!({
        "file_id": id,
        "owner_id": owner_id,
        "kind": kind.as_str(),
        "mime_type": mime_type,
        "size_bytes": size_bytes,
        "storage_key": storage_key,
    });
    if let (Some(obj), serde_json::Value::Object(more)) = (payload.as_object_mut(), extra) {
        obj.extend(more);
    }
    payload
}

/// A registration in one statement: the row, and its `file.created` event only if the row
/// was inserted (a conflict inserts neither). `$13` is the event's payload; `$14`-`$16` are
/// [`StageParams`]' topic, traceparent and channel.
static REGISTER_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        concat!(
            "WITH ins AS (
                 INSERT INTO files.files (id, owner_id, display_name, kind, mime_type, size_bytes,
                     sha256, storage_key, status, tags, package_name, idempotency_key)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
                 ON CONFLICT DO NOTHING
                 RETURNING ",
            file_columns!(),
            "),
             event AS (SELECT id::text AS key, $13::jsonb AS payload FROM ins),
             {}
             SELECT ins.*, (SELECT count(*) FROM notified) AS notices FROM ins"
        ),
        stowage_events::stage_ctes(crate::SCHEMA, "event", 14)
    )
});

impl Catalog {
    /// A catalog over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            hold_unscanned: false,
            downloads: Arc::default(),
        }
    }

    /// Holds back downloads of files still in processing (when a virus scanner runs).
    pub fn hold_unscanned(mut self, hold: bool) -> Self {
        self.hold_unscanned = hold;
        self
    }

    /// Announces that `file` was downloaded (`file.downloaded`, for activity tracking), at
    /// most once a minute per owner. A failure is logged, never the download's problem.
    pub async fn note_download(&self, file: &FileRecord) {
        let now = Instant::now();
        {
            let Ok(mut seen) = self.downloads.lock() else {
                return;
            };
            if seen
                .get(&file.owner_id)
                .is_some_and(|at| now.duration_since(*at) < DOWNLOAD_EVENT_EVERY)
            {
                return;
            }
            if seen.len() >= DOWNLOAD_MEMORY {
                seen.clear();
            }
            seen.insert(file.owner_id.clone(), now);
        }
        let result = async {
            let conn = self.pool.get().await?;
            outbox(&conn, "file.downloaded", file, json!({})).await
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(file_id = %file.id, %error, "download activity not recorded");
        }
    }

    /// Whether downloads of files in processing are held back.
    pub fn holds_unscanned(&self) -> bool {
        self.hold_unscanned
    }

    /// Records a new file and its `file.created` event. A retry with the same idempotency
    /// key returns the file recorded the first time.
    pub async fn register(&self, new: NewFile) -> Result<FileRecord> {
        if new.size_bytes > MAX_FILE_BYTES {
            return Err(Error::invalid(
                "size_bytes",
                format!("is beyond the {MAX_FILE_BYTES} bytes a file may hold"),
            ));
        }
        let size = i64::try_from(new.size_bytes)
            .map_err(|_| Error::invalid("size_bytes", "is too large"))?;
        // While a scanner is configured nothing is ready before its scan, whatever the
        // registrant says (an Ingest configured without the scanner would say ready).
        let status = match new.status {
            FileStatus::Ready if self.hold_unscanned => FileStatus::Processing,
            status => status,
        };
        let payload = event_payload(
            new.id,
            &new.owner_id,
            new.kind,
            &new.mime_type,
            new.size_bytes,
            &new.storage_key,
            json!({ "sha256": new.sha256, "status": status.as_str() }),
        );
        let notice = StageParams::new(crate::SCHEMA, stowage_events::topics::FILE_CREATED);
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt_cached(
                &REGISTER_SQL,
                &[
                    &new.id,
                    &new.owner_id,
                    &new.display_name,
                    &new.kind.as_str(),
                    &new.mime_type,
                    &size,
                    &new.sha256,
                    &new.storage_key,
                    &status.as_str(),
                    &new.tags,
                    &new.package_name,
                    &new.idempotency_key,
                    &payload,
                    &notice.topic,
                    &notice.traceparent,
                    &notice.channel,
                ],
            )
            .await?;
        if let Some(row) = row {
            return Ok(FileRecord::from_row(&row));
        }
        // Same key or same id: a retry of this registration, if it names the same blob.
        // The id and the key may name two files; the id's answers (neither is a retry
        // unless it names the same blob).
        let existing = conn
            .query_opt_cached(
                concat!(
                    "SELECT ",
                    file_columns!(),
                    " FROM files.files
                 WHERE id = $1 OR (owner_id = $2 AND idempotency_key = $3)
                 ORDER BY id = $1 DESC LIMIT 1"
                ),
                &[&new.id, &new.owner_id, &new.idempotency_key],
            )
            .await?
            .map(|r| FileRecord::from_row(&r));
        match existing {
            Some(file) if file.storage_key == new.storage_key && file.owner_id == new.owner_id => {
                Ok(file)
            }
            Some(file) if file.id == new.id => Err(Error::AlreadyExists("file_id")),
            Some(_) => Err(Error::AlreadyExists("idempotency_key")),
            // Neither the id nor the key: the blob is another file's.
            None => Err(Error::AlreadyExists("storage_key")),
        }
    }

    /// One file with its variants. Owners do not see quarantined files.
    pub async fn get(&self, id: Uuid, viewer: Viewer<'_>) -> Result<FileRecord> {
        let conn = self.pool.get().await?;
        get_on(&conn, id, viewer).await
    }

    /// One page of files matching `query`.
    pub async fn list(
        &self,
        owner: &str,
        query: &ListQuery,
        after: Option<&Cursor>,
        limit: i64,
    ) -> Result<Vec<FileRecord>> {
        let mut sql = String::from(concat!(
            "SELECT ",
            file_columns!(),
            " FROM files.files WHERE owner_id = $1 AND deleted_at IS NULL"
        ));
        let mut params: Vec<Box<dyn ToSql + Sync + Send>> = vec![Box::new(owner.to_owned())];
        let bind = |params: &mut Vec<Box<dyn ToSql + Sync + Send>>,
                    v: Box<dyn ToSql + Sync + Send>| {
            params.push(v);
            format!("${}", params.len())
        };
        match query.status {
            Some(status) => {
                let p = bind(&mut params, Box::new(status.as_str()));
                sql += &format!(" AND status = {p}");
            }
            None => sql += " AND status <> 'quarantined'",
        }
        if let Some(kind) = query.kind {
            let p = bind(&mut params, Box::new(kind.as_str()));
            sql += &format!(" AND kind = {p}");
        }
        if !query.any_tags.is_empty() {
            let p = bind(&mut params, Box::new(query.any_tags.clone()));
            sql += &format!(" AND tags && {p}::text[]");
        }
        if let Some(favorite) = query.favorite {
            let p = bind(&mut params, Box::new(favorite));
            sql += &format!(" AND favorite = {p}");
        }
        if let Some(package) = &query.package_name {
            let p = bind(&mut params, Box::new(package.clone()));
            sql += &format!(" AND package_name = {p}");
        }
        if let Some(needle) = &query.name_contains {
            let p = bind(&mut params, Box::new(format!("%{}%", escape_like(needle))));
            sql += &format!(" AND display_name ILIKE {p} ESCAPE '\\'");
        }
        let column = match query.sort {
            SortField::Created => "created_at",
            SortField::Name => "(display_name COLLATE \"C\")",
            SortField::Size => "size_bytes",
        };
        let (cmp, dir) = if query.ascending {
            (">", "ASC")
        } else {
            ("<", "DESC")
        };
        if let Some(cursor) = after {
            let (value, id): (Box<dyn ToSql + Sync + Send>, Uuid) = match (cursor, query.sort) {
                (Cursor::Created(at, id), SortField::Created) => (Box::new(*at), *id),
                (Cursor::Name(name, id), SortField::Name) => (Box::new(name.clone()), *id),
                (Cursor::Size(size, id), SortField::Size) => (Box::new(*size), *id),
                _ => return Err(Error::invalid("page_token", "is not a token of this query")),
            };
            let v = bind(&mut params, value);
            let i = bind(&mut params, Box::new(id));
            sql += &format!(" AND ({column}, id) {cmp} ({v}, {i})");
        }
        let l = bind(&mut params, Box::new(limit));
        sql += &format!(" ORDER BY {column} {dir}, id {dir} LIMIT {l}");
        let conn = self.pool.get().await?;
        let refs: Vec<&(dyn ToSql + Sync)> = params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect();
        let rows = conn.query(&sql, &refs).await?;
        let mut files: Vec<FileRecord> = rows.iter().map(FileRecord::from_row).collect();
        with_variants(&conn, &mut files).await?;
        Ok(files)
    }

    /// Renames, re-tags or (un)favourites a file that is not in trash.
    ///
    /// This and `set_trashed` (trash, restore) compare the owner as `owner_id || ''`, which
    /// no index serves, so that the only plan is the primary key's. With a plain
    /// `owner_id = $2`, a plan cached before the table's first `ANALYZE` scans one of the
    /// owner's list indexes, walking all of the owner's files on every call.
    pub async fn update(&self, id: Uuid, owner: &str, change: Change<'_>) -> Result<FileRecord> {
        let conn = self.pool.get().await?;
        let max_tags = i32::try_from(validate::MAX_TAGS).unwrap_or(i32::MAX);
        // Tags added and removed in the statement, from the row as it is when updated (a
        // concurrent change is seen, not overwritten): the current tags then the added ones,
        // each once, less the removed ones; within the most a file has.
        let row = conn
            .query_opt_cached(
                concat!(
                    "UPDATE files.files
                 SET display_name = COALESCE($3, display_name),
                     tags = COALESCE($4, ARRAY(
                         SELECT t FROM unnest(array_cat(tags, $6::text[])) WITH ORDINALITY AS u(t, o)
                         WHERE NOT (t = ANY($7::text[]))
                         GROUP BY t ORDER BY min(o))),
                     favorite = COALESCE($5, favorite),
                     updated_at = now()
                 WHERE id = $1 AND owner_id || '' = $2 AND status <> 'quarantined'
                   AND deleted_at IS NULL
                   AND cardinality(COALESCE($4, ARRAY(
                         SELECT DISTINCT t FROM unnest(array_cat(tags, $6::text[])) AS u(t)
                         WHERE NOT (t = ANY($7::text[]))))) <= $8::int
                 RETURNING ",
                    file_columns!()
                ),
                &[
                    &id,
                    &owner,
                    &change.display_name,
                    &change.tags,
                    &change.favorite,
                    &change.add_tags,
                    &change.remove_tags,
                    &max_tags,
                ],
            )
            .await?;
        match row {
            Some(row) => get_on(&conn, FileRecord::from_row(&row).id, Viewer::Owner(owner)).await,
            None => {
                // Tell "in trash" and "too many tags" apart from "not yours / not there".
                let file = get_on(&conn, id, Viewer::Owner(owner)).await?;
                if file.deleted_at.is_some() {
                    Err(Error::FailedPrecondition(
                        "file is in trash; restore it first",
                    ))
                } else if !change.add_tags.is_empty() {
                    Err(Error::invalid(
                        "add_tags",
                        format!("a file has at most {} tags", validate::MAX_TAGS),
                    ))
                } else {
                    Err(Error::NotFound)
                }
            }
        }
    }

    /// Moves a file to trash (a second call changes nothing).
    pub async fn soft_delete(&self, id: Uuid, owner: &str) -> Result<FileRecord> {
        self.set_trashed(id, owner, true).await
    }

    /// Moves every live file of `owner` created before `created_before` (or before this call)
    /// to trash, each with its `file.deleted` event, a thousand per transaction (an owner of a
    /// million files is not one transaction); returns how many.
    pub async fn trash_all(
        &self,
        owner: &str,
        created_before: Option<DateTime<Utc>>,
    ) -> Result<u64> {
        let mut conn = self.pool.get().await?;
        // The database's clock, which stamps `created_at`.
        let before: DateTime<Utc> = match created_before {
            Some(before) => before,
            None => conn.query_one_cached("SELECT now()", &[]).await?.get(0),
        };
        let mut trashed = 0;
        loop {
            let tx = conn.transaction().await?;
            let rows = tx
                .query_cached(
                    concat!(
                        "UPDATE files.files SET deleted_at = now(), updated_at = now()
                     WHERE id IN (SELECT id FROM files.files
                                  WHERE owner_id = $1 AND deleted_at IS NULL
                                    AND status <> 'quarantined' AND created_at < $2
                                  LIMIT $3 FOR UPDATE)
                     RETURNING ",
                        file_columns!()
                    ),
                    &[&owner, &before, &TRASH_BATCH],
                )
                .await?;
            for row in &rows {
                let file = FileRecord::from_row(row);
                outbox(&tx, "file.deleted", &file, json!({ "by": BY_SYSTEM })).await?;
            }
            tx.commit().await?;
            trashed += rows.len() as u64;
            if (rows.len() as i64) < TRASH_BATCH {
                return Ok(trashed);
            }
        }
    }

    /// Brings a file back from trash (a second call changes nothing).
    pub async fn restore(&self, id: Uuid, owner: &str) -> Result<FileRecord> {
        self.set_trashed(id, owner, false).await
    }

    async fn set_trashed(&self, id: Uuid, owner: &str, trashed: bool) -> Result<FileRecord> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let sql = if trashed {
            concat!(
                "UPDATE files.files SET deleted_at = now(), updated_at = now()
             WHERE id = $1 AND owner_id || '' = $2 AND deleted_at IS NULL AND status <> 'quarantined'
             RETURNING ",
                file_columns!()
            )
        } else {
            concat!(
                "UPDATE files.files SET deleted_at = NULL, updated_at = now()
             WHERE id = $1 AND owner_id || '' = $2 AND deleted_at IS NOT NULL AND status <> 'quarantined'
             RETURNING ",
                file_columns!()
            )
        };
        match tx.query_opt(sql, &[&id, &owner]).await? {
            Some(row) => {
                let file = FileRecord::from_row(&row);
                let topic = if trashed {
                    "file.deleted"
                } else {
                    "file.restored"
                };
                outbox(&tx, topic, &file, json!({})).await?;
                tx.commit().await?;
                get_on(&conn, id, Viewer::Owner(owner)).await
            }
            None => {
                tx.rollback().await?;
                get_on(&conn, id, Viewer::Owner(owner)).await
            }
        }
    }

    /// One page of the owner's trash, most recently deleted first.
    pub async fn list_trash(
        &self,
        owner: &str,
        after: Option<&(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<FileRecord>> {
        let conn = self.pool.get().await?;
        let rows = match after {
            None => {
                conn.query_cached(
                    concat!(
                        "SELECT ",
                        file_columns!(),
                        " FROM files.files
                     WHERE owner_id = $1 AND deleted_at IS NOT NULL AND status <> 'quarantined'
                     ORDER BY deleted_at DESC, id DESC LIMIT $2"
                    ),
                    &[&owner, &limit],
                )
                .await?
            }
            Some((at, id)) => {
                conn.query_cached(
                    concat!(
                        "SELECT ",
                        file_columns!(),
                        " FROM files.files
                     WHERE owner_id = $1 AND deleted_at IS NOT NULL AND status <> 'quarantined'
                       AND (deleted_at, id) < ($2, $3)
                     ORDER BY deleted_at DESC, id DESC LIMIT $4"
                    ),
                    &[&owner, at, id, &limit],
                )
                .await?
            }
        };
        let mut files: Vec<FileRecord> = rows.iter().map(FileRecord::from_row).collect();
        with_variants(&conn, &mut files).await?;
        Ok(files)
    }

    /// Files of every owner in trash since before `before`, oldest first, after `after`.
    pub async fn expired_trash(
        &self,
        before: DateTime<Utc>,
        after: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<FileRecord>> {
        let conn = self.pool.get().await?;
        let (at, id) = after.unzip();
        let rows = conn
            .query_cached(
                concat!(
                    "SELECT ",
                    file_columns!(),
                    " FROM files.files
                 WHERE deleted_at IS NOT NULL AND deleted_at < $1
                   AND ($2::timestamptz IS NULL OR (deleted_at, id) > ($2, $3))
                 ORDER BY deleted_at, id LIMIT $4"
                ),
                &[&before, &at, &id, &limit],
            )
            .await?;
        Ok(rows.iter().map(FileRecord::from_row).collect())
    }

    /// Per owner after `after` and up to `until` (by id): bytes stored (originals, trash
    /// included, plus the variant bytes charged), file count, and files whose variant charge
    /// is in flight.
    pub async fn usage_by_owner(
        &self,
        only: Option<&str>,
        after: Option<&str>,
        until: Option<&str>,
        limit: i64,
    ) -> Result<Vec<(String, u64, u64, u64)>> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_cached(
                "SELECT owner_id,
                        (sum(size_bytes) + sum(variant_bytes_charged))::bigint AS bytes,
                        count(*) AS files,
                        count(*) FILTER (WHERE variant_charge_pending IS NOT NULL
                                           AND variant_charge_pending_at > now() - interval '1 hour')
                            AS moving
                 FROM files.files
                 WHERE ($1::text IS NULL OR owner_id > $1) AND ($3::text IS NULL OR owner_id = $3)
                   AND ($4::text IS NULL OR owner_id <= $4)
                 GROUP BY owner_id ORDER BY owner_id LIMIT $2",
                &[&after, &limit, &only, &until],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    to_u64(r.get(1)),
                    to_u64(r.get(2)),
                    to_u64(r.get(3)),
                )
            })
            .collect())
    }

    /// Which of `keys` a file or a variant references.
    pub async fn find_keys(&self, keys: &[String]) -> Result<Vec<String>> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_cached(
                "SELECT storage_key FROM files.files WHERE storage_key = ANY($1)
                 UNION
                 SELECT storage_key FROM files.variants WHERE storage_key = ANY($1)",
                &[&keys],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Originals of files registered before `before`, by id after `after`.
    pub async fn list_originals(
        &self,
        before: DateTime<Utc>,
        status: Option<FileStatus>,
        after: Option<Uuid>,
        limit: i64,
    ) -> Result<Vec<FileRecord>> {
        let conn = self.pool.get().await?;
        let status = status.map(FileStatus::as_str);
        let rows = conn
            .query_cached(
                concat!(
                    "SELECT ",
                    file_columns!(),
                    " FROM files.files
                 WHERE created_at < $1 AND ($2::uuid IS NULL OR id > $2)
                   AND ($4::text IS NULL OR status = $4)
                 ORDER BY id LIMIT $3"
                ),
                &[&before, &after, &limit, &status],
            )
            .await?;
        Ok(rows.iter().map(FileRecord::from_row).collect())
    }

    /// Deletes the row of a file (and its variants) and records `file.purged` (naming the
    /// `admin` who asked, if one did).
    ///
    /// Owners may only purge what is in trash; with `trashed_before`, anyone only what has been
    /// in trash since before then. Returns what the caller must still remove from the store.
    pub async fn delete_row(
        &self,
        id: Uuid,
        viewer: Viewer<'_>,
        trashed_before: Option<DateTime<Utc>>,
        admin: Option<&str>,
    ) -> Result<Purged> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let file = get_on(&tx, id, viewer).await?;
        if matches!(viewer, Viewer::Owner(_)) && file.deleted_at.is_none() {
            return Err(Error::FailedPrecondition(
                "only files in trash can be purged; delete it first",
            ));
        }
        if let Some(before) = trashed_before
            && file.deleted_at.is_none_or(|at| at >= before)
        {
            return Err(Error::FailedPrecondition(
                "the file has not been in trash since before trashed_before",
            ));
        }
        let mut keys = vec![file.storage_key.clone()];
        keys.extend(
            file.variants
                .iter()
                .filter(|v| !v.storage_key.is_empty())
                .map(|v| v.storage_key.clone()),
        );
        // Conditional, so a restore (or another purge) that won the race is not undone.
        let deleted = tx
            .query_opt_cached(
                "DELETE FROM files.files WHERE id = $1 AND ($2 OR deleted_at IS NOT NULL)
                   AND ($3::timestamptz IS NULL OR deleted_at < $3)
                 RETURNING variant_bytes_charged, variant_charge_moves, variant_charge_pending",
                &[&id, &matches!(viewer, Viewer::Privileged), &trashed_before],
            )
            .await?;
        // What the owner was charged: the original, and the variants' bytes as their charge
        // stands (variant bytes not charged yet were never added, so they are not taken back).
        let Some(deleted) = deleted else {
            return Err(Error::FailedPrecondition(
                "the file changed meanwhile; read it again",
            ));
        };
        let charged = to_u64(deleted.get(0));
        // A step of the variant charge in progress is finished before the debit, which then
        // takes back its target.
        let pending_move = deleted.get::<_, Option<i64>>(2).map(|total| PendingCharge {
            owner_id: file.owner_id.clone(),
            charged,
            moves: to_u64(deleted.get(1)),
            total: to_u64(total),
        });
        let bytes = file.size_bytes + pending_move.as_ref().map_or(charged, |p| p.total);
        let by = match viewer {
            Viewer::Owner(_) => BY_OWNER,
            Viewer::Privileged => BY_SYSTEM,
        };
        let mut detail = json!({ "keys": keys, "freed_bytes": bytes, "by": by });
        if let Some(admin) = admin.filter(|admin| *admin != file.owner_id) {
            detail["admin"] = json!(admin);
        }
        outbox(&tx, "file.purged", &file, detail).await?;
        tx.commit().await?;
        Ok(Purged {
            owner_id: file.owner_id,
            keys,
            bytes,
            pending_move,
        })
    }

    /// Records variants and media metadata.
    #[allow(clippy::too_many_arguments)]
    pub async fn set_variants(
        &self,
        id: Uuid,
        variants: &[VariantRecord],
        status: Option<FileStatus>,
        status_reason: &str,
        width: u32,
        height: u32,
        duration_ms: u64,
        codec: &str,
    ) -> Result<FileRecord> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let updated = tx
            .execute_cached(
                "UPDATE files.files SET
                     status = COALESCE($2, status),
                     status_reason = CASE WHEN $2::text IS NULL THEN status_reason ELSE $3 END,
                     width = CASE WHEN $4 = 0 THEN width ELSE $4 END,
                     height = CASE WHEN $5 = 0 THEN height ELSE $5 END,
                     duration_ms = CASE WHEN $6::bigint = 0 THEN duration_ms ELSE $6::bigint END,
                     codec = CASE WHEN $7 = '' THEN codec ELSE $7 END,
                     updated_at = now()
                 WHERE id = $1",
                &[
                    &id,
                    &status.map(FileStatus::as_str),
                    &status_reason,
                    &i32::try_from(width).unwrap_or(i32::MAX),
                    &i32::try_from(height).unwrap_or(i32::MAX),
                    &i64::try_from(duration_ms).unwrap_or(i64::MAX),
                    &codec,
                ],
            )
            .await?;
        if updated == 0 {
            return Err(Error::NotFound);
        }
        for v in variants {
            tx.execute_cached(
                "INSERT INTO files.variants (file_id, name, mime_type, size_bytes, width, height, storage_key, inline_data)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                 ON CONFLICT (file_id, name) DO UPDATE SET mime_type = $3, size_bytes = $4,
                     width = $5, height = $6, storage_key = $7, inline_data = $8,
                     created_at = now()",
                &[
                    &id,
                    &v.name,
                    &v.mime_type,
                    &i64::try_from(v.size_bytes).unwrap_or(i64::MAX),
                    &i32::try_from(v.width).unwrap_or(i32::MAX),
                    &i32::try_from(v.height).unwrap_or(i32::MAX),
                    &v.storage_key,
                    &v.inline_data,
                ],
            )
            .await?;
        }
        let file = get_on(&tx, id, Viewer::Privileged).await?;
        tx.commit().await?;
        Ok(file)
    }

    /// The next step of file `id`'s variant charge: the one in progress if a call was
    /// interrupted, else a new one from what was charged to what its variants cost now
    /// (recorded before it is made, under the file's row lock); `None` when the file is gone
    /// or its charge is even.
    pub async fn begin_variant_move(&self, id: Uuid) -> Result<Option<PendingCharge>> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let Some(row) = tx
            .query_opt_cached(
                "SELECT owner_id, variant_bytes_charged, variant_charge_moves,
                        variant_charge_pending
                   FROM files.files WHERE id = $1 FOR UPDATE",
                &[&id],
            )
            .await?
        else {
            return Ok(None);
        };
        let mut pending = PendingCharge {
            owner_id: row.get(0),
            charged: to_u64(row.get(1)),
            moves: to_u64(row.get(2)),
            total: 0,
        };
        if let Some(total) = row.get::<_, Option<i64>>(3) {
            pending.total = to_u64(total);
            return Ok(Some(pending));
        }
        // Read after the lock is held, so it sees every SetVariants committed before.
        let total: i64 = tx
            .query_one_cached(
                "SELECT COALESCE(sum(size_bytes), 0)::bigint FROM files.variants
                 WHERE file_id = $1",
                &[&id],
            )
            .await?
            .get(0);
        pending.total = to_u64(total);
        if pending.total == pending.charged {
            return Ok(None);
        }
        tx.execute_cached(
            "UPDATE files.files SET variant_charge_pending = $2, variant_charge_pending_at = now()
             WHERE id = $1",
            &[&id, &total],
        )
        .await?;
        tx.commit().await?;
        Ok(Some(pending))
    }

    /// Records that the step `pending` of file `id`'s variant charge was made (once: a
    /// second call for the same step changes nothing).
    pub async fn finish_variant_move(&self, id: Uuid, pending: &PendingCharge) -> Result<()> {
        let conn = self.pool.get().await?;
        conn.execute_cached(
            "UPDATE files.files
                SET variant_bytes_charged = variant_charge_pending,
                    variant_charge_moves = variant_charge_moves + 1,
                    variant_charge_pending = NULL
              WHERE id = $1 AND variant_charge_moves = $2 AND variant_charge_pending = $3",
            &[
                &id,
                &i64::try_from(pending.moves).unwrap_or(i64::MAX),
                &i64::try_from(pending.total).unwrap_or(i64::MAX),
            ],
        )
        .await?;
        Ok(())
    }

    /// Totals of `owner` (or everyone) and the `largest` largest of the files they count,
    /// largest first, all read from one snapshot (files landing or going meanwhile are in
    /// every figure or in none). An owner's totals count what the owner can list
    /// (quarantined files are hidden from them); everyone's count every file.
    pub async fn stats(
        &self,
        owner: Option<&str>,
        largest: i64,
    ) -> Result<(Totals, Vec<FileRecord>)> {
        let mut conn = self.pool.get().await?;
        let tx = conn
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let totals = totals(&tx, owner).await?;
        let largest = if largest > 0 {
            largest_files(&tx, owner, largest).await?
        } else {
            Vec::new()
        };
        tx.commit().await?;
        Ok((totals, largest))
    }
}

async fn largest_files(
    conn: &impl GenericClient,
    owner: Option<&str>,
    limit: i64,
) -> Result<Vec<FileRecord>> {
    let rows = conn
        .query_cached(
            concat!(
                "SELECT ",
                file_columns!(),
                " FROM files.files
                     WHERE $1::text IS NULL OR (owner_id = $1 AND status <> 'quarantined')
                     ORDER BY size_bytes DESC, id LIMIT $2::bigint"
            ),
            &[&owner, &limit],
        )
        .await?;
    Ok(rows.iter().map(FileRecord::from_row).collect())
}

async fn totals(conn: &impl GenericClient, owner: Option<&str>) -> Result<Totals> {
    let row = conn
        .query_one_cached(
            "SELECT COALESCE(sum(size_bytes), 0)::bigint AS total,
                        count(*) AS files,
                        count(*) FILTER (WHERE deleted_at IS NOT NULL) AS trashed,
                        (SELECT COALESCE(sum(v.size_bytes), 0)::bigint FROM files.variants v
                           JOIN files.files f ON f.id = v.file_id
                          WHERE $1::text IS NULL OR (f.owner_id = $1 AND f.status <> 'quarantined'))
                            AS variant_bytes
                 FROM files.files
                 WHERE $1::text IS NULL OR (owner_id = $1 AND status <> 'quarantined')",
            &[&owner],
        )
        .await?;
    let by_kind = conn
        .query_cached(
            "SELECT kind, count(*) FROM files.files
                 WHERE $1::text IS NULL OR (owner_id = $1 AND status <> 'quarantined')
                 GROUP BY kind ORDER BY kind",
            &[&owner],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), to_u64(r.get(1))))
        .collect();
    Ok(Totals {
        total_bytes: to_u64(row.get("total")),
        file_count: to_u64(row.get("files")),
        variant_bytes: to_u64(row.get("variant_bytes")),
        trashed_count: to_u64(row.get("trashed")),
        by_kind,
    })
}

async fn get_on(conn: &impl GenericClient, id: Uuid, viewer: Viewer<'_>) -> Result<FileRecord> {
    let row = conn
        .query_opt_cached(
            concat!(
                "SELECT ",
                file_columns!(),
                " FROM files.files
             WHERE id = $1 AND ($2::text IS NULL OR (owner_id = $2 AND status <> 'quarantined'))"
            ),
            &[&id, &viewer.owner()],
        )
        .await?
        .ok_or(Error::NotFound)?;
    let mut file = FileRecord::from_row(&row);
    with_variants(conn, std::slice::from_mut(&mut file)).await?;
    Ok(file)
}

/// Fills in the variants of `files` (one, or a page of them) in one statement: a gallery
/// shows a page of thumbnails without a GetFile per file.
async fn with_variants(conn: &impl GenericClient, files: &mut [FileRecord]) -> Result<()> {
    if files.is_empty() {
        return Ok(());
    }
    let ids: Vec<Uuid> = files.iter().map(|f| f.id).collect();
    let rows = conn
        .query_cached(
            concat!(
                "SELECT file_id, ",
                variant_columns!(),
                " FROM files.variants WHERE file_id = ANY($1) ORDER BY file_id, name"
            ),
            &[&ids],
        )
        .await?;
    let mut by_file: HashMap<Uuid, Vec<VariantRecord>> = HashMap::new();
    for row in &rows {
        by_file
            .entry(row.get("file_id"))
            .or_default()
            .push(VariantRecord::from_row(row));
    }
    for file in files {
        file.variants = by_file.remove(&file.id).unwrap_or_default();
    }
    Ok(())
}

/// What an UpdateFile changes (unset fields: unchanged).
pub struct Change<'a> {
    /// New display name.
    pub display_name: Option<&'a str>,
    /// The whole new tag list.
    pub tags: Option<&'a [String]>,
    /// Tags added to the current ones.
    pub add_tags: &'a [String],
    /// Tags taken off the current ones.
    pub remove_tags: &'a [String],
    /// New favourite flag.
    pub favorite: Option<bool>,
}
