//! High-rate event streams: frames acknowledged only once durable, sealed into windows.
//!
//! A frame (`{stream_id, first_seq, events}`) waits for room in a byte budget (the memory
//! ceiling: when the writer falls behind, readers stop reading and HTTP/2 flow control slows
//! the client), then goes to the writer task of its stream (streams are spread over
//! [`WRITERS`] writers by a hash of their id, so one stream's frames stay in order while
//! writers compress and commit side by side), which gathers the frames arriving meanwhile and
//! stores them in one PostgreSQL transaction: compressed micro-segments per stream (zstd by
//! default, LZ4 by choice; each block says which), the
//! stream's durable seq moved forward. Only then is the frame acknowledged.
//! Re-sent frames (seqs at or below the durable seq) are dropped, so a client that reconnects
//! and re-sends its unacknowledged tail makes no duplicates.
//!
//! A sealer (on every replica; an advisory lock per stream keeps it single) closes each
//! stream's arrival window once it has ended: its segments become batch objects in the store
//! (`events/{owner}/{stream}/{yyyy}/{mm}/{dd}/{window_start_ms}-{first_seq}.evb`, each at most 8 MiB of
//! events so it travels as one message; the stored blocks are copied, not recompressed),
//! the batches are recorded and the segments deleted, in one transaction. Consumer groups read sealed batches in
//! order (each batch to one member of each group, redelivered if not acknowledged in time),
//! and the acknowledgement of the last group reading a stream deletes the batch's stored
//! screenshots and rewrites the batch without the bytes of its inline ones.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use chrono::{DateTime, Datelike, TimeZone, Utc};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, path::Path as ObjectPath};
use prost::Message;
use stowage_db::{Cached, PgPool};
use stowage_proto::v1 as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::{Error, Result};

/// The batches an observer may be sent (`event_batches b`): of owner `$1` (any when null),
/// of the streams `$2` (any when empty), sealed within the retention (`$3` seconds).
macro_rules! observed {
    () => {
        "($1::text IS NULL OR b.owner_id = $1)
         AND (cardinality($2::text[]) = 0 OR b.stream_id = ANY($2))
         AND b.sealed_at >= now() - make_interval(secs => $3)"
    };
}

/// Most events in one frame.
pub const MAX_FRAME_EVENTS: usize = 10_000;
/// Largest payload of one event.
pub const MAX_EVENT_PAYLOAD: usize = 1 << 20;
/// Frames gathered into one write at most.
const MAX_WRITE_FRAMES: usize = 2_000;
/// Bytes gathered into one write at most.
const MAX_WRITE_BYTES: usize = 4 << 20;
/// Writer tasks (each with its own transactions; a stream always goes to the same one).
pub const WRITERS: usize = 4;
/// Raw bytes of events in one segment, at most (a segment is one compressed block).
const SEGMENT_MAX: usize = 4 << 20;
/// Raw bytes of one stored segment read back, at most (a corrupt size is not allocated).
const SEGMENT_READ_MAX: usize = 256 << 20;
/// Raw bytes of events in one sealed batch, at most (a batch travels as one message).
const BATCH_MAX: usize = 8 << 20;
/// First bytes of a batch object; blocks follow, each a big-endian u32 length and a segment
/// as stored (a zstd frame or an LZ4 block with its size prepended, of length-delimited events).
const BATCH_MAGIC: &[u8; 8] = b"STWEVB1\n";
/// zstd's level for segments: its fastest ordinary level (level 3 compresses these events no
/// better, at half the speed; `scripts/bench streams` prints the three).
const ZSTD_LEVEL: i32 = 1;

pub use stowage_runtime::config::EventCodec;

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
    /// Largest inline screenshot taken.
    pub max_screenshot: usize,
    /// Stored screenshots kept per stream after acknowledgement (a dev option; 0 keeps none).
    pub keep_screenshots: usize,
    /// A delivered batch not acknowledged within this is delivered again.
    pub redeliver_after: Duration,
    /// Sealed batches (and their screenshots) are deleted this long after sealing.
    pub retention: Duration,
    /// Batches one subscriber holds unacknowledged, at most.
    pub prefetch: usize,
    /// Subscriptions open at once in this process, at most (each may hold `prefetch`
    /// batches and as many more waiting for its client, up to 8 MiB each).
    pub max_subscriptions: usize,
    /// Artificial delay of every write (tests of back-pressure only).
    pub write_delay: Duration,
    /// How new segments are compressed (stored ones are read whatever their codec).
    pub codec: EventCodec,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            grace: Duration::from_secs(2),
            max_buffered: 64 << 20,
            inline_max: 5 << 20,
            max_screenshot: 12 << 20,
            keep_screenshots: 0,
            redeliver_after: Duration::from_secs(60),
            retention: Duration::from_secs(7 * 24 * 3600),
            prefetch: 4,
            max_subscriptions: 64,
            write_delay: Duration::ZERO,
            codec: EventCodec::default(),
        }
    }
}

/// A frame waiting for the writer.
struct Pending {
    owner: String,
    stream: String,
    first_seq: u64,
    events: Vec<pb::Event>,
    /// Screenshots this frame put in the store, by index in `events`: deleted again if
    /// their events are not stored (the frame refused, or a re-sent duplicate).
    stored: Vec<(usize, String)>,
    done: oneshot::Sender<Result<u64>>,
    /// Encoded size of `events` as received (counted once, in `submit`).
    bytes: usize,
    _budget: OwnedSemaphorePermit,
}

/// What the writer did with one frame: the stream's durable seq after it, and how many of
/// its leading events were already stored (a re-send).
type Written = Result<(u64, usize)>;

/// The event streams of one Ingest process.
#[derive(Clone)]
pub struct EventStreams {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    store: Arc<dyn ObjectStore>,
    /// The store's directory when it is on local disk: what is put there is flushed.
    local_root: Option<std::path::PathBuf>,
    settings: StreamSettings,
    writers: Vec<mpsc::Sender<Pending>>,
    budget: Arc<Semaphore>,
    /// One permit per open subscription.
    subscriptions: Arc<Semaphore>,
    /// Open subscriptions per owner.
    owners: OpenPerOwner,
    /// Consumer groups given lag series by this process.
    lag_reported: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Consumer groups given lag series at each measurement, those furthest behind.
const LAG_GROUPS: usize = 50;

/// Consumer groups one process ever gives lag series (the exporter never forgets a series):
/// users who make group after group fall behind cannot grow the scrape without bound.
const LAG_SERIES_MAX: usize = 500;

/// Whether `group` gets a lag series: it has one already, or fewer than `max` groups were
/// ever given one (`reported`, which it then joins).
fn admit_series(reported: &mut std::collections::HashSet<String>, group: &str, max: usize) -> bool {
    if reported.contains(group) {
        return true;
    }
    if reported.len() >= max {
        return false;
    }
    reported.insert(group.to_owned());
    true
}

/// How many subscriptions each owner has open.
type OpenPerOwner = Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>;

/// A place among the subscriptions this process serves, given back when dropped.
pub struct SubscriptionSlot {
    _place: OwnedSemaphorePermit,
    owner: Option<(OpenPerOwner, String)>,
}

impl Drop for SubscriptionSlot {
    fn drop(&mut self) {
        if let Some((owners, owner)) = self.owner.take() {
            let mut owners = owners
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(open) = owners.get_mut(&owner) {
                *open = open.saturating_sub(1);
                if *open == 0 {
                    owners.remove(&owner);
                }
            }
        }
    }
}

pub(crate) fn validate_stream_id(id: &str) -> Result<()> {
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

/// The stored keys of the `streams` a subscriber names: a user names their own streams, a
/// service or admin (`owner` `None`) names them whole.
fn stream_keys(owner: Option<&str>, streams: &[String]) -> Vec<String> {
    match owner {
        Some(owner) => streams.iter().map(|s| stream_key(owner, s)).collect(),
        None => streams.to_vec(),
    }
}

/// The key Ingest keeps `owner`'s stream `stream` under: streams are named per owner, so two
/// users' `desk` are two streams (and their objects live under `events/{owner}/{stream}/`).
/// Neither part can hold a `/`.
pub(crate) fn stream_key(owner: &str, stream: &str) -> String {
    format!("{owner}/{stream}")
}

/// The name a caller knows a stream by: its own name for its owner, the whole key for a
/// service or admin (who read every owner's streams).
fn stream_name(key: &str, owner: Option<&str>) -> String {
    owner
        .and_then(|owner| key.strip_prefix(owner))
        .and_then(|rest| rest.strip_prefix('/'))
        .unwrap_or(key)
        .to_owned()
}

/// A stream as a service or admin names it: `{owner}/{stream}`.
pub(crate) fn validate_stream_key(key: &str) -> Result<()> {
    let valid = key.split_once('/').is_some_and(|(owner, stream)| {
        stowage_blob::keys::validate_user_id(owner).is_ok() && validate_stream_id(stream).is_ok()
    });
    if !valid {
        return Err(Error::invalid(
            "stream_ids",
            "a service names a stream {owner}/{stream}",
        ));
    }
    Ok(())
}

/// Deletes `key` from `store`; gone already is fine.
async fn delete_object(store: &dyn ObjectStore, key: &str) -> object_store::Result<()> {
    match store.delete(&ObjectPath::from(key)).await {
        Err(object_store::Error::NotFound { .. }) => Ok(()),
        deleted => deleted,
    }
}

/// Deletes `keys` from `store` (gone already is fine); returns how many are gone.
async fn delete_objects(store: &dyn ObjectStore, keys: &[String]) -> u32 {
    let mut gone = 0;
    for key in keys {
        match delete_object(store, key).await {
            Ok(()) => gone += 1,
            Err(error) => tracing::warn!(key, %error, "screenshot not deleted"),
        }
    }
    gone
}

/// The writer of `stream`.
fn writer_of(stream: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    stream.hash(&mut hasher);
    (hasher.finish() % WRITERS as u64) as usize
}

/// A segment ready to insert.
struct NewSegment {
    first_seq: u64,
    last_seq: u64,
    raw_bytes: usize,
    min_ts: Option<DateTime<Utc>>,
    /// Keys of the screenshots Ingest stored for these events, newline-separated.
    screenshots: String,
    /// Whether an event carries a screenshot inline.
    inline_screenshots: bool,
    data: Vec<u8>,
}

/// `events` of `stream` (the first one at `first_seq`) as segments of at most
/// [`SEGMENT_MAX`] raw bytes.
fn encode_segments(
    stream: &str,
    first_seq: u64,
    events: &[&pb::Event],
    codec: EventCodec,
) -> Vec<NewSegment> {
    let own = format!("events/{stream}/");
    let mut segments = Vec::new();
    let mut open = NewSegment::starting_at(first_seq);
    let mut raw = Vec::new();
    for (i, event) in events.iter().enumerate() {
        // Cut before an event that would take the segment past its size.
        if !raw.is_empty() && raw.len() + event.encoded_len() + 10 > SEGMENT_MAX {
            segments.push(open.close(first_seq + i as u64 - 1, &mut raw, codec));
            open = NewSegment::starting_at(first_seq + i as u64);
        }
        // Encoding into a Vec cannot fail.
        let _ = event.encode_length_delimited(&mut raw);
        if let Some(at) = timestamp_of(event) {
            open.min_ts = Some(open.min_ts.map_or(at, |m| m.min(at)));
        }
        match event.screenshot.as_ref().and_then(|s| s.source.as_ref()) {
            Some(pb::screenshot::Source::StorageKey(key)) if key.starts_with(&own) => {
                if !open.screenshots.is_empty() {
                    open.screenshots.push('\n');
                }
                open.screenshots.push_str(key);
            }
            Some(pb::screenshot::Source::InlineData(_)) => open.inline_screenshots = true,
            _ => {}
        }
    }
    if !raw.is_empty() {
        segments.push(open.close(first_seq + events.len() as u64 - 1, &mut raw, codec));
    }
    segments
}

impl NewSegment {
    fn starting_at(first_seq: u64) -> Self {
        Self {
            first_seq,
            last_seq: first_seq,
            raw_bytes: 0,
            min_ts: None,
            screenshots: String::new(),
            inline_screenshots: false,
            data: Vec::new(),
        }
    }

    /// The segment ending at `last_seq`, holding `raw` (compressed; `raw` is emptied).
    fn close(mut self, last_seq: u64, raw: &mut Vec<u8>, codec: EventCodec) -> Self {
        self.last_seq = last_seq;
        self.raw_bytes = raw.len();
        self.data = compress(raw, codec);
        raw.clear();
        self
    }
}

/// New segments as columns, for one INSERT.
#[derive(Default)]
struct Segments<'a> {
    streams: Vec<&'a str>,
    firsts: Vec<i64>,
    lasts: Vec<i64>,
    raw_bytes: Vec<i32>,
    min_ts: Vec<Option<DateTime<Utc>>>,
    screenshots: Vec<String>,
    inline_screenshots: Vec<bool>,
    data: Vec<Vec<u8>>,
}

impl<'a> Segments<'a> {
    fn push(&mut self, stream: &'a str, segment: NewSegment) {
        self.streams.push(stream);
        self.firsts.push(to_i64(segment.first_seq));
        self.lasts.push(to_i64(segment.last_seq));
        self.raw_bytes
            .push(i32::try_from(segment.raw_bytes).unwrap_or(i32::MAX));
        self.min_ts.push(segment.min_ts);
        self.screenshots.push(segment.screenshots);
        self.inline_screenshots.push(segment.inline_screenshots);
        self.data.push(segment.data);
    }
}

/// A batch object written while sealing, whose row is still to be inserted.
struct NewBatch {
    first_seq: i64,
    last_seq: i64,
    key: String,
    screenshots: Vec<String>,
    /// Whether an event carries a screenshot inline (`None`: not known, for segments written
    /// before segments said).
    inline_screenshots: Option<bool>,
    late: Vec<i64>,
}

/// A stored segment as the sealer sees it before reading its bytes.
struct SealedSegment {
    id: i64,
    first_seq: i64,
    last_seq: i64,
    raw_bytes: usize,
    min_ts: Option<DateTime<Utc>>,
    screenshots: Vec<String>,
    inline_screenshots: Option<bool>,
}

/// Consecutive runs of `sizes` adding up to at most `max` each (a single size over `max`
/// makes a run of its own).
fn parts(sizes: &[usize], max: usize) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while start < sizes.len() {
        let (mut end, mut total) = (start + 1, sizes[start]);
        while end < sizes.len() && total + sizes[end] <= max {
            total += sizes[end];
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// The events of a batch object (blocks after [`BATCH_MAGIC`], or one LZ4 block as sealed
/// before blocks).
fn decode_batch(data: &[u8]) -> Result<Vec<pb::Event>> {
    let Some(mut rest) = data.strip_prefix(BATCH_MAGIC.as_slice()) else {
        return decompress(data);
    };
    let mut events = Vec::new();
    while !rest.is_empty() {
        let corrupt = || Error::Corrupt("event batch: block cut short".into());
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
        let len = u32::from_be_bytes(*len) as usize;
        let block = tail.get(..len).ok_or_else(corrupt)?;
        events.extend(decompress(block)?);
        rest = &tail[len..];
    }
    Ok(events)
}

/// Appends a stored segment to a batch object (after [`BATCH_MAGIC`]): its length, then it.
fn push_block(object: &mut Vec<u8>, block: &[u8]) -> Result<()> {
    let len = u32::try_from(block.len())
        .map_err(|_| Error::Corrupt("event segment over 4 GiB".into()))?;
    object.extend_from_slice(&len.to_be_bytes());
    object.extend_from_slice(block);
    Ok(())
}

/// First bytes of every zstd frame. An LZ4 segment starts with its size as a little-endian
/// u32, at most [`SEGMENT_MAX`], whose last byte is 0: the two cannot be confused.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// `raw` (length-delimited events) as one stored block of `codec`.
fn compress(raw: &[u8], codec: EventCodec) -> Vec<u8> {
    match codec {
        EventCodec::Lz4 => lz4_flex::compress_prepend_size(raw),
        // Compressing into memory fails only on a broken level; fall back to LZ4.
        EventCodec::Zstd => zstd::bulk::compress(raw, ZSTD_LEVEL)
            .unwrap_or_else(|_| lz4_flex::compress_prepend_size(raw)),
    }
}

fn decompress(data: &[u8]) -> Result<Vec<pb::Event>> {
    let raw = if data.starts_with(&ZSTD_MAGIC) {
        // The frame says its size (compressed in one piece); past SEGMENT_MAX when one event
        // alone is larger (a payload and an inline screenshot).
        let size = zstd::zstd_safe::get_frame_content_size(data)
            .ok()
            .flatten()
            .and_then(|s| usize::try_from(s).ok())
            .filter(|s| *s <= SEGMENT_READ_MAX)
            .ok_or_else(|| Error::Corrupt("event segment: zstd frame without a size".into()))?;
        zstd::bulk::decompress(data, size)
            .map_err(|e| Error::Corrupt(format!("event segment: {e}")))?
    } else {
        lz4_flex::decompress_size_prepended(data)
            .map_err(|e| Error::Corrupt(format!("event segment: {e}")))?
    };
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

/// Whether PostgreSQL refused a statement for the data in it (SQLSTATE classes 22, data
/// exception, and 23, integrity constraint violation), not for its own state.
fn refused_data(error: &tokio_postgres::Error) -> bool {
    error
        .code()
        .is_some_and(|code| matches!(&code.code()[..2], "22" | "23"))
}

/// PostgreSQL's own message for `error`.
fn db_message(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map_or_else(|| error.to_string(), |e| e.message().to_owned())
}

fn timestamp_of(event: &pb::Event) -> Option<DateTime<Utc>> {
    stowage_runtime::time::from_timestamp(event.timestamp.as_ref()?)
}

impl EventStreams {
    /// Starts the writer and the sealer (until `shutdown`).
    pub fn start(
        pool: PgPool,
        blobs: &stowage_blob::Blobs,
        settings: StreamSettings,
        shutdown: CancellationToken,
    ) -> Self {
        let (writers, queues): (Vec<_>, Vec<_>) = (0..WRITERS)
            .map(|_| mpsc::channel(MAX_WRITE_FRAMES))
            .unzip();
        let budget = Arc::new(Semaphore::new(settings.max_buffered.max(1)));
        let subscriptions = Arc::new(Semaphore::new(settings.max_subscriptions.max(1)));
        let this = Self {
            inner: Arc::new(Inner {
                pool,
                store: Arc::clone(&blobs.store),
                local_root: blobs.local_root.clone(),
                settings,
                writers,
                budget,
                subscriptions,
                owners: Arc::default(),
                lag_reported: std::sync::Mutex::default(),
            }),
        };
        for frames in queues {
            tokio::spawn(this.clone().write_loop(frames, shutdown.clone()));
        }
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
        stowage_blob::keys::validate_user_id(owner)
            .map_err(|why| Error::invalid("user_id", why))?;
        validate_stream_id(&frame.stream_id)?;
        frame.stream_id = stream_key(owner, &frame.stream_id);
        if frame.first_seq == 0 {
            return Err(Error::invalid("first_seq", "must be at least 1"));
        }
        if frame.events.is_empty() || frame.events.len() > MAX_FRAME_EVENTS {
            return Err(Error::invalid("events", "must hold 1..=10000 events"));
        }
        // Sequence numbers are stored as PostgreSQL bigints.
        if frame.first_seq - 1 > i64::MAX as u64 - frame.events.len() as u64 {
            return Err(Error::invalid(
                "first_seq",
                "leaves no room for the frame's events (sequence numbers end at 2^63 - 1)",
            ));
        }
        // Every event is checked before anything is stored.
        for event in &frame.events {
            self.check_event(event)?;
        }
        // Room in the budget first (counting inline screenshots as received), so a frame
        // waiting for room holds nothing in the store.
        let bytes: usize = frame.events.iter().map(Message::encoded_len).sum();
        let permits =
            u32::try_from(bytes.clamp(1, self.inner.settings.max_buffered)).unwrap_or(u32::MAX);
        let budget = Arc::clone(&self.inner.budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let mut stored = Vec::new();
        for (i, event) in frame.events.iter_mut().enumerate() {
            match self
                .store_large_screenshot(&frame.stream_id, frame.first_seq + i as u64, event)
                .await
            {
                Ok(Some(key)) => stored.push((i, key)),
                Ok(None) => {}
                Err(error) => {
                    self.forget_screenshots(stored.into_iter().map(|(_, k)| k).collect());
                    return Err(error);
                }
            }
        }
        metrics::counter!("stowage_stream_events_in_total").increment(frame.events.len() as u64);
        metrics::counter!("stowage_stream_bytes_in_total").increment(bytes as u64);
        let (done, answer) = oneshot::channel();
        let sent = self.inner.writers[writer_of(&frame.stream_id)]
            .send(Pending {
                owner: owner.to_owned(),
                stream: frame.stream_id,
                first_seq: frame.first_seq,
                events: frame.events,
                stored,
                done,
                bytes,
                _budget: budget,
            })
            .await;
        if let Err(mpsc::error::SendError(pending)) = sent {
            self.forget_screenshots(pending.stored.into_iter().map(|(_, k)| k).collect());
            return Err(Error::ShuttingDown);
        }
        Ok(answer)
    }

    /// Refuses an event that breaks a limit, naming the field.
    fn check_event(&self, event: &pb::Event) -> Result<()> {
        if event.payload.len() > MAX_EVENT_PAYLOAD {
            return Err(Error::invalid("events.payload", "is larger than 1 MiB"));
        }
        if event.r#type.len() > 64 {
            return Err(Error::invalid("events.type", "is longer than 64 bytes"));
        }
        if timestamp_of(event).is_none() {
            return Err(Error::invalid(
                "events.timestamp",
                "is required, in years 1 to 9999",
            ));
        }
        match event.screenshot.as_ref().and_then(|s| s.source.as_ref()) {
            Some(pb::screenshot::Source::InlineData(data))
                if data.len() > self.inner.settings.max_screenshot =>
            {
                Err(Error::invalid(
                    "events.screenshot.inline_data",
                    format!(
                        "is larger than {} bytes",
                        self.inner.settings.max_screenshot
                    ),
                ))
            }
            Some(pb::screenshot::Source::StorageKey(key))
                if key.is_empty() || key.len() > 1024 || key.starts_with("events/") =>
            {
                Err(Error::invalid(
                    "events.screenshot.storage_key",
                    "must be 1..=1024 bytes and outside events/ (Ingest's own keys)",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Moves an inline screenshot above the threshold to the store, leaving its key; returns
    /// the key. Keys are unique per write, so a frame can never overwrite another's.
    async fn store_large_screenshot(
        &self,
        stream: &str,
        seq: u64,
        event: &mut pb::Event,
    ) -> Result<Option<String>> {
        let Some(shot) = event.screenshot.as_mut() else {
            return Ok(None);
        };
        let Some(pb::screenshot::Source::InlineData(data)) = &shot.source else {
            return Ok(None);
        };
        if data.len() <= self.inner.settings.inline_max {
            return Ok(None);
        }
        let key = format!(
            "events/{stream}/screens/{seq:012}-{}.bin",
            Uuid::new_v4().simple()
        );
        self.put_durable(&ObjectPath::from(key.as_str()), data.clone().into())
            .await?;
        shot.source = Some(pb::screenshot::Source::StorageKey(key.clone()));
        Ok(Some(key))
    }

    /// Puts `data` at `key`, flushed before it returns, since a transaction that relies on it
    /// commits next. On local disk written past the page cache (the store flushes too, but
    /// copying into fresh cache pages is the slower part of a flushed write on a VM's disk).
    async fn put_durable(&self, key: &ObjectPath, data: Bytes) -> Result<()> {
        match &self.inner.local_root {
            Some(root) => crate::staging::put_local(root, key, data).await,
            None => {
                self.inner.store.put(key, PutPayload::from(data)).await?;
                Ok(())
            }
        }
    }

    /// Deletes screenshots whose events were not stored, in the background.
    fn forget_screenshots(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let store = Arc::clone(&self.inner.store);
        tokio::spawn(async move {
            delete_objects(store.as_ref(), &keys).await;
        });
    }

    async fn write_loop(self, mut frames: mpsc::Receiver<Pending>, shutdown: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => {
                    // Frames still queued are answered "re-send" (their senders see the
                    // channel close); what they stored in the store goes.
                    frames.close();
                    let mut keys = Vec::new();
                    while let Ok(pending) = frames.try_recv() {
                        keys.extend(pending.stored.into_iter().map(|(_, k)| k));
                    }
                    delete_objects(self.inner.store.as_ref(), &keys).await;
                    return;
                }
                next = frames.recv() => match next {
                    Some(f) => f,
                    None => return,
                },
            };
            let mut batch = vec![first];
            let mut bytes = batch[0].bytes;
            while batch.len() < MAX_WRITE_FRAMES && bytes < MAX_WRITE_BYTES {
                match frames.try_recv() {
                    Ok(f) => {
                        bytes += f.bytes;
                        batch.push(f);
                    }
                    Err(_) => break,
                }
            }
            if !self.inner.settings.write_delay.is_zero() {
                tokio::time::sleep(self.inner.settings.write_delay).await;
            }
            let started = std::time::Instant::now();
            let outcomes: Vec<Written> = match self.write(&batch).await {
                Ok(outcomes) => outcomes,
                // PostgreSQL refused something in the data itself (each frame is checked
                // before it is queued, so this is a check missing): each frame is written
                // alone, so that one frame cannot keep every other user's out for good.
                Err(Error::Db(error)) if batch.len() > 1 && refused_data(&error) => {
                    tracing::error!(%error, frames = batch.len(), "event batch refused; frames written one by one");
                    let mut outcomes = Vec::with_capacity(batch.len());
                    for frame in &batch {
                        outcomes.push(match self.write(std::slice::from_ref(frame)).await {
                            Ok(mut one) => one.pop().unwrap_or(Err(Error::Internal("no outcome"))),
                            // Refused alone: sending it again would not help.
                            Err(Error::Db(error)) if refused_data(&error) => Err(Error::invalid(
                                "events",
                                format!("refused by the database: {}", db_message(&error)),
                            )),
                            Err(error) => Err(Error::Unavailable(error.to_string())),
                        });
                    }
                    outcomes
                }
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
            let mut unused = Vec::new();
            for (frame, outcome) in batch.into_iter().zip(outcomes) {
                let kept_from = match &outcome {
                    Ok((_, skipped)) => *skipped,
                    // The write failed, perhaps after its commit reached PostgreSQL: its
                    // events may be stored, so their screenshots stay.
                    Err(Error::Unavailable(_)) => 0,
                    Err(_) => usize::MAX,
                };
                unused.extend(
                    frame
                        .stored
                        .into_iter()
                        .filter(|(i, _)| *i < kept_from)
                        .map(|(_, key)| key),
                );
                let _ = frame.done.send(outcome.map(|(durable, _)| durable));
            }
            self.forget_screenshots(unused);
        }
    }

    /// Stores `batch` in one transaction; one outcome per frame.
    async fn write(&self, batch: &[Pending]) -> Result<Vec<Written>> {
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
        // NO KEY: the sealer's batch rows reference the stream row (a KEY SHARE lock, held
        // until its commit), and must not hold writers back; FOR UPDATE would wait for the
        // sealer's commit, which waits its turn among all streams' sealers.
        let rows = tx
            .query(
                "SELECT stream_id, owner_id, durable_seq FROM ingest.event_streams
                 WHERE stream_id = ANY($1) ORDER BY stream_id FOR NO KEY UPDATE",
                &[&ids],
            )
            .await?;
        let mut state: std::collections::HashMap<String, (String, u64, Vec<&pb::Event>, u64)> =
            rows.iter()
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
                events.extend(&frame.events[skip..]);
                *durable = frame.first_seq + frame.events.len() as u64 - 1;
            }
            outcomes.push(Ok((*durable, skip.min(frame.events.len()))));
        }
        let mut segments = Segments::default();
        let (mut up_streams, mut up_seqs) = (Vec::new(), Vec::new());
        for (stream, (_, durable, events, before)) in &state {
            if events.is_empty() {
                continue;
            }
            for segment in encode_segments(stream, before + 1, events, self.inner.settings.codec) {
                segments.push(stream, segment);
            }
            up_streams.push(stream.as_str());
            up_seqs.push(to_i64(*durable));
        }
        if !up_streams.is_empty() {
            tx.execute(
                "INSERT INTO ingest.event_segments
                     (stream_id, first_seq, last_seq, raw_bytes, min_ts, screenshots, data,
                      inline_screenshots)
                 SELECT s, f, l, r, m, coalesce(string_to_array(nullif(k, ''), E'\\n'), '{}'), d, i
                 FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[],
                             $5::timestamptz[], $6::text[], $7::bytea[], $8::bool[])
                      AS u(s, f, l, r, m, k, d, i)",
                &[
                    &segments.streams,
                    &segments.firsts,
                    &segments.lasts,
                    &segments.raw_bytes,
                    &segments.min_ts,
                    &segments.screenshots,
                    &segments.data,
                    &segments.inline_screenshots,
                ],
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
        let mut last_lag = std::time::Instant::now();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            if let Err(error) = self.seal_due().await {
                tracing::warn!(%error, "sealing failed; retrying");
            }
            // Lag measured and expired batches deleted once a window (between 1 and 10 s).
            if last_lag.elapsed()
                >= self
                    .inner
                    .settings
                    .window
                    .clamp(Duration::from_secs(1), Duration::from_secs(10))
            {
                last_lag = std::time::Instant::now();
                if let Err(error) = self.measure_consumer_lag().await {
                    tracing::warn!(%error, "consumer lag not measured");
                }
                if let Err(error) = self.expire_batches().await {
                    tracing::warn!(%error, "expired batches not deleted; retrying");
                }
            }
        }
    }

    /// Sets the consumer-lag gauges: per consumer group, the batches of the streams it reads
    /// sealed in the last day that it has not acknowledged, and the age of the oldest. Group
    /// names are the callers', so only the [`LAG_GROUPS`] furthest behind get series; one
    /// that drops out of them is set to 0 (so the series a process keeps grow only with the
    /// groups that were ever that far behind), and past [`LAG_SERIES_MAX`] groups a process
    /// gives no new group a series (until it restarts).
    async fn measure_consumer_lag(&self) -> Result<()> {
        let conn = self.inner.pool.get().await?;
        let groups = conn
            .query(
                "SELECT r.group_name,
                        count(*) FILTER (WHERE d.acked_at IS NULL) AS behind,
                        COALESCE(extract(epoch FROM now() - min(b.sealed_at)
                                 FILTER (WHERE d.acked_at IS NULL)), 0)::float8 AS age
                 FROM ingest.event_readers r
                 JOIN ingest.event_batches b
                   ON b.stream_id = r.stream_id AND b.sealed_at > now() - interval '1 day'
                 LEFT JOIN ingest.event_deliveries d
                   ON d.group_name = r.group_name AND d.batch_id = b.id
                 GROUP BY r.group_name
                 ORDER BY behind DESC, r.group_name
                 LIMIT $1",
                &[&(LAG_GROUPS as i64)],
            )
            .await?;
        drop(conn);
        let mut reported = self
            .inner
            .lag_reported
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now: std::collections::HashSet<String> =
            groups.iter().map(|row| row.get::<_, String>(0)).collect();
        for gone in reported.difference(&now) {
            metrics::gauge!("stowage_stream_consumer_lag_batches", "group" => gone.clone())
                .set(0.0);
            metrics::gauge!("stowage_stream_consumer_lag_seconds", "group" => gone.clone())
                .set(0.0);
        }
        let mut unreported = 0;
        for row in &groups {
            let group: String = row.get(0);
            if !admit_series(&mut reported, &group, LAG_SERIES_MAX) {
                unreported += 1;
                continue;
            }
            metrics::gauge!("stowage_stream_consumer_lag_batches", "group" => group.clone())
                .set(row.get::<_, i64>(1) as f64);
            metrics::gauge!("stowage_stream_consumer_lag_seconds", "group" => group)
                .set(row.get::<_, f64>(2));
        }
        static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if unreported > 0 && !SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                unreported,
                limit = LAG_SERIES_MAX,
                "consumer groups behind without a lag series: this process gave {LAG_SERIES_MAX} \
                 groups one already"
            );
        }
        Ok(())
    }

    /// Removes stored screenshots older than `max_age` that no segment or batch names (stored
    /// for a frame that was then refused and not removed, or by a process that died before the
    /// frame committed); with `dry_run` only lists them. Looks at up to 500 streams picked at
    /// random, listing only their screenshots, for at most 15 s: every stream comes up in turn
    /// over the hourly runs. A stream that never stored a frame has no row to be picked by;
    /// neither is one that still has segments from before V4 (their screenshots are named only
    /// inside their data).
    /// Returns (examined, keys listed (at most 1000), removed or removable, failures).
    pub async fn sweep_stray_screenshots(
        &self,
        max_age: Duration,
        dry_run: bool,
    ) -> Result<(u64, Vec<String>, u64, u64)> {
        let started = std::time::Instant::now();
        let cutoff =
            Utc::now() - chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::days(1));
        let conn = self.inner.pool.get().await?;
        let streams = conn
            .query_cached(
                "SELECT s.stream_id,
                        ARRAY(SELECT o.old_name FROM ingest.event_stream_old_names o
                               WHERE o.stream_id = s.stream_id)
                 FROM ingest.event_streams s
                 WHERE NOT EXISTS (SELECT 1 FROM ingest.event_segments g
                                    WHERE g.stream_id = s.stream_id AND g.min_ts IS NULL)
                 ORDER BY random() LIMIT $1",
                &[&STRAY_STREAMS_PER_SWEEP],
            )
            .await?;
        drop(conn);
        let deadline = started + STRAY_SWEEP_TIME;
        let mut sweep = StraySweep::default();
        for row in streams {
            if std::time::Instant::now() > deadline {
                break;
            }
            let stream: String = row.get(0);
            let old_names: Vec<String> = row.get(1);
            for name in std::iter::once(&stream).chain(&old_names) {
                if std::time::Instant::now() > deadline {
                    break;
                }
                // A stream that fails is counted, and the next one looked at.
                if let Err(error) = self
                    .sweep_stray_name(&stream, name, cutoff, deadline, dry_run, &mut sweep)
                    .await
                {
                    sweep.failed += 1;
                    tracing::warn!(stream, %error, "stray screenshots of a stream not swept");
                }
            }
        }
        Ok((sweep.examined, sweep.keys, sweep.removed, sweep.failed))
    }

    /// Sweeps the screenshots stored under `name` (`stream` itself, or a name it had before
    /// streams were per owner) older than `cutoff`, until `deadline`.
    async fn sweep_stray_name(
        &self,
        stream: &str,
        name: &str,
        cutoff: DateTime<Utc>,
        deadline: std::time::Instant,
        dry_run: bool,
        sweep: &mut StraySweep,
    ) -> Result<()> {
        use futures::StreamExt;
        let prefix = ObjectPath::from(format!("events/{name}/screens"));
        let mut listing = self.inner.store.list(Some(&prefix));
        let mut page = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let key = meta.location.to_string();
            // Only this name's screenshots: an old name can be a user id, under which that
            // user's stream called "screens" keeps its own (events/{user}/screens/screens/).
            if meta.last_modified < cutoff
                && screenshot_stream(&key).is_some_and(|(named, _)| named == name)
            {
                sweep.examined += 1;
                page.push(key);
            }
            let late = std::time::Instant::now() > deadline;
            if page.len() == 1000 || late {
                self.sweep_stray_page(stream, std::mem::take(&mut page), dry_run, sweep)
                    .await?;
            }
            if late {
                return Ok(());
            }
        }
        self.sweep_stray_page(stream, page, dry_run, sweep).await
    }

    /// Removes (or lists) those of `keys`, screenshots of `stream`, that none of its segments
    /// or batches names.
    async fn sweep_stray_page(
        &self,
        stream: &str,
        keys: Vec<String>,
        dry_run: bool,
        sweep: &mut StraySweep,
    ) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let named: std::collections::HashSet<String> = self
            .inner
            .pool
            .get()
            .await?
            .query_cached(
                "SELECT k FROM ingest.event_batches b, unnest(b.screenshots || b.spared) k
                  WHERE b.stream_id = $1 AND k = ANY($2)
                 UNION
                 SELECT k FROM ingest.event_segments g, unnest(g.screenshots) k
                  WHERE g.stream_id = $1 AND k = ANY($2)",
                &[&stream, &keys],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        for key in keys.into_iter().filter(|k| !named.contains(k)) {
            if !dry_run && let Err(error) = delete_object(self.inner.store.as_ref(), &key).await {
                sweep.failed += 1;
                tracing::warn!(key, %error, "stray screenshot not removed");
                continue;
            }
            sweep.removed += 1;
            if sweep.keys.len() < 1000 {
                sweep.keys.push(key);
            }
        }
        Ok(())
    }

    /// Deletes the batches sealed more than the retention ago (objects first, then rows), at
    /// most 500 per call; returns how many.
    pub async fn expire_batches(&self) -> Result<usize> {
        let retention = self.inner.settings.retention.as_secs_f64();
        let conn = self.inner.pool.get().await?;
        let rows = conn
            .query(
                "SELECT id, storage_key, screenshots FROM ingest.event_batches
                 WHERE sealed_at < now() - make_interval(secs => $1)
                 ORDER BY sealed_at LIMIT 500",
                &[&retention],
            )
            .await?;
        drop(conn);
        let mut gone = Vec::with_capacity(rows.len());
        'batches: for row in &rows {
            let key: String = row.get(1);
            let screenshots: Vec<String> = row.get(2);
            for key in screenshots.iter().chain([&key]) {
                if let Err(error) = delete_object(self.inner.store.as_ref(), key).await {
                    tracing::warn!(key, %error, "expired batch not deleted; later");
                    continue 'batches;
                }
            }
            gone.push(row.get::<_, Uuid>(0));
        }
        let mut conn = self.inner.pool.get().await?;
        let tx = conn.transaction().await?;
        // Batch rows first, as acknowledgements lock them (then their delivery): the other
        // order could deadlock with an acknowledgement of an expiring batch.
        tx.execute(
            "SELECT 1 FROM ingest.event_batches WHERE id = ANY($1) ORDER BY id FOR UPDATE",
            &[&gone],
        )
        .await?;
        tx.execute(
            "DELETE FROM ingest.event_deliveries WHERE batch_id = ANY($1)",
            &[&gone],
        )
        .await?;
        tx.execute(
            "DELETE FROM ingest.event_batches WHERE id = ANY($1)",
            &[&gone],
        )
        .await?;
        // A group that has read nothing for the retention has nothing left to read.
        tx.execute(
            "DELETE FROM ingest.event_readers WHERE last_seen < now() - make_interval(secs => $1)",
            &[&retention],
        )
        .await?;
        tx.commit().await?;
        Ok(gone.len())
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

    /// Writes `segments` (consecutive, of one window) as one batch object; returns its row,
    /// for the caller to insert.
    async fn seal_part(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        stream: &str,
        start: DateTime<Utc>,
        sealed_until: Option<DateTime<Utc>>,
        segments: &[SealedSegment],
    ) -> Result<NewBatch> {
        let ids: Vec<i64> = segments.iter().map(|s| s.id).collect();
        let rows = tx
            .query(
                "SELECT data FROM ingest.event_segments WHERE id = ANY($1) ORDER BY first_seq",
                &[&ids],
            )
            .await?;
        let first_seq = segments[0].first_seq;
        let last_seq = segments[segments.len() - 1].last_seq;
        let mut object = BATCH_MAGIC.to_vec();
        let mut late = Vec::new();
        let mut screenshots = Vec::new();
        let mut inline_screenshots = Some(false);
        for (segment, row) in segments.iter().zip(&rows) {
            let data: &[u8] = row.get(0);
            screenshots.extend(segment.screenshots.iter().cloned());
            inline_screenshots = inline_screenshots
                .zip(segment.inline_screenshots)
                .map(|(a, b)| a || b);
            let legacy = segment.min_ts.is_none();
            let may_be_late = matches!((segment.min_ts, sealed_until), (Some(t), Some(u)) if t < u);
            if legacy || may_be_late {
                let events = decompress(data)?;
                for (i, event) in events.iter().enumerate() {
                    let seq = segment.first_seq + i as i64;
                    // Stamped inside a window that was already sealed: late, delivered now,
                    // flagged.
                    if let (Some(at), Some(until)) = (timestamp_of(event), sealed_until)
                        && at < until
                    {
                        late.push(seq);
                    }
                    // Any key under events/ is one Ingest stored for this stream (clients
                    // cannot name one), also one from before streams were per owner.
                    if legacy
                        && let Some(pb::screenshot::Source::StorageKey(key)) =
                            event.screenshot.as_ref().and_then(|s| s.source.as_ref())
                        && key.starts_with("events/")
                    {
                        screenshots.push(key.clone());
                    }
                }
            }
            push_block(&mut object, data)?;
        }
        let key = format!(
            "events/{stream}/{:04}/{:02}/{:02}/{}-{first_seq:012}.evb",
            start.year(),
            start.month(),
            start.day(),
            start.timestamp_millis()
        );
        drop(rows);
        // Its segments are deleted when this transaction commits: the batch must be on the
        // disk first.
        self.put_durable(&ObjectPath::from(key.as_str()), object.into())
            .await?;
        Ok(NewBatch {
            first_seq,
            last_seq,
            key,
            screenshots,
            inline_screenshots,
            late,
        })
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
        let segments: Vec<SealedSegment> = tx
            .query(
                "SELECT id, first_seq, last_seq, raw_bytes, min_ts, screenshots, inline_screenshots
                 FROM ingest.event_segments
                 WHERE stream_id = $1 AND received_at < $2 ORDER BY first_seq",
                &[&stream, &end],
            )
            .await?
            .iter()
            .map(|r| SealedSegment {
                id: r.get(0),
                first_seq: r.get(1),
                last_seq: r.get(2),
                raw_bytes: usize::try_from(r.get::<_, i32>(3)).unwrap_or(0),
                min_ts: r.get(4),
                screenshots: r.get(5),
                inline_screenshots: r.get(6),
            })
            .collect();
        if segments.is_empty() {
            return Ok(false);
        }
        // Batches of at most BATCH_MAX raw bytes, whole segments each, one in memory at a
        // time: sealing copies the stored blocks and decodes only segments that may hold late
        // events (or that predate the segment columns).
        let sizes: Vec<usize> = segments.iter().map(|s| s.raw_bytes).collect();
        let mut batches = Vec::new();
        for part in parts(&sizes, BATCH_MAX) {
            let batch = self
                .seal_part(&tx, stream, start, sealed_until, &segments[part])
                .await?;
            batches.push(batch);
        }
        let ids: Vec<i64> = segments.iter().map(|s| s.id).collect();
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
        // A batch's seq is taken at its insert and seen at commit. Subscribers move past what
        // they were given, so seqs must become visible in their order: sealers of every
        // stream take turns from their first insert to their commit (short: the objects are
        // written already).
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('stowage-seal-order'))",
            &[],
        )
        .await?;
        for batch in &batches {
            let count = i32::try_from(batch.last_seq - batch.first_seq + 1).unwrap_or(i32::MAX);
            let id = Uuid::now_v7();
            let seq: i64 = tx
                .query_one(
                    "INSERT INTO ingest.event_batches (id, stream_id, owner_id, window_start, window_end,
                     first_seq, last_seq, event_count, storage_key, screenshots, late_seqs,
                     inline_screenshots)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING seq",
                    &[
                        &id,
                    &stream,
                    &owner,
                    &start,
                    &end,
                    &batch.first_seq,
                    &batch.last_seq,
                    &count,
                    &batch.key,
                        &batch.screenshots,
                        &batch.late,
                        &batch.inline_screenshots,
                    ],
                )
                .await?
                .get(0);
            // Announced with the batch, in its transaction.
            let payload = serde_json::json!({
                "batch_id": id,
                "stream_id": stream_name(stream, Some(&owner)),
                "owner_id": owner,
                "seq": seq,
                "window_start": start,
                "window_end": end,
                "first_seq": batch.first_seq,
                "last_seq": batch.last_seq,
                "event_count": count,
            });
            stowage_events::stage(
                &tx,
                crate::SCHEMA,
                stowage_events::topics::BATCH_SEALED,
                stream,
                &payload,
            )
            .await?;
        }
        tx.commit().await?;
        metrics::histogram!("stowage_stream_seal_lag_seconds")
            .record((Utc::now() - end).num_milliseconds().max(0) as f64 / 1000.0);
        Ok(true)
    }

    /// A place for one more subscription in this process, held until dropped; refused when
    /// all are taken, so that subscriptions cannot hold batches without bound, or when
    /// `owner` (a user; `None` for a service) already holds an eighth of them.
    pub fn subscription_slot(&self, owner: Option<&str>) -> Result<SubscriptionSlot> {
        let most = self.inner.settings.max_subscriptions;
        let place = Arc::clone(&self.inner.subscriptions)
            .try_acquire_owned()
            .map_err(|_| Error::TooManySubscriptions(most))?;
        let Some(owner) = owner else {
            return Ok(SubscriptionSlot {
                _place: place,
                owner: None,
            });
        };
        // One user takes at most an eighth of the places, so others still find one.
        let per_owner = (most / 8).max(1);
        let mut owners = self
            .inner
            .owners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = owners.entry(owner.to_owned()).or_insert(0);
        if *open >= per_owner {
            return Err(Error::TooManyOwnSubscriptions(per_owner));
        }
        *open += 1;
        Ok(SubscriptionSlot {
            _place: place,
            owner: Some((Arc::clone(&self.inner.owners), owner.to_owned())),
        })
    }

    /// Batches claimed for a subscriber of `group`: those after cursor `after` never
    /// delivered to the group, and those delivered to any member and not acknowledged in time
    /// (a member that has moved past them still gets them).
    pub async fn claim_batches(
        &self,
        owner: Option<&str>,
        group: &str,
        member: Uuid,
        after: i64,
        streams: &[String],
    ) -> Result<Vec<pb::EventBatch>> {
        let streams = stream_keys(owner, streams);
        let redeliver = self.inner.settings.redeliver_after.as_secs_f64();
        let conn = self.inner.pool.get().await?;
        // A member holds at most `prefetch` batches it has not acknowledged.
        let held: i64 = conn
            .query_one(
                "SELECT count(*) FROM ingest.event_deliveries
                 WHERE group_name = $1 AND member = $2 AND acked_at IS NULL
                   AND delivered_at >= now() - make_interval(secs => $3)",
                &[&group, &member, &redeliver],
            )
            .await?
            .get(0);
        let room = i64::try_from(self.inner.settings.prefetch).unwrap_or(i64::MAX) - held;
        if room <= 0 {
            return Ok(Vec::new());
        }
        let rows = conn
            .query(
                "WITH candidates AS (
                     SELECT b.id FROM ingest.event_batches b
                     LEFT JOIN ingest.event_deliveries d ON d.group_name = $1 AND d.batch_id = b.id
                     WHERE ($3::text IS NULL OR b.owner_id = $3)
                       AND (cardinality($4::text[]) = 0 OR b.stream_id = ANY($4))
                       -- Past the retention: being deleted.
                       AND b.sealed_at >= now() - make_interval(secs => $8)
                       -- New batches after the subscriber's cursor, and any batch another
                       -- member took and did not acknowledge in time (wherever the cursor is).
                       AND ((d.batch_id IS NULL AND b.seq > $2)
                            OR (d.acked_at IS NULL
                                AND d.delivered_at < now() - make_interval(secs => $5)))
                     ORDER BY b.seq LIMIT $6
                 ), claimed AS (
                     INSERT INTO ingest.event_deliveries (group_name, batch_id, member)
                     SELECT $1, id, $7 FROM candidates
                     ON CONFLICT (group_name, batch_id) DO UPDATE
                         SET delivered_at = now(), member = EXCLUDED.member
                         WHERE event_deliveries.acked_at IS NULL
                           AND event_deliveries.delivered_at < now() - make_interval(secs => $5)
                     RETURNING batch_id
                 ), readers AS (
                     INSERT INTO ingest.event_readers (group_name, stream_id)
                     SELECT DISTINCT $1, b.stream_id
                     FROM ingest.event_batches b JOIN claimed c ON c.batch_id = b.id
                     ON CONFLICT (group_name, stream_id) DO NOTHING
                 ), seen AS (
                     -- A group that reads at all still reads its quiet streams too.
                     UPDATE ingest.event_readers SET last_seen = now()
                     WHERE group_name = $1 AND last_seen < now() - interval '1 minute'
                       AND EXISTS (SELECT 1 FROM claimed)
                 )
                 SELECT b.id, b.stream_id, b.storage_key, b.seq, b.late_seqs, b.window_start,
                        b.window_end, b.first_seq, b.last_seq
                 FROM ingest.event_batches b JOIN claimed c ON c.batch_id = b.id
                 ORDER BY b.seq",
                &[
                    &group,
                    &after,
                    &owner,
                    &streams,
                    &redeliver,
                    &room,
                    &member,
                    &self.inner.settings.retention.as_secs_f64(),
                ],
            )
            .await?;
        drop(conn);
        self.read_batches(rows, owner).await
    }

    /// Sealed batches after cursor `after` for an observer of `streams` (all of `owner`'s, or
    /// every stream for `None`), oldest first: nothing is recorded.
    pub async fn observe_batches(
        &self,
        owner: Option<&str>,
        after: i64,
        streams: &[String],
    ) -> Result<Vec<pb::EventBatch>> {
        let streams = stream_keys(owner, streams);
        let rows = self
            .inner
            .pool
            .get()
            .await?
            .query_cached(
                concat!(
                    "SELECT b.id, b.stream_id, b.storage_key, b.seq, b.late_seqs, b.window_start,
                            b.window_end, b.first_seq, b.last_seq
                     FROM ingest.event_batches b
                     WHERE ",
                    observed!(),
                    " AND b.seq > $4 ORDER BY b.seq LIMIT $5"
                ),
                &[
                    &owner,
                    &streams,
                    &self.inner.settings.retention.as_secs_f64(),
                    &after,
                    &i64::try_from(self.inner.settings.prefetch).unwrap_or(i64::MAX),
                ],
            )
            .await?;
        self.read_batches(rows, owner).await
    }

    /// The cursor of the newest batch an observer of `streams` could be sent (0 if none): an
    /// observer starting there gets what is sealed from now on.
    pub async fn newest_cursor(&self, owner: Option<&str>, streams: &[String]) -> Result<i64> {
        let streams = stream_keys(owner, streams);
        let row = self
            .inner
            .pool
            .get()
            .await?
            .query_one_cached(
                concat!(
                    "SELECT COALESCE(max(b.seq), 0) FROM ingest.event_batches b WHERE ",
                    observed!()
                ),
                &[
                    &owner,
                    &streams,
                    &self.inner.settings.retention.as_secs_f64(),
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The batches of `rows` (of `event_batches`) with their events, named for `owner`.
    async fn read_batches(
        &self,
        rows: Vec<tokio_postgres::Row>,
        owner: Option<&str>,
    ) -> Result<Vec<pb::EventBatch>> {
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
                stream_id: stream_name(row.get("stream_id"), owner),
                window_start: Some(stowage_runtime::time::timestamp(row.get("window_start"))),
                window_end: Some(stowage_runtime::time::timestamp(row.get("window_end"))),
                first_seq: u64::try_from(row.get::<_, i64>("first_seq")).unwrap_or(0),
                last_seq: u64::try_from(row.get::<_, i64>("last_seq")).unwrap_or(0),
                events: decode_batch(&data)?,
                late_seqs: late
                    .into_iter()
                    .filter_map(|s| u64::try_from(s).ok())
                    .collect(),
                cursor: seq.to_string(),
            });
        }
        Ok(batches)
    }

    /// The bytes of the stored screenshot `key` (`events/{owner}/{stream}/screens/...`, or
    /// `events/{stream}/screens/...` from before streams were named per owner), for the
    /// stream's owner (`owner`) or a privileged caller (`None`).
    pub async fn screenshot(&self, owner: Option<&str>, key: &str) -> Result<Bytes> {
        let invalid = || {
            Error::invalid(
                "storage_key",
                "must be a screenshot key an event carries (events/{owner}/{stream}/screens/...)",
            )
        };
        let (stream, legacy) = screenshot_stream(key).ok_or_else(invalid)?;
        let conn = self.inner.pool.get().await?;
        // A key from before streams were per owner names the stream by its old name, which
        // V9 recorded with the key it became: that stream's owner, nobody else's `desk`.
        let known = conn
            .query_opt(
                "SELECT 1 FROM ingest.event_streams s
                 WHERE ($2::text IS NULL OR s.owner_id = $2)
                   AND s.stream_id = CASE WHEN $3 THEN
                       (SELECT l.stream_id FROM ingest.event_stream_old_names l
                         WHERE l.old_name = $1)
                       ELSE $1 END",
                &[&stream, &owner, &legacy],
            )
            .await?;
        drop(conn);
        if known.is_none() {
            return Err(Error::NotFound);
        }
        match self.inner.store.get(&ObjectPath::from(key)).await {
            Ok(object) => Ok(object.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound),
            Err(error) => Err(error.into()),
        }
    }

    /// Acknowledges `batch` for `group`. Once every group reading the batch's stream has
    /// acknowledged it, deletes its stored screenshots (except the newest `keep_screenshots`
    /// of its stream) and takes the bytes of its inline ones out of the batch (unless some are
    /// kept); returns how many went. A repeated acknowledgement finishes what a failed one
    /// left.
    pub async fn ack(&self, owner: Option<&str>, group: &str, batch: Uuid) -> Result<u32> {
        let mut conn = self.inner.pool.get().await?;
        let tx = conn.transaction().await?;
        // Acknowledgements of one batch take turns, so the last group's sees the others'.
        let Some(row) = tx
            .query_opt(
                "SELECT stream_id, screenshots, storage_key, inline_screenshots
                 FROM ingest.event_batches
                 WHERE id = $1 AND ($2::text IS NULL OR owner_id = $2)
                 FOR NO KEY UPDATE",
                &[&batch, &owner],
            )
            .await?
        else {
            return Err(Error::NotFound);
        };
        let acked = tx
            .execute(
                "UPDATE ingest.event_deliveries SET acked_at = now()
                 WHERE group_name = $1 AND batch_id = $2 AND acked_at IS NULL",
                &[&group, &batch],
            )
            .await?;
        if acked == 0 {
            let delivered = tx
                .query_opt(
                    "SELECT 1 FROM ingest.event_deliveries WHERE group_name = $1 AND batch_id = $2",
                    &[&group, &batch],
                )
                .await?;
            if delivered.is_none() {
                return Err(Error::NotFound);
            }
        }
        let stream: String = row.get(0);
        let screenshots: Vec<String> = row.get(1);
        let storage_key: String = row.get(2);
        let inline: Option<bool> = row.get(3);
        if screenshots.is_empty() && inline == Some(false) {
            tx.commit().await?;
            return Ok(0);
        }
        let waiting: i64 = tx
            .query_one(
                "SELECT count(*) FROM ingest.event_readers r
                 WHERE r.stream_id = $1 AND NOT EXISTS (
                     SELECT 1 FROM ingest.event_deliveries d
                     WHERE d.group_name = r.group_name AND d.batch_id = $2
                       AND d.acked_at IS NOT NULL)",
                &[&stream, &batch],
            )
            .await?
            .get(0);
        tx.commit().await?;
        drop(conn);
        if waiting > 0 {
            return Ok(0);
        }
        let mut gone = self.delete_screenshots(&stream, batch, screenshots).await?;
        if inline != Some(false) && self.inner.settings.keep_screenshots == 0 {
            gone += self.strip_inline_screenshots(batch, &storage_key).await?;
        }
        // A repeated acknowledgement finishes what a failed one left, and reports nothing:
        // the deletions were the first one's.
        Ok(if acked > 0 { gone } else { 0 })
    }

    /// Deletes `screenshots` of `batch` (acknowledged by every group), except the newest
    /// `keep_screenshots` of `stream`; spared ones are recorded on the batch, and deleted by a
    /// later acknowledgement of the stream once newer ones take their place.
    async fn delete_screenshots(
        &self,
        stream: &str,
        batch: Uuid,
        screenshots: Vec<String>,
    ) -> Result<u32> {
        let keep = self.inner.settings.keep_screenshots;
        if keep == 0 {
            return Ok(delete_objects(self.inner.store.as_ref(), &screenshots).await);
        }
        let mut conn = self.inner.pool.get().await?;
        // The final acknowledgements of one stream's batches take turns here: each reads the
        // spared screenshots and the newest ones, and writes the spared lists, from what the
        // one before left.
        let tx = conn.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('stowage-screens:' || $1))",
            &[&stream],
        )
        .await?;
        let newest: std::collections::HashSet<String> = tx
            .query(
                "SELECT s FROM ingest.event_batches, unnest(screenshots) AS s
                 WHERE stream_id = $1 ORDER BY seq DESC, s DESC LIMIT $2",
                &[&stream, &i64::try_from(keep).unwrap_or(0)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let spared_before: Vec<String> = tx
            .query(
                "SELECT s FROM ingest.event_batches, unnest(spared) AS s
                 WHERE stream_id = $1 AND spared <> '{}' AND id <> $2",
                &[&stream, &batch],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let (spared, mut doomed): (Vec<String>, Vec<String>) =
            screenshots.into_iter().partition(|k| newest.contains(k));
        doomed.extend(spared_before.into_iter().filter(|k| !newest.contains(k)));
        let newest: Vec<&String> = newest.iter().collect();
        tx.execute(
            "UPDATE ingest.event_batches SET spared = $2 WHERE id = $1",
            &[&batch, &spared],
        )
        .await?;
        tx.execute(
            "UPDATE ingest.event_batches
             SET spared = ARRAY(SELECT s FROM unnest(spared) AS s WHERE s = ANY($3))
             WHERE stream_id = $1 AND spared <> '{}' AND id <> $2",
            &[&stream, &batch, &newest],
        )
        .await?;
        tx.commit().await?;
        drop(conn);
        Ok(delete_objects(self.inner.store.as_ref(), &doomed).await)
    }

    /// Rewrites the object of `batch` without the bytes of its inline screenshots (their type
    /// and size stay) and records that it holds none; returns how many it took out.
    async fn strip_inline_screenshots(&self, batch: Uuid, key: &str) -> Result<u32> {
        // Not a batch the retention is about to delete (with its object): a rewrite landing
        // after that deletion would bring the object back with no row to find it by.
        let retention = self.inner.settings.retention.as_secs_f64();
        let margin = (retention / 2.0).min(3600.0);
        let live = self
            .inner
            .pool
            .get()
            .await?
            .query_opt(
                "SELECT 1 FROM ingest.event_batches
                 WHERE id = $1 AND sealed_at > now() - make_interval(secs => $2)",
                &[&batch, &(retention - margin)],
            )
            .await?;
        if live.is_none() {
            return Ok(0);
        }
        let path = ObjectPath::from(key);
        let object = match self.inner.store.get(&path).await {
            Ok(object) => object.bytes().await?,
            // Gone with the retention meanwhile.
            Err(object_store::Error::NotFound { .. }) => return Ok(0),
            Err(error) => return Err(error.into()),
        };
        let codec = self.inner.settings.codec;
        let stripped =
            tokio::task::spawn_blocking(move || without_inline_screenshots(&object, codec))
                .await
                .map_err(|_| Error::Internal("rewriting a batch panicked"))??;
        let count = match stripped {
            Some((object, count)) => {
                self.put_durable(&path, object.into()).await?;
                count
            }
            None => 0,
        };
        let recorded = self
            .inner
            .pool
            .get()
            .await?
            .execute(
                "UPDATE ingest.event_batches SET inline_screenshots = false WHERE id = $1",
                &[&batch],
            )
            .await?;
        if recorded == 0 {
            // The retention deleted the batch while it was rewritten: its object must not
            // come back.
            delete_objects(self.inner.store.as_ref(), &[key.to_owned()]).await;
            return Ok(0);
        }
        Ok(count)
    }
}

/// `object` (a batch) with the bytes of its inline screenshots taken out, and how many; `None`
/// when it has none.
fn without_inline_screenshots(object: &[u8], codec: EventCodec) -> Result<Option<(Vec<u8>, u32)>> {
    let mut events = decode_batch(object)?;
    let mut count = 0;
    for screenshot in events.iter_mut().filter_map(|e| e.screenshot.as_mut()) {
        if matches!(
            screenshot.source,
            Some(pb::screenshot::Source::InlineData(_))
        ) {
            screenshot.source = None;
            count += 1;
        }
    }
    if count == 0 {
        return Ok(None);
    }
    let mut rewritten = BATCH_MAGIC.to_vec();
    let mut raw = Vec::new();
    for event in &events {
        if !raw.is_empty() && raw.len() + event.encoded_len() + 10 > SEGMENT_MAX {
            push_block(&mut rewritten, &compress(&raw, codec))?;
            raw.clear();
        }
        // Encoding into a Vec cannot fail.
        let _ = event.encode_length_delimited(&mut raw);
    }
    if !raw.is_empty() {
        push_block(&mut rewritten, &compress(&raw, codec))?;
    }
    Ok(Some((rewritten, count)))
}

/// Streams a sweep of stray screenshots looks at (picked at random).
const STRAY_STREAMS_PER_SWEEP: i64 = 500;

/// The longest a sweep of stray screenshots goes on to another stream: it runs inside
/// `SweepStaging`, a call with the mesh's 30 s deadline.
const STRAY_SWEEP_TIME: Duration = Duration::from_secs(15);

/// What a sweep of stray screenshots found.
#[derive(Default)]
struct StraySweep {
    examined: u64,
    keys: Vec<String>,
    removed: u64,
    failed: u64,
}

/// The stream a stored screenshot's key names, and whether by its name from before streams
/// were per owner: `events/{owner}/{stream}/screens/{seq}-{id}.bin`, or
/// `events/{stream}/screens/...` then. None for any other key, a batch object's
/// (`events/{owner}/{stream}/{yyyy}/...`) among them, whatever its stream is called.
fn screenshot_stream(key: &str) -> Option<(&str, bool)> {
    let (stream, name) = key.strip_prefix("events/")?.rsplit_once("/screens/")?;
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b));
    if !name_ok {
        return None;
    }
    match stream.split_once('/') {
        Some(_) if validate_stream_key(stream).is_ok() => Some((stream, false)),
        None if validate_stream_id(stream).is_ok() => Some((stream, true)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn screenshot_keys_are_told_from_batch_objects_whatever_the_stream_is_called() {
        let id = "0123456789abcdef0123456789abcdef";
        let shot = |stream: &str| format!("events/{stream}/screens/000000000042-{id}.bin");
        assert_eq!(
            screenshot_stream(&shot("alice/desk")),
            Some(("alice/desk", false))
        );
        assert_eq!(screenshot_stream(&shot("desk")), Some(("desk", true)));
        // A stream called "screens": its screenshots are its own, its batches are not
        // screenshots of a stream named after its owner.
        assert_eq!(
            screenshot_stream(&shot("alice/screens")),
            Some(("alice/screens", false))
        );
        for other in [
            "events/alice/screens/2026/12/05/0123456789abcdef.evb".to_owned(),
            "events/screens/2026/12/05/0123456789abcdef.evb".to_owned(),
            "events/alice/desk/2026/12/05/0123456789abcdef.evb".to_owned(),
            format!("events/alice/desk/screens/sub/{id}.bin"),
            format!("events/alice/desk/screens/a%2Fb-{id}.bin"),
            "events/alice/desk/screens/".to_owned(),
            format!("users/alice/image/2026/12/{id}.png"),
            format!("events/a/b/c/screens/1-{id}.bin"),
        ] {
            assert_eq!(screenshot_stream(&other), None, "{other}");
        }
    }

    /// Past the bound no new group gets a series; those that have one keep it.
    #[test]
    fn lag_series_are_given_to_a_bounded_number_of_groups() {
        let mut reported = std::collections::HashSet::new();
        assert!(admit_series(&mut reported, "ann/a", 2));
        assert!(admit_series(&mut reported, "bob/b", 2));
        assert!(!admit_series(&mut reported, "cat/c", 2));
        assert!(admit_series(&mut reported, "ann/a", 2));
        assert_eq!(reported.len(), 2);
    }

    fn event(seq: u64, payload: usize) -> pb::Event {
        pb::Event {
            timestamp: Some(stowage_runtime::time::timestamp(
                DateTime::from_timestamp(1_700_000_000 + i64::try_from(seq).unwrap_or(0), 0)
                    .unwrap_or_default(),
            )),
            r#type: "input".into(),
            payload: vec![u8::try_from(seq % 251).unwrap_or(0); payload],
            screenshot: None,
        }
    }

    #[test]
    fn segments_are_cut_at_their_size_and_a_batch_reads_them_back_in_order() {
        let events: Vec<pb::Event> = (1..=40).map(|s| event(s, 300 << 10)).collect();
        let refs: Vec<&pb::Event> = events.iter().collect();
        for codec in [EventCodec::Lz4, EventCodec::Zstd] {
            let segments = encode_segments("desk", 1, &refs, codec);
            assert!(segments.len() > 1, "12 MB of events make several segments");
            assert_eq!(segments[0].first_seq, 1);
            assert_eq!(segments[segments.len() - 1].last_seq, 40);
            for pair in segments.windows(2) {
                assert_eq!(pair[0].last_seq + 1, pair[1].first_seq);
            }
            assert!(segments.iter().all(|s| s.raw_bytes <= SEGMENT_MAX));
            assert_eq!(
                segments[0].min_ts.map(|t| t.timestamp()),
                Some(1_700_000_001)
            );
            let object = batch_of(segments.iter().map(|s| s.data.as_slice()));
            assert_eq!(
                decode_batch(&object).ok().as_ref(),
                Some(&events),
                "{codec:?}"
            );
            // A block cut short is an error, not fewer events.
            assert!(decode_batch(&object[..object.len() - 1]).is_err());
        }
    }

    #[test]
    fn an_event_larger_than_a_segment_is_stored_alone_and_read_back() {
        // A 1 MiB payload and a 5 MiB inline screenshot: one event past SEGMENT_MAX.
        let mut events: Vec<pb::Event> = (1..=3).map(|s| event(s, 1 << 20)).collect();
        events[1].screenshot = Some(pb::Screenshot {
            source: Some(pb::screenshot::Source::InlineData(vec![7; 5 << 20])),
            ..Default::default()
        });
        let refs: Vec<&pb::Event> = events.iter().collect();
        for codec in [EventCodec::Lz4, EventCodec::Zstd] {
            let segments = encode_segments("desk", 1, &refs, codec);
            assert!(segments.iter().any(|s| s.raw_bytes > SEGMENT_MAX));
            let object = batch_of(segments.iter().map(|s| s.data.as_slice()));
            assert_eq!(
                decode_batch(&object).ok().as_ref(),
                Some(&events),
                "{codec:?}"
            );
        }
    }

    fn batch_of<'a>(blocks: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
        let mut object = BATCH_MAGIC.to_vec();
        for block in blocks {
            assert!(push_block(&mut object, block).is_ok());
        }
        object
    }

    #[test]
    fn a_batch_reads_segments_stored_under_either_codec() {
        // Segments written before and after a change of codec end up in one batch.
        let events: Vec<pb::Event> = (1..=6).map(|s| event(s, 1000)).collect();
        let refs: Vec<&pb::Event> = events.iter().collect();
        let lz4 = encode_segments("desk", 1, &refs[..3], EventCodec::Lz4);
        let zstd = encode_segments("desk", 4, &refs[3..], EventCodec::Zstd);
        assert!(zstd[0].data.starts_with(&ZSTD_MAGIC));
        assert!(!lz4[0].data.starts_with(&ZSTD_MAGIC));
        let object = batch_of([lz4[0].data.as_slice(), zstd[0].data.as_slice()].into_iter());
        assert_eq!(decode_batch(&object).ok(), Some(events));
    }

    #[test]
    fn stored_screenshots_are_listed_with_their_segment() {
        let mut events: Vec<pb::Event> = (1..=3).map(|s| event(s, 10)).collect();
        for (i, key) in [(0, "events/desk/screens/1.bin"), (2, "elsewhere/2.bin")] {
            events[i].screenshot = Some(pb::Screenshot {
                source: Some(pb::screenshot::Source::StorageKey(key.into())),
                ..Default::default()
            });
        }
        let refs: Vec<&pb::Event> = events.iter().collect();
        let segments = encode_segments("desk", 1, &refs, EventCodec::Lz4);
        assert_eq!(segments.len(), 1);
        assert_eq!(segments[0].screenshots, "events/desk/screens/1.bin");
    }

    #[test]
    fn batches_group_whole_segments_up_to_the_limit() {
        assert_eq!(parts(&[], 10), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(parts(&[4, 4, 4, 12, 1], 10), [0..2, 2..3, 3..4, 4..5]);
        assert_eq!(
            parts(&[0, 0, 0], 10).len(),
            1,
            "empty segments join one batch"
        );
    }
}
