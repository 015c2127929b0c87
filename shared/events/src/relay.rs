//! The relay: unpublished outbox rows → Redis Streams, in id order, marked sent only after
//! Redis took them. All its state is in PostgreSQL, so it survives restarts of itself and of
//! Redis.

use std::{sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use fred::{clients::Client, interfaces::KeysInterface, prelude::*};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{Event, event::stream_key, settle::EntryId};
use stowage_db::Cached;

/// How often, at most, a relay counts its unpublished rows for the lag gauges.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Errors of one relay pass.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// PostgreSQL failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection could be taken from the pool.
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The database URL cannot be used.
    #[error("database url: {0}")]
    Target(#[from] stowage_db::DbError),
    /// Redis failed or is unreachable; the rows stay unpublished.
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    /// The schema's name cannot be one (it goes into SQL and a channel name).
    #[error("schema {0:?}: 1 to 40 lowercase letters, digits or _, starting with a letter")]
    Schema(String),
}

/// How a relay behaves.
#[derive(Clone, Debug)]
pub struct RelaySettings {
    /// Rows published per pass.
    pub batch: usize,
    /// Approximate length each stream is cut to (`XADD MAXLEN ~`), a bound on Redis' memory
    /// when a group falls far behind; streams are otherwise trimmed to what every group has
    /// acknowledged.
    pub stream_max_len: u64,
    /// How often the relay settles what the groups acknowledged and checks for lost entries.
    pub settle_every: Duration,
    /// Longest sleep while idle (notifications usually wake it first).
    pub idle_poll: Duration,
    /// How far back events are published again when Redis has lost its data, and how long
    /// streams keep acknowledged entries for groups created late.
    pub replay_window: Duration,
    /// How long published rows are kept (at least the replay window).
    pub retention: Duration,
    /// Prefix of the Redis keys, so meshes (or test runs) can share one Redis.
    pub namespace: String,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch: 500,
            stream_max_len: 1_000_000,
            settle_every: Duration::from_secs(1),
            idle_poll: Duration::from_secs(1),
            replay_window: Duration::from_secs(3600),
            retention: Duration::from_secs(7 * 24 * 3600),
            namespace: crate::DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

/// Publishes one schema's outbox.
#[derive(Clone)]
pub struct Relay {
    pub(crate) pool: Pool,
    listen: stowage_db::PgTarget,
    pub(crate) schema: String,
    pub(crate) redis: Client,
    pub(crate) settings: RelaySettings,
    /// Settling passes skipped in a row because another relay was publishing.
    pub(crate) settle_skipped: Arc<std::sync::atomic::AtomicU32>,
}

impl Relay {
    /// A relay of `schema`'s outbox in the database at `database_url` (a dedicated connection
    /// listens for new rows), publishing through `redis`.
    pub fn new(
        pool: Pool,
        database_url: &str,
        schema: &str,
        redis: Client,
        settings: RelaySettings,
    ) -> Result<Self, RelayError> {
        if !is_schema_name(schema) {
            return Err(RelayError::Schema(schema.to_owned()));
        }
        Ok(Self {
            pool,
            listen: stowage_db::PgTarget::parse(database_url)?,
            schema: schema.to_owned(),
            redis,
            settings,
            settle_skipped: Arc::default(),
        })
    }

    /// Publishes until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) {
        let wake = Arc::new(Notify::new());
        let listener = tokio::spawn(stowage_db::listen(
            self.listen.clone(),
            channel(&self.schema),
            Arc::clone(&wake),
            shutdown.child_token(),
        ));
        // The first pass prunes too: a relay restarted more often than every ten minutes
        // would otherwise never prune.
        let mut last_prune: Option<tokio::time::Instant> = None;
        let mut last_lag: Option<tokio::time::Instant> = None;
        let mut last_settle: Option<tokio::time::Instant> = None;
        let mut settle_failures = 0u32;
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let settle = last_settle.is_none_or(|at| at.elapsed() >= self.settings.settle_every);
            let pass = async {
                self.replay_if_redis_forgot().await?;
                if settle {
                    last_settle = Some(tokio::time::Instant::now());
                    // Publishing does not wait on settling: a failure is reported, and the
                    // next pass tries again.
                    match self.settle().await {
                        Ok(_) => settle_failures = 0,
                        Err(error) => {
                            settle_failures = settle_failures.saturating_add(1);
                            if settle_failures == 1 {
                                tracing::warn!(schema = %self.schema, %error, "outbox settling failed, retrying");
                            }
                        }
                    }
                }
                self.publish_pending().await
            };
            let outcome = tokio::select! {
                () = shutdown.cancelled() => break,
                outcome = pass => outcome,
            };
            let idle = match outcome {
                Ok(n) => {
                    failures = 0;
                    n < self.settings.batch
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(schema = %self.schema, %error, "outbox relay pass failed, retrying");
                    }
                    true
                }
            };
            // The gauges are read every few seconds at most; counting the unpublished rows
            // after every batch would cost a statement per batch under load.
            if last_lag.is_none_or(|at| at.elapsed() >= LAG_EVERY) {
                last_lag = Some(tokio::time::Instant::now());
                if let Err(error) = self.observe_lag().await {
                    tracing::debug!(%error, "outbox lag not measured");
                }
            }
            if last_prune.is_none_or(|at| at.elapsed() > Duration::from_secs(600)) {
                last_prune = Some(tokio::time::Instant::now());
                if let Err(error) = self.prune().await {
                    tracing::warn!(%error, "outbox prune failed");
                }
            }
            if idle {
                // After a failure back off up to 5 s; otherwise sleep until a new row or the
                // idle poll.
                let wait = if failures > 0 {
                    Duration::from_millis(200 * u64::from(failures.min(25)))
                } else {
                    self.settings.idle_poll
                };
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = wake.notified(), if failures == 0 => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
        // Its stop is a child of `shutdown`: it leaves the shared listening connection.
        let _ = listener.await;
    }

    /// Key of the advisory lock publishers of this schema take (`hashtext` of it).
    pub(crate) fn publish_lock(&self) -> String {
        format!("stowage-outbox:{}", self.schema)
    }

    /// Takes the publishers' lock for `tx` if no other relay of the schema holds it.
    pub(crate) async fn try_publish_lock(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
    ) -> Result<bool, RelayError> {
        Ok(tx
            .query_one_cached(
                "SELECT pg_try_advisory_xact_lock(hashtext($1))",
                &[&self.publish_lock()],
            )
            .await?
            .get(0))
    }

    /// Publishes one batch of unpublished rows; returns how many. Only one relay of a schema
    /// publishes at a time (an advisory lock), which keeps each stream in outbox order (except
    /// for what is published again: see [`crate::Settled`]).
    pub async fn publish_pending(&self) -> Result<usize, RelayError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        if !self.try_publish_lock(&tx).await? {
            return Ok(0);
        }
        let limit = i64::try_from(self.settings.batch).unwrap_or(i64::MAX);
        let rows = tx
            .query_cached(
                &format!(
                    "SELECT id, event_id, topic, key, payload, traceparent, created_at
                     FROM {}.outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
                    self.schema
                ),
                &[&limit],
            )
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let pipeline = self.redis.pipeline();
        let mut ids = Vec::with_capacity(rows.len());
        let mut topics = Vec::with_capacity(rows.len());
        for row in &rows {
            let event = Event {
                id: row.get::<_, Uuid>(1),
                topic: row.get(2),
                key: row.get(3),
                payload: row.get(4),
                traceparent: row.get(5),
                occurred_at: row.get::<_, DateTime<Utc>>(6),
            };
            let fields = event.to_fields();
            let cap = ("MAXLEN", "~", self.settings.stream_max_len as i64);
            let _: () = pipeline
                .xadd(
                    stream_key(&self.settings.namespace, &event.topic),
                    false,
                    cap,
                    "*",
                    fields,
                )
                .await?;
            ids.push(row.get::<_, i64>(0));
            topics.push(event.topic);
        }
        let mut entries_ms = Vec::with_capacity(rows.len());
        let mut entries_seq = Vec::with_capacity(rows.len());
        for result in pipeline.try_all::<Value>().await {
            // Rows stay unpublished; entries that did get in are repeated next pass, which
            // consumers dedupe.
            let entry: EntryId = result?
                .as_string()
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| {
                    fred::error::Error::new(fred::error::ErrorKind::Protocol, "XADD gave no id")
                })?;
            entries_ms.push(entry.ms);
            entries_seq.push(entry.seq);
        }
        // Marks the rows with their entries and counts the entries added to each stream (see
        // `settle`). Planned afresh each time, not cached: the outbox keeps published rows for
        // the replay window, and a plan cached while it was small (before its first ANALYZE)
        // walks every row instead of the primary key, 1 ms per batch at a few thousand rows.
        tx.execute(
            &format!(
                "WITH marked AS (
                     UPDATE {0}.outbox o SET published_at = now(), stream_ms = e.ms, stream_seq = e.seq
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS e(id, ms, seq)
                     WHERE o.id = e.id RETURNING o.topic)
                 INSERT INTO {0}.outbox_streams AS s (topic, added)
                 SELECT topic, count(*) FROM marked GROUP BY topic
                 ON CONFLICT (topic) DO UPDATE SET added = s.added + excluded.added",
                self.schema
            ),
            &[&ids, &entries_ms, &entries_seq],
        )
        .await?;
        tx.commit().await?;
        for topic in topics {
            metrics::counter!("stowage_events_published_total", "topic" => topic).increment(1);
        }
        Ok(ids.len())
    }

    /// When Redis has no record of this schema's epoch key, it lost its data (or never saw
    /// this relay): everything published within the replay window, and everything not yet
    /// acknowledged by every group, goes out again.
    async fn replay_if_redis_forgot(&self) -> Result<(), RelayError> {
        let key = crate::event::epoch_key(&self.settings.namespace, &self.schema);
        let present: i64 = self.redis.exists(&key).await?;
        if present > 0 {
            return Ok(());
        }
        let window = chrono::Duration::from_std(self.settings.replay_window)
            .unwrap_or(chrono::Duration::hours(1));
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        // Under the publishers' lock: a batch another relay sent to the Redis that was lost,
        // and marks published only now, is then marked before this looks, and goes again.
        tx.execute_cached(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&self.publish_lock()],
        )
        .await?;
        // Also what no group had acknowledged yet, however old; and the streams start again
        // from no entries, as Redis counts them.
        let replayed = tx
            .execute_cached(
                &format!(
                    "UPDATE {}.outbox
                     SET published_at = NULL, stream_ms = NULL, stream_seq = NULL, settled_at = NULL
                     WHERE published_at > now() - ($1::float8 * interval '1 second')
                        OR (settled_at IS NULL AND stream_ms IS NOT NULL
                            AND created_at > now() - interval '{}')",
                    self.schema,
                    crate::settle::REQUEUE_HORIZON
                ),
                &[&pg_interval(window)],
            )
            .await?;
        tx.execute_cached(
            &format!("UPDATE {}.outbox_streams SET added = 0", self.schema),
            &[],
        )
        .await?;
        tx.commit().await?;
        // Set only after the rows are queued again: a crash in between replays twice, never
        // zero times.
        let _: Option<String> = self
            .redis
            .set(
                &key,
                Utc::now().to_rfc3339(),
                None,
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if replayed > 0 {
            tracing::info!(schema = %self.schema, replayed, "redis has no record of recent events, publishing them again");
            metrics::counter!("stowage_events_replayed_total", "schema" => self.schema.clone(), "reason" => "restart")
                .increment(replayed);
        }
        Ok(())
    }

    async fn observe_lag(&self) -> Result<(), RelayError> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_one_cached(
                &format!(
                    "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
                     FROM {}.outbox WHERE published_at IS NULL",
                    self.schema
                ),
                &[],
            )
            .await?;
        let schema = self.schema.clone();
        metrics::gauge!("stowage_outbox_pending", "schema" => schema.clone())
            .set(row.get::<_, i64>(0) as f64);
        metrics::gauge!("stowage_outbox_lag_seconds", "schema" => schema).set(row.get::<_, f64>(1));
        Ok(())
    }

    async fn prune(&self) -> Result<(), RelayError> {
        let keep = self.settings.retention.max(self.settings.replay_window);
        let keep = chrono::Duration::from_std(keep).unwrap_or(chrono::Duration::days(7));
        let conn = self.pool.get().await?;
        // Rows some group never acknowledged go too (a group no one reads any more, or a
        // Redis loss older than the replay horizon): counted, and said, as events dropped.
        let row = conn
            .query_one_cached(
                &format!(
                    "WITH gone AS (
                         DELETE FROM {}.outbox WHERE published_at < now() - ($1::float8 * interval '1 second')
                         RETURNING topic, settled_at IS NULL AS unsettled)
                     SELECT count(*), count(*) FILTER (WHERE unsettled),
                            COALESCE(array_agg(DISTINCT topic) FILTER (WHERE unsettled), '{{}}')
                     FROM gone",
                    self.schema
                ),
                &[&pg_interval(keep)],
            )
            .await?;
        let (removed, unsettled, topics): (i64, i64, Vec<String>) =
            (row.get(0), row.get(1), row.get(2));
        tracing::debug!(schema = %self.schema, removed, "pruned published outbox rows");
        if unsettled > 0 {
            tracing::warn!(schema = %self.schema, unsettled, ?topics, "pruned outbox rows that some consumer group never acknowledged: those events are dropped for it (a group no one reads any more can be removed with XGROUP DESTROY)");
            metrics::counter!("stowage_events_dropped_total", "schema" => self.schema.clone())
                .increment(unsettled.unsigned_abs());
        }
        Ok(())
    }
}

/// The notification channel of `schema`'s outbox.
pub(crate) fn channel(schema: &str) -> String {
    format!("stowage_outbox_{schema}")
}

/// Seconds of `d`, for `$n::float8 * interval '1 second'`.
pub(crate) fn pg_interval(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// Whether `schema` can name a schema here: it goes into SQL unquoted and, as
/// `stowage_outbox_{schema}`, into a channel name of at most 63 bytes.
fn is_schema_name(schema: &str) -> bool {
    schema.len() <= 40
        && schema.starts_with(|c: char| c.is_ascii_lowercase())
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

#[cfg(test)]
mod schema_tests {
    #[test]
    fn schema_names_fit_sql_and_channels() {
        for good in ["ingest", "probe", "a1_b", &"s".repeat(40)] {
            assert!(super::is_schema_name(good), "{good}");
        }
        for bad in ["", "1st", "Files", "a-b", "a\"b", "x;drop", &"s".repeat(41)] {
            assert!(!super::is_schema_name(bad), "{bad}");
        }
    }
}
