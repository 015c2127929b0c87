//! The producer's side: an event row written in the caller's transaction.

use deadpool_postgres::GenericClient;
use stowage_db::Cached;
use uuid::Uuid;

/// Records an event in `schema`'s outbox inside the caller's transaction, so it exists if and
/// only if the change it announces commits. It carries the current trace context, and wakes
/// the relay (the notification is delivered at commit).
pub async fn stage(
    tx: &impl GenericClient,
    schema: &str,
    topic: &str,
    key: &str,
    payload: &serde_json::Value,
) -> Result<Uuid, tokio_postgres::Error> {
    let traceparent = stowage_telemetry::current_traceparent();
    let row = tx
        .query_one_cached(
            &format!(
                "WITH staged AS (
                     INSERT INTO {schema}.outbox (topic, key, payload, traceparent)
                     VALUES ($1, $2, $3, $4) RETURNING event_id)
                 SELECT event_id, pg_notify($5, '') FROM staged"
            ),
            &[
                &topic,
                &key,
                payload,
                &traceparent,
                &crate::relay::channel(schema),
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// For a statement that makes a change and stages its events in one go (no transaction held
/// open across a round trip): CTEs `staged` and `notified` that put one event per row of the
/// CTE `rows` (columns `key text`, `payload jsonb`) into `schema`'s outbox. Parameters `$p`,
/// `$p+1` and `$p+2` take [`StageParams`]' topic, traceparent and channel, in that order. The
/// statement must read `notified` (for example `(SELECT count(*) FROM notified)`): that is
/// what wakes the relay.
pub fn stage_ctes(schema: &str, rows: &str, p: usize) -> String {
    let (traceparent, channel) = (p + 1, p + 2);
    format!(
        "staged AS (
             INSERT INTO {schema}.outbox (topic, key, payload, traceparent)
             SELECT ${p}, key, payload, ${traceparent} FROM {rows}
             RETURNING event_id),
         notified AS (SELECT pg_notify(${channel}, '') FROM staged)"
    )
}

/// The parameters of [`stage_ctes`].
#[derive(Debug)]
pub struct StageParams {
    /// The events' topic.
    pub topic: &'static str,
    /// The current trace context.
    pub traceparent: Option<String>,
    /// The relay's notification channel.
    pub channel: String,
}

impl StageParams {
    /// For events of `topic` in `schema`'s outbox, in the current trace.
    pub fn new(schema: &str, topic: &'static str) -> Self {
        Self {
            topic,
            traceparent: stowage_telemetry::current_traceparent(),
            channel: crate::relay::channel(schema),
        }
    }
}
