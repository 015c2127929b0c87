//! High-rate event streams: frames acknowledged only once durable, sealed into windows.
//!
//! A frame (`{stream_id, first_seq, events}`) waits for room in a byte budget (the memory
//! ceiling: when the writer falls behind, readers stop reading and HTTP/2 flow control slows
//! the client), then goes to one writer task that gathers the frames of every stream arriving
//! meanwhile and stores them in one PostgreSQL transaction: one lz4-compressed micro-segment
//! per stream, the stream's durable seq moved forward. Only then is the frame acknowledged.
//! Re-sent frames (seqs at or below the durable seq) are dropped, so a client that reconnects
//! and re-sends its unacknowledged tail makes no duplicates.
//!
//! A sealer (on every replica; an advisory lock per stream keeps it single) closes each
//! stream's arrival window once it has ended, merges its segments into one compressed batch
//! object in the store (`events/{stream}/{yyyy}/{mm}/{dd}/{window_start_ms}.lz4`), records the
//! batch and deletes the segments, in one transaction. Consumer groups read sealed batches in
//! order (each batch to one member of each group, redelivered if not acknowledged in time),
//! and an acknowledgement deletes the batch's stored screenshots.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as ObjectPath};
use prost::Message;
use stowage_db::PgPool;
use stowage_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};

/// Most events in one frame.
pub const MAX_FRAME_EVENTS: usize = 10_000;
/// Largest payload of one event.
pub const MAX_EVENT_PAYLOAD: usize = 1 << 20;
/// Frames gathered into one write at most.
const MAX_WRITE_FRAMES: usize = 2_000;
/// Bytes gathered into one write at most.
const MAX_WRITE_BYTES: usize = 32 << 20;

/// How event streams behave.
#[derive(Clone, Debug)]
pub struct StreamSettings {
    /// Length of a window.
    pub window: Duration,
    /// Wait after a window's end before it is sealed (frames in flight land first).
    pub grace: Duration,
    /// Bytes of frames waiting for the writer, at most (the memory ceiling).
    pub max_buffered: usize,
    /// Inline screenshots above this are moved to the store.
    pub inline_max: usize,
    /// Stored screenshots kept per stream after acknowledgement (a dev option; 0 keeps none).
    pub keep_screenshots: usize,
    /// A delivered batch not acknowledged within this is delivered again.
    pub redeliver_after: Duration,
    /// Artificial delay of every write (tests of back-pressure only).
    pub write_delay: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            grace: Duration::from_secs(2),
            max_buffered: 256 << 20,
            inline_max: 5 << 20,
            keep_screenshots: 0,
            redeliver_after: Duration::from_secs(60),
            write_delay: Duration::ZERO,
        }
    }
}

/// A frame waiting for the writer.
struct Pending {
    owner: String,
    stream: String,
    first_seq: u64,
    events: Vec<pb::Event>,
    done: oneshot::Sender<Result<u64>>,
    _budget: OwnedSemaphorePermit,
}

/// The event streams of one Ingest process.
#[derive(Clone)]
pub struct EventStreams {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    store: Arc<dyn ObjectStore>,
    settings: StreamSettings,
    writer: mpsc::Sender<Pending>,
    budget: Arc<Semaphore>,
}

fn validate_stream_id(id: &str) -> Result<()> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(Error::invalid(
            "stream_id",
            "must be 1..=128 characters of [A-Za-z0-9_.-]",
        ));
    }
    Ok(())
}

fn compress(events: &[pb::Event]) -> Vec<u8> {
    let mut raw = Vec::new();
    for event in events {
        // Encoding into a Vec cannot fail.
        let _ = event.encode_length_delimited(&mut raw);
    }
    lz4_flex::compress_prepend_size(&raw)
}

fn decompress(data: &[u8]) -> Result<Vec<pb::Event>> {
    let raw = lz4_flex::decompress_size_prepended(data)
        .map_err(|e| Error::Corrupt(format!("event segment: {e}")))?;
    let mut buf = Bytes::from(raw);
    let mut events = Vec::new();
    while !buf.is_empty() {
        events.push(
            pb::Event::decode_length_delimited(&mut buf)
                .map_err(|e| Error::Corrupt(format!("event segment: {e}")))?,
        );
    }
    Ok(events)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn timestamp_of(event: &pb::Event) -> Option<DateTime<Utc>> {
    stowage_runtime::time::from_timestamp(event.timestamp.as_ref()?)
}

impl EventStreams {
    /// Starts the writer and the sealer (until `shutdown`).
    pub fn start(
        pool: PgPool,
        store: Arc<dyn ObjectStore>,
        settings: StreamSettings,
        shutdown: CancellationToken,
    ) -> Self {
        let (writer, frames) = mpsc::channel(MAX_WRITE_FRAMES * 4);
        let budget = Arc::new(Semaphore::new(settings.max_buffered.max(1)));
        let this = Self {
            inner: Arc::new(Inner {
                pool,
                store,
                settings,
                writer,
                budget,
            }),
        };
        tokio::spawn(this.clone().write_loop(frames, shutdown.clone()));
        tokio::spawn(this.clone().seal_loop(shutdown));
        this
    }

    /// Takes `frame` of `owner`'s stream: waits for room in the memory budget, then hands
    /// it to the writer. The receiver answers with the stream's durable seq once stored.
    pub async fn submit(
        &self,
        owner: &str,
        mut frame: pb::AppendEventsRequest,
    ) -> Result<oneshot::Receiver<Result<u64>>> {
        validate_stream_id(&frame.stream_id)?;
        if frame.first_seq == 0 {
            return Err(Error::invalid("first_seq", "must be at least 1"));
        }
        if frame.events.is_empty() || frame.events.len() > MAX_FRAME_EVENTS {
            return Err(Error::invalid("events", "must hold 1..=10000 events"));
        }
        let mut bytes = 0usize;
        for (i, event) in frame.events.iter_mut().enumerate() {
            if event.payload.len() > MAX_EVENT_PAYLOAD {
                return Err(Error::invalid("events.payload", "is larger than 1 MiB"));
            }
            if event.r#type.len() > 64 {
                return Err(Error::invalid("events.type", "is longer than 64 bytes"));
            }
            if timestamp_of(event).is_none() {
                return Err(Error::invalid("events.timestamp", "is required"));
            }
            self.store_large_screenshot(&frame.stream_id, frame.first_seq + i as u64, event)
                .await?;
            bytes += event.encoded_len();
        }
        let permits =
            u32::try_from(bytes.clamp(1, self.inner.settings.max_buffered)).unwrap_or(u32::MAX);
        let budget = Arc::clone(&self.inner.budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        metrics::counter!("stowage_stream_events_in_total").increment(frame.events.len() as u64);
        metrics::counter!("stowage_stream_bytes_in_total").increment(bytes as u64);
        let (done, answer) = oneshot::channel();
        self.inner
            .writer
            .send(Pending {
                owner: owner.to_owned(),
                stream: frame.stream_id,
                first_seq: frame.first_seq,
                events: frame.events,
                done,
                _budget: budget,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(answer)
    }

    /// Moves an inline screenshot above the threshold to the store, leaving its key.
    async fn store_large_screenshot(
        &self,
        stream: &str,
        seq: u64,
        event: &mut pb::Event,
    ) -> Result<()> {
        let Some(shot) = event.screenshot.as_mut() else {
            return Ok(());
        };
        let Some(pb::screenshot::Source::InlineData(data)) = &shot.source else {
            return Ok(());
        };
        if data.len() <= self.inner.settings.inline_max {
            return Ok(());
        }
        let key = format!("events/{stream}/screens/{seq}.bin");
        self.inner
            .store
            .put(
                &ObjectPath::from(key.as_str()),
                PutPayload::from(data.clone()),
            )
            .await?;
        shot.source = Some(pb::screenshot::Source::StorageKey(key));
        Ok(())
    }

    async fn write_loop(self, mut frames: mpsc::Receiver<Pending>, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return,
                next = frames.recv() => match next {
                    Some(f) => f,
                    None => return,
                },
            };
            let mut batch = vec![first];
            let mut bytes = 0;
            while batch.len() < MAX_WRITE_FRAMES && bytes < MAX_WRITE_BYTES {
                match frames.try_recv() {
                    Ok(f) => {
                        bytes += f.events.iter().map(Message::encoded_len).sum::<usize>();
                        batch.push(f);
                    }
                    Err(_) => break,
                }
            }
            if !self.inner.settings.write_delay.is_zero() {
                tokio::time::sleep(self.inner.settings.write_delay).await;
            }
            let started = std::time::Instant::now();
            let outcomes = match self.write(&batch).await {
                Ok(outcomes) => outcomes,
                Err(error) => {
                    tracing::warn!(%error, frames = batch.len(), "event write failed; clients resend");
                    batch
                        .iter()
                        .map(|_| Err(Error::Unavailable(error.to_string())))
                        .collect()
                }
            };
            metrics::histogram!("stowage_stream_ack_latency_seconds")
                .record(started.elapsed().as_secs_f64());
            for (frame, outcome) in batch.into_iter().zip(outcomes) {
                let _ = frame.done.send(outcome);
            }
        }
    }

    /// Stores `batch` in one transaction; one outcome per frame.
    async fn write(&self, batch: &[Pending]) -> Result<Vec<Result<u64>>> {
        let mut streams: Vec<(&str, &str)> = batch
            .iter()
            .map(|f| (f.stream.as_str(), f.owner.as_str()))
            .collect();
        streams.sort_unstable();
        streams.dedup_by(|a, b| a.0 == b.0);
        let ids: Vec<&str> = streams.iter().map(|(s, _)| *s).collect();
        let owners: Vec<&str> = streams.iter().map(|(_, o)| *o).collect();
        let mut conn = self.inner.pool.get().await?;
        let tx = conn.transaction().await?;
        tx.execute(
            "INSERT INTO ingest.event_streams (stream_id, owner_id)
             SELECT * FROM unnest($1::text[], $2::text[]) ON CONFLICT DO NOTHING",
            &[&ids, &owners],
        )
        .await?;
        let rows = tx
            .query(
                "SELECT stream_id, owner_id, durable_seq FROM ingest.event_streams
                 WHERE stream_id = ANY($1) ORDER BY stream_id FOR UPDATE",
                &[&ids],
            )
            .await?;
        let mut state: std::collections::HashMap<String, (String, u64, Vec<pb::Event>, u64)> = rows
            .iter()
            .map(|r| {
                let durable = u64::try_from(r.get::<_, i64>(2)).unwrap_or(0);
                (r.get(0), (r.get(1), durable, Vec::new(), durable))
            })
            .collect();
        let mut outcomes = Vec::with_capacity(batch.len());
        for frame in batch {
            let Some((owner, durable, events, _)) = state.get_mut(&frame.stream) else {
                outcomes.push(Err(Error::Corrupt("stream row missing".into())));
                continue;
            };
            if *owner != frame.owner {
                outcomes.push(Err(Error::NotFound));
                continue;
            }
            if frame.first_seq > *durable + 1 {
                outcomes.push(Err(Error::SeqGap {
                    expected: *durable + 1,
                }));
                continue;
            }
            let skip = usize::try_from(*durable + 1 - frame.first_seq).unwrap_or(usize::MAX);
            if skip < frame.events.len() {
                events.extend_from_slice(&frame.events[skip..]);
                *durable = frame.first_seq + frame.events.len() as u64 - 1;
            }
            outcomes.push(Ok(*durable));
        }
        let (mut seg_streams, mut firsts, mut lasts, mut datas) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut up_streams, mut up_seqs) = (Vec::new(), Vec::new());
        for (stream, (_, durable, events, before)) in &state {
            if events.is_empty() {
                continue;
            }
            seg_streams.push(stream.as_str());
            firsts.push(to_i64(before + 1));
            lasts.push(to_i64(*durable));
            datas.push(compress(events));
            up_streams.push(stream.as_str());
            up_seqs.push(to_i64(*durable));
        }
        if !seg_streams.is_empty() {
            tx.execute(
                "INSERT INTO ingest.event_segments (stream_id, first_seq, last_seq, data)
                 SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bytea[])",
                &[&seg_streams, &firsts, &lasts, &datas],
            )
            .await?;
            tx.execute(
                "UPDATE ingest.event_streams s SET durable_seq = u.seq
                 FROM unnest($1::text[], $2::bigint[]) AS u(stream_id, seq)
                 WHERE s.stream_id = u.stream_id",
                &[&up_streams, &up_seqs],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    async fn seal_loop(self, shutdown: CancellationToken) {
        let every = (self.inner.settings.window / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = self.seal_due().await {
                tracing::warn!(%error, "sealing failed; retrying");
            }
        }
    }

    /// Seals every window that ended more than the grace ago; returns how many.
    pub async fn seal_due(&self) -> Result<usize> {
        let window_ms = i64::try_from(self.inner.settings.window.as_millis())
            .unwrap_or(30_000)
            .max(1);
        let grace = chrono::Duration::from_std(self.inner.settings.grace).unwrap_or_default();
        let conn = self.inner.pool.get().await?;
        let due = conn
            .query(
                "SELECT stream_id, min(received_at) FROM ingest.event_segments GROUP BY stream_id",
                &[],
            )
            .await?;
        drop(conn);
        // Streams with events not yet sealed: each has at least one open window.
        metrics::gauge!("stowage_stream_open_windows").set(due.len() as f64);
        let mut sealed = 0;
        for row in due {
            let stream: String = row.get(0);
            let oldest: DateTime<Utc> = row.get(1);
            let start_ms = oldest.timestamp_millis().div_euclid(window_ms) * window_ms;
            let Some(start) = Utc.timestamp_millis_opt(start_ms).single() else {
                continue;
            };
            let end = start + chrono::Duration::milliseconds(window_ms);
            if end + grace > Utc::now() {
                continue;
            }
            if self.seal(&stream, start, end).await? {
                sealed += 1;
            }
        }
        Ok(sealed)
    }

    /// Seals `stream`'s window `[start, end)` unless another replica is at it.
    async fn seal(&self, stream: &str, start: DateTime<Utc>, end: DateTime<Utc>) -> Result<bool> {
        let mut conn = self.inner.pool.get().await?;
        let tx = conn.transaction().await?;
        let locked: bool = tx
            .query_one(
                "SELECT pg_try_advisory_xact_lock(hashtext('stowage-seal:' || $1))",
                &[&stream],
            )
            .await?
            .get(0);
        if !locked {
            return Ok(false);
        }
        let info = tx
            .query_one(
                "SELECT owner_id, sealed_until FROM ingest.event_streams WHERE stream_id = $1",
                &[&stream],
            )
            .await?;
        let owner: String = info.get(0);
        let sealed_until: Option<DateTime<Utc>> = info.get(1);
        let segments = tx
            .query(
                "SELECT id, data FROM ingest.event_segments
                 WHERE stream_id = $1 AND received_at < $2 ORDER BY first_seq",
                &[&stream, &end],
            )
            .await?;
        if segments.is_empty() {
            return Ok(false);
        }
        let first_seq: i64 = tx
            .query_one(
                "SELECT min(first_seq) FROM ingest.event_segments
                 WHERE stream_id = $1 AND received_at < $2",
                &[&stream, &end],
            )
            .await?
            .get(0);
        let mut events = Vec::new();
        let mut ids = Vec::with_capacity(segments.len());
        for row in &segments {
            ids.push(row.get::<_, i64>(0));
            events.extend(decompress(row.get::<_, &[u8]>(1))?);
        }
        let first = u64::try_from(first_seq).unwrap_or(0);
        let last = first + events.len() as u64 - 1;
        // Stamped inside a window that was already sealed: late, delivered now, flagged.
        let late: Vec<i64> = match sealed_until {
            None => Vec::new(),
            Some(until) => events
                .iter()
                .enumerate()
                .filter(|(_, e)| timestamp_of(e).is_some_and(|t| t < until))
                .map(|(i, _)| to_i64(first + i as u64))
                .collect(),
        };
        let screenshots: Vec<String> = events
            .iter()
            .filter_map(|e| match e.screenshot.as_ref()?.source.as_ref()? {
                // Only what Ingest stored itself may be deleted on acknowledgement.
                pb::screenshot::Source::StorageKey(k)
                    if k.starts_with(&format!("events/{stream}/")) =>
                {
                    Some(k.clone())
                }
                _ => None,
            })
            .collect();
        let key = format!(
            "events/{stream}/{:04}/{:02}/{:02}/{}.lz4",
            start.year(),
            start.month(),
            start.day(),
            start.timestamp_millis()
        );
        self.inner
            .store
            .put(
                &ObjectPath::from(key.as_str()),
                PutPayload::from(compress(&events)),
            )
            .await?;
        let count = i32::try_from(events.len()).unwrap_or(i32::MAX);
        tx.execute(
            "INSERT INTO ingest.event_batches (id, stream_id, owner_id, window_start, window_end,
                 first_seq, last_seq, event_count, storage_key, screenshots, late_seqs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            &[
                &Uuid::now_v7(),
                &stream,
                &owner,
                &start,
                &end,
                &first_seq,
                &to_i64(last),
                &count,
                &key,
                &screenshots,
                &late,
            ],
        )
        .await?;
        tx.execute(
            "DELETE FROM ingest.event_segments WHERE id = ANY($1)",
            &[&ids],
        )
        .await?;
        tx.execute(
            "UPDATE ingest.event_streams SET sealed_until = greatest(sealed_until, $2)
             WHERE stream_id = $1",
            &[&stream, &end],
        )
        .await?;
        tx.commit().await?;
        metrics::histogram!("stowage_stream_seal_lag_seconds")
            .record((Utc::now() - end).num_milliseconds().max(0) as f64 / 1000.0);
        Ok(true)
    }

    /// Batches for `group` after cursor `after`, claimed for this subscriber: never
    /// delivered to the group, or delivered and not acknowledged in time.
    pub async fn claim_batches(
        &self,
        owner: Option<&str>,
        group: &str,
        after: i64,
        streams: &[String],
    ) -> Result<Vec<pb::EventBatch>> {
        let redeliver = self.inner.settings.redeliver_after.as_secs_f64();
        let conn = self.inner.pool.get().await?;
        let rows = conn
            .query(
                "WITH candidates AS (
                     SELECT b.id FROM ingest.event_batches b
                     LEFT JOIN ingest.event_deliveries d ON d.group_name = $1 AND d.batch_id = b.id
                     WHERE b.seq > $2 AND ($3::text IS NULL OR b.owner_id = $3)
                       AND (cardinality($4::text[]) = 0 OR b.stream_id = ANY($4))
                       AND (d.batch_id IS NULL OR (d.acked_at IS NULL
                            AND d.delivered_at < now() - make_interval(secs => $5)))
                     ORDER BY b.seq LIMIT 10
                 ), claimed AS (
                     INSERT INTO ingest.event_deliveries (group_name, batch_id)
                     SELECT $1, id FROM candidates
                     ON CONFLICT (group_name, batch_id) DO UPDATE SET delivered_at = now()
                         WHERE event_deliveries.acked_at IS NULL
                           AND event_deliveries.delivered_at < now() - make_interval(secs => $5)
                     RETURNING batch_id
                 )
                 SELECT b.* FROM ingest.event_batches b JOIN claimed c ON c.batch_id = b.id
                 ORDER BY b.seq",
                &[&group, &after, &owner, &streams, &redeliver],
            )
            .await?;
        drop(conn);
        let mut batches = Vec::with_capacity(rows.len());
        for row in rows {
            let key: String = row.get("storage_key");
            let data = self
                .inner
                .store
                .get(&ObjectPath::from(key.as_str()))
                .await?
                .bytes()
                .await?;
            let seq: i64 = row.get("seq");
            let late: Vec<i64> = row.get("late_seqs");
            batches.push(pb::EventBatch {
                id: row.get::<_, Uuid>("id").to_string(),
                stream_id: row.get("stream_id"),
                window_start: Some(stowage_runtime::time::timestamp(row.get("window_start"))),
                window_end: Some(stowage_runtime::time::timestamp(row.get("window_end"))),
                first_seq: u64::try_from(row.get::<_, i64>("first_seq")).unwrap_or(0),
                last_seq: u64::try_from(row.get::<_, i64>("last_seq")).unwrap_or(0),
                events: decompress(&data)?,
                late_seqs: late
                    .into_iter()
                    .filter_map(|s| u64::try_from(s).ok())
                    .collect(),
                cursor: seq.to_string(),
            });
        }
        Ok(batches)
    }

    /// Acknowledges `batch` for `group`; deletes its stored screenshots (except the newest
    /// `keep_screenshots` of its stream) and returns how many.
    pub async fn ack(&self, owner: Option<&str>, group: &str, batch: Uuid) -> Result<u32> {
        let conn = self.inner.pool.get().await?;
        let row = conn
            .query_opt(
                "UPDATE ingest.event_deliveries d SET acked_at = now()
                 FROM ingest.event_batches b
                 WHERE d.group_name = $1 AND d.batch_id = $2 AND b.id = d.batch_id
                   AND ($3::text IS NULL OR b.owner_id = $3) AND d.acked_at IS NULL
                 RETURNING b.stream_id, b.screenshots",
                &[&group, &batch, &owner],
            )
            .await?;
        let Some(row) = row else {
            let known = conn
                .query_opt(
                    "SELECT 1 FROM ingest.event_deliveries d JOIN ingest.event_batches b
                       ON b.id = d.batch_id
                     WHERE d.group_name = $1 AND d.batch_id = $2
                       AND ($3::text IS NULL OR b.owner_id = $3)",
                    &[&group, &batch, &owner],
                )
                .await?;
            return match known {
                Some(_) => Ok(0),
                None => Err(Error::NotFound),
            };
        };
        let stream: String = row.get(0);
        let screenshots: Vec<String> = row.get(1);
        let keep: std::collections::HashSet<String> = if self.inner.settings.keep_screenshots > 0 {
            conn.query(
                "SELECT s FROM ingest.event_batches, unnest(screenshots) AS s
                 WHERE stream_id = $1 ORDER BY seq DESC, s DESC LIMIT $2",
                &[
                    &stream,
                    &i64::try_from(self.inner.settings.keep_screenshots).unwrap_or(0),
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
        } else {
            std::collections::HashSet::new()
        };
        drop(conn);
        let mut deleted = 0;
        for key in screenshots.iter().filter(|k| !keep.contains(*k)) {
            match self
                .inner
                .store
                .delete(&ObjectPath::from(key.as_str()))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                Err(error) => tracing::warn!(key, %error, "screenshot not deleted"),
            }
        }
        Ok(deleted)
    }
}
