//! Jobs as the queue stores them and as callers describe new ones.

use std::{fmt, str::FromStr};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_postgres::Row;
use uuid::Uuid;

use crate::Error;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobState {
    /// Waiting for its `run_at`, or for a worker.
    Queued,
    /// Claimed by a worker until `locked_until`.
    Running,
    /// Done.
    Succeeded,
    /// An attempt failed; waiting for `run_at` after backoff to be tried again.
    Failed,
    /// Out of attempts, or failed for good: waits for an operator.
    Dead,
}

impl JobState {
    /// Whether a job in this state is over and may be queued again (`Queue::requeue`):
    /// succeeded, failed or dead, not queued or running.
    pub fn is_requeueable(self) -> bool {
        match self {
            Self::Succeeded | Self::Failed | Self::Dead => true,
            Self::Queued | Self::Running => false,
        }
    }

    /// Whether a job in this state is over: succeeded or dead. A failed job is not: it waits
    /// for its next attempt.
    pub fn is_over(self) -> bool {
        matches!(self, Self::Succeeded | Self::Dead)
    }

    /// Every state, in lifecycle order.
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Dead,
    ];

    /// The name stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Dead => "dead",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is none of [`JobState`]'s.
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for JobState {
    type Err = UnknownState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// A job as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    /// Identifier (UUID v7, so ids sort by creation).
    pub id: Uuid,
    /// Which handler runs it.
    pub kind: String,
    /// Unique key: enqueueing a second job with it returns this one.
    pub key: String,
    /// What the handler needs.
    pub payload: serde_json::Value,
    /// Where it is in its life.
    pub state: JobState,
    /// Attempts started so far, the running one included.
    pub attempts: u32,
    /// Attempts allowed before it is dead.
    pub max_attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
    /// When it may run (for a failed job: when it is retried).
    pub run_at: DateTime<Utc>,
    /// While running: when the claim lapses and another worker may take the job.
    pub locked_until: Option<DateTime<Utc>>,
    /// While running: the worker that holds it.
    pub locked_by: Option<String>,
    /// W3C `traceparent` of whoever enqueued it, so its run can join that trace.
    pub traceparent: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When its row last changed.
    pub updated_at: DateTime<Utc>,
}

/// Columns [`Job::from_row`] reads, in a form that fits a `SELECT` or `RETURNING` list.
pub(crate) const JOB_COLUMNS: &str = "id, kind, key, payload, state, attempts, max_attempts, \
     last_error, run_at, locked_until, locked_by, traceparent, created_at, updated_at";

impl Job {
    pub(crate) fn from_row(row: &Row) -> Result<Self, Error> {
        let state: String = row.try_get("state")?;
        let state = state
            .parse()
            .map_err(|UnknownState(value)| Error::Corrupt {
                column: "state",
                value,
            })?;
        Ok(Self {
            id: row.try_get("id")?,
            kind: row.try_get("kind")?,
            key: row.try_get("key")?,
            payload: row.try_get("payload")?,
            state,
            attempts: count(row, "attempts")?,
            max_attempts: count(row, "max_attempts")?,
            last_error: row.try_get("last_error")?,
            run_at: row.try_get("run_at")?,
            locked_until: row.try_get("locked_until")?,
            locked_by: row.try_get("locked_by")?,
            traceparent: row.try_get("traceparent")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        })
    }

    /// The position just after this job in a newest-first listing.
    pub fn cursor(&self) -> JobCursor {
        JobCursor {
            created_at: self.created_at,
            id: self.id,
        }
    }
}

fn count(row: &Row, column: &'static str) -> Result<u32, Error> {
    let value: i32 = row.try_get(column)?;
    u32::try_from(value).map_err(|_| Error::Corrupt {
        column,
        value: value.to_string(),
    })
}

/// A job to enqueue.
#[derive(Clone, Debug, PartialEq)]
pub struct NewJob {
    /// Which handler runs it.
    pub kind: String,
    /// Unique key: while a job with this key exists, enqueueing another returns it instead.
    pub key: String,
    /// What the handler needs.
    pub payload: serde_json::Value,
    /// Not before this time; now when `None`.
    pub run_at: Option<DateTime<Utc>>,
    /// Attempts before it is dead; the queue's default when `None`.
    pub max_attempts: Option<u32>,
    /// W3C `traceparent` of the caller, stored as given.
    pub traceparent: Option<String>,
}

impl NewJob {
    /// A job of `kind` with unique `key`, to run now with the queue's default attempts.
    pub fn new(
        kind: impl Into<String>,
        key: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            kind: kind.into(),
            key: key.into(),
            payload,
            run_at: None,
            max_attempts: None,
            traceparent: None,
        }
    }
}

/// What [`Queue::enqueue`](crate::Queue::enqueue) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Enqueued {
    /// The job with the key: the new one, or the one that already had it.
    pub id: Uuid,
    /// Whether this call created it.
    pub created: bool,
}

/// A position in a newest-first listing of jobs (keyset paging).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCursor {
    /// Creation time of the last job of the previous page.
    pub created_at: DateTime<Utc>,
    /// Its id, which breaks ties.
    pub id: Uuid,
}

/// One page of [`Queue::list`](crate::Queue::list).
#[derive(Clone, Debug, PartialEq)]
pub struct JobPage {
    /// Jobs, newest first.
    pub jobs: Vec<Job>,
    /// Where the next page starts; `None` on the last page.
    pub next: Option<JobCursor>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names() {
        for state in JobState::ALL {
            assert_eq!(state.as_str().parse::<JobState>().unwrap(), state);
            assert_eq!(state.to_string(), state.as_str());
        }
        assert!("Queued".parse::<JobState>().is_err());
    }
}
