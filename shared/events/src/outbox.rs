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
