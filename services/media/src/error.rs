use stowage_runtime::status::{database_failed, dependency_failed};
use tonic::Status;

/// What can go wrong in Media's API.
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
    /// No such job or quarantined file.
    #[error("{0} not found")]
    NotFound(String),
    /// The object is not in a state that allows the call.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The job queue failed.
    #[error("job queue: {0}")]
    Jobs(#[from] stowage_jobs::Error),
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection available.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
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
            Error::NotFound(_) => Status::not_found(error.to_string()),
            Error::FailedPrecondition(why) => Status::failed_precondition(why),
            Error::Jobs(stowage_jobs::Error::JobNotFound(_)) => {
                Status::not_found(error.to_string())
            }
            Error::Jobs(stowage_jobs::Error::NotRequeueable { .. }) => {
                Status::failed_precondition(error.to_string())
            }
            Error::Jobs(stowage_jobs::Error::Invalid { field, reason }) => {
                stowage_runtime::status::invalid_argument(field, reason)
            }
            Error::Jobs(ref e) => dependency_failed("job queue", e),
            Error::Db(ref e) => database_failed("media database", e),
            Error::Pool(ref e) => database_failed("media database", e),
            Error::Peer(status) => status,
        }
    }
}

/// Result of Media operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
