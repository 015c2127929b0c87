//! Lifecycle: scheduled clean-up that never deletes what a user owns, and usage that never
//! drifts.
//!
//! Its jobs are interval schedules on the mesh's PostgreSQL job queue (schema `lifecycle`):
//! each tick fires once across any number of replicas, and every run is recorded (start, end,
//! items examined / acted on / failed, dry run). The jobs own no data: they act through the
//! APIs of the services that do (Ingest ends abandoned uploads, Files purges expired trash and
//! counts what each owner stores, Quota repairs usage), whose calls are conditional and keyed,
//! so a run repeated or racing another is harmless.

pub mod activity;
mod grpc;
pub mod policy;
pub mod tasks;
mod usage;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use stowage_db::{Cached, PgPool};
use stowage_jobs::{Handler, Job, JobError, Queue, Schedule};
use stowage_runtime::mesh::{FilesApi, IngestApi, MediaApi, QuotaApi};
use uuid::Uuid;

pub use activity::{ActivityEvents, HistoryEvent, NOTICE_TOPIC};
pub use grpc::LifecycleGrpc;
pub use policy::Policy;
pub use tasks::{TASKS, Tally};

/// Name of the schema Lifecycle owns.
pub const SCHEMA: &str = "lifecycle";
/// Consumer group Lifecycle reads file and upload events with.
pub const CONSUMER_GROUP: &str = "lifecycle";
/// Kind of the jobs its schedules enqueue.
pub const TASK_JOB: &str = "lifecycle.task";

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Applies Lifecycle's migrations: its own tables and the job queue's.
pub async fn migrate(pool: &PgPool) -> Result<(), stowage_db::DbError> {
    stowage_db::migrate(pool, SCHEMA, migrations()).await?;
    stowage_jobs::migrate(pool, SCHEMA).await
}

/// Lifecycle's own migrations, for [`stowage_db::migrate`]: a test of an upgrade applies those
/// of an earlier release (`set_target`), writes rows as it did, and starts the service on them.
pub fn migrations() -> stowage_db::MigrationRunner {
    embedded::migrations::runner()
}

/// The schedules of every task, at their default intervals.
pub fn schedules() -> Vec<Schedule> {
    TASKS
        .iter()
        .map(|t| {
            Schedule::new(
                t.name,
                t.interval,
                TASK_JOB,
                serde_json::json!({ "name": t.name }),
            )
        })
        .collect()
}

/// One recorded run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunRecord {
    /// Run id.
    pub id: Uuid,
    /// Task name.
    pub name: String,
    /// Start.
    pub started_at: DateTime<Utc>,
    /// End, once finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// What it did.
    pub tally: Tally,
    /// Dry run?
    pub dry_run: bool,
    /// Error of the run as a whole.
    pub error: String,
}

impl RunRecord {
    fn from_row(row: &tokio_postgres::Row) -> Self {
        let count = |c: &str| u64::try_from(row.get::<_, i64>(c)).unwrap_or(0);
        Self {
            id: row.get("id"),
            name: row.get("name"),
            started_at: row.get("started_at"),
            finished_at: row.get("finished_at"),
            tally: Tally {
                examined: count("examined"),
                acted: count("acted"),
                failed: count("failed"),
                report: row.get("report"),
            },
            dry_run: row.get("dry_run"),
            error: row.get("error"),
        }
    }
}

/// Lifecycle's core: the tasks, their runs and the policy.
pub struct Lifecycle {
    pool: PgPool,
    queue: Queue,
    ingest: Arc<dyn IngestApi>,
    files: Arc<dyn FilesApi>,
    quota: Arc<dyn QuotaApi>,
    media: Arc<dyn MediaApi>,
    store: Arc<dyn object_store::ObjectStore>,
    /// The store's directory when it is on local disk (its unfinished writes are swept).
    local_root: Option<std::path::PathBuf>,
    redis: Option<fred::clients::Client>,
    namespace: String,
    settle: std::time::Duration,
    /// Blobs, then files, one `blob_gc` run looks at.
    gc_batch: u64,
    /// How long each of `blob_gc`'s ways may go on in one run.
    gc_time: std::time::Duration,
    /// Retries and concurrency of the per-user rechecks.
    rechecks: activity::RecheckSettings,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("queue", &self.queue.schema())
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Lifecycle over its database and queue, acting through the other services (and on the
    /// store for blobs nobody references).
    pub fn new(
        pool: PgPool,
        queue: Queue,
        ingest: Arc<dyn IngestApi>,
        files: Arc<dyn FilesApi>,
        quota: Arc<dyn QuotaApi>,
        media: Arc<dyn MediaApi>,
        store: Arc<dyn object_store::ObjectStore>,
    ) -> Self {
        let defaults = stowage_runtime::config::LifecycleConfig::default();
        Self {
            pool,
            queue,
            ingest,
            files,
            quota,
            media,
            store,
            local_root: None,
            redis: None,
            namespace: stowage_events::DEFAULT_NAMESPACE.to_owned(),
            settle: usage::DEFAULT_SETTLE,
            gc_batch: defaults.gc_batch,
            gc_time: defaults.gc_time,
            rechecks: activity::RecheckSettings::from(&defaults),
        }
    }

    /// How failed rechecks are retried (attempts, first wait, factor) and how many run at
    /// once, from the process's settings.
    pub fn with_rechecks(mut self, config: &stowage_runtime::config::LifecycleConfig) -> Self {
        self.rechecks = activity::RecheckSettings::from(config);
        self
    }

    /// How many blobs, and then files, one `blob_gc` run looks at; the next run goes on where
    /// it stopped.
    pub fn with_gc_batch(mut self, batch: u64) -> Self {
        self.gc_batch = batch.max(1);
        self
    }

    /// How long each of `blob_gc`'s two ways may go on in one run; past it, a way stops after
    /// the item (or page of files) it is at, having looked at one at least, and the next run
    /// goes on from there.
    pub fn with_gc_time(mut self, time: std::time::Duration) -> Self {
        self.gc_time = time;
        self
    }

    /// The local-disk store's directory: `blob_gc` also removes the temporary files of writes
    /// that never finished there.
    pub fn with_local_root(mut self, root: Option<std::path::PathBuf>) -> Self {
        self.local_root = root;
        self
    }

    /// Waits `settle` before taking a second look at a drifted account: a recount between
    /// two steps of a purge or an upload is not a drift.
    pub fn with_reconcile_settle(mut self, settle: std::time::Duration) -> Self {
        self.settle = settle;
        self
    }

    /// Keeps users' live session state in `redis`, under `namespace`.
    pub fn with_redis(mut self, redis: fred::clients::Client, namespace: &str) -> Self {
        self.redis = Some(redis);
        self.namespace = namespace.to_owned();
        self
    }

    /// Registers an ephemeral blob of `owner` living `ttl` unless acknowledged first.
    pub async fn register_ephemeral(
        &self,
        key: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<DateTime<Utc>, tonic::Status> {
        let secs = ttl.as_secs_f64();
        let conn = self.pool.get().await.map_err(db)?;
        let row = conn
            .query_one_cached(
                "INSERT INTO lifecycle.ephemeral (storage_key, owner, expires_at)
                 VALUES ($1, $2, now() + make_interval(secs => $3))
                 ON CONFLICT (storage_key) DO UPDATE SET expires_at = EXCLUDED.expires_at,
                     owner = EXCLUDED.owner, created_at = now(), acknowledged_at = NULL
                 RETURNING expires_at",
                &[&key, &owner, &secs],
            )
            .await
            .map_err(db)?;
        Ok(row.get(0))
    }

    /// Acknowledges ephemeral blobs; returns how many were registered.
    pub async fn ack_ephemeral(&self, keys: &[String]) -> Result<u64, tonic::Status> {
        let conn = self.pool.get().await.map_err(db)?;
        conn.execute_cached(
            "UPDATE lifecycle.ephemeral SET acknowledged_at = coalesce(acknowledged_at, now())
             WHERE storage_key = ANY($1)",
            &[&keys],
        )
        .await
        .map_err(db)
    }

    /// Runs due rechecks until `shutdown`, looking every `every`.
    pub async fn run_rechecks(
        self: Arc<Self>,
        every: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(status) = self.run_due_rechecks().await {
                tracing::warn!(%status, "rechecks not run; retrying");
            }
        }
    }

    /// The job queue (schedules live there).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The policy in force.
    pub async fn policy(&self) -> Result<Policy, tonic::Status> {
        let conn = self.pool.get().await.map_err(db)?;
        let row = conn
            .query_opt_cached("SELECT policy FROM lifecycle.policy", &[])
            .await
            .map_err(db)?;
        // A stored policy this version cannot read (written by a newer one, or by hand)
        // stops the tasks that follow it, rather than running them under the defaults (a
        // shorter trash retention than the one set would purge what was to be kept).
        match row {
            None => Ok(Policy::default()),
            Some(row) => serde_json::from_value(row.get(0)).map_err(|e| {
                tonic::Status::failed_precondition(format!(
                    "the stored policy cannot be read by this version ({e}); set it again with SetPolicy"
                ))
            }),
        }
    }

    /// Replaces the policy.
    pub async fn set_policy(&self, policy: &Policy) -> Result<Policy, tonic::Status> {
        let value = serde_json::to_value(policy)
            .map_err(|e| tonic::Status::internal(format!("policy: {e}")))?;
        let conn = self.pool.get().await.map_err(db)?;
        conn.execute_cached(
            "INSERT INTO lifecycle.policy (policy) VALUES ($1)
             ON CONFLICT (id) DO UPDATE SET policy = $1, updated_at = now()",
            &[&value],
        )
        .await
        .map_err(db)?;
        tracing::info!(?policy, "lifecycle policy changed");
        Ok(policy.clone())
    }

    /// Runs task `name` now and records the run.
    pub async fn execute(&self, name: &str, dry_run: bool) -> Result<RunRecord, tonic::Status> {
        if !TASKS.iter().any(|t| t.name == name) {
            return Err(stowage_runtime::status::invalid_argument(
                "name",
                format!("no scheduled job {name:?}"),
            ));
        }
        let policy = self.policy().await?;
        let id = Uuid::now_v7();
        let conn = self.pool.get().await.map_err(db)?;
        // Runs of this task whose process died mid-run never said so: older than any run can
        // last, they are closed as abandoned.
        let longest = self.queue.config().job_timeout.as_secs_f64() * 2.0;
        conn.execute_cached(
            "UPDATE lifecycle.runs SET finished_at = now(),
                 error = 'abandoned: its process stopped before the run ended'
             WHERE name = $1 AND finished_at IS NULL
               AND started_at < now() - make_interval(secs => $2)",
            &[&name, &longest],
        )
        .await
        .map_err(db)?;
        // Runs are kept 90 days: tasks every minute would otherwise add half a million rows
        // a year each.
        conn.execute_cached(
            "DELETE FROM lifecycle.runs WHERE name = $1 AND started_at < now() - interval '90 days'",
            &[&name],
        )
        .await
        .map_err(db)?;
        conn.execute_cached(
            "INSERT INTO lifecycle.runs (id, name, dry_run) VALUES ($1, $2, $3)",
            &[&id, &name, &dry_run],
        )
        .await
        .map_err(db)?;
        drop(conn);
        // Stopped before it ends (the job's time ran out, the caller of RunNow hung up), the
        // run is closed as such, not left running for ever.
        let mut unfinished = Unfinished {
            pool: Some(self.pool.clone()),
            id,
        };
        let started = std::time::Instant::now();
        let outcome = self.run_task(name, &policy, dry_run).await;
        unfinished.pool = None;
        // `task`, not `job`: Prometheus sets `job` on every target itself (and would rename ours).
        metrics::histogram!("stowage_cleanup_run_seconds", "task" => name.to_owned())
            .record(started.elapsed().as_secs_f64());
        let (tally, error) = match &outcome {
            Ok(t) => (t.clone(), String::new()),
            Err(s) => (Tally::default(), format!("{}: {}", s.code(), s.message())),
        };
        let to_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let conn = self.pool.get().await.map_err(db)?;
        let row = conn
            .query_one_cached(
                "UPDATE lifecycle.runs SET finished_at = now(), examined = $2, acted = $3,
                     failed = $4, error = $5, report = $6
                 WHERE id = $1
                 RETURNING id, name, started_at, finished_at, examined, acted, failed, report,
                     dry_run, error",
                &[
                    &id,
                    &to_i64(tally.examined),
                    &to_i64(tally.acted),
                    &to_i64(tally.failed),
                    &error,
                    &tally.report,
                ],
            )
            .await
            .map_err(db)?;
        metrics::counter!("stowage_cleanup_runs_total", "task" => name.to_owned(), "outcome" => if error.is_empty() { "ok" } else { "error" })
            .increment(1);
        tracing::info!(run_id = %id, name, dry_run, examined = tally.examined, acted = tally.acted, failed = tally.failed, error, "lifecycle run finished");
        outcome?;
        Ok(RunRecord::from_row(&row))
    }

    /// Runs newest first, optionally of one task, after `before` (keyset).
    pub async fn runs(
        &self,
        name: Option<&str>,
        before: Option<(DateTime<Utc>, Uuid)>,
        limit: i64,
    ) -> Result<Vec<RunRecord>, tonic::Status> {
        let conn = self.pool.get().await.map_err(db)?;
        let (at, id) = before.unzip();
        let rows = conn
            .query_cached(
                "SELECT id, name, started_at, finished_at, examined, acted, failed, report, dry_run,
                     error
                 FROM lifecycle.runs
                 WHERE ($1::text IS NULL OR name = $1)
                   AND ($2::timestamptz IS NULL OR (started_at, id) < ($2, $3))
                 ORDER BY started_at DESC, id DESC LIMIT $4",
                &[&name, &at, &id, &limit],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(RunRecord::from_row).collect())
    }
}

pub(crate) fn db(error: impl std::error::Error + 'static) -> tonic::Status {
    stowage_runtime::status::database_failed("lifecycle database", &error)
}

/// The handler of scheduled ticks: runs the task the job names.
#[async_trait::async_trait]
impl Handler for Lifecycle {
    async fn run(&self, job: &Job) -> Result<(), JobError> {
        let name = job
            .payload
            .get("name")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| JobError::permanent("payload.name: missing"))?;
        match self.execute(name, false).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::InvalidArgument => Err(JobError::permanent(s)),
            Err(s) => Err(JobError::retry(s)),
        }
    }
}

/// A run in progress; dropped before its end, it records that the run was stopped.
struct Unfinished {
    /// Taken when the run ends.
    pool: Option<PgPool>,
    id: Uuid,
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        let (Some(pool), Ok(runtime)) = (self.pool.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let id = self.id;
        runtime.spawn(async move {
            let closed = async {
                pool.get()
                    .await
                    .map_err(db)?
                    .execute(
                        "UPDATE lifecycle.runs SET finished_at = now(),
                             error = 'cancelled: stopped before it ended (out of time, or its caller hung up)'
                         WHERE id = $1 AND finished_at IS NULL",
                        &[&id],
                    )
                    .await
                    .map_err(db)
            }
            .await;
            if let Err(error) = closed {
                tracing::warn!(run_id = %id, %error, "stopped run not recorded");
            }
        });
    }
}
