//! Upload benchmark: prints figures, asserts nothing.
//!
//! In one run on one machine: MB/s of one 1 GiB upload through WriteChunks to local disk; raw
//! sequential write of the same bytes to the same disk; uploads/s of 4 KiB files committed end
//! to end; and the same two workloads against @tus/server with @tus/file-store (node), with
//! the ratios. The 1 GiB uploads run three times each, taking turns, and their medians are
//! compared; so do the 4 KiB one-shot uploads and the peer's. Two ceilings are measured beside them: SHA-256 of the GiB on one core, and 4 KiB
//! files written durably with nothing else (the disk's share of a small upload). Run it with
//! `scripts/bench` (release build, servers started for it).

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use stowage::Role;
use stowage_integration_tests::{
    complete, cpu, create_session, put_chunk, random_bytes, upload, write_chunks,
};
use stowage_testkit::{Processes, Setup, channel, token};
use tonic::transport::Channel;

const BIG: usize = 1 << 30;
const CHUNK: usize = 8 << 20;
const SMALL: usize = 4096;
const CONCURRENCY: usize = 16;
const SMALL_SECONDS: u64 = 5;

/// Largest direct write at a time, as in staging.
const DIRECT_PIECE: usize = 1 << 20;

/// Rounds of each 1 GiB upload, ours and the peer's taking turns.
const BIG_ROUNDS: usize = 3;

/// Rounds of the 4 KiB one-shot uploads and of the peer's, taking turns.
const SMALL_ROUNDS: usize = 3;

fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// The median of `values`, and the values rounded, as the line prints them.
fn median_of(values: &mut [f64]) -> (f64, String) {
    let shown = values
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect::<Vec<_>>()
        .join(", ");
    values.sort_by(f64::total_cmp);
    (values[values.len() / 2], shown)
}

fn mbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64()
}

/// How the raw baseline writes the bytes.
#[derive(Clone, Copy, PartialEq)]
enum Raw {
    /// Through the page cache, no flush.
    Cached,
    /// Through the page cache, one flush at the end.
    CachedFlushed,
    /// `O_DIRECT` from an aligned buffer, flushed after every chunk: what Stowage's local-disk
    /// staging does for each acknowledged chunk.
    DirectEachChunk,
}

fn raw_write(dir: &std::path::Path, data: &[u8], how: Raw) -> anyhow::Result<Duration> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("raw.bin");
    let mut aligned = vec![0u8; DIRECT_PIECE + 4096];
    let at = aligned.as_ptr().align_offset(4096);
    let aligned = &mut aligned[at..at + DIRECT_PIECE];
    let start = Instant::now();
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(true).write(true);
    if how == Raw::DirectEachChunk {
        options.custom_flags(nix::fcntl::OFlag::O_DIRECT.bits());
    }
    let mut file = options.open(&path)?;
    for chunk in data.chunks(CHUNK) {
        if how == Raw::DirectEachChunk {
            // The chunk arrives in a network buffer; the copy into an aligned one counts. As
            // in staging, `DIRECT_PIECE` at a time, then one flush per chunk.
            for piece in chunk.chunks(DIRECT_PIECE) {
                aligned[..piece.len()].copy_from_slice(piece);
                file.write_all(&aligned[..piece.len()])?;
            }
            file.sync_data()?;
        } else {
            file.write_all(chunk)?;
        }
    }
    file.flush()?;
    if how == Raw::CachedFlushed {
        file.sync_all()?;
    }
    drop(file);
    let elapsed = start.elapsed();
    std::fs::remove_file(&path)?;
    Ok(elapsed)
}

/// SHA-256 of `data` on one core, as Stowage's local-disk staging hashes every byte of an upload:
/// each 1 MiB piece just after its copy into the buffer the disk writes from (faster than hashing
/// the GiB from memory). The ceiling of any upload that is verified whole.
fn hash_alone(data: &[u8]) -> Duration {
    use sha2::Digest;
    let start = Instant::now();
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; DIRECT_PIECE];
    for piece in data.chunks(DIRECT_PIECE) {
        let copy = &mut buffer[..piece.len()];
        copy.copy_from_slice(piece);
        hasher.update(copy);
    }
    std::hint::black_box(hasher.finalize());
    start.elapsed()
}

/// Durable 4 KiB files written by `CONCURRENCY` threads for `SMALL_SECONDS`, each as the
/// local-disk store writes a one-shot upload's blob (a temporary file written and flushed,
/// renamed into place, its directory flushed): files/s, the disk's share of a 4 KiB one-shot
/// upload with nothing else. Sessions and tus stage first, and do more.
fn durable_small_files(dir: &std::path::Path) -> anyhow::Result<f64> {
    let root = dir.join("raw-small");
    std::fs::create_dir_all(&root)?;
    let deadline = Instant::now() + Duration::from_secs(SMALL_SECONDS);
    let start = Instant::now();
    let written: u64 = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..CONCURRENCY)
            .map(|t| {
                let root = &root;
                scope.spawn(move || -> anyhow::Result<u64> {
                    let data = random_bytes(SMALL);
                    let sub = root.join(format!("t{t}"));
                    std::fs::create_dir_all(&sub)?;
                    let folder = std::fs::File::open(&sub)?;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let (temporary, path) =
                            (sub.join(format!("{n}#1")), sub.join(n.to_string()));
                        let mut file = std::fs::File::create(&temporary)?;
                        file.write_all(&data)?;
                        file.sync_all()?;
                        std::fs::rename(&temporary, &path)?;
                        folder.sync_all()?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().map_err(|_| anyhow::anyhow!("writer panicked"))?)
            .sum::<anyhow::Result<u64>>()
    })?;
    let rate = written as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&root)?;
    Ok(rate)
}

/// CPU seconds used by Stowage's process, the bench's own (its client) and the whole machine.
#[derive(Default, Clone, Copy)]
struct Cpu {
    server: f64,
    client: f64,
    machine: f64,
}

impl Cpu {
    fn now(server: u32) -> anyhow::Result<Self> {
        let unread = || anyhow::anyhow!("CPU time not readable from /proc");
        Ok(Self {
            server: cpu::seconds(server).ok_or_else(unread)?,
            client: cpu::seconds(std::process::id()).ok_or_else(unread)?,
            machine: cpu::machine_busy().ok_or_else(unread)?,
        })
    }

    fn since(self, before: Self) -> Self {
        Self {
            server: self.server - before.server,
            client: self.client - before.client,
            machine: self.machine - before.machine,
        }
    }
}

/// Uploads made in a timed workload and the seconds it took.
#[derive(Clone, Copy)]
struct Round {
    uploads: u64,
    seconds: f64,
}

impl Round {
    fn since(start: Instant, done: &AtomicU64) -> Self {
        Self {
            uploads: done.load(Ordering::Relaxed),
            seconds: start.elapsed().as_secs_f64(),
        }
    }

    fn rate(self) -> f64 {
        self.uploads as f64 / self.seconds
    }
}

/// CPU seconds spent during small uploads, summed over rounds, and the uploads they made.
#[derive(Default)]
struct SmallCpu {
    /// Stowage's process (ours) or node's (the peer).
    server: f64,
    postgres: f64,
    machine: f64,
    uploads: f64,
}

impl SmallCpu {
    fn read(server: u32) -> anyhow::Result<[f64; 3]> {
        let unread = || anyhow::anyhow!("CPU time not readable from /proc");
        Ok([
            cpu::seconds(server).ok_or_else(unread)?,
            cpu::seconds_of("postgres"),
            cpu::machine_busy().ok_or_else(unread)?,
        ])
    }

    /// Runs `workload`, adding what it used to the sums, with the work it left behind (relays,
    /// consumers): counted until the machine is quiet again. Returns its uploads/s.
    async fn measure(
        &mut self,
        server: u32,
        workload: impl std::future::Future<Output = anyhow::Result<Round>>,
    ) -> anyhow::Result<f64> {
        let before = Self::read(server)?;
        let round = workload.await?;
        settle("the end of the CPU count").await?;
        let after = Self::read(server)?;
        self.server += after[0] - before[0];
        self.postgres += after[1] - before[1];
        self.machine += after[2] - before[2];
        self.uploads += round.uploads as f64;
        Ok(round.rate())
    }

    /// Milliseconds per upload: server, PostgreSQL, machine.
    fn per_upload_ms(&self) -> [f64; 3] {
        [self.server, self.postgres, self.machine].map(|s| 1000.0 * s / self.uploads.max(1.0))
    }
}

async fn stowage_big(server: &Channel, alice: &str, data: &Bytes) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let s = create_session(
        server.clone(),
        alice,
        "big.bin",
        Some(data.len() as u64),
        "",
    )
    .await?;
    // One WriteChunks stream carrying every chunk, as `stowage upload` does; the chunks are
    // slices of one buffer, as a client reading a file into reused buffers would send them.
    let chunks: Vec<(u64, Bytes)> = (0..data.len())
        .step_by(CHUNK)
        .map(|o| (o as u64, data.slice(o..(o + CHUNK).min(data.len()))))
        .collect();
    write_chunks(server.clone(), alice, &s.id, chunks).await?;
    complete(server.clone(), alice, &s.id).await?;
    Ok(start.elapsed())
}

/// Mean time of each step of a small upload, summed over every client.
#[derive(Default)]
struct Steps {
    create: AtomicU64,
    put: AtomicU64,
    complete: AtomicU64,
}

impl Steps {
    fn add(counter: &AtomicU64, since: Instant) -> Instant {
        counter.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
        Instant::now()
    }

    fn mean_ms(&self, uploads: f64) -> [f64; 3] {
        [&self.create, &self.put, &self.complete]
            .map(|c| c.load(Ordering::Relaxed) as f64 / 1000.0 / uploads.max(1.0))
    }
}

/// 4 KiB uploads for `SMALL_SECONDS` from `CONCURRENCY` clients, client `w` as `users[w %
/// users.len()]`: the uploads made, and per step the mean latency (sessions: CreateUpload, PutChunk,
/// CompleteUpload; one-shot: Upload).
async fn stowage_small(
    server: &Channel,
    users: &[String],
    one_shot: bool,
) -> anyhow::Result<(Round, [f64; 3])> {
    let done = Arc::new(AtomicU64::new(0));
    let steps = Arc::new(Steps::default());
    let deadline = Instant::now() + Duration::from_secs(SMALL_SECONDS);
    let start = Instant::now();
    let workers = (0..CONCURRENCY).map(|w| {
        let (channel, alice, done, steps) = (
            server.clone(),
            users[w % users.len()].clone(),
            Arc::clone(&done),
            Arc::clone(&steps),
        );
        tokio::spawn(async move {
            let data = random_bytes(SMALL);
            let mut i = 0;
            while Instant::now() < deadline {
                let name = format!("s{w}-{i}");
                let t = Instant::now();
                if one_shot {
                    upload(channel.clone(), &alice, &name, &data, &[]).await?;
                    Steps::add(&steps.complete, t);
                } else {
                    let s = create_session(channel.clone(), &alice, &name, Some(SMALL as u64), "")
                        .await?;
                    let t = Steps::add(&steps.create, t);
                    put_chunk(channel.clone(), &alice, &s.id, 0, &data).await?;
                    let t = Steps::add(&steps.put, t);
                    complete(channel.clone(), &alice, &s.id).await?;
                    Steps::add(&steps.complete, t);
                }
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    for r in futures::future::join_all(workers).await {
        r??;
    }
    let round = Round::since(start, &done);
    Ok((round, steps.mean_ms(round.uploads as f64)))
}

async fn tus_create(
    http: &reqwest::Client,
    endpoint: &str,
    auth: Option<&str>,
    length: usize,
    body: Option<Vec<u8>>,
) -> anyhow::Result<String> {
    let mut request = http
        .post(endpoint)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", length.to_string())
        .header("upload-metadata", "filename YS5iaW4=");
    if let Some(a) = auth {
        request = request.header("authorization", a);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/offset+octet-stream")
            .body(body);
    }
    let response = request.send().await?;
    anyhow::ensure!(
        response.status() == 201,
        "tus create: {}",
        response.status()
    );
    Ok(response.headers()["location"].to_str()?.to_owned())
}

async fn tus_big(
    http: &reqwest::Client,
    base: &str,
    endpoint: &str,
    auth: Option<&str>,
    data: Bytes,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let location = tus_create(http, endpoint, auth, data.len(), None).await?;
    let url = if location.starts_with("http") {
        location
    } else {
        format!("{base}{location}")
    };
    let len = data.len();
    let body = futures::stream::iter(
        (0..len)
            .step_by(CHUNK)
            .map(move |o| Ok::<_, std::io::Error>(data.slice(o..(o + CHUNK).min(len)))),
    );
    let mut request = http
        .patch(&url)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .header("content-length", len.to_string())
        .body(reqwest::Body::wrap_stream(body));
    if let Some(a) = auth {
        request = request.header("authorization", a);
    }
    let response = request.send().await?;
    anyhow::ensure!(response.status() == 204, "tus patch: {}", response.status());
    Ok(start.elapsed())
}

async fn tus_small(
    http: &reqwest::Client,
    endpoint: &str,
    auth: Option<&str>,
) -> anyhow::Result<Round> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(SMALL_SECONDS);
    let start = Instant::now();
    let workers = (0..CONCURRENCY).map(|_| {
        let (http, endpoint, auth, done) = (
            http.clone(),
            endpoint.to_owned(),
            auth.map(str::to_owned),
            Arc::clone(&done),
        );
        tokio::spawn(async move {
            let data = random_bytes(SMALL);
            while Instant::now() < deadline {
                tus_create(&http, &endpoint, auth.as_deref(), SMALL, Some(data.clone())).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(())
        })
    });
    for r in futures::future::join_all(workers).await {
        r??;
    }
    Ok(Round::since(start, &done))
}

/// Removes what is in `dir`, keeping `dir`.
fn empty_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

/// Busy and total jiffies of every CPU so far, from `/proc/stat`.
fn cpu_jiffies() -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .ok_or_else(|| anyhow::anyhow!("/proc/stat has no cpu line"))?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// Waits until the machine is quiet (under 10% busy over half a second), at most two minutes:
/// the events of the uploads just measured (Media's jobs, Lifecycle's activity) are still
/// being processed after a workload ends, and the next contender must not pay for them.
async fn settle(before: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut last = cpu_jiffies()?;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = cpu_jiffies()?;
        let busy = (now.0 - last.0) as f64 / (now.1 - last.1).max(1) as f64;
        last = now;
        if busy < 0.10 || start.elapsed() > Duration::from_secs(120) {
            println!(
                "  (waited {:.1} s for the machine to settle before {before}; {:.0}% busy)",
                start.elapsed().as_secs_f64(),
                busy * 100.0
            );
            return Ok(());
        }
    }
}

/// The peer: @tus/server with @tus/file-store on node, writing under `dir`.
async fn start_peer(dir: &std::path::Path) -> anyhow::Result<(tokio::process::Child, String)> {
    let port = stowage_local::free_port()?;
    let js = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("js");
    let mut peer = tokio::process::Command::new("node")
        .arg(js.join("tus-server.mjs"))
        .arg(port.to_string())
        .arg(dir)
        .current_dir(&js)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut ready = tokio::io::BufReader::new(
        peer.stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?,
    );
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut ready, &mut line).await?;
    Ok((peer, format!("http://127.0.0.1:{port}")))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `upload-bench small` runs only the 4 KiB workloads, `upload-bench big` only the 1 GiB ones.
    let only = std::env::args().nth(1).unwrap_or_default();
    let mut setup = Setup::new().await?.with_default_limit(1 << 40);
    let dir = setup
        .blob_dir
        .as_ref()
        .map(|d| d.path().to_owned())
        .unwrap_or_else(std::env::temp_dir);
    // Limits far above what the benchmark sends: the checks still run (their cost counts),
    // they just never refuse.
    for subject in ["USER", "IP"] {
        for class in ["UPLOAD", "OTHER"] {
            let rule = format!("STOWAGE_RATE_LIMIT__{subject}__{class}");
            setup
                .env
                .push((format!("{rule}__PER_SECOND"), "1000000".into()));
            setup.env.push((format!("{rule}__BURST"), "1000000".into()));
        }
    }
    // Stowage in a process of its own (`stowage serve all`), as the peer runs in node's: the
    // bench's clients do not share its threads.
    let stowage = Processes::all(&setup).await?;
    let addr = stowage.addr(Role::Ingest);
    let server = channel(addr);
    let alice = token("bench", &[]);
    let auth = format!("Bearer {alice}");
    let base = format!("http://{addr}");
    let peer_dir = tempfile::Builder::new()
        .prefix("tus-peer-")
        .tempdir_in(dir.parent().unwrap_or(&dir))?;
    let (mut peer, peer_base) = start_peer(peer_dir.path()).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    println!(
        "upload benchmark: 1 GiB in 8 MiB chunks, 4 KiB files with {CONCURRENCY} clients for {SMALL_SECONDS} s; store dir {}",
        dir.display()
    );

    let server_pid = stowage
        .process(Role::Ingest)
        .pid()
        .ok_or_else(|| anyhow::anyhow!("stowage exited"))?;
    if only != "small" {
        let data = Bytes::from(random_bytes(BIG));
        // The first write of 1 GiB into the page cache after boot runs at a fraction of the
        // speed of later ones on a VM (the host backs each fresh page on first touch): it is
        // shown, and the baselines are measured after it.
        let raw_cold = raw_write(&dir, &data, Raw::Cached)?;
        let raw = raw_write(&dir, &data, Raw::Cached)?;
        let raw_synced = raw_write(&dir, &data, Raw::CachedFlushed)?;
        let raw_direct = raw_write(&dir, &data, Raw::DirectEachChunk)?;
        let hashed = hash_alone(&data);
        // Both vary from run to run on a VM (the disk above all): they take turns, and the
        // median of each is compared.
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        let mut cpu = Cpu::default();
        for _ in 0..BIG_ROUNDS {
            let before = Cpu::now(server_pid)?;
            ours.push(stowage_big(&server, &alice, &data).await?);
            let used = Cpu::now(server_pid)?.since(before);
            cpu.server += used.server;
            cpu.client += used.client;
            cpu.machine += used.machine;
            theirs.push(
                tus_big(
                    &http,
                    &peer_base,
                    &format!("{peer_base}/files"),
                    None,
                    data.clone(),
                )
                .await?,
            );
            // The peer writes through the page cache: its next round must find the pages
            // this one took free again, as the raw baselines do, not fresh ones (on this VM
            // fresh pages cost more than the disk: see the first raw write).
            empty_dir(peer_dir.path())?;
        }
        let show = |times: &[Duration]| {
            times
                .iter()
                .map(|t| format!("{:.0}", mbps(BIG, *t)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "1 GiB rounds (MB/s): stowage WriteChunks {}; @tus/server {}",
            show(&ours),
            show(&theirs)
        );
        let (stowage, peer_big) = (median(&mut ours), median(&mut theirs));
        let stowage_tus_big = tus_big(
            &http,
            &base,
            &format!("{base}/tus"),
            Some(&auth),
            data.clone(),
        )
        .await?;
        let (raw_mbps, st_mbps, peer_mbps) =
            (mbps(BIG, raw), mbps(BIG, stowage), mbps(BIG, peer_big));
        let (synced_mbps, direct_mbps) = (mbps(BIG, raw_synced), mbps(BIG, raw_direct));
        println!(
            "raw sequential write, 1st run  {:>9.1} MB/s   (page cache, no fsync; fresh pages)",
            mbps(BIG, raw_cold)
        );
        println!("raw sequential write           {raw_mbps:>9.1} MB/s   (page cache, no fsync)");
        println!(
            "raw sequential write + fsync   {synced_mbps:>9.1} MB/s   (page cache, one fsync at the end)"
        );
        println!(
            "raw direct write, flush/chunk  {direct_mbps:>9.1} MB/s   (O_DIRECT, fdatasync per 8 MiB: durable as Stowage's acks)"
        );
        let hash_mbps = mbps(BIG, hashed);
        println!(
            "sha256 alone, one core         {hash_mbps:>9.1} MB/s   (copied and hashed by 1 MiB pieces; {:.2} x raw direct: the most a verified upload can reach)",
            hash_mbps / direct_mbps
        );
        println!(
            "stowage WriteChunks 1 GiB      {st_mbps:>9.1} MB/s (median)   {:.2} x raw, {:.2} x raw+fsync, {:.2} x raw direct (target >= 0.8)   {:.2} x peer (target >= 2)",
            st_mbps / raw_mbps,
            st_mbps / synced_mbps,
            st_mbps / direct_mbps,
            st_mbps / peer_mbps
        );
        println!(
            "stowage tus PATCH 1 GiB        {:>9.1} MB/s",
            mbps(BIG, stowage_tus_big)
        );
        println!("@tus/server file-store 1 GiB   {peer_mbps:>9.1} MB/s (median)");
        let (rounds, wall) = (
            BIG_ROUNDS as f64,
            ours.iter().sum::<Duration>().as_secs_f64(),
        );
        println!(
            "CPU per stowage 1 GiB upload   server {:.2} s, client {:.2} s, machine {:.2} s of {:.2} s x {} cores ({:.0} % busy)",
            cpu.server / rounds,
            cpu.client / rounds,
            cpu.machine / rounds,
            wall / rounds,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            100.0 * cpu.machine
                / (wall * std::thread::available_parallelism().map_or(1, |n| n.get()) as f64)
        );
    }

    if only == "big" {
        let _ = peer.kill().await;
        return Ok(());
    }
    settle("the 4 KiB sessions").await?;
    let one_user = [alice.clone()];
    let (sessions, session_steps) = stowage_small(&server, &one_user, false).await?;
    let sessions = sessions.rate();
    // The one-shot uploads and the peer's vary from run to run on a VM: they take turns, and
    // the medians are compared.
    let (mut one_shot_rounds, mut peer_rounds, mut one_shot_latency) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut our_cpu, mut peer_cpu) = (SmallCpu::default(), SmallCpu::default());
    let peer_pid = peer
        .id()
        .ok_or_else(|| anyhow::anyhow!("the peer exited"))?;
    for round in 1..=SMALL_ROUNDS {
        settle(&format!("the 4 KiB one-shot uploads, round {round}")).await?;
        let mut latency = 0.0;
        let rate = our_cpu
            .measure(server_pid, async {
                let (round, steps) = stowage_small(&server, &one_user, true).await?;
                latency = steps[2];
                Ok(round)
            })
            .await?;
        one_shot_rounds.push(rate);
        one_shot_latency.push(latency);
        settle(&format!("the peer's 4 KiB uploads, round {round}")).await?;
        let peer_files = format!("{peer_base}/files");
        peer_rounds.push(
            peer_cpu
                .measure(peer_pid, tus_small(&http, &peer_files, None))
                .await?,
        );
    }
    let (one_shot, one_shot_shown) = median_of(&mut one_shot_rounds);
    let (peer_small, peer_shown) = median_of(&mut peer_rounds);
    let (latency, _) = median_of(&mut one_shot_latency);
    // The same with a user per client: every hold and charge of one user goes through that
    // user's account row, one transaction at a time.
    settle("the 4 KiB one-shot uploads of many users").await?;
    let many_users: Vec<String> = (0..CONCURRENCY)
        .map(|w| token(&format!("bench-{w}"), &[]))
        .collect();
    let one_shot_many = stowage_small(&server, &many_users, true).await?.0.rate();
    settle("the 4 KiB tus uploads").await?;
    let stowage_tus = tus_small(&http, &format!("{base}/tus"), Some(&auth))
        .await?
        .rate();
    settle("the raw 4 KiB files").await?;
    let durable_files = tokio::task::block_in_place(|| durable_small_files(&dir))?;
    let [create, put, done] = session_steps;
    println!(
        "stowage 4 KiB sessions         {sessions:>9.1} uploads/s   {:.2} x peer (target >= 3)",
        sessions / peer_small
    );
    println!(
        "  mean latency per step         CreateUpload {create:.1} ms, PutChunk {put:.1} ms, CompleteUpload {done:.1} ms"
    );
    println!(
        "stowage 4 KiB one-shot Upload  {one_shot:>9.1} uploads/s   {:.2} x peer (target >= 3)   mean latency {latency:.1} ms (the rounds' median)   (median of rounds {one_shot_shown})",
        one_shot / peer_small,
    );
    let [server_ms, postgres_ms, machine_ms] = our_cpu.per_upload_ms();
    let [node_ms, _, peer_machine_ms] = peer_cpu.per_upload_ms();
    println!(
        "  CPU per upload                Stowage {server_ms:.2} ms + PostgreSQL {postgres_ms:.2} ms, machine {machine_ms:.2} ms; the peer: node {node_ms:.2} ms, machine {peer_machine_ms:.2} ms (ours {:.2} x the peer's)",
        machine_ms / peer_machine_ms.max(f64::MIN_POSITIVE)
    );
    println!(
        "  the same, a user per client  {one_shot_many:>9.1} uploads/s   {:.2} x peer",
        one_shot_many / peer_small
    );
    println!("stowage 4 KiB tus create+body  {stowage_tus:>9.1} uploads/s");
    println!(
        "@tus/server 4 KiB create+body  {peer_small:>9.1} uploads/s   (median of rounds {peer_shown})"
    );
    println!(
        "raw durable 4 KiB files        {durable_files:>9.1} files/s     ({CONCURRENCY} threads, as a one-shot blob: written, flushed, renamed, dir flushed; {:.2} x peer)",
        durable_files / peer_small
    );
    let _ = peer.kill().await;
    drop(stowage);
    Ok(())
}
