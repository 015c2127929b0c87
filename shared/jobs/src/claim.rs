//! The statements a worker runs: claim due jobs, record an attempt's outcome, find the next
//! due time.

use std::time::Duration;

use stowage_db::GenericClient;
use uuid::Uuid;

use crate::{Error, Job, JobState, Queue, job::JOB_COLUMNS};

/// A job this worker holds until its claim lapses.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub job: Job,
    /// The token the outcome must present.
    pub claim: Uuid,
    /// Whether the job was taken over from a worker whose claim lapsed.
    pub lapsed: bool,
}

/// What one claim statement returned.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// Jobs to run now.
    pub runnable: Vec<Claimed>,
    /// Jobs whose worker was lost on their last attempt, now dead.
    pub lost: Vec<Job>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.runnable.len() + self.lost.len()
    }
}

/// Claims up to `limit` due jobs of `kinds`: queued or failed jobs whose `run_at` has come,
/// and running jobs whose claim lapsed (their worker died). A lapsed job that already used
/// all its attempts becomes dead instead of running again.
pub(crate) async fn claim(
    queue: &Queue,
    kinds: &[String],
    limit: usize,
    worker: &str,
) -> Result<Batch, Error> {
    let conn = queue.pool().get().await?;
    // MATERIALIZED keeps the locking subquery from being inlined and run more than once.
    let stmt = conn
        .prepare_cached(&queue.sql(&format!(
            "WITH due AS MATERIALIZED (
                 SELECT id AS due_id,
                        state = 'running' AS lapsed,
                        state = 'running' AND attempts >= max_attempts AS exhausted
                 FROM {{schema}}.jobs
                 WHERE state IN ('queued', 'failed', 'running')
                   AND due_at <= now()
                   AND kind = ANY($1)
                 ORDER BY due_at
                 LIMIT $2
                 FOR UPDATE SKIP LOCKED
             )
             UPDATE {{schema}}.jobs SET
                 state = CASE WHEN exhausted THEN 'dead' ELSE 'running' END,
                 attempts = attempts + CASE WHEN exhausted THEN 0 ELSE 1 END,
                 claim = CASE WHEN exhausted THEN NULL ELSE gen_random_uuid() END,
                 locked_until = CASE WHEN exhausted THEN NULL
                                     ELSE now() + make_interval(secs => $3) END,
                 locked_by = CASE WHEN exhausted THEN NULL ELSE $4 END,
                 last_error = CASE WHEN lapsed THEN $5 ELSE last_error END,
                 updated_at = now()
             FROM due
             WHERE id = due_id
             RETURNING {JOB_COLUMNS}, claim, lapsed"
        )))
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let visibility = queue.config().visibility_timeout;
    let lapsed_error =
        format!("worker lost: its claim lapsed after the visibility timeout ({visibility:?})");
    let rows = conn
        .query(
            &stmt,
            &[
                &kinds,
                &limit,
                &visibility.as_secs_f64(),
                &worker,
                &lapsed_error,
            ],
        )
        .await?;
    let mut batch = Batch::default();
    for row in rows {
        let job = Job::from_row(&row)?;
        let claim: Option<Uuid> = row.try_get("claim")?;
        match claim {
            Some(claim) if job.state == JobState::Running => batch.runnable.push(Claimed {
                job,
                claim,
                lapsed: row.try_get("lapsed")?,
            }),
            _ => batch.lost.push(job),
        }
    }
    Ok(batch)
}

/// How an attempt ended, as the worker reports it.
#[derive(Debug)]
pub(crate) enum Report<'a> {
    Succeeded,
    /// Failed; retried after `retry_in` unless attempts are used up.
    Failed {
        error: &'a str,
        retry_in: Duration,
    },
    /// Failed for good.
    Permanent {
        error: &'a str,
    },
}

/// Records the outcome of `claimed`'s attempt and returns the job's new state, or `None`
/// when the claim is no longer ours (it lapsed and another worker took the job): the newer
/// attempt's state stands.
pub(crate) async fn finish(
    queue: &Queue,
    claimed: &Claimed,
    report: &Report<'_>,
) -> Result<Option<JobState>, Error> {
    let conn = queue.pool().get().await?;
    let row = match report {
        Report::Succeeded => {
            let stmt = conn
                .prepare_cached(&queue.sql(
                    "UPDATE {schema}.jobs SET
                         state = 'succeeded', last_error = NULL, claim = NULL,
                         locked_until = NULL, locked_by = NULL, updated_at = now()
                     WHERE id = $1 AND claim = $2
                     RETURNING state",
                ))
                .await?;
            conn.query_opt(&stmt, &[&claimed.job.id, &claimed.claim])
                .await?
        }
        Report::Failed { error, retry_in } => {
            fail(&conn, queue, claimed, false, error, *retry_in).await?
        }
        Report::Permanent { error } => {
            fail(&conn, queue, claimed, true, error, Duration::ZERO).await?
        }
    };
    let Some(row) = row else {
        return Ok(None);
    };
    let state: String = row.try_get("state")?;
    state.parse().map(Some).map_err(|_| Error::Corrupt {
        column: "state",
        value: state.clone(),
    })
}

/// Gives a claimed job back, unfinished, to be run at once by any worker, its attempt not
/// counted (its worker is stopping); `false` when the claim was no longer this worker's.
pub(crate) async fn hand_back(queue: &Queue, claimed: &Claimed) -> Result<bool, Error> {
    let conn = queue.pool().get().await?;
    let stmt = conn
        .prepare_cached(&queue.sql(
            "UPDATE {schema}.jobs SET
                 state = 'queued', attempts = greatest(attempts - 1, 0), run_at = now(),
                 claim = NULL, locked_until = NULL, locked_by = NULL, updated_at = now()
             WHERE id = $1 AND claim = $2",
        ))
        .await?;
    let handed = conn
        .execute(&stmt, &[&claimed.job.id, &claimed.claim])
        .await?
        == 1;
    if handed {
        queue.notify_in(&conn).await?;
    }
    Ok(handed)
}

async fn fail(
    conn: &impl GenericClient,
    queue: &Queue,
    claimed: &Claimed,
    permanent: bool,
    error: &str,
    retry_in: Duration,
) -> Result<Option<tokio_postgres::Row>, Error> {
    let stmt = conn
        .prepare_cached(&queue.sql(
            "UPDATE {schema}.jobs SET
                 state = CASE WHEN $3 OR attempts >= max_attempts THEN 'dead' ELSE 'failed' END,
                 run_at = CASE WHEN $3 OR attempts >= max_attempts THEN run_at
                               ELSE now() + make_interval(secs => $4) END,
                 last_error = $5, claim = NULL, locked_until = NULL, locked_by = NULL,
                 updated_at = now()
             WHERE id = $1 AND claim = $2
             RETURNING state",
        ))
        .await?;
    Ok(conn
        .query_opt(
            &stmt,
            &[
                &claimed.job.id,
                &claimed.claim,
                &permanent,
                &retry_in.as_secs_f64(),
                &error,
            ],
        )
        .await?)
}

/// Seconds until the next job of `kinds` falls due (negative when one is overdue), `None`
/// when no job waits.
pub(crate) async fn next_due(queue: &Queue, kinds: &[String]) -> Result<Option<f64>, Error> {
    let conn = queue.pool().get().await?;
    let stmt = conn
        .prepare_cached(&queue.sql(
            "SELECT extract(epoch FROM min(due_at) - now())::float8 AS wait
             FROM {schema}.jobs
             WHERE state IN ('queued', 'failed', 'running') AND kind = ANY($1)",
        ))
        .await?;
    Ok(conn.query_one(&stmt, &[&kinds]).await?.try_get("wait")?)
}
