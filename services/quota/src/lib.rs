//! Quota: per-user limits and usage, reserve / commit / release, admin views and repair.
//!
//! Usage only moves through this service: an upload reserves bytes first (a single
//! conditional `UPDATE` that can never take an account over its limit, however many
//! reservations race), commits its real size once, or releases the hold. Every change of usage
//! is one row of an append-only ledger keyed by an idempotency key, so retries never count
//! twice.

mod accounts;
mod error;
mod grpc;

pub use accounts::{Account, Reservation, ReservationState, Stats};
pub use error::{Error, Result};
pub use grpc::QuotaGrpc;

/// Name of the schema Quota owns.
pub const SCHEMA: &str = "quota";

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies Quota's migrations.
pub async fn migrate(pool: &stowage_db::PgPool) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate(pool, SCHEMA, embedded::migrations::runner()).await
}

pub use accounts::Quota;
