//! File events Media acts on.

use async_trait::async_trait;
use deadpool_postgres::Transaction;
use stowage_events::{Event, EventHandler, HandlerError, topics};
use stowage_jobs::{NewJob, Queue};
use uuid::Uuid;

use crate::{PROCESS_JOB, job_key};
use stowage_db::Cached;

/// Turns `file.created` of a file in processing into a processing job, and forgets a purged
/// file's quarantine, outcome and scan rows.
#[derive(Clone, Debug)]
pub struct FileEvents {
    queue: Queue,
}

impl FileEvents {
    /// Enqueues into `queue`.
    pub fn new(queue: Queue) -> Self {
        Self { queue }
    }

    /// Topics this handler reads.
    pub const TOPICS: &'static [&'static str] = &[topics::FILE_CREATED, topics::FILE_PURGED];
}

fn file_id(event: &Event) -> Result<Uuid, HandlerError> {
    event
        .payload
        .get("file_id")
        .and_then(serde_json::Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| {
            HandlerError(format!(
                "{} event {} without file_id",
                event.topic, event.id
            ))
        })
}

/// Whether a `file.created` event is for a file in processing (events from before the status
/// was carried are taken as such).
fn in_processing(event: &Event) -> bool {
    event
        .payload
        .get("status")
        .and_then(serde_json::Value::as_str)
        .is_none_or(|s| s == "processing")
}

#[async_trait]
impl EventHandler for FileEvents {
    async fn handle(&self, event: &Event, tx: &Transaction<'_>) -> Result<(), HandlerError> {
        let id = file_id(event)?;
        match event.topic.as_str() {
            topics::FILE_CREATED if !in_processing(event) => {
                // Registered ready: there is nothing for Media to do (see
                // `stowage_ingest::Registration`).
            }
            topics::FILE_CREATED => {
                // In the event's transaction: the job exists exactly when the event counts as
                // applied. The key makes a second event for the file a no-op.
                let mut job = NewJob::new(
                    PROCESS_JOB,
                    job_key(&id),
                    serde_json::json!({ "file_id": id }),
                );
                job.traceparent = stowage_telemetry::current_traceparent();
                self.queue
                    .enqueue_in(tx, job)
                    .await
                    .map_err(|e| HandlerError(format!("enqueue: {e}")))?;
            }
            topics::FILE_PURGED => {
                tx.execute_cached("DELETE FROM media.quarantine WHERE file_id = $1", &[&id])
                    .await?;
                tx.execute_cached("DELETE FROM media.outcomes WHERE file_id = $1", &[&id])
                    .await?;
                tx.execute_cached("DELETE FROM media.scans WHERE file_id = $1", &[&id])
                    .await?;
                tx.execute_cached(
                    "DELETE FROM media.unfinished_runs WHERE file_id = $1",
                    &[&id],
                )
                .await?;
            }
            _ => {}
        }
        Ok(())
    }
}
