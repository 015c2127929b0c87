//! Upload rows in Ingest's schema.

use stowage_db::PgPool;
use uuid::Uuid;

use crate::error::Result;

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

/// Upload rows.
#[derive(Clone, Debug)]
pub struct Uploads {
    pool: PgPool,
}

impl Uploads {
    /// Rows over `pool`.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Starts a row in state `receiving`; with an idempotency key already used, returns the
    /// existing row instead (and `false`).
    pub async fn start(
        &self,
        owner: &str,
        key: Option<&str>,
        declared_size: u64,
        display_name: &str,
    ) -> Result<(UploadRow, bool)> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt(
                "INSERT INTO ingest.uploads (id, owner_id, idempotency_key, state, declared_size, file_id, display_name)
                 VALUES ($1, $2, $3, 'receiving', $4, $5, $6)
                 ON CONFLICT (owner_id, idempotency_key) DO NOTHING
                 RETURNING id, state, file_id",
                &[
                    &Uuid::now_v7(),
                    &owner,
                    &key,
                    &i64::try_from(declared_size).unwrap_or(i64::MAX),
                    &Uuid::now_v7(),
                    &display_name,
                ],
            )
            .await?;
        if let Some(row) = row {
            return Ok((
                UploadRow {
                    id: row.get(0),
                    state: row.get(1),
                    file_id: row.get(2),
                },
                true,
            ));
        }
        let row = conn
            .query_one(
                "SELECT id, state, file_id FROM ingest.uploads WHERE owner_id = $1 AND idempotency_key = $2",
                &[&owner, &key],
            )
            .await?;
        Ok((
            UploadRow {
                id: row.get(0),
                state: row.get(1),
                file_id: row.get(2),
            },
            false,
        ))
    }

    /// Records the reservation that holds the upload's quota.
    pub async fn set_reservation(&self, id: Uuid, reservation: Uuid) -> Result<()> {
        let conn = self.pool.get().await?;
        conn.execute(
            "UPDATE ingest.uploads SET reservation_id = $2, updated_at = now() WHERE id = $1",
            &[&id, &reservation],
        )
        .await?;
        Ok(())
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
        conn.execute(
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

    /// Deletes a row that never held quota or bytes.
    pub async fn forget(&self, id: Uuid) -> Result<()> {
        let conn = self.pool.get().await?;
        conn.execute(
            "DELETE FROM ingest.uploads WHERE id = $1 AND state = 'receiving' AND reservation_id IS NULL",
            &[&id],
        )
        .await?;
        Ok(())
    }
}
