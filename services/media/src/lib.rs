//! Media: thumbnails, previews, video posters, media metadata and antivirus with quarantine.
//!
//! Media hears `file.created` through its consumer group and enqueues one `media.process`
//! job per file in processing in its own PostgreSQL queue (schema `media`); files it has no
//! work for are registered ready by Ingest (`stowage_blob::plan`) and get no job. A worker scans the bytes when a
//! scanner is configured, decodes within limits off the async runtime (images in process,
//! video and audio with ffprobe / ffmpeg as bounded subprocesses), stores the variants under
//! the owner's `variants/` prefix and hands them to `Files.SetVariants` with the file's final
//! status, then announces `media.ready`, `media.failed` or `media.quarantined`. Files that
//! scanned clean are scanned again when the scanner's signatures change ([`rescan`]).

pub mod clamd;
mod consumer;
mod error;
mod grpc;
pub mod imaging;
mod process;
pub mod rescan;
pub mod video;

pub use consumer::FileEvents;
pub use error::{Error, Result};
pub use grpc::MediaGrpc;
pub use process::{Media, MediaSettings, variant_key};
pub use stowage_blob::plan::{Plan, plan};

/// Name of the schema Media owns.
pub const SCHEMA: &str = "media";
/// Kind of the job that processes one file.
pub const PROCESS_JOB: &str = "media.process";
/// Consumer group Media reads file events with.
pub const CONSUMER_GROUP: &str = "media";

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies Media's migrations: its own tables and the job queue's.
pub async fn migrate(pool: &stowage_db::PgPool) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate(pool, SCHEMA, embedded::migrations::runner()).await?;
    stowage_jobs::migrate(pool, SCHEMA).await
}

/// The unique key of the job that processes `file_id`.
pub fn job_key(file_id: &uuid::Uuid) -> String {
    format!("process:{file_id}")
}
