//! Event streams into one Ingest process: `--streams` clients each append frames of
//! `--frame` events of about 200 bytes for `--seconds`, keeping `--inflight` frames
//! unacknowledged (or, with `--rate N`, N events/s in all, paced: seed 001's "1000+
//! events/second with <2% CPU" is `--rate 1000 --streams 1 --frame 100`); prints events/s sustained, ack latency p50 / p99, the Ingest process's CPU
//! share and peak RSS (and the CPU of PostgreSQL and of this client, which share the
//! machine), then LZ4 against zstd on the same events. Run by `scripts/bench streams` (not a
//! test).
//!
//! The client sends pre-encoded frames (only the stream id and first seq are encoded per
//! frame) so that its own CPU stays small beside the server's. `--env KEY=VALUE` sets the
//! services' environment.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use prost::Message;
use rand::{Rng, SeedableRng, rngs::StdRng};
use stowage::Role;
use stowage_integration_tests::cpu;
use stowage_proto::v1 as pb;
use stowage_testkit::{Processes, Setup, authed, token};
use tonic::codec::{Codec, EncodeBuf, Encoder};

/// One frame: its stream id and first seq, and its events already encoded as field 3.
#[derive(Clone)]
struct Frame {
    stream_id: String,
    first_seq: u64,
    events: Bytes,
}

/// Writes [`Frame`]s as `AppendEventsRequest` bytes; reads answers with prost.
#[derive(Default)]
struct FrameCodec;

struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = Frame;
    type Error = tonic::Status;

    fn encode(&mut self, frame: Frame, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        prost::encoding::string::encode(1, &frame.stream_id, dst);
        prost::encoding::uint64::encode(2, &frame.first_seq, dst);
        dst.put_slice(&frame.events);
        Ok(())
    }
}

impl Codec for FrameCodec {
    type Encode = Frame;
    type Decode = pb::AppendEventsResponse;
    type Encoder = FrameEncoder;
    type Decoder = tonic_prost::ProstDecoder<pb::AppendEventsResponse>;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(Default::default())
    }
}

/// Events like an agent's (input, window, activity), about `size` bytes each, stamped now.
fn make_events(rng: &mut StdRng, count: usize, size: usize) -> Vec<pb::Event> {
    const APPS: [&str; 5] = ["code", "firefox", "slack", "terminal", "figma"];
    const TITLES: [&str; 5] = [
        "main.rs - stowage - Visual Studio Code",
        "Pull request #4182 · stowage/stowage - Mozilla Firefox",
        "#platform | Slack",
        "cargo nextest run --workspace",
        "Dashboard redesign - Figma",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (0..count)
        .map(|i| {
            let (kind, body) = match rng.random_range(0..10) {
                0..=5 => (
                    "input",
                    format!(
                        r#"{{"device":"keyboard","code":{},"x":{},"y":{},"mods":{},"app":"{}"}}"#,
                        rng.random_range(8..255),
                        rng.random_range(0..3840),
                        rng.random_range(0..2160),
                        rng.random_range(0..16),
                        APPS[rng.random_range(0..APPS.len())]
                    ),
                ),
                6..=8 => (
                    "window",
                    format!(
                        r#"{{"title":"{}","pid":{},"focused":true}}"#,
                        TITLES[rng.random_range(0..TITLES.len())],
                        rng.random_range(1000..65000)
                    ),
                ),
                _ => (
                    "activity",
                    format!(
                        r#"{{"idle_ms":{},"active_ms":{}}}"#,
                        rng.random_range(0..60_000),
                        rng.random_range(0..60_000)
                    ),
                ),
            };
            let mut payload = body.into_bytes();
            // Pad to the size with a random-looking tail (ids, hashes: not compressible).
            while payload.len() + 24 < size {
                payload.push(b"0123456789abcdef"[rng.random_range(0..16)]);
            }
            pb::Event {
                timestamp: Some(prost_types::Timestamp {
                    seconds: i64::try_from(now.as_secs()).unwrap_or(0),
                    nanos: i32::try_from(now.subsec_nanos() + i as u32 % 1000).unwrap_or(0),
                }),
                r#type: kind.into(),
                payload,
                screenshot: None,
            }
        })
        .collect()
}

/// `events` encoded as repeated field 3 of `AppendEventsRequest`.
fn encode_field(events: &[pb::Event]) -> Bytes {
    let mut buf = BytesMut::new();
    for event in events {
        prost::encoding::message::encode(3, event, &mut buf);
    }
    buf.freeze()
}

/// `events` as the server stores them (length-delimited, back to back).
fn encode_raw(events: &[pb::Event]) -> Vec<u8> {
    let mut raw = Vec::new();
    for event in events {
        let _ = event.encode_length_delimited(&mut raw);
    }
    raw
}

struct Totals {
    acked: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
    measuring: AtomicBool,
}

/// What each stream sends.
#[derive(Clone, Copy)]
struct Load {
    /// Events per frame.
    frame_events: usize,
    /// Frames sent and not yet acknowledged, at most.
    inflight: usize,
    /// Time between two frames of a stream; none: as fast as they are acknowledged.
    pace: Option<Duration>,
}

/// One stream: appends frames, at most `inflight` unacknowledged, until `stop`.
async fn run_stream(
    addr: SocketAddr,
    token: String,
    index: usize,
    load: Load,
    totals: Arc<Totals>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let Load {
        frame_events,
        inflight,
        pace,
    } = load;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(64 << 20);
    grpc.ready().await?;
    let stream_id = format!("bench-{index}-{}", uuid::Uuid::new_v4().simple());
    let (frames, outgoing) = tokio::sync::mpsc::channel::<Frame>(inflight);
    let sent = Arc::new(Mutex::new(VecDeque::<Instant>::new()));
    let slots = Arc::new(tokio::sync::Semaphore::new(inflight));
    let producer = {
        let (sent, slots, stop, stream_id) = (
            Arc::clone(&sent),
            Arc::clone(&slots),
            Arc::clone(&stop),
            stream_id.clone(),
        );
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(index as u64);
            let mut block = encode_field(&make_events(&mut rng, frame_events, 200));
            let mut made = Instant::now();
            let mut seq = 1u64;
            let mut pacing = pace.map(tokio::time::interval);
            while !stop.load(Ordering::Relaxed) {
                if let Some(pacing) = pacing.as_mut() {
                    pacing.tick().await;
                }
                let Ok(permit) = slots.acquire().await else {
                    return;
                };
                permit.forget();
                // Fresh timestamps every second, as a live agent's.
                if made.elapsed() > Duration::from_secs(1) {
                    block = encode_field(&make_events(&mut rng, frame_events, 200));
                    made = Instant::now();
                }
                if let Ok(mut sent) = sent.lock() {
                    sent.push_back(Instant::now());
                }
                let frame = Frame {
                    stream_id: stream_id.clone(),
                    first_seq: seq,
                    events: block.clone(),
                };
                seq += frame_events as u64;
                if frames.send(frame).await.is_err() {
                    return;
                }
            }
        })
    };
    let path = http::uri::PathAndQuery::from_static("/stowage.v1.Ingest/AppendEvents");
    let request = authed(
        tokio_stream::wrappers::ReceiverStream::new(outgoing),
        &token,
    );
    let mut answers = grpc
        .streaming(request, path, FrameCodec)
        .await?
        .into_inner();
    let mut acked_seq = 0u64;
    while let Some(answer) = answers.next().await {
        let answer = answer?;
        let at = sent.lock().ok().and_then(|mut s| s.pop_front());
        slots.add_permits(1);
        let events = answer.durable_seq - acked_seq;
        acked_seq = answer.durable_seq;
        if totals.measuring.load(Ordering::Relaxed) {
            totals.acked.fetch_add(events, Ordering::Relaxed);
            if let (Some(at), Ok(mut l)) = (at, totals.latencies.lock()) {
                l.push(at.elapsed());
            }
        }
        if stop.load(Ordering::Relaxed) && sent.lock().map(|s| s.is_empty()).unwrap_or(true) {
            break;
        }
    }
    producer.abort();
    Ok(())
}

/// `VmHWM` / `VmRSS` of process `pid`, in bytes.
fn memory(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

/// LZ4 against zstd on `events` as stored: ratio and speed of each.
fn compare_codecs(events: &[pb::Event]) {
    let raw = encode_raw(events);
    let mb = raw.len() as f64 / 1e6;
    let time = |f: &dyn Fn() -> usize| {
        let started = Instant::now();
        let mut rounds = 0u32;
        let mut out = 0;
        while started.elapsed() < Duration::from_millis(700) {
            out = f();
            rounds += 1;
        }
        (out, started.elapsed().as_secs_f64() / f64::from(rounds))
    };
    println!(
        "\ncompression of {} events ({:.1} MB as stored), one core:",
        events.len(),
        mb
    );
    println!("  codec     ratio   compress MB/s   decompress MB/s");
    let lz4 = lz4_flex::compress_prepend_size(&raw);
    let (size, c) = time(&|| lz4_flex::compress_prepend_size(&raw).len());
    let (_, d) = time(&|| {
        lz4_flex::decompress_size_prepended(&lz4)
            .map(|v| v.len())
            .unwrap_or(0)
    });
    println!(
        "  lz4      {:6.2}   {:13.0}   {:15.0}",
        raw.len() as f64 / size as f64,
        mb / c,
        mb / d
    );
    for level in [1, 3] {
        let packed = zstd::bulk::compress(&raw, level).unwrap_or_default();
        let (size, c) = time(&|| zstd::bulk::compress(&raw, level).map_or(0, |v| v.len()));
        let (_, d) = time(&|| {
            zstd::bulk::decompress(&packed, raw.len())
                .map(|v| v.len())
                .unwrap_or(0)
        });
        println!(
            "  zstd -{level}  {:6.2}   {:13.0}   {:15.0}",
            raw.len() as f64 / size as f64,
            mb / c,
            mb / d
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let seconds = arg("--seconds", 60);
    let streams = arg("--streams", 8) as usize;
    let frame = arg("--frame", 1000) as usize;
    // Eight frames in flight per stream (64,000 events, 13 MB, over 8 streams): with fewer,
    // the client waits on acknowledgements (events in flight / ack latency) before the server
    // runs out of CPU.
    let inflight = arg("--inflight", 8) as usize;
    // Events per second in all, paced (0: as fast as they are acknowledged).
    let rate = arg("--rate", 0);
    let pace = (rate > 0).then(|| Duration::from_secs_f64((frame * streams) as f64 / rate as f64));
    let warmup = Duration::from_secs(3);

    let mut setup = Setup::new().await?;
    // Media off: the bench is about Ingest; other processes only answer health checks.
    setup
        .env
        .push(("STOWAGE_MEDIA__ENABLED".into(), "false".into()));
    // As the image runs it (see the Dockerfile).
    setup
        .env
        .push(("MALLOC_MMAP_THRESHOLD_".into(), "131072".into()));
    // `--env KEY=VALUE` (repeatable) sets the environment of the services, e.g.
    // `--env STOWAGE_INGEST__STREAMS__WINDOW=10s`.
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2).filter(|w| w[0] == "--env") {
        if let Some((key, value)) = pair[1].split_once('=') {
            setup.env.push((key.to_owned(), value.to_owned()));
        }
    }
    let processes = Processes::split(&setup).await?;
    let ingest = processes.process(Role::Ingest);
    let pid = ingest
        .pid()
        .ok_or_else(|| anyhow::anyhow!("ingest exited"))?;
    let addr = ingest.addr;
    let user = token("bench", &[]);
    let paced = match rate {
        0 => String::new(),
        n => format!(", paced at {n} events/s in all"),
    };
    println!(
        "streams bench: {streams} streams x frames of {frame} events (~200 B), {inflight} frames in flight per stream{paced}, {seconds} s after {} s warm-up",
        warmup.as_secs()
    );

    let totals = Arc::new(Totals {
        acked: AtomicU64::new(0),
        latencies: Mutex::new(Vec::new()),
        measuring: AtomicBool::new(false),
    });
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..streams)
        .map(|i| {
            tokio::spawn(run_stream(
                addr,
                user.clone(),
                i,
                Load {
                    frame_events: frame,
                    inflight,
                    pace,
                },
                Arc::clone(&totals),
                Arc::clone(&stop),
            ))
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let me = std::process::id();
    let (ingest0, pg0, client0) = (
        cpu::seconds(pid).ok_or_else(|| anyhow::anyhow!("ingest exited"))?,
        cpu::seconds_of("postgres"),
        cpu::seconds(me).unwrap_or_default(),
    );
    let started = Instant::now();
    totals.measuring.store(true, Ordering::Relaxed);
    let mut peak_rss = 0;
    let mut next_report = Duration::from_secs(10);
    let mut last_acked = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak_rss = peak_rss.max(memory(pid, "VmRSS:"));
        if started.elapsed() >= next_report {
            let acked = totals.acked.load(Ordering::Relaxed);
            println!(
                "  {:3} s: {:>9.0} events/s, ingest RSS {:.1} MiB",
                next_report.as_secs(),
                (acked - last_acked) as f64 / 10.0,
                memory(pid, "VmRSS:") as f64 / 1048576.0
            );
            last_acked = acked;
            next_report += Duration::from_secs(10);
        }
    }
    totals.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let (ingest1, pg1, client1) = (
        cpu::seconds(pid).ok_or_else(|| anyhow::anyhow!("ingest exited"))?,
        cpu::seconds_of("postgres"),
        cpu::seconds(me).unwrap_or_default(),
    );
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    let acked = totals.acked.load(Ordering::Relaxed);
    let mut latencies = totals
        .latencies
        .lock()
        .map(|l| l.clone())
        .unwrap_or_default();
    latencies.sort_unstable();
    let rate = acked as f64 / elapsed;
    let ingest_cpu = (ingest1 - ingest0) / elapsed;
    println!("\nevents acknowledged: {acked} in {elapsed:.1} s");
    println!(
        "events/s sustained:   {rate:.0}  ({:.1} MB/s of events)",
        rate * 200.0 / 1e6
    );
    println!(
        "ack latency:          p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} frames)",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        latencies.len()
    );
    println!(
        "ingest CPU:           {:.1}% of one core ({:.0} events per CPU-second)",
        ingest_cpu * 100.0,
        rate / ingest_cpu.max(1e-9)
    );
    println!(
        "ingest RSS:           peak {:.1} MiB sampled, VmHWM {:.1} MiB",
        peak_rss as f64 / 1048576.0,
        memory(pid, "VmHWM:") as f64 / 1048576.0
    );
    println!(
        "beside it:            PostgreSQL {:.1}% of a core, this client {:.1}% (2 cores in all)",
        (pg1 - pg0) / elapsed * 100.0,
        (client1 - client0) / elapsed * 100.0
    );
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let row = conn
        .query_one(
            "SELECT (SELECT count(*) FROM ingest.event_batches),
                    (SELECT coalesce(sum(event_count), 0) FROM ingest.event_batches),
                    (SELECT count(*) FROM ingest.event_segments)",
            &[],
        )
        .await?;
    println!(
        "sealed so far:        {} batches, {} events; {} segments waiting for their window",
        row.get::<_, i64>(0),
        row.get::<_, i64>(1),
        row.get::<_, i64>(2)
    );
    let mut rng = StdRng::seed_from_u64(7);
    compare_codecs(&make_events(&mut rng, 20_000, 200));
    Ok(())
}
