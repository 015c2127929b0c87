use stowage_runtime::status::{database_failed, dependency_failed};
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

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
    /// The file's content (sniffed from its first bytes) is of a type the deployment does not
    /// take (`STOWAGE_INGEST__ALLOWED_TYPES`).
    #[error("{field}: the content is {mime}; this deployment takes {allowed}")]
    TypeNotAllowed {
        /// Field that carried the first bytes.
        field: &'static str,
        /// What the bytes are.
        mime: String,
        /// The types taken, as configured.
        allowed: String,
    },
    /// With content types restricted, a session's first chunk is too short to tell its type.
    #[error(
        "chunk.data: a first chunk carries at least {needed} bytes (or the whole file) while content types are restricted"
    )]
    FirstChunkTooShort {
        /// Bytes the type is decided by.
        needed: usize,
    },
    /// An upload with the same idempotency key is still running.
    #[error("an upload with this idempotency_key is in progress")]
    InProgress,
    /// The process is shutting down.
    #[error("server is shutting down; retry the upload")]
    ShuttingDown,
    /// No such session for this caller.
    #[error("upload session not found")]
    SessionNotFound,
    /// Another writer holds the session right now.
    #[error("another writer is writing this session; read its offset with GetUpload and retry")]
    Busy,
    /// Every subscription this process serves at once is taken.
    #[error("this process already serves {0} subscriptions, its most; retry later")]
    TooManySubscriptions(usize),
    /// The caller has as many sessions of unknown length open as one user may.
    #[error(
        "you already have {0} uploads of unknown length open, the most one user may; complete or abort one"
    )]
    TooManyOpenUploads(usize),
    /// The local-disk store has not the room for the upload and the space it keeps free
    /// (the figures are logged, not told to the caller).
    #[error("the store is short of free space for {needed} more bytes; try again later")]
    StoreFull { needed: u64 },
    /// The caller has as many subscriptions open as one user may.
    #[error(
        "you already have {0} subscriptions open in this process, the most one user may; close one or retry later"
    )]
    TooManyOwnSubscriptions(usize),
    /// The session is not open.
    #[error("session is {0}")]
    SessionState(String),
    /// A chunk not at the session's offset.
    #[error("chunk.offset: expected {expected}, got {got}")]
    WrongOffset {
        /// The session's offset.
        expected: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// A chunk whose checksum does not match its bytes.
    #[error("chunk checksum does not match its bytes")]
    ChecksumMismatch,
    /// Complete before all bytes arrived.
    #[error("upload incomplete: {received} of {size} bytes received")]
    Incomplete {
        /// Bytes received.
        received: u64,
        /// Declared size.
        size: u64,
    },
    /// A broken invariant.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// No such event stream or batch for this caller.
    #[error("not found")]
    NotFound,
    /// A frame that does not follow the stream's durable seq.
    #[error("first_seq: expected {expected} (the stream's durable seq + 1); re-send from there")]
    SeqGap {
        /// The seq the stream expects next.
        expected: u64,
    },
    /// Stored data that does not decode.
    #[error("corrupt data: {0}")]
    Corrupt(String),
    /// A write that could not be made durable; the client re-sends.
    #[error("not stored, re-send: {0}")]
    Unavailable(String),
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
    /// The field and reason of a refusal of what a file's bytes are (its type, or too few
    /// bytes to tell it), as the message says them: `None` for other errors.
    pub(crate) fn content_refusal(&self) -> Option<(&'static str, String)> {
        let field = match self {
            Error::TypeNotAllowed { field, .. } => *field,
            Error::FirstChunkTooShort { .. } => "chunk.data",
            _ => return None,
        };
        let message = self.to_string();
        let reason = message
            .strip_prefix(field)
            .and_then(|r| r.strip_prefix(": "))
            .unwrap_or(&message);
        Some((field, reason.to_owned()))
    }

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
            Error::TypeNotAllowed { .. } | Error::FirstChunkTooShort { .. } => {
                let (field, reason) = error.content_refusal().unwrap_or_default();
                stowage_runtime::status::invalid_argument(field, reason)
            }
            Error::InProgress => Status::aborted(error.to_string()),
            Error::ShuttingDown => Status::unavailable(error.to_string()),
            Error::Stream(status) => status,
            Error::SessionNotFound => Status::not_found(error.to_string()),
            Error::Busy => Status::aborted(error.to_string()),
            Error::TooManySubscriptions(_)
            | Error::TooManyOwnSubscriptions(_)
            | Error::TooManyOpenUploads(_)
            | Error::StoreFull { .. } => Status::resource_exhausted(error.to_string()),
            Error::SessionState(_) | Error::Incomplete { .. } => {
                Status::failed_precondition(error.to_string())
            }
            Error::WrongOffset { expected, .. } => {
                let mut status = Status::with_error_details(
                    tonic::Code::FailedPrecondition,
                    error.to_string(),
                    ErrorDetails::with_precondition_failure_violation(
                        "OFFSET",
                        "chunk.offset",
                        format!("the session's offset is {expected}"),
                    ),
                );
                if let Ok(v) = expected.to_string().parse() {
                    status.metadata_mut().insert("upload-offset", v);
                }
                status
            }
            Error::ChecksumMismatch => stowage_runtime::status::invalid_argument(
                "chunk.sha256",
                "does not match the chunk's bytes",
            ),
            Error::NotFound => Status::not_found(error.to_string()),
            Error::SeqGap { expected } => {
                let mut status = Status::failed_precondition(error.to_string());
                if let Ok(v) = expected.to_string().parse() {
                    status.metadata_mut().insert("expected-seq", v);
                }
                status
            }
            Error::Corrupt(ref why) => {
                tracing::error!(why, "stored event data does not decode");
                Status::data_loss("stored events do not decode")
            }
            Error::Unavailable(_) => Status::unavailable(error.to_string()),
            Error::Internal(why) => {
                tracing::error!(why, "ingest invariant broken");
                Status::internal("internal error")
            }
            Error::Db(ref e) => database_failed("upload storage", e),
            Error::Pool(ref e) => database_failed("upload storage", e),
            Error::Store(ref e) => dependency_failed("object store", e),
            Error::Peer(status) => status,
        }
    }
}

/// Result of Ingest operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
