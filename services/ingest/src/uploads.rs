//! Upload rows in Ingest's schema.

use std::sync::LazyLock;

use stowage_db::{Cached, GenericClient, PgPool};
use stowage_events::StageParams;
use uuid::Uuid;

use crate::error::Result;

/// An upload's completion in one statement: the row turns `completed` and, if it was not
/// already, `upload.completed` is staged (upload and file ids, owner, size, SHA-256).
/// `$1` id, `$2` size, `$3` SHA-256 (or null); `$4`-`$6` are [`StageParams`]'.
static COMPLETE_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH done AS (
             UPDATE ingest.uploads
             SET state = 'completed', received_bytes = $2, failure = NULL, updated_at = now()
             WHERE id = $1 AND state <> 'completed'
             RETURNING id, owner_id, file_id),
         event AS (
             SELECT id::text AS key,
                    jsonb_build_object('upload_id', id, 'owner_id', owner_id,
                                       'file_id', file_id::text, 'size_bytes', $2::bigint,
                                       'sha256', $3::text) AS payload
             FROM done),
         {}
         SELECT count(*) FROM notified",
        stowage_events::stage_ctes(crate::SCHEMA, "event", 4)
    )
});

/// Marks upload `id` (one-shot or session) completed on `conn` and, the first time, stages its
/// `upload.completed` event in the same statement; a second call changes and stages nothing.
pub(crate) async fn mark_completed(
    conn: &impl GenericClient,
    id: Uuid,
    size: u64,
    sha256: Option<&str>,
) -> Result<()> {
    let notice = StageParams::new(crate::SCHEMA, stowage_events::topics::UPLOAD_COMPLETED);
    conn.query_one_cached(
        &COMPLETE_SQL,
        &[
            &id,
            &i64::try_from(size).unwrap_or(i64::MAX),
            &sha256,
            &notice.topic,
            &notice.traceparent,
            &notice.channel,
        ],
    )
    .await?;
    Ok(())
}

/// An upload as recorded.
#[derive(Clone, Debug)]
pub struct UploadRow {
    /// Upload id.
    pub id: Uuid,
    /// State name.
    pub state: String,
    /// File id, chosen at start.
    pub file_id: Uuid,
}

fn upload_row(row: &tokio_postgres::Row) -> UploadRow {
    UploadRow {
        id: row.get(0),
        state: row.get(1),
        file_id: row.get(2),
    }
}

/// Upload rows.
#[derive(Clone, Debug)]
pub struct Uploads {
    pool: PgPool,
}

/// A one-shot upload about to receive its bytes.
pub struct NewUpload<'a> {
    /// The upload's id.
    pub id: Uuid,
    /// Whose it is.
    pub owner: &'a str,
    /// The client's idempotency key, if it gave one.
    pub idempotency_key: Option<&'a str>,
    /// The size its header declared.
    pub declared_size: u64,
    /// Its file's name.
    pub display_name: &'a str,
    /// The quota hold it has.
    pub reservation: Uuid,
    /// The file it becomes.
    pub file_id: Uuid,
    /// Where its bytes go: recorded from the start, so that a crash from here on leaves a key
    /// the sweeper can remove.
    pub storage_key: &'a str,
}

impl Uploads {
    /// Rows over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Starts `upload`'s row in state `receiving`; with an idempotency key already used,
    /// returns the existing row instead (and `false`).
    pub async fn start(&self, upload: NewUpload<'_>) -> Result<(UploadRow, bool)> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt_cached(
                "INSERT INTO ingest.uploads
                     (id, owner_id, idempotency_key, state, declared_size, file_id, display_name, reservation_id, storage_key)
                 VALUES ($1, $2, $3, 'receiving', $4, $5, $6, $7, $8)
                 ON CONFLICT (owner_id, idempotency_key) DO NOTHING
                 RETURNING id, state, file_id",
                &[
                    &upload.id,
                    &upload.owner,
                    &upload.idempotency_key,
                    &i64::try_from(upload.declared_size).unwrap_or(i64::MAX),
                    &upload.file_id,
                    &upload.display_name,
                    &upload.reservation,
                    &upload.storage_key,
                ],
            )
            .await?;
        if let Some(row) = row {
            return Ok((upload_row(&row), true));
        }
        let row = conn
            .query_one_cached(
                "SELECT id, state, file_id FROM ingest.uploads WHERE owner_id = $1 AND idempotency_key = $2",
                &[&upload.owner, &upload.idempotency_key],
            )
            .await?;
        Ok((upload_row(&row), false))
    }

    /// Which of `keys` an unfinished upload names (a one-shot upload receiving or registered,
    /// a session open or completing).
    pub async fn keys_in_use(&self, keys: &[String]) -> Result<Vec<String>> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_cached(
                "SELECT DISTINCT storage_key FROM ingest.uploads
                 WHERE storage_key = ANY($1)
                   AND state IN ('receiving', 'registered', 'open', 'completing')",
                &[&keys],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The upload that used idempotency key `key` of `owner`, if any.
    pub async fn find(&self, owner: &str, key: &str) -> Result<Option<UploadRow>> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt_cached(
                "SELECT id, state, file_id FROM ingest.uploads WHERE owner_id = $1 AND idempotency_key = $2",
                &[&owner, &key],
            )
            .await?;
        Ok(row.as_ref().map(upload_row))
    }

    /// Moves the upload to `state`, with the key, byte count and failure when known.
    pub async fn set_state(
        &self,
        id: Uuid,
        state: &str,
        storage_key: Option<&str>,
        received: u64,
        failure: Option<&str>,
    ) -> Result<()> {
        let conn = self.pool.get().await?;
        conn.execute_cached(
            "UPDATE ingest.uploads
             SET state = $2, storage_key = COALESCE($3, storage_key), received_bytes = $4,
                 failure = $5, updated_at = now()
             WHERE id = $1",
            &[
                &id,
                &state,
                &storage_key,
                &i64::try_from(received).unwrap_or(i64::MAX),
                &failure,
            ],
        )
        .await?;
        Ok(())
    }

    /// Marks a one-shot upload completed and, the first time, stages its `upload.completed`
    /// event in the same statement (see `mark_completed`).
    pub async fn complete(&self, id: Uuid, size: u64, sha256: Option<&str>) -> Result<()> {
        let conn = self.pool.get().await?;
        mark_completed(&conn, id, size, sha256).await
    }

    /// Marks a one-shot upload still receiving as alive, so that no sweeper claims it.
    pub async fn touch(&self, id: Uuid) -> Result<()> {
        let conn = self.pool.get().await?;
        conn.execute_cached(
            "UPDATE ingest.uploads SET updated_at = now() WHERE id = $1 AND state = 'receiving'",
            &[&id],
        )
        .await?;
        Ok(())
    }

    /// Claims one-shot uploads left `receiving` or `registered` for longer than `older_than`
    /// (their process died), at most 100 per call. Claiming only moves `updated_at`, so no
    /// other sweeper takes them for `older_than`; their state changes once the sweeper knows
    /// whether the file was registered (a row is never marked failed while its file exists).
    pub async fn claim_abandoned(&self, older_than: std::time::Duration) -> Result<Vec<Abandoned>> {
        let conn = self.pool.get().await?;
        let rows = conn
            .query_cached(
                "UPDATE ingest.uploads u
                 SET updated_at = now()
                 FROM (SELECT id FROM ingest.uploads
                       WHERE NOT resumable AND state IN ('receiving', 'registered')
                         AND updated_at < now() - make_interval(secs => $1)
                       ORDER BY updated_at LIMIT 100 FOR UPDATE SKIP LOCKED) old
                 WHERE u.id = old.id
                 RETURNING u.id, u.state, u.reservation_id, u.storage_key, u.received_bytes, u.file_id",
                &[&older_than.as_secs_f64()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| Abandoned {
                id: r.get(0),
                state: r.get(1),
                reservation_id: r.get(2),
                storage_key: r.get(3),
                received: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                file_id: r.get(5),
            })
            .collect())
    }
}

/// A one-shot upload whose process died.
#[derive(Clone, Debug)]
pub struct Abandoned {
    /// Upload id.
    pub id: Uuid,
    /// State it was left in.
    pub state: String,
    /// Its reservation.
    pub reservation_id: Option<Uuid>,
    /// Key it was writing, if it got that far.
    pub storage_key: Option<String>,
    /// Bytes registered (for `registered` rows).
    pub received: u64,
    /// The file it was creating.
    pub file_id: Uuid,
}
