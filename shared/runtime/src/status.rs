//! Helpers that build the gRPC statuses every service returns for bad input.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// INVALID_ARGUMENT naming `field`, with a `google.rpc.BadRequest` detail.
pub fn invalid_argument(field: &str, why: impl std::fmt::Display) -> Status {
    let description = why.to_string();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

/// Parses a UUID field, naming it when it is not one.
pub fn parse_uuid(field: &str, value: &str) -> Result<uuid::Uuid, Status> {
    if value.is_empty() {
        return Err(invalid_argument(field, "is required"));
    }
    uuid::Uuid::parse_str(value).map_err(|_| invalid_argument(field, "is not a valid id"))
}

/// An optional time field, naming it when it is out of range.
pub fn parse_time(
    field: &str,
    value: Option<&prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, Status> {
    value
        .map(|at| {
            crate::time::from_timestamp(at)
                .ok_or_else(|| invalid_argument(field, "not a valid time"))
        })
        .transpose()
}

/// Checks a page size, applying `default` for 0 and refusing values above `max`.
pub fn page_size(value: u32, default: u32, max: u32) -> Result<i64, Status> {
    match value {
        0 => Ok(i64::from(default)),
        v if v > max => Err(invalid_argument(
            "page_size",
            format!("must be at most {max}"),
        )),
        v => Ok(i64::from(v)),
    }
}

/// UNAVAILABLE for a dependency that failed. The detail goes to the log, never to the caller.
pub fn dependency_failed(what: &'static str, error: &dyn std::fmt::Debug) -> Status {
    tracing::error!(?error, what, "dependency failed");
    Status::unavailable(format!("{what} unavailable"))
}

/// The code for a database error, found anywhere in `error`'s chain (a pool's error wraps the
/// connection's): UNAVAILABLE when the database could not answer or gave up for a reason of
/// the moment (connection lost, shutting down, out of resources, a deadlock, a lock or
/// statement timeout, a read-only replica: a retry may pass); INTERNAL when it answered and
/// refused the statement itself (bad data, a broken constraint, a statement it cannot run: the
/// same call fails again).
pub fn database_code(error: &(dyn std::error::Error + 'static)) -> Code {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(e) = e.downcast_ref::<deadpool_postgres::tokio_postgres::Error>()
            && let Some(state) = e.code()
        {
            let state = state.code();
            let transient = matches!(
                state.get(..2).unwrap_or_default(),
                "08" | "40" | "53" | "57" | "58"
            ) || matches!(state, "25006" | "25P03" | "55006" | "55P03");
            return if transient {
                Code::Unavailable
            } else {
                Code::Internal
            };
        }
        cause = e.source();
    }
    // No answer from the database at all (a closed connection, a pool out of connections).
    Code::Unavailable
}

/// The status for a database error, as [`database_code`] classes it. The detail goes to the
/// log, never to the caller.
pub fn database_failed(what: &'static str, error: &(dyn std::error::Error + 'static)) -> Status {
    if database_code(error) == Code::Unavailable {
        return dependency_failed(what, &error);
    }
    tracing::error!(?error, what, "the database refused a statement");
    Status::internal(format!("{what} failed"))
}

/// Whether a call that failed with `code` may pass if made again as it was: the callee could
/// not answer, or the answer was lost. (What it did before failing is then unknown too.)
pub fn retry_may_pass(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}
