use stowage_runtime::status::dependency_failed;
use tonic::Status;

/// What can go wrong in Ingest.
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
    /// An upload with the same idempotency key is still running.
    #[error("an upload with this idempotency_key is in progress")]
    InProgress,
    /// The process is shutting down.
    #[error("server is shutting down; retry the upload")]
    ShuttingDown,
    /// The client's stream broke.
    #[error("upload stream broken: {0}")]
    Stream(Status),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection available.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Another service refused or failed (its status is passed on).
    #[error("{0}")]
    Peer(#[from] Status),
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
            Error::InProgress => Status::aborted(error.to_string()),
            Error::ShuttingDown => Status::unavailable(error.to_string()),
            Error::Stream(status) => status,
            Error::Db(ref e) => dependency_failed("upload storage", e),
            Error::Pool(ref e) => dependency_failed("upload storage", e),
            Error::Store(ref e) => dependency_failed("object store", e),
            Error::Peer(status) => status,
        }
    }
}

/// Result of Ingest operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
