//! Repeatable schedules: each tick enqueues exactly one job, however many replicas run a
//! [`Scheduler`].
//!
//! Ticks fall on multiples of the interval since the Unix epoch (an hourly schedule fires on
//! the hour), computed by the database's clock. Firing is one transaction: a conditional
//! update that moves `next_run_at` past now, and the enqueue of the job with key
//! `{name}@{tick in epoch seconds}`. A replica that loses the race finds `next_run_at` in
//! the future and does nothing. After downtime the missed ticks collapse into one run.

use std::time::Duration;

use chrono::{DateTime, Utc};
use stowage_db::GenericClient;
use tokio_util::sync::CancellationToken;

use crate::{Enqueued, Error, NewJob, Queue};

/// Shortest interval: tick keys count whole seconds.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest interval.
const MAX_INTERVAL: Duration = Duration::from_secs(366 * 24 * 3600);
/// Shortest sleep of a scheduler between two looks at its schedules.
const MIN_WAIT: Duration = Duration::from_millis(10);

/// Least wait after a schedule failed to fire.
const FAILED_WAIT: Duration = Duration::from_secs(5);

/// A job to enqueue every `interval`.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Unique name; also the prefix of its jobs' keys. No `@`.
    pub name: String,
    /// Time between ticks: at least one second, whole milliseconds.
    pub interval: Duration,
    /// Kind of the jobs it enqueues.
    pub kind: String,
    /// Payload of the jobs it enqueues.
    pub payload: serde_json::Value,
}

impl Schedule {
    /// A schedule `name` that enqueues a job of `kind` with `payload` every `interval`.
    pub fn new(
        name: impl Into<String>,
        interval: Duration,
        kind: impl Into<String>,
        payload: serde_json::Value,
    ) -> Self {
        Self {
            name: name.into(),
            interval,
            kind: kind.into(),
            payload,
        }
    }

    fn validate(&self) -> Result<(), Error> {
        if self.name.is_empty() || self.name.len() > 200 || self.name.contains('@') {
            return Err(Error::invalid(
                "name",
                format!("{:?} must be 1 to 200 bytes without '@'", self.name),
            ));
        }
        if self.kind.is_empty() {
            return Err(Error::invalid("kind", "must not be empty"));
        }
        interval_ms(self.interval).map(|_| ())
    }
}

/// A schedule as stored, for operators.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleInfo {
    /// Its name.
    pub name: String,
    /// Kind of the jobs it enqueues.
    pub kind: String,
    /// The interval in force: an operator's, else the code's.
    pub interval: Duration,
    /// The interval the code declares.
    pub default_interval: Duration,
    /// Whether it fires.
    pub enabled: bool,
    /// Its next tick.
    pub next_run_at: DateTime<Utc>,
    /// The last tick it fired.
    pub last_run_at: Option<DateTime<Utc>>,
}

const INFO_COLUMNS: &str = "name, kind, coalesce(override_interval_ms, interval_ms) AS every_ms, \
     interval_ms, enabled, next_run_at, last_run_at";

impl ScheduleInfo {
    fn from_row(row: &tokio_postgres::Row) -> Result<Self, Error> {
        let duration = |column: &'static str| -> Result<Duration, Error> {
            let ms: i64 = row.try_get(column)?;
            u64::try_from(ms)
                .map(Duration::from_millis)
                .map_err(|_| Error::Corrupt {
                    column: "interval_ms",
                    value: ms.to_string(),
                })
        };
        Ok(Self {
            name: row.try_get("name")?,
            kind: row.try_get("kind")?,
            interval: duration("every_ms")?,
            default_interval: duration("interval_ms")?,
            enabled: row.try_get("enabled")?,
            next_run_at: row.try_get("next_run_at")?,
            last_run_at: row.try_get("last_run_at")?,
        })
    }
}

fn interval_ms(interval: Duration) -> Result<i64, Error> {
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&interval) {
        return Err(Error::invalid(
            "interval",
            format!("must be between {MIN_INTERVAL:?} and {MAX_INTERVAL:?}, is {interval:?}"),
        ));
    }
    i64::try_from(interval.as_millis()).map_err(|_| Error::invalid("interval", "too long"))
}

/// Keeps a set of schedules and fires their ticks; run one in every replica.
#[derive(Debug)]
pub struct Scheduler {
    queue: Queue,
    schedules: Vec<Schedule>,
}

impl Scheduler {
    /// A scheduler of `schedules` on `queue`.
    pub fn new(queue: Queue, schedules: Vec<Schedule>) -> Result<Self, Error> {
        for (i, schedule) in schedules.iter().enumerate() {
            schedule.validate()?;
            if schedules[..i].iter().any(|s| s.name == schedule.name) {
                return Err(Error::invalid(
                    "name",
                    format!("schedule {:?} is declared twice", schedule.name),
                ));
            }
        }
        Ok(Self { queue, schedules })
    }

    /// Records the schedules, then fires their ticks until `shutdown`.
    ///
    /// A schedule's kind, payload and default interval follow the code; whether it is
    /// enabled and an operator's interval survive restarts. Database errors are logged and
    /// retried.
    pub async fn run(self, shutdown: CancellationToken) {
        let idle_poll = self.queue.config().idle_poll;
        let names: Vec<String> = self.schedules.iter().map(|s| s.name.clone()).collect();
        let mut error_wait = Duration::from_millis(200);
        while let Err(error) = self.upsert().await {
            tracing::warn!(queue = %self.queue.schema(), %error, retry_in = ?error_wait, "cannot record schedules");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(error_wait) => {}
            }
            error_wait = (error_wait * 2).min(idle_poll);
        }
        tracing::info!(queue = %self.queue.schema(), schedules = ?names, "scheduler started");
        loop {
            // A schedule that failed stays due: the others' next ticks still set the wait,
            // but not sooner than a pause, or the failing one would be tried in a tight loop.
            let least = match self.fire_due(&names).await {
                Ok(()) => MIN_WAIT,
                Err(_) => FAILED_WAIT.min(idle_poll),
            };
            let wait = match self.next_due(&names).await {
                Ok(Some(seconds)) => Duration::try_from_secs_f64(seconds.max(0.0))
                    .unwrap_or(idle_poll)
                    .clamp(least, idle_poll),
                Ok(None) => idle_poll,
                Err(error) => {
                    tracing::warn!(queue = %self.queue.schema(), %error, "cannot fire schedules");
                    idle_poll
                }
            };
            // Sleep at most idle_poll: an operator may change a schedule from any replica.
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(queue = %self.queue.schema(), "scheduler stopped");
    }

    async fn upsert(&self) -> Result<(), Error> {
        let conn = self.queue.pool().get().await?;
        let stmt = conn
            .prepare_cached(&self.queue.sql(
                "INSERT INTO {schema}.schedules (name, kind, payload, interval_ms, next_run_at)
                 VALUES ($1, $2, $3, $4,
                         {schema}.jobs_tick_floor(now(), $4) + $4 * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE SET
                     kind = excluded.kind,
                     payload = excluded.payload,
                     interval_ms = excluded.interval_ms,
                     -- A new interval in force moves the next tick onto its grid.
                     next_run_at = CASE
                         WHEN schedules.override_interval_ms IS NULL
                              AND schedules.interval_ms <> excluded.interval_ms
                         THEN excluded.next_run_at
                         ELSE schedules.next_run_at END,
                     updated_at = now()",
            ))
            .await?;
        for schedule in &self.schedules {
            conn.execute(
                &stmt,
                &[
                    &schedule.name,
                    &schedule.kind,
                    &schedule.payload,
                    &interval_ms(schedule.interval)?,
                ],
            )
            .await?;
        }
        Ok(())
    }

    /// Fires each due schedule of `names`; one that fails does not keep the others from
    /// firing (the first error is returned once every one was tried).
    async fn fire_due(&self, names: &[String]) -> Result<(), Error> {
        let mut first_error = None;
        for name in names {
            match fire(&self.queue, name).await {
                Ok(Some((tick, enqueued))) => tracing::info!(
                    queue = %self.queue.schema(),
                    schedule = %name,
                    %tick,
                    job_id = %enqueued.id,
                    created = enqueued.created,
                    "schedule fired"
                ),
                Ok(None) => {}
                Err(error) => {
                    tracing::warn!(queue = %self.queue.schema(), schedule = %name, %error, "schedule did not fire");
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Seconds until the next tick of `names` (negative when overdue).
    async fn next_due(&self, names: &[String]) -> Result<Option<f64>, Error> {
        let conn = self.queue.pool().get().await?;
        let stmt = conn
            .prepare_cached(&self.queue.sql(
                "SELECT extract(epoch FROM min(next_run_at) - now())::float8 AS wait
                 FROM {schema}.schedules WHERE enabled AND name = ANY($1)",
            ))
            .await?;
        Ok(conn.query_one(&stmt, &[&names]).await?.try_get("wait")?)
    }
}

/// Fires the tick of schedule `name` if one is due, in one transaction with its job.
async fn fire(queue: &Queue, name: &str) -> Result<Option<(DateTime<Utc>, Enqueued)>, Error> {
    let mut conn = queue.pool().get().await?;
    let tx = conn.transaction().await?;
    let stmt = tx
        .prepare_cached(&queue.sql(
            "UPDATE {schema}.schedules s SET
                 last_run_at = t.tick, next_run_at = t.tick + t.every, updated_at = now()
             FROM (SELECT name,
                          {schema}.jobs_tick_floor(now(), coalesce(override_interval_ms, interval_ms))
                              AS tick,
                          coalesce(override_interval_ms, interval_ms) * interval '1 millisecond'
                              AS every
                   FROM {schema}.schedules WHERE name = $1) t
             WHERE s.name = t.name AND s.enabled AND s.next_run_at <= now()
             RETURNING s.kind, s.payload, t.tick",
        ))
        .await?;
    let Some(row) = tx.query_opt(&stmt, &[&name]).await? else {
        return Ok(None);
    };
    let tick: DateTime<Utc> = row.try_get("tick")?;
    // A run of an earlier tick still to finish (queued, running or waiting for its retry):
    // this tick passes, as ticks missed during downtime do, rather than piling up runs of
    // the same work behind a slow one.
    let pending = tx
        .prepare_cached(&queue.sql(
            "SELECT key FROM {schema}.jobs
             WHERE state IN ('queued', 'failed', 'running') AND starts_with(key, $1)
             LIMIT 1",
        ))
        .await?;
    if let Some(earlier) = tx.query_opt(&pending, &[&format!("{name}@")]).await? {
        tx.commit().await?;
        let earlier: String = earlier.try_get(0)?;
        tracing::info!(
            queue = %queue.schema(),
            schedule = %name,
            %tick,
            earlier,
            "schedule tick passed: its last run has not finished"
        );
        return Ok(None);
    }
    let job = NewJob::new(
        row.try_get::<_, String>("kind")?,
        format!("{name}@{}", tick.timestamp()),
        row.try_get("payload")?,
    );
    let enqueued = queue.enqueue_in(&tx, job).await?;
    tx.commit().await?;
    Ok(Some((tick, enqueued)))
}

impl Queue {
    /// Every schedule of the queue, by name.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleInfo>, Error> {
        let conn = self.pool().get().await?;
        let stmt = conn
            .prepare_cached(&self.sql(&format!(
                "SELECT {INFO_COLUMNS} FROM {{schema}}.schedules ORDER BY name"
            )))
            .await?;
        conn.query(&stmt, &[])
            .await?
            .iter()
            .map(ScheduleInfo::from_row)
            .collect()
    }

    /// Enables or disables schedule `name`. Enabling moves its next tick to the first one
    /// from now, so ticks missed while disabled do not fire.
    pub async fn set_enabled(&self, name: &str, enabled: bool) -> Result<ScheduleInfo, Error> {
        self.update_schedule(
            name,
            "next_run_at = CASE WHEN $2 AND NOT enabled
                 THEN {schema}.jobs_tick_floor(now(), coalesce(override_interval_ms, interval_ms))
                      + coalesce(override_interval_ms, interval_ms) * interval '1 millisecond'
                 ELSE next_run_at END,
             enabled = $2",
            Some(&enabled),
        )
        .await
    }

    /// Sets the interval of schedule `name` (an operator's choice, kept across restarts
    /// until [`Queue::reset_interval`]); its next tick is the first one from now on the new
    /// grid.
    pub async fn set_interval(
        &self,
        name: &str,
        interval: Duration,
    ) -> Result<ScheduleInfo, Error> {
        let ms = interval_ms(interval)?;
        self.update_schedule(
            name,
            "override_interval_ms = $2,
             next_run_at = {schema}.jobs_tick_floor(now(), $2) + $2 * interval '1 millisecond'",
            Some(&ms),
        )
        .await
    }

    /// Drops an operator's interval of schedule `name`: the code's applies again.
    pub async fn reset_interval(&self, name: &str) -> Result<ScheduleInfo, Error> {
        self.update_schedule(
            name,
            "override_interval_ms = NULL,
             next_run_at = CASE WHEN override_interval_ms IS NOT NULL
                 THEN {schema}.jobs_tick_floor(now(), interval_ms)
                      + interval_ms * interval '1 millisecond'
                 ELSE next_run_at END",
            None,
        )
        .await
    }

    async fn update_schedule(
        &self,
        name: &str,
        assignments: &str,
        value: Option<&(dyn tokio_postgres::types::ToSql + Sync)>,
    ) -> Result<ScheduleInfo, Error> {
        let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&name];
        params.extend(value);
        let conn = self.pool().get().await?;
        let stmt = conn
            .prepare_cached(&self.sql(&format!(
                "UPDATE {{schema}}.schedules SET {assignments}, updated_at = now()
                 WHERE name = $1
                 RETURNING {INFO_COLUMNS}"
            )))
            .await?;
        match conn.query_opt(&stmt, &params).await? {
            Some(row) => ScheduleInfo::from_row(&row),
            None => Err(Error::ScheduleNotFound(name.to_owned())),
        }
    }

    /// Enqueues one job of schedule `name` now, outside its ticks (key
    /// `{name}@manual-{uuid}`). Each call enqueues another job.
    pub async fn run_now(&self, name: &str) -> Result<Enqueued, Error> {
        let conn = self.pool().get().await?;
        let stmt = conn
            .prepare_cached(
                &self.sql("SELECT kind, payload FROM {schema}.schedules WHERE name = $1"),
            )
            .await?;
        let Some(row) = conn.query_opt(&stmt, &[&name]).await? else {
            return Err(Error::ScheduleNotFound(name.to_owned()));
        };
        let job = NewJob::new(
            row.try_get::<_, String>("kind")?,
            format!("{name}@manual-{}", uuid::Uuid::now_v7().simple()),
            row.try_get("payload")?,
        );
        let enqueued = self.enqueue_in(&conn, job).await?;
        tracing::info!(queue = %self.schema(), schedule = %name, job_id = %enqueued.id, "schedule run on demand");
        Ok(enqueued)
    }
}
