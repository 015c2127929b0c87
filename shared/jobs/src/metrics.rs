//! Metrics of the queue, through the `metrics` facade: the process installs the recorder.
//!
//! Counters and the histogram carry `queue` (the schema) and `kind`; the depth gauge carries
//! `queue` and `state`.

use std::{collections::BTreeMap, time::Duration};

use crate::JobState;

/// Jobs that succeeded.
pub const JOBS_PROCESSED: &str = "stowage_jobs_processed_total";
/// Attempts that failed (timeouts, errors, panics, lost workers), whatever followed.
pub const JOBS_FAILED: &str = "stowage_jobs_failed_total";
/// Failed attempts that will be retried after backoff.
pub const JOBS_RETRIED: &str = "stowage_jobs_retried_total";
/// Jobs that became dead letters.
pub const JOBS_DEAD: &str = "stowage_jobs_dead_total";
/// Duration of one attempt, in seconds.
pub const JOB_DURATION: &str = "stowage_job_duration_seconds";
/// Jobs per state, refreshed by every worker every few seconds.
pub const QUEUE_DEPTH: &str = "stowage_queue_depth";
/// How long the longest-waiting due job has waited past its run time, in seconds.
pub const QUEUE_OLDEST_DUE: &str = "stowage_queue_oldest_due_seconds";
/// Gauge: when the depth gauges of a queue were last refreshed (seconds since the epoch).
pub const QUEUE_DEPTH_UPDATED: &str = "stowage_queue_depth_updated_timestamp_seconds";

/// Registers the descriptions of the queue's metrics with the installed recorder.
pub fn describe_metrics() {
    metrics::describe_counter!(JOBS_PROCESSED, "Jobs that succeeded");
    metrics::describe_counter!(
        JOBS_FAILED,
        "Job attempts that failed (error, timeout, panic or lost worker)"
    );
    metrics::describe_counter!(JOBS_RETRIED, "Failed job attempts that will be retried");
    metrics::describe_counter!(JOBS_DEAD, "Jobs that became dead letters");
    metrics::describe_histogram!(
        JOB_DURATION,
        metrics::Unit::Seconds,
        "Duration of one job attempt"
    );
    metrics::describe_gauge!(QUEUE_DEPTH, "Jobs per state");
    metrics::describe_gauge!(
        QUEUE_OLDEST_DUE,
        metrics::Unit::Seconds,
        "How long the longest-waiting due job has waited past its run time"
    );
    metrics::describe_gauge!(
        QUEUE_DEPTH_UPDATED,
        metrics::Unit::Seconds,
        "When the depth gauges were last refreshed, seconds since the epoch"
    );
}

/// How an attempt ended, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Succeeded,
    Retried,
    Dead,
}

pub(crate) fn record_attempt(queue: &str, kind: &str, outcome: Outcome, took: Duration) {
    let labels = [("queue", queue.to_owned()), ("kind", kind.to_owned())];
    metrics::histogram!(JOB_DURATION, &labels).record(took.as_secs_f64());
    record_outcome(queue, kind, outcome);
}

pub(crate) fn record_outcome(queue: &str, kind: &str, outcome: Outcome) {
    let labels = [("queue", queue.to_owned()), ("kind", kind.to_owned())];
    match outcome {
        Outcome::Succeeded => metrics::counter!(JOBS_PROCESSED, &labels).increment(1),
        Outcome::Retried => {
            metrics::counter!(JOBS_FAILED, &labels).increment(1);
            metrics::counter!(JOBS_RETRIED, &labels).increment(1);
        }
        Outcome::Dead => {
            metrics::counter!(JOBS_FAILED, &labels).increment(1);
            metrics::counter!(JOBS_DEAD, &labels).increment(1);
        }
    }
}

pub(crate) fn record_depth(queue: &str, depth: &BTreeMap<JobState, u64>, oldest_due: Duration) {
    for (state, jobs) in depth {
        metrics::gauge!(QUEUE_DEPTH, "queue" => queue.to_owned(), "state" => state.as_str())
            .set(*jobs as f64);
    }
    metrics::gauge!(QUEUE_OLDEST_DUE, "queue" => queue.to_owned()).set(oldest_due.as_secs_f64());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    metrics::gauge!(QUEUE_DEPTH_UPDATED, "queue" => queue.to_owned()).set(now.as_secs_f64());
}
