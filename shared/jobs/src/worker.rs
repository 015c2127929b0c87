//! Workers: claim due jobs, run them with their handlers, record the outcome.

use std::{
    collections::HashMap,
    future::Future,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use crate::{
    Job, JobState, Queue,
    claim::{self, Claimed, Report},
    metrics::{self, Outcome},
};

/// Shortest sleep between two claims while a due job is locked by someone else (another
/// worker's claim in flight), so that case does not spin.
const MIN_WAIT: Duration = Duration::from_millis(200);
/// How often a worker refreshes the depth gauges.
const DEPTH_REFRESH: Duration = Duration::from_secs(5);

/// Refreshes of the depth between two counts of succeeded jobs, when there are
/// [`MANY_SUCCEEDED`] of them or more.
const SUCCEEDED_EVERY: u64 = 12;

/// Succeeded jobs past which counting them every time costs more than the gauge is worth.
const MANY_SUCCEEDED: u64 = 10_000;
/// Longest time between two purges of succeeded jobs.
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// Longest error message kept in `last_error`.
const MAX_ERROR_LEN: usize = 4096;

/// Why an attempt failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Worth another attempt after backoff; the job is dead once its attempts are used up.
    #[error("{0}")]
    Retry(String),
    /// Can never succeed (e.g. a hostile file): the job is dead at once, with this reason.
    #[error("{0}")]
    Permanent(String),
}

impl JobError {
    /// A retryable failure described by `reason`.
    pub fn retry(reason: impl std::fmt::Display) -> Self {
        Self::Retry(reason.to_string())
    }

    /// A permanent failure described by `reason`.
    pub fn permanent(reason: impl std::fmt::Display) -> Self {
        Self::Permanent(reason.to_string())
    }
}

/// Runs the jobs of one kind.
///
/// Jobs run at least once: after a crash, a timeout or a lost outcome a job runs again, so
/// `run` must be idempotent. A run longer than the queue's `job_timeout` is dropped at its
/// next `.await` and counts as a failed attempt; work it moved off the runtime
/// (`spawn_blocking`) is not stopped by that.
#[async_trait::async_trait]
pub trait Handler: Send + Sync {
    /// Runs `job` once.
    async fn run(&self, job: &Job) -> Result<(), JobError>;
}

/// A [`Handler`] made of a closure that takes the job by value.
pub fn handler_fn<F, Fut>(f: F) -> Arc<dyn Handler>
where
    F: Fn(Job) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    Arc::new(FnHandler(f))
}

struct FnHandler<F>(F);

#[async_trait::async_trait]
impl<F, Fut> Handler for FnHandler<F>
where
    F: Fn(Job) -> Fut + Send + Sync,
    Fut: Future<Output = Result<(), JobError>> + Send,
{
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        (self.0)(job.clone()).await
    }
}

/// Claims and runs the jobs of the kinds it has handlers for, up to the queue's
/// `concurrency` at once.
pub struct Worker {
    queue: Queue,
    handlers: HashMap<String, Arc<dyn Handler>>,
    name: String,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("queue", &self.queue.schema())
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("name", &self.name)
            .finish()
    }
}

impl Worker {
    /// A worker of `queue` that runs each job with the handler of its kind. It claims only
    /// jobs of those kinds, so workers of different kinds can share a queue.
    pub fn new(queue: Queue, handlers: HashMap<String, Arc<dyn Handler>>) -> Self {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
        let name = format!(
            "{host}/{}/{}",
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            queue,
            handlers,
            name,
        }
    }

    /// The name this worker writes in `locked_by` (host, process id, a random suffix).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs jobs until `shutdown`; then stops claiming, lets running jobs finish for up to
    /// `drain` (each is bounded by `job_timeout` too), hands back those still running, and
    /// returns.
    ///
    /// Between claims an idle worker sleeps until a notification of a new job, the next
    /// job's due time, or `idle_poll`, whichever comes first. Database errors are logged
    /// and retried; they never end the loop.
    pub async fn run(self, shutdown: CancellationToken) {
        let queue = self.queue.clone();
        let schema = queue.schema().to_owned();
        let config = queue.config().clone();
        let mut kinds: Vec<String> = self.handlers.keys().cloned().collect();
        kinds.sort();
        if kinds.is_empty() {
            tracing::warn!(queue = %schema, "job worker has no handlers, not starting");
            return;
        }
        let handlers = Arc::new(self.handlers);
        let wake = Arc::new(Notify::new());
        let helpers = CancellationToken::new();
        // Cancelled when running jobs are to be handed back.
        let abandon = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(
            stowage_db::listen(
                queue.listen_target().clone(),
                queue.channel().to_owned(),
                wake.clone(),
                helpers.clone(),
            )
            .instrument(tracing::info_span!("task", name = "jobs-listener")),
        );
        tasks.spawn(
            refresh_depth(queue.clone(), helpers.clone())
                .instrument(tracing::info_span!("task", name = "jobs-depth")),
        );
        tasks.spawn(
            purge_succeeded(queue.clone(), helpers.clone())
                .instrument(tracing::info_span!("task", name = "jobs-purge")),
        );
        let slots = Arc::new(Semaphore::new(config.concurrency));
        let mut error_wait = MIN_WAIT;
        tracing::info!(
            queue = %schema,
            worker = %self.name,
            ?kinds,
            concurrency = config.concurrency,
            "job worker started"
        );
        loop {
            let free = slots.available_permits();
            if free == 0 {
                // A finishing job wakes us.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = wake.notified() => continue,
                }
            }
            let batch = match claim::claim(&queue, &kinds, free, &self.name).await {
                Ok(batch) => {
                    error_wait = MIN_WAIT;
                    batch
                }
                Err(error) => {
                    tracing::warn!(queue = %schema, %error, retry_in = ?error_wait, "cannot claim jobs");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(error_wait) => {}
                    }
                    error_wait = (error_wait * 2).min(config.idle_poll);
                    continue;
                }
            };
            let more = batch.len() == free;
            for job in &batch.lost {
                tracing::error!(
                    queue = %schema,
                    job_id = %job.id,
                    kind = %job.kind,
                    attempts = job.attempts,
                    "job is dead: its worker was lost on its last attempt"
                );
                metrics::record_outcome(&schema, &job.kind, Outcome::Dead);
            }
            for claimed in batch.runnable {
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Only this loop takes permits, and it claimed no more than were free.
                    unreachable!("claimed more jobs than free slots");
                };
                if claimed.lapsed {
                    tracing::warn!(
                        queue = %schema,
                        job_id = %claimed.job.id,
                        kind = %claimed.job.kind,
                        attempt = claimed.job.attempts,
                        "job taken over: its previous worker's claim lapsed"
                    );
                    metrics::record_outcome(&schema, &claimed.job.kind, Outcome::Retried);
                }
                let handler = handlers.get(&claimed.job.kind).cloned();
                let span = tracing::info_span!(
                    "job",
                    queue = %schema,
                    kind = %claimed.job.kind,
                    job_id = %claimed.job.id,
                    attempt = claimed.job.attempts,
                );
                // The run joins the trace of whoever enqueued the job.
                stowage_telemetry::set_parent_from_traceparent(
                    &span,
                    claimed.job.traceparent.as_deref(),
                );
                tasks.spawn(
                    execute(
                        queue.clone(),
                        handler,
                        claimed,
                        permit,
                        wake.clone(),
                        abandon.clone(),
                    )
                    .instrument(span),
                );
            }
            if more {
                continue;
            }
            let wait = match claim::next_due(&queue, &kinds).await {
                Ok(Some(seconds)) => Duration::try_from_secs_f64(seconds.max(0.0))
                    .unwrap_or(config.idle_poll)
                    .clamp(MIN_WAIT, config.idle_poll),
                Ok(None) => config.idle_poll,
                Err(error) => {
                    tracing::warn!(queue = %schema, %error, "cannot read the next due time");
                    config.idle_poll
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        let running = config.concurrency - slots.available_permits();
        tracing::info!(queue = %schema, worker = %self.name, running, "job worker stopping");
        helpers.cancel();
        tasks.close();
        if tokio::time::timeout(config.drain, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                queue = %schema,
                worker = %self.name,
                drain = ?config.drain,
                "jobs still running are handed back to run elsewhere"
            );
            abandon.cancel();
            tasks.wait().await;
        }
        tracing::info!(queue = %schema, worker = %self.name, "job worker stopped");
    }
}

/// Runs one claimed job and records its outcome.
async fn execute(
    queue: Queue,
    handler: Option<Arc<dyn Handler>>,
    claimed: Claimed,
    permit: OwnedSemaphorePermit,
    wake: Arc<Notify>,
    abandon: CancellationToken,
) {
    let job = &claimed.job;
    let timeout = queue.config().job_timeout;
    let started = Instant::now();
    let run = async {
        match handler {
            Some(handler) => {
                let run = tokio::time::timeout(timeout, handler.run(job));
                match AssertUnwindSafe(run).catch_unwind().await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_elapsed)) => {
                        Err(JobError::Retry(format!("timed out after {timeout:?}")))
                    }
                    Err(_panic) => Err(JobError::Retry("handler panicked".to_owned())),
                }
            }
            None => Err(JobError::Retry(format!("no handler for kind {}", job.kind))),
        }
    };
    let result = tokio::select! {
        result = run => result,
        // The run is dropped where it stands, as a killed process would leave it (handlers
        // are idempotent), but its claim is given back now rather than when it lapses.
        () = abandon.cancelled() => {
            match claim::hand_back(&queue, &claimed).await {
                Ok(true) => tracing::info!("job handed back: it runs again at once elsewhere"),
                Ok(false) => tracing::warn!("job not handed back: its claim had lapsed"),
                Err(error) => tracing::warn!(%error, "job not handed back; it runs again once its claim lapses"),
            }
            drop(permit);
            return;
        }
    };
    let took = started.elapsed();
    let error = result.as_ref().err().map(|e| truncate(&e.to_string()));
    let retry_in = queue.config().backoff(job.attempts);
    let report = match (&result, &error) {
        (Err(JobError::Permanent(_)), Some(error)) => Report::Permanent { error },
        (Err(JobError::Retry(_)), Some(error)) => Report::Failed { error, retry_in },
        _ => Report::Succeeded,
    };
    match record(&queue, &claimed, &report).await {
        Some(state) => {
            let outcome = match state {
                JobState::Succeeded => Outcome::Succeeded,
                JobState::Dead => Outcome::Dead,
                _ => Outcome::Retried,
            };
            metrics::record_attempt(queue.schema(), &job.kind, outcome, took);
            match (outcome, &error) {
                (Outcome::Succeeded, _) => tracing::debug!(?took, "job succeeded"),
                (Outcome::Retried, Some(error)) => {
                    tracing::warn!(%error, ?took, ?retry_in, "job attempt failed, will retry");
                }
                (_, error) => tracing::error!(
                    error = error.as_deref().unwrap_or(""),
                    attempts = job.attempts,
                    "job is dead"
                ),
            }
        }
        None => tracing::warn!(
            ?took,
            "job outcome discarded: its claim lapsed and another worker took it over"
        ),
    }
    drop(permit);
    wake.notify_one();
}

/// Records an outcome, retrying a few times: an outcome lost to a passing database error
/// costs a second run of the job once its claim lapses.
async fn record(queue: &Queue, claimed: &Claimed, report: &Report<'_>) -> Option<JobState> {
    let mut wait = Duration::from_millis(200);
    for attempt in 1..=4 {
        match claim::finish(queue, claimed, report).await {
            Ok(state) => return state,
            Err(error) => tracing::warn!(%error, attempt, "cannot record the job outcome"),
        }
        if attempt < 4 {
            tokio::time::sleep(wait).await;
            wait *= 2;
        }
    }
    tracing::error!("job outcome not recorded; the job runs again once its claim lapses");
    None
}

fn truncate(error: &str) -> String {
    if error.len() <= MAX_ERROR_LEN {
        return error.to_owned();
    }
    let mut end = MAX_ERROR_LEN;
    while !error.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &error[..end])
}

/// Keeps the depth gauges fresh until `stop`.
async fn refresh_depth(queue: Queue, stop: CancellationToken) {
    let mut succeeded_before = 0;
    for round in 0u64.. {
        // Succeeded jobs (days of them) are counted once a minute when they are many, the
        // others every time.
        let succeeded = succeeded_before < MANY_SUCCEEDED || round % SUCCEEDED_EVERY == 0;
        match queue.depth_counting(succeeded).await {
            Ok((depth, oldest)) => {
                if let Some(n) = depth.get(&JobState::Succeeded) {
                    succeeded_before = *n;
                }
                metrics::record_depth(queue.schema(), &depth, oldest);
            }
            Err(error) => {
                tracing::debug!(queue = %queue.schema(), %error, "cannot read queue depth")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(DEPTH_REFRESH) => {}
        }
    }
}

/// Deletes succeeded jobs older than the queue's `keep_succeeded` until `stop`: at start, then
/// as often as that (at most hourly). Workers of every replica do it; they skip each other's
/// rows.
async fn purge_succeeded(queue: Queue, stop: CancellationToken) {
    let keep = queue.config().keep_succeeded;
    let every = keep.min(PURGE_EVERY);
    loop {
        match queue.purge_succeeded(keep).await {
            Ok(0) => {}
            Ok(purged) => tracing::info!(queue = %queue.schema(), purged, "succeeded jobs deleted"),
            Err(error) => {
                tracing::warn!(queue = %queue.schema(), %error, "cannot delete succeeded jobs")
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_LEN);
        let cut = truncate(&long);
        assert!(cut.len() <= MAX_ERROR_LEN + '…'.len_utf8());
        assert!(cut.ends_with('…'));
        assert_eq!(truncate("short"), "short");
    }
}
