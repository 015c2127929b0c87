//! The error of every queue operation.

use uuid::Uuid;

use crate::JobState;

/// Errors of the queue, its workers and its schedules.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection could be taken from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A value given to the queue is out of range; `field` names it.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The configuration field or argument at fault.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// No job has this id or key.
    #[error("job {0} not found")]
    JobNotFound(String),
    /// The job is queued or running, so there is nothing to requeue.
    #[error("job {id} is {state} and cannot be requeued")]
    NotRequeueable {
        /// The job.
        id: Uuid,
        /// Its current state.
        state: JobState,
    },
    /// No schedule has this name.
    #[error("schedule {0} not found")]
    ScheduleNotFound(String),
    /// A row holds a value this version does not understand (a newer version wrote it, or
    /// someone edited the table by hand).
    #[error("unexpected {column} in the jobs tables: {value}")]
    Corrupt {
        /// The column.
        column: &'static str,
        /// What it held.
        value: String,
    },
}

impl Error {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
