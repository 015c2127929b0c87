//! Resumable upload sessions: one implementation behind WriteChunks, PutChunk and tus.
//!
//! A chunk is accepted only at the session's current offset, under a row lock taken with
//! `FOR UPDATE NOWAIT`: of two writers on one session (on any replicas) one waits for nothing
//! and is told to retry. The bytes are staged and the offset, the running SHA-256 state and
//! the part list are updated in the same transaction, so a replica killed mid-chunk leaves the
//! session at its last good offset. A WriteChunks stream on local disk holds the session with an
//! advisory lock instead while its chunks keep coming, and records each chunk while staging the
//! next ([`ChunkStream`]); the lock goes with its connection.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Datelike, Utc};
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, path::Path as ObjectPath};
use serde::{Deserialize, Serialize};
use sha1::Sha1;
use sha2::{
    Digest, Sha256,
    digest::common::hazmat::{SerializableState, SerializedState},
};
use stowage_blob::keys;
use stowage_db::{Cached, GenericClient, PgPool};
use stowage_proto::v1 as pb;
use stowage_runtime::{
    mesh::{FilesApi, QuotaApi},
    validate,
};
use tokio_postgres::Row;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

/// The columns of an upload row that a [`Session`] is read from. Named rather than `*`: a
/// cached statement whose result type changes (a migration adding a column while this version
/// still runs) fails on every later call on its connection.
macro_rules! session_columns {
    () => {
        "id, owner_id, declared_size, received_bytes, state, expires_at, file_id, metadata, \
         storage_key, multipart_id, reservation_id, hash_state, sha256, placed, resumable, \
         held_bytes"
    };
}

/// Key of a session's writer lock, a PostgreSQL advisory lock, from the SQL expression of the
/// session's id: a WriteChunks stream holds it across the chunks that keep coming (see
/// [`ChunkStream`]); other writers take it for their transaction, or are refused while a stream
/// has it.
macro_rules! writer_lock {
    ($id:literal) => {
        concat!("hashtextextended(", $id, "::text, 11)")
    };
}

/// Key of a session's completion lock, from the SQL expression of the session's id: completers
/// of one session (a retry, another replica, the sweeper) take turns on it.
macro_rules! completion_lock {
    ($id:literal) => {
        concat!("hashtextextended(", $id, "::text, 7)")
    };
}

mod chunk_stream;
mod unpooled;

pub use chunk_stream::ChunkStream;

use crate::{
    error::{Error, Result},
    sniff::{AllowedTypes, Registration, SNIFF_LEN, sniff},
    staging::{Part, Staging, Target},
};

/// Settings of resumable sessions.
#[derive(Clone, Debug)]
pub struct SessionSettings {
    /// How long an unfinished session lives.
    pub ttl: Duration,
    /// Suggested chunk size.
    pub chunk_size_hint: u32,
    /// Largest file.
    pub max_file_size: u64,
    /// Largest chunk through any door.
    pub max_chunk: usize,
    /// Free bytes a local-disk store keeps: a session that would leave less is refused.
    pub min_free: u64,
    /// What status new files are registered with.
    pub registration: Registration,
    /// The content types taken (checked on a session's first bytes).
    pub allowed: AllowedTypes,
}

/// What a client said about the file at creation.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Meta {
    /// Display name.
    pub display_name: String,
    /// Declared MIME type (kept with the session; the stored type comes from the bytes).
    pub declared_mime_type: String,
    /// Declared kind (hint).
    pub declared_kind: i32,
    /// Tags.
    pub tags: Vec<String>,
    /// Expected whole-file SHA-256.
    pub expected_sha256: String,
    /// Producing app.
    pub package_name: String,
    /// The `Upload-Metadata` a tus client created the upload with, as it sent it: tus answers
    /// every HEAD with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tus_metadata: String,
}

impl Meta {
    /// Checks and normalises what came from a client.
    pub fn from_proto(m: pb::UploadMetadata, prefix: &'static str) -> Result<Self> {
        let field = |f: &'static str| -> &'static str {
            match (prefix, f) {
                ("header.metadata", "display_name") => "header.metadata.display_name",
                ("header.metadata", "tags") => "header.metadata.tags",
                ("header.metadata", "declared_mime_type") => "header.metadata.declared_mime_type",
                ("header.metadata", "package_name") => "header.metadata.package_name",
                ("header.metadata", _) => "header.metadata.expected_sha256",
                (_, "display_name") => "metadata.display_name",
                (_, "tags") => "metadata.tags",
                (_, "declared_mime_type") => "metadata.declared_mime_type",
                (_, "package_name") => "metadata.package_name",
                _ => "metadata.expected_sha256",
            }
        };
        for (name, value) in [
            ("declared_mime_type", &m.declared_mime_type),
            ("package_name", &m.package_name),
        ] {
            validate::label(value).map_err(|why| Error::invalid(field(name), why))?;
        }
        validate::display_name(&m.display_name)
            .map_err(|why| Error::invalid(field("display_name"), why))?;
        let tags = validate::tags(&m.tags).map_err(|why| Error::invalid(field("tags"), why))?;
        let expected = m.expected_sha256.to_ascii_lowercase();
        if !expected.is_empty()
            && (expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(Error::invalid(
                field("expected_sha256"),
                "must be 64 hex characters",
            ));
        }
        Ok(Self {
            display_name: m.display_name,
            declared_mime_type: m.declared_mime_type,
            declared_kind: m.declared_kind,
            tags,
            expected_sha256: expected,
            package_name: m.package_name,
            tus_metadata: String::new(),
        })
    }

    fn to_proto(&self) -> pb::UploadMetadata {
        pb::UploadMetadata {
            display_name: self.display_name.clone(),
            declared_mime_type: self.declared_mime_type.clone(),
            declared_kind: self.declared_kind,
            tags: self.tags.clone(),
            expected_sha256: self.expected_sha256.clone(),
            package_name: self.package_name.clone(),
        }
    }
}

/// A per-chunk checksum sent by the client.
#[derive(Clone, Debug)]
pub enum Checksum {
    /// SHA-256 digest bytes.
    Sha256(Vec<u8>),
    /// SHA-1 digest bytes (tus).
    Sha1(Vec<u8>),
}

/// One chunk at an explicit offset.
#[derive(Clone, Debug)]
pub struct ChunkIn {
    /// Offset of its first byte.
    pub offset: u64,
    /// The bytes.
    pub data: Bytes,
    /// Optional checksum of `data`.
    pub checksum: Option<Checksum>,
    /// Total size, for deferred-length sessions.
    pub size: Option<u64>,
}

/// A session as stored.
#[derive(Clone, Debug)]
pub struct Session {
    /// Id.
    pub id: Uuid,
    /// Owner.
    pub owner: String,
    /// Declared size, if known.
    pub size: Option<u64>,
    /// Bytes durably received.
    pub offset: u64,
    /// State name.
    pub state: String,
    /// Expiry.
    pub expires_at: Option<DateTime<Utc>>,
    /// File id (chosen at creation).
    pub file_id: Uuid,
    /// Client metadata.
    pub meta: Meta,
    key: Option<String>,
    multipart_id: Option<String>,
    reservation_id: Option<Uuid>,
    /// Bytes the reservation holds: the declared size, or while the length is deferred, at
    /// least what has been received.
    held: u64,
    hash_state: Option<Vec<u8>>,
    sha256: Option<String>,
    placed: bool,
    chunk_size_hint: u32,
}

/// What ending a session found: the session, and whether this call ended it (not an earlier
/// one).
struct Ended {
    session: Session,
    now: bool,
}

impl Session {
    fn from_row(row: &Row, chunk_size_hint: u32) -> Self {
        let meta: serde_json::Value = row.get("metadata");
        Self {
            id: row.get("id"),
            owner: row.get("owner_id"),
            size: row.get::<_, Option<i64>>("declared_size").map(|v| v as u64),
            offset: row.get::<_, i64>("received_bytes") as u64,
            state: row.get("state"),
            expires_at: row.get("expires_at"),
            file_id: row.get("file_id"),
            meta: serde_json::from_value(meta).unwrap_or_default(),
            key: row.get("storage_key"),
            multipart_id: row.get("multipart_id"),
            reservation_id: row.get("reservation_id"),
            held: row
                .get::<_, Option<i64>>("held_bytes")
                .or(row.get("declared_size"))
                .map_or(0, |v| v as u64),
            hash_state: row.get("hash_state"),
            sha256: row.get("sha256"),
            placed: row.get("placed"),
            chunk_size_hint,
        }
    }

    /// Whether the session expired.
    pub fn is_expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at < Utc::now())
    }

    /// Whether the session is gone for its client: ended without a file (aborted, expired,
    /// failed), or still open past its expiry. One completing or completed is not.
    pub fn is_gone(&self) -> bool {
        matches!(self.state.as_str(), "aborted" | "expired" | "failed")
            || (self.state == "open" && self.is_expired())
    }

    /// The proto form.
    pub fn to_proto(&self) -> pb::UploadSession {
        let state = match self.state.as_str() {
            "open" => pb::UploadState::Open,
            "completing" | "registered" => pb::UploadState::Completing,
            "completed" => pb::UploadState::Completed,
            "aborted" | "failed" => pb::UploadState::Aborted,
            "expired" => pb::UploadState::Expired,
            _ => pb::UploadState::Unspecified,
        };
        let state = if state == pb::UploadState::Open && self.is_expired() {
            pb::UploadState::Expired
        } else {
            state
        };
        pb::UploadSession {
            id: self.id.to_string(),
            owner_id: self.owner.clone(),
            size_bytes: self.size,
            offset: self.offset,
            state: state as i32,
            chunk_size_hint: self.chunk_size_hint,
            expires_at: self.expires_at.map(stowage_runtime::time::timestamp),
            file_id: if self.state == "completed" {
                self.file_id.to_string()
            } else {
                String::new()
            },
            metadata: Some(self.meta.to_proto()),
        }
    }
}

/// Refuses a chunk unless `session` is open and expects `offset` (its recorded offset, or past
/// chunks not recorded yet), where the chunk starts.
fn check_open_at(session: &Session, offset: u64, chunk_offset: u64) -> Result<()> {
    if session.state != "open" {
        return Err(Error::SessionState(session.state.clone()));
    }
    if session.is_expired() {
        return Err(Error::SessionState("expired".into()));
    }
    if chunk_offset != offset {
        return Err(Error::WrongOffset {
            expected: offset,
            got: chunk_offset,
        });
    }
    Ok(())
}

/// Checks the client's checksum of `chunk`, if it sent one, before anything is staged.
async fn check_checksum(chunk: &ChunkIn) -> Result<()> {
    let Some(checksum) = chunk.checksum.clone() else {
        return Ok(());
    };
    let data = chunk.data.clone();
    tokio::task::spawn_blocking(move || verify_checksum(&data, &checksum))
        .await
        .map_err(|_| Error::Internal("checksum panicked"))?
}

/// Checks `data` against the client's checksum.
fn verify_checksum(data: &[u8], checksum: &Checksum) -> Result<()> {
    let ok = match checksum {
        Checksum::Sha256(d) => Sha256::digest(data).as_slice() == d.as_slice(),
        Checksum::Sha1(d) => Sha1::digest(data).as_slice() == d.as_slice(),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::ChecksumMismatch)
    }
}

/// The running hash as stored on the session row (resumed from there by any replica).
fn hash_state(hasher: &Sha256) -> Vec<u8> {
    hasher.serialize().to_vec()
}

/// The running hash from its stored state (a new one before the first byte).
fn hasher_from(state: Option<&[u8]>) -> Result<Sha256> {
    match state {
        None => Ok(Sha256::new()),
        Some(bytes) => {
            let serialized = SerializedState::<Sha256>::try_from(bytes)
                .map_err(|_| Error::Internal("stored hash state has the wrong size"))?;
            Sha256::deserialize(&serialized)
                .map_err(|_| Error::Internal("stored hash state is corrupt"))
        }
    }
}

/// Most sessions of unknown length one owner keeps open at once.
pub const MAX_OPEN_DEFERRED: usize = 100;

/// Resumable sessions.
#[derive(Clone)]
pub struct Sessions {
    pool: PgPool,
    staging: Staging,
    store: Arc<dyn ObjectStore>,
    quota: Arc<dyn QuotaApi>,
    files: Arc<dyn FilesApi>,
    settings: SessionSettings,
    /// Chunk writes run to their end (see `run_to_end`).
    writes: TaskTracker,
}

/// How far ahead of the bytes received the hold of a session whose length is deferred runs,
/// at most (ahead by as much as it held, up to this): a long upload asks Quota a few dozen
/// times, and holds little it has not used.
const HOLD_AHEAD_MAX: u64 = 256 << 20;

/// A session of an owner. The owner is compared as `owner_id || ''`, which no index serves, so
/// that the only plan is the primary key's: with a plain `owner_id = $2`, a plan cached while
/// the table's statistics were stale (a young table) walked all of the owner's rows through
/// the (owner, idempotency key) index, 2–4 ms per call once there were a thousand, growing
/// with every upload.
const READ: &str = concat!(
    "SELECT ",
    session_columns!(),
    " FROM ingest.uploads WHERE id = $1 AND owner_id || '' = $2 AND resumable"
);

/// A session of an owner, locked for the transaction (see [`Sessions::lock`]); found as
/// [`READ`] finds it.
macro_rules! lock_sql {
    ($wait:literal) => {
        concat!(
            "SELECT ",
            session_columns!(),
            ", pg_try_advisory_xact_lock(",
            writer_lock!("id"),
            ") AS writable FROM ingest.uploads WHERE id = $1 AND owner_id || '' = $2 \
             AND resumable FOR UPDATE",
            $wait
        )
    };
}

impl Sessions {
    /// Sessions over `pool`, staging through `staging`.
    pub fn new(
        pool: PgPool,
        staging: Staging,
        store: Arc<dyn ObjectStore>,
        quota: Arc<dyn QuotaApi>,
        files: Arc<dyn FilesApi>,
        settings: SessionSettings,
    ) -> Self {
        Self {
            pool,
            staging,
            store,
            quota,
            files,
            settings,
            writes: TaskTracker::new(),
        }
    }

    /// Runs a chunk's write to its end even if the caller is dropped meanwhile (a client that
    /// hangs up, a stream reset). The staging write runs on a blocking thread, which nothing can
    /// stop: if the lock it was made under went with the caller, another writer could take the
    /// session, stage other bytes at the same offset and record their hash, and the orphaned write
    /// could then land over them. Run to its end, the write keeps the lock until its bytes are on
    /// disk, and a chunk that arrived whole is recorded. Tracked, so shutdown waits for them
    /// ([`drain_writes`](Self::drain_writes)).
    async fn run_to_end<T: Send + 'static>(
        &self,
        write: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        // Once shutdown waits for the writes, no new one starts: it could outlive the wait.
        if self.writes.is_closed() {
            return Err(Error::ShuttingDown);
        }
        self.writes
            .spawn(write)
            .await
            .map_err(|_| Error::Internal("a chunk's write panicked"))?
    }

    /// Waits for the chunk writes still running (their callers gone: see `run_to_end`), so
    /// none outlives the process's hold on its session. Called at shutdown, after the server
    /// drained.
    pub async fn drain_writes(&self) {
        self.writes.close();
        self.writes.wait().await;
    }

    /// The settings in force.
    pub fn settings(&self) -> &SessionSettings {
        &self.settings
    }

    /// Opens a session and reserves its quota: the whole declared size, or while the length
    /// is deferred, what has arrived, grown as chunks come (see `hold_more`).
    pub async fn create(
        &self,
        owner: &str,
        size: Option<u64>,
        meta: Meta,
        idempotency_key: Option<&str>,
    ) -> Result<Session> {
        keys::validate_user_id(owner).map_err(|why| Error::invalid("user_id", why))?;
        if let Some(size) = size
            && size > self.settings.max_file_size
        {
            return Err(Error::invalid(
                "size_bytes",
                format!(
                    "{size} bytes is above the limit of {}",
                    self.settings.max_file_size
                ),
            ));
        }
        if let Some(size) = size {
            self.staging.check_room(size, self.settings.min_free)?;
        }
        if let Some(key) = idempotency_key {
            validate::idempotency_key(key).map_err(|why| Error::invalid("idempotency_key", why))?;
        }
        let conn = self.pool.get().await?;
        let ttl_secs = self.settings.ttl.as_secs_f64();
        let row = conn
            .query_opt_cached(
                concat!(
                    "INSERT INTO ingest.uploads (id, owner_id, idempotency_key, state, declared_size, file_id,
                     display_name, resumable, metadata, expires_at)
                 VALUES ($1, $2, $3, 'open', $4, $5, $6, true, $7, now() + make_interval(secs => $8))
                 ON CONFLICT (owner_id, idempotency_key) DO NOTHING RETURNING ",
                    session_columns!()
                ),
                &[
                    &Uuid::now_v7(),
                    &owner,
                    &idempotency_key,
                    &size.map(|s| s as i64),
                    &Uuid::now_v7(),
                    &meta.display_name,
                    &serde_json::to_value(&meta).unwrap_or_default(),
                    &ttl_secs,
                ],
            )
            .await?;
        let Some(row) = row else {
            let row = conn
                .query_one_cached(
                    concat!(
                        "SELECT ",
                        session_columns!(),
                        " FROM ingest.uploads WHERE owner_id = $1 AND idempotency_key = $2"
                    ),
                    &[&owner, &idempotency_key],
                )
                .await?;
            let existing = Session::from_row(&row, self.settings.chunk_size_hint);
            if !row.get::<_, bool>("resumable") {
                return Err(Error::invalid(
                    "idempotency_key",
                    "was used by a one-shot upload",
                ));
            }
            if let (Some(asked), Some(declared)) = (size, existing.size)
                && asked != declared
            {
                return Err(Error::invalid(
                    "idempotency_key",
                    format!("was used for an upload of {declared} bytes, not {asked}"),
                ));
            }
            if existing.reservation_id.is_none() && existing.state == "open" {
                // The first call stopped between the row and its hold (a crash, an error after
                // Quota answered): the hold is asked for again, under the same key, so Quota
                // answers with the one it made, if it made one.
                let size = existing.size;
                return self.reserve_for(&conn, existing, size, false).await;
            }
            return Ok(existing);
        };
        let session = Session::from_row(&row, self.settings.chunk_size_hint);
        if size.is_none() {
            // A session of unknown length holds no quota: the count of them is the bound.
            let open: i64 = conn
                .query_one_cached(
                    "SELECT count(*) FROM ingest.uploads
                     WHERE owner_id = $1 AND state = 'open' AND declared_size IS NULL
                       AND expires_at > now()",
                    &[&owner],
                )
                .await?
                .get(0);
            if open > MAX_OPEN_DEFERRED as i64 {
                conn.execute_cached(
                    "DELETE FROM ingest.uploads WHERE id = $1 AND reservation_id IS NULL",
                    &[&session.id],
                )
                .await?;
                return Err(Error::TooManyOpenUploads(MAX_OPEN_DEFERRED));
            }
        }
        self.reserve_for(&conn, session, size, true).await
    }

    /// Holds quota for a new session (idempotent per session). A refusal removes the row when
    /// `first` (this call made it); a retry leaves it, as the first call may still be waiting
    /// on its own hold (an unheld row expires with the session).
    async fn reserve_for(
        &self,
        conn: &impl GenericClient,
        session: Session,
        size: Option<u64>,
        first: bool,
    ) -> Result<Session> {
        let reserved = self
            .quota
            .reserve(pb::ReserveRequest {
                user_id: session.owner.clone(),
                bytes: size.unwrap_or(0),
                ttl_seconds: self.hold_ttl_seconds(),
                idempotency_key: format!("upload:{}", session.id),
            })
            .await;
        let reservation = match reserved {
            Ok(r) => r.reservation.map(|r| r.id).unwrap_or_default(),
            Err(status) => {
                if first {
                    conn.execute_cached(
                        "DELETE FROM ingest.uploads WHERE id = $1 AND reservation_id IS NULL",
                        &[&session.id],
                    )
                    .await?;
                }
                return Err(status.into());
            }
        };
        let reservation =
            Uuid::parse_str(&reservation).map_err(|_| Error::Internal("bad reservation id"))?;
        let row = conn
            .query_one_cached(
                concat!(
                    "UPDATE ingest.uploads SET reservation_id = $2, held_bytes = $3 WHERE id = $1
                     RETURNING ",
                    session_columns!()
                ),
                &[&session.id, &reservation, &(size.unwrap_or(0) as i64)],
            )
            .await?;
        Ok(Session::from_row(&row, self.settings.chunk_size_hint))
    }

    /// A session of `owner` (NOT_FOUND for anyone else's).
    pub async fn get(&self, id: Uuid, owner: &str) -> Result<Session> {
        self.read(&self.pool.get().await?, id, owner).await
    }

    /// A session of `owner`, read on `conn`.
    async fn read(&self, conn: &impl GenericClient, id: Uuid, owner: &str) -> Result<Session> {
        let row = conn
            .query_opt_cached(READ, &[&id, &owner])
            .await?
            .ok_or(Error::SessionNotFound)?;
        Ok(Session::from_row(&row, self.settings.chunk_size_hint))
    }

    async fn lock(
        &self,
        tx: &impl GenericClient,
        id: Uuid,
        owner: &str,
        wait: bool,
    ) -> Result<Session> {
        // Refused as busy while another writer holds the session's writer lock (a WriteChunks
        // stream, or another transaction here): taken for this transaction, so no stream
        // starts meanwhile. Aborting, expiring or completing a session a stream is writing
        // waits for nothing either, and is refused until the stream lets go.
        let sql = if wait {
            lock_sql!("")
        } else {
            lock_sql!(" NOWAIT")
        };
        match tx.query_opt_cached(sql, &[&id, &owner]).await {
            Ok(Some(row)) if !row.get::<_, bool>("writable") => Err(Error::Busy),
            Ok(Some(row)) => Ok(Session::from_row(&row, self.settings.chunk_size_hint)),
            Ok(None) => Err(Error::SessionNotFound),
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                Err(Error::Busy)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The parts staged for `id` so far (none where staging keeps no part rows).
    async fn parts(&self, tx: &impl GenericClient, id: Uuid) -> Result<Vec<Part>> {
        if !self.staging.keeps_parts() {
            return Ok(Vec::new());
        }
        let rows = tx
            .query_cached(
                "SELECT part_number, start_offset, size_bytes, part_id, pending FROM ingest.upload_parts
                 WHERE upload_id = $1 ORDER BY part_number",
                &[&id],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Part {
                number: r.get("part_number"),
                start: r.get::<_, i64>("start_offset") as u64,
                size: r.get::<_, i64>("size_bytes") as u64,
                part_id: r.get("part_id"),
                pending: r.get("pending"),
            })
            .collect())
    }

    /// Appends one chunk at its offset. Once called, the write runs to its end even if the
    /// caller goes away (see `run_to_end`).
    pub async fn write_chunk(&self, id: Uuid, owner: &str, chunk: ChunkIn) -> Result<Session> {
        let (sessions, owner) = (self.clone(), owner.to_owned());
        self.run_to_end(async move {
            let mut conn = sessions.pool.get().await?;
            let written = sessions.write_chunk_on(&mut conn, id, &owner, chunk).await;
            drop(conn);
            if let Err(Error::TypeNotAllowed { .. }) = &written {
                sessions.abort_refused(id, &owner).await;
            }
            written
        })
        .await
    }

    /// Ends a session whose first bytes are of a type the deployment does not take: no later
    /// chunk can change what the file is, so its hold goes now rather than at its expiry.
    /// Runs to its end if its caller goes away.
    pub(crate) async fn abort_refused(&self, id: Uuid, owner: &str) {
        let (sessions, owner) = (self.clone(), owner.to_owned());
        let aborted = self
            .run_to_end(async move { sessions.abort(id, &owner).await })
            .await;
        if let Err(error) = aborted {
            tracing::info!(upload_id = %id, %error, "session of a refused type left to expire");
        }
    }

    /// Refuses a chunk ending at `end`, past the session's length (or the largest file).
    fn check_end(&self, session: &Session, end: u64) -> Result<()> {
        let limit = session.size.unwrap_or(self.settings.max_file_size);
        if end > limit {
            return Err(Error::invalid(
                "chunk.data",
                format!("runs past the declared length of {limit} bytes"),
            ));
        }
        Ok(())
    }

    /// With content types restricted, a session's first chunk decides its type: it must carry
    /// the bytes sniffing looks at (8 KiB, or the whole file when shorter), so that what is
    /// checked is what completion will find; then its type must be one taken.
    fn check_first_chunk(&self, session: &Session, chunk: &ChunkIn, end: u64) -> Result<()> {
        if self.settings.allowed.is_empty() {
            return Ok(());
        }
        if chunk.data.len() < SNIFF_LEN && session.size != Some(end) {
            return Err(Error::FirstChunkTooShort { needed: SNIFF_LEN });
        }
        let head = &chunk.data[..chunk.data.len().min(SNIFF_LEN)];
        self.settings
            .allowed
            .check(&sniff(head, &session.meta.display_name), "chunk.data")
    }

    /// Refuses a chunk larger than the setting.
    fn check_chunk_size(&self, chunk: &ChunkIn) -> Result<()> {
        if chunk.data.len() > self.settings.max_chunk {
            return Err(Error::invalid(
                "chunk.data",
                format!("at most {} bytes per chunk", self.settings.max_chunk),
            ));
        }
        Ok(())
    }

    /// [`write_chunk`](Self::write_chunk) on `conn` (which may hold the session's writer lock).
    async fn write_chunk_on(
        &self,
        conn: &mut stowage_db::Connection,
        id: Uuid,
        owner: &str,
        chunk: ChunkIn,
    ) -> Result<Session> {
        self.check_chunk_size(&chunk)?;
        let tx = conn.transaction().await?;
        let mut session = self.lock(&tx, id, owner, false).await?;
        check_open_at(&session, session.offset, chunk.offset)?;
        // The offset is the session's: no overflow.
        let end = chunk.offset + chunk.data.len() as u64;
        match (session.size, chunk.size) {
            (Some(declared), Some(given)) if declared != given => {
                return Err(Error::invalid(
                    "chunk.size_bytes",
                    format!("differs from the declared {declared}"),
                ));
            }
            (None, Some(given)) => {
                if given < end || given > self.settings.max_file_size {
                    return Err(Error::invalid(
                        "chunk.size_bytes",
                        "is below the bytes sent or above the limit",
                    ));
                }
                self.size_known(&tx, &mut session, given).await?;
            }
            _ => {}
        }
        self.check_end(&session, end)?;
        if chunk.data.is_empty() {
            tx.commit().await?;
            return Ok(session);
        }
        if session.key.is_none() {
            self.check_first_chunk(&session, &chunk, end)?;
        }
        check_checksum(&chunk).await?;
        let hasher = hasher_from(session.hash_state.as_deref())?;
        if Self::needs_more_held(&session, end) {
            self.hold_more(&tx, &mut session, end).await?;
        }
        let fresh_key = session.key.is_none();
        let key = match &session.key {
            Some(k) => ObjectPath::from(k.as_str()),
            None => {
                let head = &chunk.data[..chunk.data.len().min(SNIFF_LEN)];
                self.choose_key(&tx, &mut session, head).await?
            }
        };
        let result = self
            .stage_and_record(tx, id, &session, &key, chunk, end, hasher)
            .await;
        if result.is_err() && fresh_key {
            // The key and multipart id were rolled back with the transaction: abort the
            // native upload started for them, or it would never be cleaned up.
            self.staging
                .discard(id, Some(&key), session.multipart_id.as_deref(), &[])
                .await;
        }
        let (row, merged) = result?;
        // Pending bytes merged into a native part are not needed any more.
        for number in merged {
            let _ = self
                .store
                .delete(&keys::staging_part(&id.to_string(), number as u32))
                .await;
        }
        Ok(Session::from_row(&row, self.settings.chunk_size_hint))
    }

    /// Stages a checked chunk and records it in the session's transaction.
    #[allow(clippy::too_many_arguments)]
    async fn stage_and_record(
        &self,
        tx: stowage_db::Transaction<'_>,
        id: Uuid,
        session: &Session,
        key: &ObjectPath,
        chunk: ChunkIn,
        end: u64,
        hasher: Sha256,
    ) -> Result<(Row, Vec<i32>)> {
        let parts = self.parts(&tx, id).await?;
        let last = session.size == Some(end);
        let (staged, hasher) = self
            .staging
            .write(
                Target {
                    upload: id,
                    key,
                    multipart_id: session.multipart_id.as_deref(),
                    // A deferred length may grow to the limit.
                    max_size: session.size.unwrap_or(self.settings.max_file_size),
                },
                &parts,
                chunk.offset,
                chunk.data,
                last,
                hasher,
            )
            .await?;
        let hash_state = hash_state(&hasher);
        for number in &staged.merged {
            tx.execute_cached(
                "DELETE FROM ingest.upload_parts WHERE upload_id = $1 AND part_number = $2",
                &[&id, number],
            )
            .await?;
        }
        if let Some(p) = &staged.part {
            tx.execute_cached(
                "INSERT INTO ingest.upload_parts (upload_id, part_number, start_offset, size_bytes, part_id, pending)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[&id, &p.number, &(p.start as i64), &(p.size as i64), &p.part_id, &p.pending],
            )
            .await?;
        }
        let row = tx
            .query_one_cached(
                concat!(
                    "UPDATE ingest.uploads SET received_bytes = $2, hash_state = $3, updated_at = now()
                     WHERE id = $1 RETURNING ",
                    session_columns!()
                ),
                &[&id, &(end as i64), &hash_state],
            )
            .await?;
        tx.commit().await?;
        Ok((row, staged.merged))
    }

    /// Picks the final key from the first bytes and starts the native multipart upload there
    /// (when the store has one), recording both on the session row.
    async fn choose_key(
        &self,
        tx: &impl GenericClient,
        session: &mut Session,
        head: &[u8],
    ) -> Result<ObjectPath> {
        let sniffed = sniff(head, &session.meta.display_name);
        let now = Utc::now();
        let key = keys::original(
            &session.owner,
            sniffed.kind,
            now.year(),
            now.month(),
            &session.file_id.to_string(),
            &sniffed.extension,
        );
        session.multipart_id = self.staging.begin(&key).await?;
        tx.execute_cached(
            "UPDATE ingest.uploads SET storage_key = $2, multipart_id = $3 WHERE id = $1",
            &[&session.id, &key.as_ref(), &session.multipart_id],
        )
        .await?;
        session.key = Some(key.to_string());
        Ok(key)
    }

    /// A deferred length became known: the session's hold grows to that size if it holds
    /// less. A larger hold stays as it is (Commit charges the real size and gives back the
    /// rest): shrunk in Quota by a change then rolled back, it would hold less than the row
    /// says, and chunks up to the row's figure would be staged unheld.
    async fn size_known(
        &self,
        tx: &impl GenericClient,
        session: &mut Session,
        size: u64,
    ) -> Result<()> {
        let held = session.held.max(size);
        if size > session.held {
            self.resize_hold(session, size, size).await?;
        }
        tx.execute_cached(
            "UPDATE ingest.uploads SET declared_size = $2, held_bytes = $3 WHERE id = $1",
            &[&session.id, &(size as i64), &(held as i64)],
        )
        .await?;
        session.size = Some(size);
        session.held = held;
        Ok(())
    }

    /// Whether a chunk ending at `end` needs a larger hold first: the session's length is
    /// deferred and its reservation holds less.
    fn needs_more_held(session: &Session, end: u64) -> bool {
        session.size.is_none() && end > session.held
    }

    /// While the length is deferred, the session holds quota for what it receives: before a
    /// chunk ending at `end` is staged, its hold grows ahead of `end` by as much as it held (at
    /// most [`HOLD_AHEAD_MAX`]), or where that does not fit, to `end` alone (so near the limit
    /// it leaves the rest to the user's other uploads), in one call to Quota. Refused that,
    /// the chunk is.
    async fn hold_more(
        &self,
        tx: &impl GenericClient,
        session: &mut Session,
        end: u64,
    ) -> Result<()> {
        // The bytes of unknown length take room on the disk as they come.
        self.staging
            .check_room(end.saturating_sub(session.offset), self.settings.min_free)?;
        let ahead = end
            .saturating_add(session.held.min(HOLD_AHEAD_MAX))
            .min(self.settings.max_file_size)
            .max(end);
        let held = self.resize_hold(session, ahead, end).await?;
        // Rolled back with the chunk, the row says less than Quota holds, and the next chunk
        // asks again: nothing is held twice, and nothing staged is unheld.
        tx.execute_cached(
            "UPDATE ingest.uploads SET held_bytes = $2 WHERE id = $1",
            &[&session.id, &(held as i64)],
        )
        .await?;
        session.held = held;
        Ok(())
    }

    /// How long a session's quota hold lives, as Quota takes it: as long as the session.
    fn hold_ttl_seconds(&self) -> u32 {
        u32::try_from(self.settings.ttl.as_secs()).unwrap_or(u32::MAX)
    }

    /// Sets the session's hold to `bytes`, in place, or where they do not fit to `fallback`;
    /// returns what it holds.
    async fn resize_hold(&self, session: &Session, bytes: u64, fallback: u64) -> Result<u64> {
        let reservation = session
            .reservation_id
            .ok_or(Error::Internal("a session without its reservation"))?;
        let resized = self
            .quota
            .resize(pb::ResizeRequest {
                reservation_id: reservation.to_string(),
                bytes,
                ttl_seconds: self.hold_ttl_seconds(),
                fallback_bytes: fallback,
            })
            .await?;
        resized
            .reservation
            .map(|r| r.bytes)
            .ok_or(Error::Internal("Quota resized no reservation"))
    }

    async fn release(&self, reservation: Uuid, upload: Uuid) {
        if let Err(status) = self
            .quota
            .release(pb::ReleaseRequest {
                reservation_id: reservation.to_string(),
            })
            .await
        {
            tracing::warn!(%upload, %status, "reservation release failed; it expires on its own");
        }
    }

    /// [`complete`](Self::complete), run to its end even if its caller stops waiting (a client
    /// that hangs up would otherwise leave it between two steps, for the sweeper to finish).
    pub async fn complete_to_end(&self, id: Uuid, owner: &str) -> Result<pb::File> {
        let (sessions, owner) = (self.clone(), owner.to_owned());
        self.run_to_end(async move { sessions.complete(id, &owner).await })
            .await
    }

    /// Verifies, places, registers and charges the upload. Calling it again after a crash at
    /// any step converges to one file and one charge.
    pub async fn complete(&self, id: Uuid, owner: &str) -> Result<pb::File> {
        // 1. Under the row lock: check and move to `completing`, committed before anything
        //    else happens, so no chunk can land any more and no rollback can undo a later step.
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let mut session = self.lock(&tx, id, owner, true).await?;
        match session.state.as_str() {
            "completed" => {
                tx.commit().await?;
                return self.file_of(&session).await;
            }
            "open" => {
                if session.is_expired() {
                    return Err(Error::SessionState("expired".into()));
                }
                let size = session.size.unwrap_or(session.offset);
                if session.offset != size {
                    return Err(Error::Incomplete {
                        received: session.offset,
                        size,
                    });
                }
                if session.size.is_none() {
                    // A deferred length ends here: the hold becomes what arrived.
                    self.size_known(&tx, &mut session, size).await?;
                }
                if session.reservation_id.is_none() {
                    return Err(Error::Internal("session holds no reservation"));
                }
                let sha = hex::encode(hasher_from(session.hash_state.as_deref())?.finalize());
                if !session.meta.expected_sha256.is_empty() && session.meta.expected_sha256 != sha {
                    return Err(Error::invalid(
                        "metadata.expected_sha256",
                        "does not match the bytes received",
                    ));
                }
                if session.key.is_none() {
                    // Nothing was ever written: an empty file.
                    self.settings
                        .allowed
                        .check(&sniff(&[], &session.meta.display_name), "chunk.data")?;
                    self.choose_key(&tx, &mut session, &[]).await?;
                }
                tx.execute_cached(
                    "UPDATE ingest.uploads SET state = 'completing', sha256 = $2, declared_size = $3, updated_at = now()
                     WHERE id = $1",
                    &[&id, &sha, &(size as i64)],
                )
                .await?;
            }
            "completing" | "registered" => {}
            other => return Err(Error::SessionState(other.to_owned())),
        }
        tx.commit().await?;
        drop(conn);
        self.finish(id, owner).await
    }

    /// Steps of a completion after `completing`, each recorded as it is done. Completers of
    /// one session (a retry, another replica, the sweeper) take turns on an advisory lock.
    async fn finish(&self, id: Uuid, owner: &str) -> Result<pb::File> {
        // One connection: its session-level advisory lock serialises completers, and the steps
        // are recorded on it as they happen.
        // Cancelled while it holds the lock, the connection is closed rather than pooled, so
        // the lock goes with it.
        let mut conn = unpooled::Unpooled::new(
            self.pool.get().await?,
            concat!("SELECT pg_advisory_unlock(", completion_lock!("$1"), ")"),
            id.to_string(),
        );
        conn.get()?
            .execute_cached(
                concat!("SELECT pg_advisory_lock(", completion_lock!("$1"), ")"),
                &[&conn.key()],
            )
            .await?;
        let result = self.finish_locked(conn.get_mut()?, id, owner).await;
        conn.release().await?;
        result
    }

    async fn finish_locked(
        &self,
        conn: &mut stowage_db::Connection,
        id: Uuid,
        owner: &str,
    ) -> Result<pb::File> {
        let session = self.read(&*conn, id, owner).await?;
        if session.state == "completed" {
            return self.file_of(&session).await;
        }
        let size = session.size.unwrap_or(session.offset);
        let key = ObjectPath::from(
            session
                .key
                .clone()
                .ok_or(Error::Internal("completing session without a key"))?,
        );
        let parts = self.parts(conn, id).await?;
        if !session.placed {
            self.staging
                .compose(id, &key, session.multipart_id.as_deref(), &parts, size)
                .await?;
            conn.execute_cached(
                "UPDATE ingest.uploads SET placed = true WHERE id = $1",
                &[&id],
            )
            .await?;
        }
        let head = if size == 0 {
            Bytes::new()
        } else {
            let options = GetOptions {
                range: Some(GetRange::Bounded(0..size.min(SNIFF_LEN as u64))),
                ..GetOptions::default()
            };
            self.store.get_opts(&key, options).await?.bytes().await?
        };
        let sniffed = sniff(&head, &session.meta.display_name);
        let status = self
            .settings
            .registration
            .status(&sniffed, &session.meta.display_name, size);
        let registered = self
            .files
            .register_file(pb::RegisterFileRequest {
                owner_id: owner.to_owned(),
                file_id: session.file_id.to_string(),
                display_name: session.meta.display_name.clone(),
                kind: crate::oneshot::kind_proto(sniffed.kind) as i32,
                mime_type: sniffed.mime_type,
                size_bytes: size,
                sha256: session.sha256.clone().unwrap_or_default(),
                storage_key: key.to_string(),
                tags: session.meta.tags.clone(),
                package_name: session.meta.package_name.clone(),
                status: status as i32,
                idempotency_key: id.to_string(),
            })
            .await?;
        let file = registered
            .file
            .ok_or(Error::Internal("no file in response"))?;
        // Registration and commit are idempotent (keyed by upload and reservation): a completer
        // that follows a crash repeats both from `completing`, so nothing is recorded between.
        let reservation = session
            .reservation_id
            .ok_or(Error::Internal("session holds no reservation"))?;
        self.quota
            .commit(pb::CommitRequest {
                reservation_id: reservation.to_string(),
                bytes: size,
            })
            .await?;
        // The state change and its event in one statement, on the connection that holds the
        // completion lock (a second one could wait forever on a pool its callers exhausted).
        crate::uploads::mark_completed(&*conn, id, size, Some(&file.sha256)).await?;
        if !self.staging.is_native() || parts.iter().any(|p| p.pending) {
            self.staging.discard_all(id, None, None, &parts).await;
        }
        Ok(file)
    }

    async fn file_of(&self, session: &Session) -> Result<pb::File> {
        let response = self
            .files
            .get_file(pb::GetFileRequest {
                file_id: session.file_id.to_string(),
            })
            .await?;
        response.file.ok_or(Error::Internal("no file in response"))
    }

    /// Abandons a session: staging removed, reservation released. Idempotent: a session
    /// that ended before is returned as it is.
    pub async fn abort(&self, id: Uuid, owner: &str) -> Result<Session> {
        Ok(self.end(id, owner, "aborted").await?.session)
    }

    /// Abandons a session once, as tus termination does: a session that ended before (by an
    /// earlier or a concurrent termination, or by expiry) is refused with its state.
    pub async fn terminate(&self, id: Uuid, owner: &str) -> Result<Session> {
        match self.end(id, owner, "aborted").await? {
            Ended { session, now: true } => Ok(session),
            Ended {
                session,
                now: false,
            } => Err(Error::SessionState(session.state)),
        }
    }

    /// Ends session `id` as `state`. An expiry (`state` "expired") ends it only if, under
    /// its lock, it is still past its expiry: a sweep reads its candidates unlocked.
    async fn end(&self, id: Uuid, owner: &str, state: &str) -> Result<Ended> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let session = self.lock(&tx, id, owner, true).await?;
        match session.state.as_str() {
            "aborted" | "expired" | "failed" => {
                return Ok(Ended {
                    session,
                    now: false,
                });
            }
            // Past the point of no return: the sweeper or a retried Complete finishes it.
            "completed" | "registered" | "completing" => {
                return Err(Error::SessionState(session.state.clone()));
            }
            _ => {}
        }
        let parts = self.parts(&tx, id).await?;
        let Some(row) = tx
            .query_opt_cached(
                concat!(
                    "UPDATE ingest.uploads SET state = $2, updated_at = now()
                     WHERE id = $1 AND ($2 <> 'expired' OR expires_at < now())
                     RETURNING ",
                    session_columns!()
                ),
                &[&id, &state],
            )
            .await?
        else {
            // Not past its expiry.
            return Ok(Ended {
                session,
                now: false,
            });
        };
        tx.execute_cached(
            "DELETE FROM ingest.upload_parts WHERE upload_id = $1",
            &[&id],
        )
        .await?;
        if state == "expired" {
            let payload = serde_json::json!({
                "upload_id": id,
                "owner_id": owner,
                "received_bytes": session.offset,
            });
            stowage_events::stage(
                &tx,
                crate::SCHEMA,
                stowage_events::topics::UPLOAD_EXPIRED,
                &id.to_string(),
                &payload,
            )
            .await?;
        }
        tx.commit().await?;
        // Ended for good only now: bytes and hold go. Left behind by a crash here, the
        // staging sweep removes the bytes (their row ended) and the hold expires.
        let key = session.key.as_deref().map(ObjectPath::from);
        self.staging
            .discard_all(id, key.as_ref(), session.multipart_id.as_deref(), &parts)
            .await;
        if session.placed
            && let Some(key) = &key
        {
            let _ = self.store.delete(key).await;
        }
        if let Some(reservation) = session.reservation_id {
            self.release(reservation, id).await;
        }
        Ok(Ended {
            session: Session::from_row(&row, self.settings.chunk_size_hint),
            now: true,
        })
    }

    /// Removes objects under `staging/` older than `max_age` whose upload is not live (no row,
    /// or a row that ended); with `dry_run` only lists them. Returns (examined, keys listed
    /// (at most 1000), removed or removable, failures).
    pub async fn sweep_staging(
        &self,
        max_age: Duration,
        dry_run: bool,
    ) -> Result<(u64, Vec<String>, u64, u64)> {
        use futures::TryStreamExt;
        let cutoff = chrono::Utc::now()
            - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::days(1));
        let prefix = ObjectPath::from("staging");
        let objects: Vec<object_store::ObjectMeta> =
            self.store.list(Some(&prefix)).try_collect().await?;
        let examined = objects.len() as u64;
        let mut stale: std::collections::BTreeMap<Option<Uuid>, Vec<ObjectPath>> =
            std::collections::BTreeMap::new();
        for meta in objects.into_iter().filter(|m| m.last_modified < cutoff) {
            let upload = meta
                .location
                .parts()
                .nth(1)
                .and_then(|p| Uuid::parse_str(p.as_ref()).ok());
            stale.entry(upload).or_default().push(meta.location);
        }
        let ids: Vec<Uuid> = stale.keys().flatten().copied().collect();
        let conn = self.pool.get().await?;
        let live: std::collections::HashSet<Uuid> = conn
            .query_cached(
                "SELECT id FROM ingest.uploads WHERE id = ANY($1)
                   AND state IN ('receiving', 'open', 'completing', 'registered')",
                &[&ids],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        drop(conn);
        let (mut keys, mut removed, mut failed) = (Vec::new(), 0, 0);
        for (upload, paths) in stale {
            if upload.is_some_and(|id| live.contains(&id)) {
                continue;
            }
            for path in paths {
                if !dry_run && let Err(error) = self.store.delete(&path).await {
                    failed += 1;
                    tracing::warn!(key = %path, %error, "stale staging object not removed");
                    continue;
                }
                removed += 1;
                if keys.len() < 1000 {
                    keys.push(path.to_string());
                }
            }
        }
        Ok((examined, keys, removed, failed))
    }

    /// Ends open sessions past their expiry (staging removed, reservation released), at most
    /// `limit`; with `dry_run` only lists them. A session lives until the `expires_at` its
    /// client was told, however long nobody writes to it: a tab reopened or a laptop woken
    /// hours later resumes. Safe on any number of replicas (rows being written are skipped).
    /// Returns (examined, ended ids, failures).
    pub async fn sweep_expired(&self, limit: i64, dry_run: bool) -> Result<(u64, Vec<Uuid>, u64)> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_cached(
                "SELECT id, owner_id FROM ingest.uploads
                 WHERE resumable AND state = 'open' AND expires_at < now()
                 ORDER BY expires_at LIMIT $1",
                &[&limit],
            )
            .await?;
        drop(conn);
        let examined = rows.len() as u64;
        let (mut ended, mut failed) = (Vec::new(), 0);
        for row in rows {
            let (id, owner): (Uuid, String) = (row.get(0), row.get(1));
            if dry_run {
                ended.push(id);
                continue;
            }
            match self.end(id, &owner, "expired").await {
                Ok(Ended { now: true, .. }) => ended.push(id),
                // Ended meanwhile (by its owner or another replica's sweep).
                Ok(Ended { now: false, .. }) => {}
                Err(error) => {
                    failed += 1;
                    tracing::warn!(upload_id = %id, %error, "expiry sweep skipped a session");
                }
            }
        }
        if !ended.is_empty() && !dry_run {
            tracing::info!(expired = ended.len(), "expired upload sessions ended");
        }
        Ok((examined, ended, failed))
    }

    /// Finishes completions a crash interrupted (at most `limit`): a session past the point
    /// of no return is completed, never abandoned. Returns how many.
    pub async fn finish_interrupted(&self, limit: i64) -> Result<usize> {
        let mut finished = 0;
        let conn = self.pool.get().await?;
        let stuck = conn
            .query_cached(
                "SELECT id, owner_id FROM ingest.uploads
                 WHERE resumable AND state IN ('completing', 'registered')
                   AND updated_at < now() - interval '1 minute'
                 ORDER BY updated_at LIMIT $1",
                &[&limit],
            )
            .await?;
        drop(conn);
        for row in stuck {
            let (id, owner): (Uuid, String) = (row.get(0), row.get(1));
            match self.finish(id, &owner).await {
                Ok(_) => finished += 1,
                Err(error) => {
                    tracing::warn!(upload_id = %id, %error, "could not finish an interrupted completion")
                }
            }
        }
        if finished > 0 {
            tracing::info!(finished, "interrupted upload completions finished");
        }
        Ok(finished)
    }
}
