//! A job queue in PostgreSQL, shared by the services that run work in the background.
//!
//! Each service keeps its queue in its own schema (`{schema}.jobs`, `{schema}.schedules`,
//! migrated by [`migrate`]). Producers [`Queue::enqueue`] jobs, each with a unique key, alone
//! or inside their own transaction ([`Queue::enqueue_in`]); [`Worker`]s claim due jobs with
//! `FOR UPDATE SKIP LOCKED`, run them with the [`Handler`] of their kind, retry failures
//! with exponential backoff and turn jobs out of attempts into dead letters; a
//! [`Scheduler`] enqueues repeatable jobs once per tick across any number of replicas.
//!
//! Delivery is at least once: a claim lasts the queue's visibility timeout, longer than a
//! job's timeout, and a job whose worker died is taken again when its claim lapses. Handlers
//! must therefore be idempotent. An outcome is recorded only under the claim that ran the
//! job, so a worker that lost its claim cannot overwrite a newer attempt's state.
//!
//! New jobs are announced with `NOTIFY` on channel `stowage_jobs_{schema}`, so idle workers
//! wake at once instead of polling; they still look every `idle_poll` in case a notification
//! was lost. A job carries the W3C `traceparent` of whoever enqueued it; the handler decides
//! how to join that trace.

#![warn(missing_docs)]

mod claim;
mod config;
mod error;
mod job;
pub mod metrics;
mod queue;
mod schedule;
mod worker;

pub use config::QueueConfig;
pub use error::Error;
pub use job::{Enqueued, Job, JobCursor, JobPage, JobState, NewJob, UnknownState};
pub use queue::Queue;
pub use schedule::{Schedule, ScheduleInfo, Scheduler};
pub use worker::{Handler, JobError, Worker, handler_fn};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Name of the migration history table, kept apart from the service's own
/// `{schema}.schema_history`.
pub const HISTORY_TABLE: &str = "jobs_schema_history";

/// Creates or updates the queue's tables in `schema` (history in
/// `{schema}.jobs_schema_history`). Safe to run from many replicas at once.
pub async fn migrate(pool: &stowage_db::PgPool, schema: &str) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate_with_history(pool, schema, embedded::migrations::runner(), HISTORY_TABLE)
        .await
}
