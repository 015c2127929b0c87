//! Ingest: uploads (one-shot now; resumable sessions and tus next) and event streams.

mod error;
mod grpc;
mod oneshot;
mod sniff;
mod uploads;

pub use error::{Error, Result};
pub use grpc::IngestGrpc;
pub use oneshot::Uploader;
pub use sniff::{Sniffed, sniff};
pub use uploads::Uploads;

/// Name of the schema Ingest owns.
pub const SCHEMA: &str = "ingest";

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies Ingest's migrations.
pub async fn migrate(pool: &stowage_db::PgPool) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate(pool, SCHEMA, embedded::migrations::runner()).await
}
