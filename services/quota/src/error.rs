use stowage_runtime::status::database_failed;
use tonic::Status;

/// What can go wrong in Quota.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing or out of range.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Field name as in the proto.
        field: &'static str,
        /// Why it is refused.
        reason: String,
    },
    /// Not enough quota left.
    #[error("quota exceeded: {requested} bytes requested, {available} available")]
    Exhausted {
        /// Bytes asked for.
        requested: u64,
        /// Bytes left under the limit.
        available: u64,
    },
    /// No such reservation.
    #[error("reservation not found")]
    ReservationNotFound,
    /// The reservation is in a state that does not allow the call.
    #[error("reservation is {0}")]
    WrongState(String),
    /// The account moved since the caller looked at it.
    #[error("{0}")]
    Moved(String),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection available.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<Error> for Status {
    fn from(error: Error) -> Self {
        match error {
            Error::InvalidArgument { field, reason } => {
                stowage_runtime::status::invalid_argument(field, reason)
            }
            Error::Exhausted { .. } => Status::resource_exhausted(error.to_string()),
            Error::ReservationNotFound => Status::not_found(error.to_string()),
            Error::WrongState(_) => Status::failed_precondition(error.to_string()),
            Error::Moved(_) => Status::aborted(error.to_string()),
            Error::Db(ref e) => database_failed("quota storage", e),
            Error::Pool(ref e) => database_failed("quota storage", e),
        }
    }
}

/// Result of Quota operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
