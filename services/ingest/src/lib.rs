//! Ingest: uploads (one-shot, resumable sessions over gRPC, grpc-web and tus) and event
//! streams.

mod error;
mod grpc;
mod links;
mod oneshot;
mod sessions;
mod sniff;
mod staging;
pub mod streams;
mod tus;
mod uploads;

pub use error::{Error, Result};
pub use grpc::IngestGrpc;
pub use links::{MAX_LINK_SECONDS, UploadLinks};
pub use oneshot::{TOUCH_EVERY_MAX, Uploader};
pub use sessions::{Checksum, ChunkIn, ChunkStream, Meta, Session, SessionSettings, Sessions};
pub use sniff::{AllowedTypes, Registration, Sniffed, sniff};
pub use staging::{MIN_NATIVE_PART, Staging};
pub use streams::{EventStreams, StreamSettings};
pub use tus::routes as tus_routes;
pub use uploads::Uploads;

/// Name of the schema Ingest owns.
pub const SCHEMA: &str = "ingest";

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies Ingest's migrations.
pub async fn migrate(pool: &stowage_db::PgPool) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate(pool, SCHEMA, migrations()).await
}

/// Ingest's migrations, for [`stowage_db::migrate`]: a test of an upgrade applies those of an
/// earlier release (`set_target`), writes rows as it did, and starts the service on them.
pub fn migrations() -> stowage_db::MigrationRunner {
    embedded::migrations::runner()
}
