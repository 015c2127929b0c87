//! Files: file metadata (list, filter, sort, keyset pages, tags, favourites, trash),
//! downloads with byte ranges, signed URLs and storage statistics.

mod catalog;
mod download;
mod error;
mod grpc;
mod model;

pub use catalog::{Catalog, Cursor, ListQuery, NewFile, SortField, Viewer};
pub use download::{UrlSigner, resolve_range, routes as http_routes};
pub use error::{Error, Result};
pub use grpc::FilesGrpc;
pub use model::{FileRecord, FileStatus, Kind, VariantRecord};

/// Name of the schema Files owns.
pub const SCHEMA: &str = "files";

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies Files' migrations.
pub async fn migrate(pool: &stowage_db::PgPool) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate(pool, SCHEMA, embedded::migrations::runner()).await
}
