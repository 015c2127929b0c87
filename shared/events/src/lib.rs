//! Events between Stowage services, exactly once in effect.
//!
//! A producer writes an event into its own schema's `outbox` in the transaction that makes the
//! change ([`stage`]); a [`Relay`] publishes unpublished rows to Redis Streams (one stream per
//! topic) and marks them sent. Consumers read through consumer groups ([`Consumer`]), apply
//! each event in a PostgreSQL transaction that also records its id (duplicates are skipped),
//! then acknowledge; deliveries left pending by a crashed consumer are claimed by another, and
//! an event that keeps failing is set aside as a dead letter after its last attempt.
//!
//! Redis holds nothing that cannot be rebuilt. The relay records where each event went and
//! marks it settled once every group has acknowledged it; streams are trimmed to what some
//! group still needs. When Redis has lost its data (a restart without persistence, a failover
//! to a replica that lagged, a restart from an older snapshot) or cut entries a group had not
//! read, the relay publishes again what was not settled (and, after a restart, everything
//! within the replay window), and the consumers' dedupe turns the repeats into no-ops.

mod consumer;
mod event;
mod outbox;
mod relay;
mod settle;

pub use consumer::{Consumer, ConsumerSettings, EventHandler, HandlerError};
pub use event::{DEFAULT_NAMESPACE, Event, stream_key};
pub use outbox::{StageParams, stage, stage_ctes};
pub use relay::{Relay, RelayError, RelaySettings};
pub use settle::Settled;

/// Topics published by Stowage services.
pub mod topics {
    /// A file was registered (Files).
    pub const FILE_CREATED: &str = "file.created";
    /// A file went to the trash (Files).
    pub const FILE_DELETED: &str = "file.deleted";
    /// A file came back from the trash (Files).
    pub const FILE_RESTORED: &str = "file.restored";
    /// A file and its bytes were removed for good (Files).
    pub const FILE_PURGED: &str = "file.purged";
    /// A file was downloaded (Files; at most one per owner and minute per process), as
    /// activity.
    pub const FILE_DOWNLOADED: &str = "file.downloaded";
    /// An upload session completed (Ingest).
    pub const UPLOAD_COMPLETED: &str = "upload.completed";
    /// An upload session expired or was abandoned (Ingest).
    pub const UPLOAD_EXPIRED: &str = "upload.expired";
    /// A window of an event stream was sealed into a batch (Ingest): subscribers may fetch it.
    pub const BATCH_SEALED: &str = "batch.sealed";
    /// An account's usage crossed a notice threshold (Quota).
    pub const QUOTA_THRESHOLD_CROSSED: &str = "quota.threshold_crossed";
    /// An admin set an account's limit (Quota): `user_id`, `limit_bytes`,
    /// `previous_limit_bytes` (null for a new account), `admin`.
    pub const QUOTA_LIMIT_SET: &str = "quota.limit_set";
    /// A file's derivatives are ready (Media).
    pub const MEDIA_READY: &str = "media.ready";
    /// A file could not be processed (Media).
    pub const MEDIA_FAILED: &str = "media.failed";
    /// A file was quarantined by the scanner (Media).
    pub const MEDIA_QUARANTINED: &str = "media.quarantined";
    /// An admin released a quarantined file (Media): `file_id`, `owner_id`, `admin`.
    pub const MEDIA_QUARANTINE_RELEASED: &str = "media.quarantine_released";
    /// A user's storage was measured after their files changed (Lifecycle's debounced
    /// recheck, at most one per user every 10 s): bytes stored, charged and held.
    pub const USAGE_MEASURED: &str = "usage.measured";
}

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Creates (or brings up to date) the outbox and the consumer dedupe table in `schema`.
pub async fn migrate(pool: &stowage_db::PgPool, schema: &str) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate_with_history(
        pool,
        schema,
        embedded::migrations::runner(),
        "events_schema_history",
    )
    .await
}
