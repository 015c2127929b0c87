use stowage_runtime::status::{database_failed, dependency_failed};
use tonic::Status;

/// What can go wrong in Files.
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
    /// A byte range starts past the end of the object.
    #[error("range.offset: {offset} is past the end of the object ({size} bytes)")]
    RangeNotSatisfiable {
        /// Requested offset.
        offset: u64,
        /// Object size.
        size: u64,
    },
    /// No such file for this caller (also: another user's file).
    #[error("file not found")]
    NotFound,
    /// No such variant of the file.
    #[error("variant {0:?} not found")]
    VariantNotFound(String),
    /// The file is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(&'static str),
    /// A registration conflicts with an existing file through this field (`file_id`,
    /// `idempotency_key` or `storage_key`).
    #[error("{0}: already registered to another file")]
    AlreadyExists(&'static str),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection available.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// Another service failed.
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
            Error::RangeNotSatisfiable { .. } => Status::out_of_range(error.to_string()),
            Error::NotFound | Error::VariantNotFound(_) => Status::not_found(error.to_string()),
            Error::FailedPrecondition(why) => Status::failed_precondition(why),
            Error::AlreadyExists(_) => Status::already_exists(error.to_string()),
            Error::Db(ref e) => database_failed("file metadata", e),
            Error::Pool(ref e) => database_failed("file metadata", e),
            Error::Store(object_store::Error::NotFound { ref path, .. }) => {
                tracing::error!(path, "blob of a registered file is missing");
                Status::data_loss("the file's bytes are missing from the store")
            }
            Error::Store(ref e) => dependency_failed("object store", e),
            Error::Peer(status) => status,
        }
    }
}

/// Result of Files operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
