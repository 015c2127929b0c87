//! The consumer's side: a consumer group per service, each event applied in a PostgreSQL
//! transaction together with its dedupe row, acknowledged only after that commits. The
//! entries of one read share one transaction; if any of them fails, each is applied alone, so
//! a bad event holds back only itself.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use async_trait::async_trait;
use deadpool_postgres::{Pool, Transaction};
use fred::{clients::Client, prelude::*, types::streams::XReadResponse};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{Event, event::stream_key, relay::pg_interval};
use stowage_db::Cached;

/// Removes member ARGV[2] of group ARGV[1] of stream KEYS[1] if it holds no deliveries.
const FORGET_IF_EMPTY: &str = "if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then \
     return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end return -1";

/// Why a handler did not apply an event; it stays pending and is delivered again.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HandlerError(pub String);

impl From<tokio_postgres::Error> for HandlerError {
    fn from(error: tokio_postgres::Error) -> Self {
        // The server's own message: "db error" alone says nothing in a dead letter.
        match error.as_db_error() {
            Some(db) => Self(format!("database: {}", db.message())),
            None => Self(format!("database: {error}")),
        }
    }
}

/// Applies events of the topics a [`Consumer`] reads.
#[async_trait]
pub trait EventHandler: Send + Sync + 'static {
    /// Applies `event` inside `tx`, which also records that it was applied: what the handler
    /// writes through `tx` happens exactly once per event. Effects outside the database must
    /// be idempotent themselves.
    async fn handle(&self, event: &Event, tx: &Transaction<'_>) -> Result<(), HandlerError>;

    /// Applies `events` (all fresh, in delivery order) together inside `tx`, for a handler
    /// whose effects fold into fewer writes than one per event. Returns `false`, the default,
    /// to have each applied through [`EventHandler::handle`] in a span of its own instead;
    /// folded events share one span, so they are not traced one by one.
    async fn handle_batch(
        &self,
        events: &[&Event],
        tx: &Transaction<'_>,
    ) -> Result<bool, HandlerError> {
        let _ = (events, tx);
        Ok(false)
    }
}

/// How a consumer behaves.
#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    /// Entries read per call.
    pub batch: u64,
    /// How long a read waits for new entries.
    pub block: Duration,
    /// How long a delivery may stay unacknowledged before another consumer claims it.
    pub claim_idle: Duration,
    /// How long applied event ids are remembered (longer than any replay).
    pub dedupe_retention: Duration,
    /// Failed attempts at one event (while the database takes the count) after which it is
    /// set aside in `dead_events` and acknowledged.
    pub max_attempts: u32,
    /// Time without reading after which another member of the group, holding no deliveries,
    /// is taken for a process that is gone and removed (a live one reads every `block`).
    pub forget_members_after: Duration,
    /// Prefix of the Redis keys (as the relay's).
    pub namespace: String,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        Self {
            batch: 100,
            block: Duration::from_secs(2),
            claim_idle: Duration::from_secs(30),
            dedupe_retention: Duration::from_secs(7 * 24 * 3600),
            max_attempts: 10,
            forget_members_after: Duration::from_secs(3600),
            namespace: crate::DEFAULT_NAMESPACE.to_owned(),
        }
    }
}

/// A member of consumer group `group` over some topics, recording applied events in
/// `schema.consumed_events`.
pub struct Consumer {
    redis: Client,
    pool: Pool,
    schema: String,
    group: String,
    name: String,
    topics: Vec<String>,
    handler: Arc<dyn EventHandler>,
    settings: ConsumerSettings,
}

#[derive(Clone, Copy)]
enum Applied {
    Now,
    Before,
}

/// Reads of stuck events (each of up to `batch` entries) per stream and claim pass.
const MAX_CLAIM_READS: usize = 100;

impl Consumer {
    /// A consumer of `topics` in group `group`. It opens its own Redis connection (a blocking
    /// read holds a connection) with `redis`'s settings.
    pub fn new(
        redis: &Client,
        pool: Pool,
        schema: &str,
        group: &str,
        topics: &[&str],
        handler: Arc<dyn EventHandler>,
        settings: ConsumerSettings,
    ) -> Self {
        let name = format!(
            "{}-{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into()),
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        Self {
            redis: redis.clone_new(),
            pool,
            schema: schema.to_owned(),
            group: group.to_owned(),
            name,
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            handler,
            settings,
        }
    }

    /// Reads, applies and acknowledges until `shutdown`, finishing the event in hand.
    pub async fn run(self, shutdown: CancellationToken) {
        let _connection = self.redis.connect();
        let streams: Vec<String> = self
            .topics
            .iter()
            .map(|t| stream_key(&self.settings.namespace, t))
            .collect();
        let mut last_claim = tokio::time::Instant::now();
        let mut last_housekeeping = tokio::time::Instant::now() - Duration::from_secs(3600);
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            let read = tokio::select! {
                () = shutdown.cancelled() => break,
                read = self.read(&streams) => read,
            };
            match read {
                Ok(entries) => {
                    failures = 0;
                    self.process_read(entries).await;
                }
                Err(error) if error.details().starts_with("NOGROUP") => {
                    if let Err(error) = self.create_groups(&streams).await {
                        tracing::warn!(%error, group = %self.group, "cannot create consumer groups");
                        // Not at once again (a read-only replica, memory full): a pause, as
                        // after any failed read.
                        tokio::select! {
                            () = shutdown.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    metrics::counter!("stowage_events_read_failures_total", "group" => self.group.clone())
                        .increment(1);
                    // The first, then every hundredth (about every 8 minutes): a read that
                    // never succeeds is not silent.
                    if failures % 100 == 1 {
                        tracing::warn!(%error, group = %self.group, failures, "event read failed, retrying");
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(200 * u64::from(failures.min(25)))) => {}
                    }
                    continue;
                }
            }
            if last_claim.elapsed() >= self.settings.claim_idle / 2 {
                last_claim = tokio::time::Instant::now();
                self.claim_stuck(&streams).await;
            }
            if last_housekeeping.elapsed() >= Duration::from_secs(60) {
                last_housekeeping = tokio::time::Instant::now();
                self.observe_lag(&streams).await;
                self.prune_dedupe().await;
                self.forget_gone_members(&streams).await;
            }
        }
    }

    async fn read(
        &self,
        streams: &[String],
    ) -> Result<Vec<(String, String, HashMap<String, String>)>, fred::error::Error> {
        let ids = vec![">"; streams.len()];
        let block = u64::try_from(self.settings.block.as_millis()).unwrap_or(2000);
        let call = self.redis.xreadgroup::<fred::types::Value, _, _, _, _>(
            self.group.as_str(),
            self.name.as_str(),
            Some(self.settings.batch),
            Some(block),
            false,
            streams.to_vec(),
            ids,
        );
        // A read blocked on a connection that died must not hang forever.
        let value =
            match tokio::time::timeout(self.settings.block + Duration::from_secs(5), call).await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(fred::error::Error::new(
                        fred::error::ErrorKind::Timeout,
                        "XREADGROUP timed out",
                    ));
                }
            };
        // A read that times out without entries answers nil, which fred does not turn into an
        // empty map.
        if value.is_null() {
            return Ok(Vec::new());
        }
        let response: XReadResponse<String, String, String, String> =
            value.into_xread_response()?;
        Ok(response
            .into_iter()
            .flat_map(|(stream, entries)| {
                entries
                    .into_iter()
                    .map(move |(id, fields)| (stream.clone(), id, fields))
            })
            .collect())
    }

    async fn create_groups(&self, streams: &[String]) -> Result<(), fred::error::Error> {
        for stream in streams {
            // From the start of the stream: after a Redis restart the relay publishes again
            // into a fresh stream, and every entry of it must be read.
            match self
                .redis
                .xgroup_create::<(), _, _, _>(stream.as_str(), self.group.as_str(), "0", true)
                .await
            {
                Ok(()) => tracing::info!(stream, group = %self.group, "consumer group created"),
                Err(error) if error.details().starts_with("BUSYGROUP") => {}
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Applies the entries of one read: together in one transaction when there are several,
    /// each alone if that fails.
    async fn process_read(&self, entries: Vec<(String, String, HashMap<String, String>)>) {
        let mut events = Vec::with_capacity(entries.len());
        for (stream, id, fields) in entries {
            if let Some(event) = self.parse(&stream, &id, &fields).await {
                events.push((stream, id, event));
            }
        }
        if events.len() > 1 {
            let batch: Vec<&Event> = events.iter().map(|(_, _, event)| event).collect();
            match self.apply_guarded(&batch).await {
                Ok(applied) => {
                    for ((_, _, event), applied) in events.iter().zip(applied) {
                        self.count_applied(event, applied);
                    }
                    self.ack_all(&events).await;
                    return;
                }
                Err(error) => {
                    tracing::info!(%error, group = %self.group, events = events.len(), "a read's events did not apply together; applying them one by one");
                }
            }
        }
        for (stream, id, event) in &events {
            self.process_event(stream, id, event).await;
        }
    }

    /// The event in an entry; a malformed entry is dropped (and acknowledged).
    async fn parse(
        &self,
        stream: &str,
        id: &str,
        fields: &HashMap<String, String>,
    ) -> Option<Event> {
        match Event::from_fields(fields) {
            Ok(event) => Some(event),
            Err(reason) => {
                // Retrying cannot fix an entry no producer of ours could have written.
                tracing::error!(stream, id, %reason, "malformed event dropped");
                metrics::counter!("stowage_events_malformed_total").increment(1);
                self.ack(stream, id).await;
                None
            }
        }
    }

    /// The span an event is applied in, a child of the change that produced it.
    fn span(&self, event: &Event) -> tracing::Span {
        let span = tracing::info_span!(
            "event",
            otel.name = %format!("consume {}", event.topic),
            otel.kind = "consumer",
            event.id = %event.id,
            group = %self.group,
        );
        stowage_telemetry::set_parent_from_traceparent(&span, event.traceparent.as_deref());
        span
    }

    fn count_applied(&self, event: &Event, applied: Applied) {
        let outcome = match applied {
            Applied::Now => "applied",
            Applied::Before => "duplicate",
        };
        metrics::counter!("stowage_events_consumed_total", "topic" => event.topic.clone(), "group" => self.group.clone(), "outcome" => outcome).increment(1);
    }

    async fn process_event(&self, stream: &str, id: &str, event: &Event) {
        match self.apply_guarded(&[event]).await {
            Ok(applied) => {
                let [applied] = applied[..] else {
                    unreachable!("one result per event")
                };
                self.count_applied(event, applied);
                self.ack(stream, id).await;
            }
            Err(error) => {
                metrics::counter!("stowage_events_failed_total", "topic" => event.topic.clone(), "group" => self.group.clone()).increment(1);
                match self.count_failure(event, &error).await {
                    Ok(true) => {
                        tracing::error!(%error, event_id = %event.id, topic = %event.topic, group = %self.group, attempts = self.settings.max_attempts, "event failed on every attempt, set aside in dead_events");
                        metrics::counter!("stowage_events_dead_total", "topic" => event.topic.clone(), "group" => self.group.clone()).increment(1);
                        self.ack(stream, id).await;
                    }
                    // Left pending: claimed again after `claim_idle`.
                    Ok(false) => {
                        tracing::warn!(%error, event_id = %event.id, topic = %event.topic, "event not applied, will be retried");
                    }
                    Err(count_error) => {
                        tracing::warn!(%error, %count_error, event_id = %event.id, topic = %event.topic, "event not applied (failure not counted), will be retried");
                    }
                }
            }
        }
    }

    /// Counts a failed attempt at `event`; at the last one the event moves to `dead_events`
    /// (returns `true`: it is to be acknowledged). The count lives in the database, so only
    /// attempts that failed while the database answered count: an outage does not use them up.
    /// A later delivery of a dead event (a replay) gets its attempts afresh.
    async fn count_failure(
        &self,
        event: &Event,
        error: &HandlerError,
    ) -> Result<bool, HandlerError> {
        let mut conn = self.connection().await?;
        let tx = conn.transaction().await?;
        let attempts = i32::try_from(self.settings.max_attempts).unwrap_or(i32::MAX);
        let reason: String = error.0.chars().take(2000).collect();
        let row = tx
            .query_one_cached(
                &format!(
                    "WITH counted AS (
                         INSERT INTO {0}.event_failures AS f (consumer, event_id, failures, last_error)
                         VALUES ($1, $2, 1, $3)
                         ON CONFLICT (consumer, event_id) DO UPDATE
                             SET failures = f.failures + 1, last_error = excluded.last_error, failed_at = now()
                         RETURNING failures),
                     buried AS (
                         INSERT INTO {0}.dead_events AS d
                             (consumer, event_id, topic, key, payload, traceparent, occurred_at, failures, last_error)
                         SELECT $1, $2, $5, $6, $7, $8, $9, failures, $3 FROM counted WHERE failures >= $4
                         ON CONFLICT (consumer, event_id) DO UPDATE
                             SET failures = d.failures + excluded.failures, last_error = excluded.last_error, dead_at = now()
                         RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM buried)",
                    self.schema
                ),
                &[
                    &self.group,
                    &event.id,
                    &reason,
                    &attempts,
                    &event.topic,
                    &event.key,
                    &event.payload,
                    &event.traceparent,
                    &event.occurred_at,
                ],
            )
            .await?;
        let buried: bool = row.get(0);
        if buried {
            // Apart (a statement cannot delete the row its own upsert changed), in the same
            // transaction: a replayed event gets its attempts afresh.
            tx.execute_cached(
                &format!(
                    "DELETE FROM {}.event_failures WHERE consumer = $1 AND event_id = $2",
                    self.schema
                ),
                &[&self.group, &event.id],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(buried)
    }

    /// Applies `events` in one transaction: one dedupe insert for all, the handler for each
    /// one not applied before (once, even if a read holds it twice), one commit.
    /// [`Self::apply_together`], with a handler's panic turned into its failure: the events
    /// stay pending and are retried like any other failure, and the consumer keeps running.
    async fn apply_guarded(&self, events: &[&Event]) -> Result<Vec<Applied>, HandlerError> {
        use futures::FutureExt;
        std::panic::AssertUnwindSafe(self.apply_together(events))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| Err(HandlerError("handler panicked".to_owned())))
    }

    async fn apply_together(&self, events: &[&Event]) -> Result<Vec<Applied>, HandlerError> {
        let mut conn = self.connection().await?;
        let tx = conn.transaction().await?;
        let ids: Vec<uuid::Uuid> = events.iter().map(|e| e.id).collect();
        let mut fresh: HashSet<uuid::Uuid> = tx
            .query_cached(
                &format!(
                    "INSERT INTO {}.consumed_events (consumer, event_id)
                     SELECT $1, unnest($2::uuid[])
                     ON CONFLICT DO NOTHING RETURNING event_id",
                    self.schema
                ),
                &[&self.group, &ids],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut applied = Vec::with_capacity(events.len());
        let mut new = Vec::new();
        for event in events {
            if fresh.remove(&event.id) {
                applied.push(Applied::Now);
                new.push(*event);
            } else {
                applied.push(Applied::Before);
            }
        }
        let batch_span = tracing::info_span!("events", group = %self.group, events = new.len());
        let folded = new.is_empty()
            || self
                .handler
                .handle_batch(&new, &tx)
                .instrument(batch_span)
                .await?;
        if !folded {
            for event in new {
                self.handler
                    .handle(event, &tx)
                    .instrument(self.span(event))
                    .await?;
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    async fn connection(&self) -> Result<deadpool_postgres::Object, HandlerError> {
        self.pool
            .get()
            .await
            .map_err(|e| HandlerError(format!("database unavailable: {e}")))
    }

    async fn ack(&self, stream: &str, id: &str) {
        if let Err(error) = self
            .redis
            .xack::<i64, _, _, _>(stream, self.group.as_str(), id)
            .await
        {
            // Delivered again later and skipped as a duplicate.
            tracing::warn!(%error, stream, id, "event acknowledgement failed");
        }
    }

    /// Acknowledges `events` with one call per stream.
    async fn ack_all(&self, events: &[(String, String, Event)]) {
        let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
        for (stream, id, _) in events {
            by_stream.entry(stream).or_default().push(id);
        }
        for (stream, ids) in by_stream {
            if let Err(error) = self
                .redis
                .xack::<i64, _, _, _>(stream, self.group.as_str(), ids.clone())
                .await
            {
                // Delivered again later and skipped as duplicates.
                tracing::warn!(%error, stream, entries = ids.len(), "event acknowledgement failed");
            }
        }
    }

    /// Takes over deliveries another consumer left unacknowledged for `claim_idle`.
    async fn claim_stuck(&self, streams: &[String]) {
        let idle = u64::try_from(self.settings.claim_idle.as_millis()).unwrap_or(30_000);
        for stream in streams {
            // Through the whole pending list (a database outage leaves every event read
            // meanwhile in it), a read at a time and applied together, up to a bound per pass
            // so that new events are read in between.
            let mut cursor = "0-0".to_owned();
            for _ in 0..MAX_CLAIM_READS {
                let claimed = self
                    .redis
                    .xautoclaim_values::<String, String, String, _, _, _, _>(
                        stream.as_str(),
                        self.group.as_str(),
                        self.name.as_str(),
                        idle,
                        cursor.as_str(),
                        Some(self.settings.batch),
                        false,
                    )
                    .await;
                match claimed {
                    Ok((next, entries)) => {
                        if !entries.is_empty() {
                            tracing::info!(stream, events = entries.len(), "claimed stuck events");
                            let entries = entries
                                .into_iter()
                                .map(|(id, fields)| (stream.clone(), id, fields))
                                .collect();
                            self.process_read(entries).await;
                        }
                        if next == "0-0" {
                            break;
                        }
                        cursor = next;
                    }
                    Err(error) => {
                        tracing::debug!(%error, stream, "claim of stuck events failed");
                        break;
                    }
                }
            }
        }
    }

    /// Sets `stowage_events_consumer_lag` (entries not yet delivered to the group) and
    /// `stowage_events_consumer_pending` (delivered, not acknowledged) per topic.
    async fn observe_lag(&self, streams: &[String]) {
        for (stream, topic) in streams.iter().zip(&self.topics) {
            let Ok(groups) = self
                .redis
                .xinfo_groups::<Vec<HashMap<String, Value>>, _>(stream.as_str())
                .await
            else {
                continue;
            };
            let Some(info) = groups.iter().find(|g| {
                g.get("name").and_then(|v| v.as_string()).as_deref() == Some(self.group.as_str())
            }) else {
                continue;
            };
            let number = |k: &str| info.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            let labels = [("topic", topic.clone()), ("group", self.group.clone())];
            metrics::gauge!("stowage_events_consumer_lag", &labels).set(number("lag"));
            metrics::gauge!("stowage_events_consumer_pending", &labels).set(number("pending"));
        }
    }

    /// Removes members of the group that hold no deliveries and have not read for
    /// `forget_members_after`: processes that are gone (every process joins under a name of
    /// its own, so names would pile up with every restart).
    async fn forget_gone_members(&self, streams: &[String]) {
        let gone_after =
            i64::try_from(self.settings.forget_members_after.as_millis()).unwrap_or(i64::MAX);
        for stream in streams {
            let Ok(members) = self
                .redis
                .xinfo_consumers::<Vec<HashMap<String, Value>>, _, _>(
                    stream.as_str(),
                    self.group.as_str(),
                )
                .await
            else {
                continue;
            };
            for member in members {
                let number = |k: &str| member.get(k).and_then(Value::as_i64).unwrap_or(0);
                let Some(name) = member.get("name").and_then(Value::as_string) else {
                    continue;
                };
                if name == self.name || number("pending") > 0 || number("idle") < gone_after {
                    continue;
                }
                // Checked again and removed in one step: a member that woke meanwhile and
                // took deliveries keeps them (removing it would drop them from the group).
                match self
                    .redis
                    .eval::<i64, _, _, _>(
                        FORGET_IF_EMPTY,
                        vec![stream.as_str()],
                        vec![self.group.as_str(), name.as_str()],
                    )
                    .await
                {
                    Ok(-1) => tracing::debug!(
                        stream,
                        member = name,
                        "a gone member took deliveries meanwhile; kept"
                    ),
                    Ok(_) => tracing::debug!(stream, member = name, "removed a gone group member"),
                    Err(error) => tracing::debug!(%error, stream, "group member not removed"),
                }
            }
        }
    }

    async fn prune_dedupe(&self) {
        let keep = chrono::Duration::from_std(self.settings.dedupe_retention)
            .unwrap_or(chrono::Duration::days(7));
        let Ok(conn) = self.pool.get().await else {
            return;
        };
        if let Err(error) = conn
            .execute_cached(
                &format!(
                    "DELETE FROM {}.consumed_events
                     WHERE consumer = $1 AND consumed_at < now() - ($2::float8 * interval '1 second')",
                    self.schema
                ),
                &[&self.group, &pg_interval(keep)],
            )
            .await
        {
            tracing::warn!(%error, "dedupe prune failed");
        }
        // Failures of events that since applied, or were never delivered again; dead letters
        // an operator left for a month.
        if let Err(error) = conn
            .batch_execute(&format!(
                "DELETE FROM {0}.event_failures WHERE failed_at < now() - interval '7 days';
                 DELETE FROM {0}.dead_events WHERE dead_at < now() - interval '30 days';",
                self.schema
            ))
            .await
        {
            tracing::warn!(%error, "failure records prune failed");
        }
    }
}
