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

/// The status for a PostgreSQL error: UNAVAILABLE when the database could not answer
/// (connection lost, shutting down, out of resources: a retry may pass), INTERNAL when it
/// answered and refused the statement (bad data, a broken constraint, a statement it cannot
/// run: the same call would fail again). The detail goes to the log, never to the caller.
pub fn database_failed(
    what: &'static str,
    error: &deadpool_postgres::tokio_postgres::Error,
) -> Status {
    let refused = error.code().is_some_and(|code| {
        let class = code.code().get(..2).unwrap_or_default();
        matches!(class, "0A" | "21" | "22" | "23" | "2F" | "42" | "P0" | "XX")
    });
    if !refused {
        return dependency_failed(what, error);
    }
    tracing::error!(?error, what, "the database refused a statement");
    Status::internal(format!("{what} failed"))
}
