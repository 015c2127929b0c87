//! The queue: enqueue, look up, list and requeue jobs.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use stowage_db::{GenericClient, PgPool};
use uuid::Uuid;

use crate::{
    Enqueued, Error, Job, JobCursor, JobPage, JobState, NewJob, QueueConfig,
    config::check_max_attempts, job::JOB_COLUMNS,
};

/// Longest job kind accepted.
const MAX_KIND_LEN: usize = 200;
/// Longest key accepted (a B-tree entry must fit in a third of a page).
const MAX_KEY_LEN: usize = 1000;
/// Longest `traceparent` accepted (a W3C one is 55 bytes; some room for what comes next).
const MAX_TRACEPARENT_LEN: usize = 512;
/// Largest page of [`Queue::list`].
const MAX_PAGE_SIZE: u32 = 1000;
/// Rows one statement of [`Queue::purge_succeeded`] deletes, so it never holds many locks.
const PURGE_BATCH: i64 = 1000;

/// A job queue in one PostgreSQL schema (`{schema}.jobs`, `{schema}.schedules`).
///
/// Cheap to clone. Each service has its own queue in its own schema; migrate it with
/// [`migrate`](crate::migrate) first.
#[derive(Clone, Debug)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    listen: stowage_db::PgTarget,
    schema: String,
    channel: String,
    config: QueueConfig,
}

impl Queue {
    /// A queue in `schema`, reached through `pool`.
    ///
    /// `database_url` is the URL `pool` was built from: workers open one extra connection
    /// with it to `LISTEN` for new jobs (a pooled connection cannot receive notifications).
    pub fn new(
        pool: PgPool,
        database_url: &str,
        schema: &str,
        config: QueueConfig,
    ) -> Result<Self, Error> {
        config.validate()?;
        check_schema(schema)?;
        let listen = stowage_db::PgTarget::parse(database_url)
            .map_err(|e| Error::invalid("database_url", format!("{e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                listen,
                schema: schema.to_owned(),
                channel: format!("stowage_jobs_{schema}"),
                config,
            }),
        })
    }

    /// The schema the queue lives in; also the `queue` label of its metrics.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.inner.config
    }

    /// The pool the queue uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    pub(crate) fn listen_target(&self) -> &stowage_db::PgTarget {
        &self.inner.listen
    }

    /// The notification channel idle workers listen on.
    pub(crate) fn channel(&self) -> &str {
        &self.inner.channel
    }

    /// `template` with `{schema}` replaced by the queue's schema.
    pub(crate) fn sql(&self, template: &str) -> String {
        template.replace("{schema}", &self.inner.schema)
    }

    /// Enqueues `job` unless a job with its key exists, and wakes idle workers.
    pub async fn enqueue(&self, job: NewJob) -> Result<Enqueued, Error> {
        let conn = self.inner.pool.get().await?;
        self.enqueue_in(&conn, job).await
    }

    /// Like [`Queue::enqueue`] on `client`, which may be the caller's transaction: the job
    /// then exists, and workers are woken, only if that transaction commits.
    pub async fn enqueue_in(
        &self,
        client: &impl GenericClient,
        job: NewJob,
    ) -> Result<Enqueued, Error> {
        let max_attempts = self.check_new_job(&job)?;
        let insert = client
            .prepare_cached(&self.sql(
                "INSERT INTO {schema}.jobs
                     (id, kind, key, payload, max_attempts, run_at, traceparent)
                 VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), $7)
                 ON CONFLICT (key) DO NOTHING
                 RETURNING id",
            ))
            .await?;
        let existing = client
            .prepare_cached(&self.sql("SELECT id FROM {schema}.jobs WHERE key = $1"))
            .await?;
        // In READ COMMITTED each statement sees what committed before it, so after a conflict
        // the SELECT finds the holder of the key, unless it was purged in between: then the
        // key is free again and the INSERT is worth another try.
        for _ in 0..3 {
            let id = Uuid::now_v7();
            let inserted = client
                .query_opt(
                    &insert,
                    &[
                        &id,
                        &job.kind,
                        &job.key,
                        &job.payload,
                        &max_attempts,
                        &job.run_at,
                        &job.traceparent,
                    ],
                )
                .await?;
            if inserted.is_some() {
                self.notify_in(client).await?;
                return Ok(Enqueued { id, created: true });
            }
            if let Some(row) = client.query_opt(&existing, &[&job.key]).await? {
                return Ok(Enqueued {
                    id: row.try_get(0)?,
                    created: false,
                });
            }
        }
        Err(Error::invalid(
            "key",
            format!(
                "{:?} was taken and released three times during one enqueue",
                job.key
            ),
        ))
    }

    /// Wakes idle workers (at commit, when `client` is in a transaction).
    pub(crate) async fn notify_in(&self, client: &impl GenericClient) -> Result<(), Error> {
        let notify = client.prepare_cached("SELECT pg_notify($1, '')").await?;
        client.execute(&notify, &[&self.inner.channel]).await?;
        Ok(())
    }

    fn check_new_job(&self, job: &NewJob) -> Result<i32, Error> {
        if job.kind.is_empty() || job.kind.len() > MAX_KIND_LEN {
            return Err(Error::invalid(
                "kind",
                format!("must be 1 to {MAX_KIND_LEN} bytes"),
            ));
        }
        if job.key.is_empty() || job.key.len() > MAX_KEY_LEN {
            return Err(Error::invalid(
                "key",
                format!("must be 1 to {MAX_KEY_LEN} bytes"),
            ));
        }
        if job
            .traceparent
            .as_ref()
            .is_some_and(|t| t.len() > MAX_TRACEPARENT_LEN)
        {
            return Err(Error::invalid(
                "traceparent",
                format!("must be at most {MAX_TRACEPARENT_LEN} bytes"),
            ));
        }
        let max_attempts = job.max_attempts.unwrap_or(self.inner.config.max_attempts);
        check_max_attempts("max_attempts", max_attempts)?;
        i32::try_from(max_attempts).map_err(|_| Error::invalid("max_attempts", "too large"))
    }

    /// The job `id`.
    pub async fn get(&self, id: Uuid) -> Result<Job, Error> {
        let conn = self.inner.pool.get().await?;
        let stmt = conn
            .prepare_cached(&self.sql(&format!(
                "SELECT {JOB_COLUMNS} FROM {{schema}}.jobs WHERE id = $1"
            )))
            .await?;
        match conn.query_opt(&stmt, &[&id]).await? {
            Some(row) => Job::from_row(&row),
            None => Err(Error::JobNotFound(id.to_string())),
        }
    }

    /// The job with `key`.
    pub async fn get_by_key(&self, key: &str) -> Result<Job, Error> {
        let conn = self.inner.pool.get().await?;
        let stmt = conn
            .prepare_cached(&self.sql(&format!(
                "SELECT {JOB_COLUMNS} FROM {{schema}}.jobs WHERE key = $1"
            )))
            .await?;
        match conn.query_opt(&stmt, &[&key]).await? {
            Some(row) => Job::from_row(&row),
            None => Err(Error::JobNotFound(key.to_owned())),
        }
    }

    /// Puts a succeeded, failed or dead job back in the queue to run now, with its attempts
    /// reset (an operator's retry). Its last error stays until the next attempt ends.
    pub async fn requeue(&self, id: Uuid) -> Result<Job, Error> {
        self.requeue_where("id = $1", &id, || Error::JobNotFound(id.to_string()))
            .await
    }

    /// [`Queue::requeue`] of the job with `key`.
    pub async fn requeue_key(&self, key: &str) -> Result<Job, Error> {
        self.requeue_where("key = $1", &key, || Error::JobNotFound(key.to_owned()))
            .await
    }

    async fn requeue_where(
        &self,
        condition: &str,
        value: &(dyn tokio_postgres::types::ToSql + Sync),
        not_found: impl Fn() -> Error,
    ) -> Result<Job, Error> {
        let conn = self.inner.pool.get().await?;
        let requeue = conn
            .prepare_cached(&self.sql(&format!(
                "UPDATE {{schema}}.jobs
                 SET state = 'queued', attempts = 0, run_at = now(), updated_at = now()
                 WHERE {condition} AND state IN ('succeeded', 'failed', 'dead')
                 RETURNING {JOB_COLUMNS}"
            )))
            .await?;
        if let Some(row) = conn.query_opt(&requeue, &[value]).await? {
            let job = Job::from_row(&row)?;
            self.notify_in(&conn).await?;
            tracing::info!(queue = %self.schema(), job_id = %job.id, kind = %job.kind, "job requeued");
            return Ok(job);
        }
        let current = conn
            .prepare_cached(&self.sql(&format!(
                "SELECT id, state FROM {{schema}}.jobs WHERE {condition}"
            )))
            .await?;
        let Some(row) = conn.query_opt(&current, &[value]).await? else {
            return Err(not_found());
        };
        let state: String = row.try_get("state")?;
        Err(Error::NotRequeueable {
            id: row.try_get("id")?,
            state: state.parse().map_err(|_| Error::Corrupt {
                column: "state",
                value: state.clone(),
            })?,
        })
    }

    /// Jobs newest first, optionally only those in `state`; `before` is the
    /// [`JobPage::next`] of the previous page. `page_size` is clamped to 1..=1000.
    pub async fn list(
        &self,
        state: Option<JobState>,
        page_size: u32,
        before: Option<JobCursor>,
    ) -> Result<JobPage, Error> {
        let size = page_size.clamp(1, MAX_PAGE_SIZE);
        let mut conditions = Vec::new();
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
        let state_name = state.map(JobState::as_str);
        if let Some(name) = &state_name {
            params.push(name);
            conditions.push(format!("state = ${}", params.len()));
        }
        if let Some(cursor) = &before {
            params.push(&cursor.created_at);
            params.push(&cursor.id);
            conditions.push(format!(
                "(created_at, id) < (${}, ${})",
                params.len() - 1,
                params.len()
            ));
        }
        // One row more than the page tells whether another page follows.
        let limit = i64::from(size) + 1;
        params.push(&limit);
        let filter = if conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", conditions.join(" AND "))
        };
        let conn = self.inner.pool.get().await?;
        let stmt = conn
            .prepare_cached(&self.sql(&format!(
                "SELECT {JOB_COLUMNS} FROM {{schema}}.jobs {filter}
                 ORDER BY created_at DESC, id DESC LIMIT ${}",
                params.len()
            )))
            .await?;
        let rows = conn.query(&stmt, &params).await?;
        let mut jobs = rows
            .iter()
            .map(Job::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let next = if jobs.len() > size as usize {
            jobs.truncate(size as usize);
            jobs.last().map(Job::cursor)
        } else {
            None
        };
        Ok(JobPage { jobs, next })
    }

    /// Jobs per state (every state present, zero included) and how long the longest-waiting
    /// due job (queued, or failed with its retry time passed) has waited past its `run_at`.
    pub async fn depth(&self) -> Result<(BTreeMap<JobState, u64>, Duration), Error> {
        self.depth_counting(true).await
    }

    /// [`depth`](Self::depth), counting succeeded jobs only when `succeeded` (they are most
    /// of the table, kept for days; the others are read through `jobs_by_state_created`'s
    /// ranges). Without them, their count is absent from the map.
    pub(crate) async fn depth_counting(
        &self,
        succeeded: bool,
    ) -> Result<(BTreeMap<JobState, u64>, Duration), Error> {
        let conn = self.inner.pool.get().await?;
        let counts = conn
            .prepare_cached(&self.sql(
                "SELECT state, count(*) AS jobs FROM {schema}.jobs
                 WHERE state IN ('queued', 'running', 'failed', 'dead')
                    OR ($1 AND state = 'succeeded')
                 GROUP BY state",
            ))
            .await?;
        let mut depth: BTreeMap<JobState, u64> = JobState::ALL
            .into_iter()
            .filter(|state| succeeded || *state != JobState::Succeeded)
            .map(|state| (state, 0))
            .collect();
        for row in conn.query(&counts, &[&succeeded]).await? {
            let state: String = row.try_get("state")?;
            let state = state.parse().map_err(|_| Error::Corrupt {
                column: "state",
                value: state.clone(),
            })?;
            let jobs: i64 = row.try_get("jobs")?;
            depth.insert(state, u64::try_from(jobs).unwrap_or(0));
        }
        let oldest = conn
            .prepare_cached(&self.sql(
                "SELECT extract(epoch FROM now() - min(due_at))::float8 AS waited
                 FROM {schema}.jobs
                 WHERE state IN ('queued', 'failed') AND due_at <= now()",
            ))
            .await?;
        let waited: Option<f64> = conn.query_one(&oldest, &[]).await?.try_get("waited")?;
        let waited = Duration::try_from_secs_f64(waited.unwrap_or(0.0)).unwrap_or_default();
        Ok((depth, waited))
    }

    /// Deletes succeeded jobs last changed more than `older_than` ago and returns how many.
    /// Their keys become free: a later enqueue with one of them creates a new job.
    pub async fn purge_succeeded(&self, older_than: Duration) -> Result<u64, Error> {
        let conn = self.inner.pool.get().await?;
        let purge = conn
            .prepare_cached(&self.sql(
                "DELETE FROM {schema}.jobs WHERE id IN (
                     SELECT id FROM {schema}.jobs
                     WHERE state = 'succeeded'
                       AND updated_at < now() - make_interval(secs => $1)
                     LIMIT $2
                     FOR UPDATE SKIP LOCKED)",
            ))
            .await?;
        let mut purged = 0;
        loop {
            let deleted = conn
                .execute(&purge, &[&older_than.as_secs_f64(), &PURGE_BATCH])
                .await?;
            purged += deleted;
            if deleted < PURGE_BATCH as u64 {
                return Ok(purged);
            }
        }
    }

    /// The database's clock, which every time in the queue comes from.
    pub async fn now(&self) -> Result<DateTime<Utc>, Error> {
        let conn = self.inner.pool.get().await?;
        Ok(conn.query_one("SELECT now()", &[]).await?.try_get(0)?)
    }
}

/// A schema name is spliced into SQL and into a channel name (63 bytes at most), so it must
/// be a plain lowercase identifier.
fn check_schema(schema: &str) -> Result<(), Error> {
    let mut chars = schema.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && schema.len() <= 40;
    if valid {
        Ok(())
    } else {
        Err(Error::invalid(
            "schema",
            format!("{schema:?} is not a lowercase identifier of at most 40 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names_are_plain_identifiers() {
        for good in ["media", "lifecycle", "_x1"] {
            check_schema(good).unwrap();
        }
        for bad in [
            "",
            "Media",
            "1media",
            "media; drop",
            "a\"b",
            &"x".repeat(41),
        ] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }
}
