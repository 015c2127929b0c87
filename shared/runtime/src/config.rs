//! Configuration from the environment and an optional TOML file, one typed struct per
//! service, validated at start.
//!
//! Sources, later ones winning: built-in defaults, the TOML file named by `STOWAGE_CONFIG`
//! (or `--config`), `DATABASE_URL` / `REDIS_URL`, then `STOWAGE_*` variables. Nested keys use a
//! double underscore: `STOWAGE_QUOTA__DEFAULT_LIMIT=20GiB` sets `quota.default_limit`.

use std::{net::SocketAddr, path::Path, time::Duration};

pub use bytesize::ByteSize;
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Deserializer, Serialize};

/// A configuration error, naming the variable (or TOML key) at fault.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Log output format (`text` or `json`).
pub use stowage_telemetry::LogFormat;

/// The whole configuration of a Stowage process.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `STOWAGE_ADDR`: address gRPC, grpc-web and HTTP listen on.
    pub addr: SocketAddr,
    /// `DATABASE_URL`: PostgreSQL; `stowage dev` starts a throwaway server when unset.
    pub database_url: Option<String>,
    /// `REDIS_URL`: Redis; `stowage dev` starts a throwaway server when unset.
    pub redis_url: Option<String>,
    /// `STOWAGE_BLOB_URL`: object store (`file://`, `memory://`, `s3://`, `az://`).
    pub blob_url: String,
    /// `STOWAGE_PUBLIC_URL`: base of signed download URLs (default `http://{addr}`).
    pub public_url: Option<String>,
    /// `STOWAGE_URL_SIGNING_KEY`: HMAC key of signed download URLs and upload links (default:
    /// derived from the HS256 secret; required with JWKS auth).
    pub url_signing_key: Option<String>,
    /// `STOWAGE_URL_SIGNING_KEY_PREVIOUS`: the key before the current one, while rotating:
    /// URLs signed with it are still served (new ones are signed with the current key). Keep
    /// it for the longest URL lifetime (`STOWAGE_FILES__MAX_URL_TTL`) after the change.
    pub url_signing_key_previous: Option<String>,
    /// `STOWAGE_SERVICE_TOKEN`: bearer token services present to each other over gRPC when
    /// tokens cannot be minted locally (JWKS mode).
    pub service_token: Option<String>,
    /// `STOWAGE_SERVICE_TOKEN_FILE`: a file holding that token, read again whenever it
    /// changes (a mounted Secret that something renews), for tokens that expire.
    pub service_token_file: Option<std::path::PathBuf>,
    /// `STOWAGE_CORS_ORIGINS`: comma-separated origins allowed to call over grpc-web; `*` for
    /// any.
    #[serde(deserialize_with = "comma_list")]
    pub cors_origins: Vec<String>,
    /// `STOWAGE_MAX_MESSAGE_SIZE`: largest gRPC message accepted (default 16 MiB, room for an 8 MiB chunk).
    pub max_message_size: ByteSize,
    /// `STOWAGE_DB_POOL_SIZE`: PostgreSQL connections per pool (a process keeps one per service
    /// it serves and one of its own, each opened as needed).
    pub db_pool_size: usize,
    /// `STOWAGE_LOG_FORMAT`: `text` or `json`.
    pub log_format: LogFormat,
    /// `STOWAGE_SHUTDOWN_GRACE`: how long in-flight calls may finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `STOWAGE_METRICS_ADDR`: where Prometheus scrapes `/metrics` (e.g. `0.0.0.0:9090`);
    /// unset, `/metrics` is served on `STOWAGE_ADDR`.
    pub metrics_addr: Option<SocketAddr>,
    /// `STOWAGE_AUTH__*`.
    pub auth: AuthConfig,
    /// `STOWAGE_PEERS__*`: where the other services are in `serve <one>` mode.
    pub peers: PeersConfig,
    /// `STOWAGE_FILES__*`.
    pub files: FilesConfig,
    /// `STOWAGE_QUOTA__*`.
    pub quota: QuotaConfig,
    /// `STOWAGE_INGEST__*`.
    pub ingest: IngestConfig,
    /// `STOWAGE_EVENTS__*`.
    pub events: EventsConfig,
    /// `STOWAGE_MEDIA__*`.
    pub media: MediaConfig,
    /// `STOWAGE_LIFECYCLE__*`.
    pub lifecycle: LifecycleConfig,
    /// `STOWAGE_RATE_LIMIT__*`: per-user and per-IP limits per call class, kept in Redis.
    pub rate_limit: stowage_ratelimit::Limits,
    /// `STOWAGE_CONNECTIONS__*`: how many connections, and how much each may send unread.
    pub connections: ConnectionsConfig,
}

/// Connections to the listener (gRPC, grpc-web, tus and plain HTTP alike).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionsConfig {
    /// `STOWAGE_CONNECTIONS__MAX`: connections open at once; past it, new ones wait to be
    /// accepted until one closes.
    pub max: usize,
    /// `STOWAGE_CONNECTIONS__PER_ADDRESS`: connections one client address (an IPv6 /64) may
    /// hold open at once; past it, its new ones are closed at once (0: no bound, for a
    /// service reached only through a proxy that opens more than this).
    pub per_address: usize,
    /// `STOWAGE_CONNECTIONS__STREAM_WINDOW`: HTTP/2 receive window of one call, what a peer
    /// may send before the service reads it (larger: faster uploads on fast links).
    pub stream_window: ByteSize,
    /// `STOWAGE_CONNECTIONS__CONNECTION_WINDOW`: HTTP/2 receive window of a connection,
    /// shared by its calls.
    pub connection_window: ByteSize,
}

impl Default for ConnectionsConfig {
    fn default() -> Self {
        Self {
            max: 10_000,
            per_address: 1_000,
            // hyper's default, 1 MiB, kept one upload stream of 8 MiB chunks at about 170 MB/s
            // on loopback, its client waiting for window updates; 4 MiB: about 300.
            stream_window: ByteSize::mib(4),
            connection_window: ByteSize::mib(8),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 7070)),
            database_url: None,
            redis_url: None,
            blob_url: "file:///var/lib/stowage".into(),
            public_url: None,
            url_signing_key: None,
            url_signing_key_previous: None,
            service_token: None,
            service_token_file: None,
            cors_origins: Vec::new(),
            max_message_size: ByteSize::mib(16),
            db_pool_size: 16,
            log_format: LogFormat::Text,
            shutdown_grace: Duration::from_secs(30),
            metrics_addr: None,
            auth: AuthConfig::default(),
            peers: PeersConfig::default(),
            files: FilesConfig::default(),
            quota: QuotaConfig::default(),
            ingest: IngestConfig::default(),
            events: EventsConfig::default(),
            media: MediaConfig::default(),
            lifecycle: LifecycleConfig::default(),
            rate_limit: stowage_ratelimit::Limits::default(),
            connections: ConnectionsConfig::default(),
        }
    }
}

/// Longest `STOWAGE_EVENTS__REPLAY_WINDOW`: well within the 7 days consumers remember the
/// events they applied.
pub const REPLAY_WINDOW_MAX: Duration = Duration::from_secs(24 * 3600);

/// Events between services (outbox relay and consumers over Redis Streams).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// `STOWAGE_EVENTS__STREAM_MAX_LEN`: approximate length a topic's stream is cut to when a
    /// group falls this far behind (streams are otherwise trimmed to what the groups need).
    pub stream_max_len: u64,
    /// `STOWAGE_EVENTS__REPLAY_WINDOW`: how far back events are published again when Redis
    /// has lost its data, and how long streams keep acknowledged entries for groups created
    /// late.
    #[serde(with = "humantime_serde")]
    pub replay_window: Duration,
    /// `STOWAGE_EVENTS__CLAIM_IDLE`: how long a delivery may stay unacknowledged before
    /// another consumer takes it over.
    #[serde(with = "humantime_serde")]
    pub claim_idle: Duration,
    /// `STOWAGE_EVENTS__MAX_ATTEMPTS`: failed attempts at one event after which a consumer
    /// sets it aside in its schema's `dead_events` (attempts come every `claim_idle`).
    pub max_attempts: u32,
    /// Prefix of the Redis keys of this mesh, so several meshes can share one Redis: of the
    /// event streams, in braces (`{<namespace>}:events:<topic>`: one Redis Cluster slot), and
    /// of the rate-limit buckets (`<namespace>:rl:...`).
    pub namespace: String,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            stream_max_len: 1_000_000,
            replay_window: Duration::from_secs(3600),
            claim_idle: Duration::from_secs(30),
            max_attempts: 10,
            namespace: "stowage".into(),
        }
    }
}

/// Token verification.
/// How long one Lifecycle job (a scheduled run) may take.
pub const LIFECYCLE_JOB_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// The longest `gc_time`: `blob_gc`'s two ways together take at most 4/5 of a job, leaving
/// the rest to its sweep of unfinished writes.
pub const GC_TIME_MAX: Duration = Duration::from_secs(LIFECYCLE_JOB_TIMEOUT.as_secs() * 2 / 5);

/// Lifecycle: its clean-up thresholds live in its policy (an API); these are process settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LifecycleConfig {
    /// A user's recheck runs this long after the last file event of a burst.
    #[serde(with = "humantime_serde")]
    pub recheck_debounce: Duration,
    /// `STOWAGE_LIFECYCLE__RECHECK_ATTEMPTS`: attempts of a recheck whose recount fails
    /// before it is left to the next reconcile (1..=20).
    pub recheck_attempts: u32,
    /// `STOWAGE_LIFECYCLE__RECHECK_BACKOFF`: wait before a failed recheck's second attempt
    /// (5 s to 1 h).
    #[serde(with = "humantime_serde")]
    pub recheck_backoff: Duration,
    /// `STOWAGE_LIFECYCLE__RECHECK_BACKOFF_FACTOR`: each later wait is the one before times
    /// this (1 to 10).
    pub recheck_backoff_factor: f64,
    /// `STOWAGE_LIFECYCLE__RECHECK_CONCURRENCY`: rechecks a process runs at once (1..=64).
    pub recheck_concurrency: usize,
    /// A drifted account is looked at again this long later, and repaired only if nothing
    /// moved: a recount between two steps of a purge or an upload is not a drift.
    #[serde(with = "humantime_serde")]
    pub reconcile_settle: Duration,
    /// Blobs, and then files, that one `blob_gc` run looks at, at most: the next run goes on
    /// where it stopped (on stores that list in key order; a local disk is walked whole).
    pub gc_batch: u64,
    /// How long each of `blob_gc`'s two ways may go on in one run (it always looks at one
    /// item, or one page of files, at least); the next run goes on where it stopped.
    #[serde(with = "humantime_serde")]
    pub gc_time: Duration,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            recheck_debounce: Duration::from_secs(1),
            recheck_attempts: 6,
            recheck_backoff: Duration::from_secs(5),
            recheck_backoff_factor: 2.0,
            recheck_concurrency: 4,
            reconcile_settle: Duration::from_secs(2),
            gc_batch: 1_000_000,
            gc_time: Duration::from_secs(10 * 60),
        }
    }
}

/// Media: derivatives, metadata and antivirus.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Whether Media runs in this mesh: new files are registered PROCESSING and wait for it.
    /// Off, they are READY at once and have no variants.
    pub enabled: bool,
    /// clamd to scan every new file with (`tcp://host:3310` or `unix:///run/clamd.ctl`).
    /// While set, files in processing are not served and infected files are quarantined.
    pub clamd_url: Option<String>,
    /// Longest wait for one scan, plus one second per 20 MB of the file (a large file is
    /// streamed and scanned for longer), but no more than the job's time limit leaves: a
    /// file too large for that is held as unscannable.
    #[serde(with = "humantime_serde")]
    pub scan_timeout: Duration,
    /// Jobs one Media process runs at once.
    pub concurrency: usize,
    /// Longest run of one job; a claim lasts twice as long.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    /// Attempts of a job (scanner down, store errors) before it is dead.
    pub max_attempts: u32,
    /// Delay before the first retry, doubled each time up to `backoff_cap`.
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    /// Longest delay between two attempts.
    #[serde(with = "humantime_serde")]
    pub backoff_cap: Duration,
    /// Largest image decoded.
    pub max_image_size: ByteSize,
    /// Largest image in pixels (width × height).
    pub max_pixels: u64,
    /// Largest file copied to a temp file for ffprobe / ffmpeg.
    pub max_video_size: ByteSize,
    /// Longest run of one ffprobe or ffmpeg.
    #[serde(with = "humantime_serde")]
    pub tool_timeout: Duration,
    /// Address-space limit of one ffprobe or ffmpeg.
    pub tool_memory: ByteSize,
    /// ffmpeg binary.
    pub ffmpeg: String,
    /// ffprobe binary.
    pub ffprobe: String,
    /// `STOWAGE_MEDIA__HEIF_CONVERT`: libheif's `heif-convert`, which turns HEIF / HEIC and
    /// AVIF pictures into PNG for their variants.
    pub heif_convert: String,
    /// `STOWAGE_MEDIA__RESCAN_WINDOW`: files uploaded this long ago or less are scanned again
    /// when clamd's signatures change; `0s`: never.
    #[serde(with = "humantime_serde")]
    pub rescan_window: Duration,
    /// `STOWAGE_MEDIA__RESCAN_INTERVAL`: how often Media asks clamd whether its signatures
    /// changed (and queues the re-scans when they did).
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            clamd_url: None,
            scan_timeout: Duration::from_secs(60),
            concurrency: 3,
            job_timeout: Duration::from_secs(5 * 60),
            max_attempts: 12,
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(5 * 60),
            max_image_size: ByteSize::mib(256),
            max_pixels: 64_000_000,
            max_video_size: ByteSize::gib(20),
            tool_timeout: Duration::from_secs(120),
            tool_memory: ByteSize::gib(2),
            ffmpeg: "ffmpeg".into(),
            ffprobe: "ffprobe".into(),
            heif_convert: "heif-convert".into(),
            rescan_window: Duration::from_secs(3 * 24 * 3600),
            rescan_interval: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `STOWAGE_AUTH__HS256_SECRET`: shared secret (dev and single-tenant installs).
    pub hs256_secret: Option<String>,
    /// `STOWAGE_AUTH__JWKS_URL`: JWKS of an OIDC provider (RS256 / ES256).
    pub jwks_url: Option<String>,
    /// `STOWAGE_AUTH__ISSUER`: required `iss`, when set.
    pub issuer: Option<String>,
    /// `STOWAGE_AUTH__AUDIENCE`: required `aud`, when set.
    pub audience: Option<String>,
}

/// Addresses of the other services, used by `serve <one>`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersConfig {
    /// `STOWAGE_PEERS__QUOTA`, e.g. `http://quota:7070`.
    pub quota: Option<String>,
    /// `STOWAGE_PEERS__FILES`.
    pub files: Option<String>,
    /// `STOWAGE_PEERS__INGEST`.
    pub ingest: Option<String>,
    /// `STOWAGE_PEERS__MEDIA`.
    pub media: Option<String>,
    /// `STOWAGE_PEERS__LIFECYCLE`.
    pub lifecycle: Option<String>,
    /// `STOWAGE_PEERS__TIMEOUT`: deadline of each call to another service.
    #[serde(with = "humantime_serde::option")]
    pub timeout: Option<Duration>,
}

/// Files service settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FilesConfig {
    /// `STOWAGE_FILES__MAX_URL_TTL`: longest lifetime of a signed URL.
    #[serde(with = "humantime_serde")]
    pub max_url_ttl: Duration,
    /// `STOWAGE_FILES__DOWNLOAD_CHUNK`: bytes per Download message.
    pub download_chunk: ByteSize,
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            max_url_ttl: Duration::from_secs(7 * 24 * 3600),
            download_chunk: ByteSize::kib(256),
        }
    }
}

/// Quota service settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct QuotaConfig {
    /// `STOWAGE_QUOTA__DEFAULT_LIMIT`: limit of a new account (default 10 GiB).
    pub default_limit: ByteSize,
    /// `STOWAGE_QUOTA__RESERVATION_TTL`: default lifetime of a reservation.
    #[serde(with = "humantime_serde")]
    pub reservation_ttl: Duration,
}

impl Default for QuotaConfig {
    fn default() -> Self {
        Self {
            default_limit: ByteSize::gib(10),
            reservation_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Ingest service settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// `STOWAGE_INGEST__MAX_FILE_SIZE`: largest file accepted.
    pub max_file_size: ByteSize,
    /// `STOWAGE_INGEST__PART_SIZE`: multipart part size towards the store.
    pub part_size: ByteSize,
    /// `STOWAGE_INGEST__MIN_FREE`: free space a local-disk store keeps; an upload that would
    /// leave less is refused (RESOURCE_EXHAUSTED). 0 turns the check off.
    pub min_free: ByteSize,
    /// `STOWAGE_INGEST__ALLOWED_TYPES`: comma-separated MIME types (`image/png`) or families
    /// (`image/*`) a file's content may have, as sniffed from its first bytes; empty (the
    /// default) takes every type.
    #[serde(deserialize_with = "comma_list")]
    pub allowed_types: Vec<String>,
    /// `STOWAGE_INGEST__SESSION_TTL`: how long an unfinished resumable upload lives.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// `STOWAGE_INGEST__CHUNK_SIZE`: chunk size suggested to clients.
    pub chunk_size: ByteSize,
    /// `STOWAGE_INGEST__MAX_CHUNK`: largest chunk (WriteChunks message, tus PATCH with a checksum).
    pub max_chunk: ByteSize,
    /// `STOWAGE_INGEST__SWEEP_INTERVAL`: how often expired sessions are swept.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// `STOWAGE_INGEST__TUS_PATH`: where the tus endpoint lives on the HTTP port.
    pub tus_path: String,
    /// `STOWAGE_INGEST__PUBLIC_URL`: base of upload links, where clients reach Ingest's tus
    /// endpoint (default `STOWAGE_PUBLIC_URL`, for a gateway that routes the tus path of that
    /// host to Ingest).
    pub public_url: Option<String>,
    /// `STOWAGE_INGEST__STREAMS__*`: event streams.
    pub streams: StreamsConfig,
}

/// Event streams (AppendEvents, sealed windows, consumer groups).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Length of a window.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Wait after a window's end before sealing it.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// Memory ceiling: bytes of frames waiting to be stored.
    pub max_buffered: ByteSize,
    /// Inline screenshots above this go to the store.
    pub inline_max: ByteSize,
    /// Largest inline screenshot taken (INVALID_ARGUMENT above).
    pub max_screenshot: ByteSize,
    /// Stored screenshots kept per stream after acknowledgement (dev; 0 keeps none).
    pub keep_screenshots: usize,
    /// A batch delivered but not acknowledged within this goes to another group member.
    #[serde(with = "humantime_serde")]
    pub redeliver_after: Duration,
    /// Sealed batches (and their screenshots) are deleted this long after sealing.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// Batches one subscriber holds unacknowledged, at most (the rest go to other members
    /// of its group).
    pub prefetch: usize,
    /// `STOWAGE_INGEST__STREAMS__MAX_SUBSCRIPTIONS`: SubscribeBatches calls one process
    /// serves at once, at most (each may hold `2 × prefetch` batches of up to 8 MiB); past it,
    /// RESOURCE_EXHAUSTED.
    pub max_subscriptions: usize,
    /// Artificial delay of every durable write: for back-pressure tests only.
    #[serde(with = "humantime_serde")]
    pub write_delay: Duration,
    /// `STOWAGE_INGEST__STREAMS__CODEC`: `zstd` (default) or `lz4`, how new segments are
    /// compressed; stored ones are read whatever theirs.
    pub codec: EventCodec,
}

/// Compression of stored event segments.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EventCodec {
    /// zstd at its fastest level: about half the bytes of LZ4 on typical events, at 80% of
    /// its speed; the database writes fewer bytes.
    #[default]
    Zstd,
    /// LZ4: the cheapest to compress, the most to store.
    Lz4,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(30),
            grace: Duration::from_secs(2),
            max_buffered: ByteSize::mib(64),
            inline_max: ByteSize::mib(5),
            max_screenshot: ByteSize::mib(12),
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

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_file_size: ByteSize::gib(50),
            part_size: ByteSize::mib(8),
            min_free: ByteSize::gib(1),
            allowed_types: Vec::new(),
            session_ttl: Duration::from_secs(24 * 3600),
            chunk_size: ByteSize::mib(8),
            max_chunk: ByteSize::mib(64),
            sweep_interval: Duration::from_secs(60),
            tus_path: "/tus".into(),
            public_url: None,
            streams: StreamsConfig::default(),
        }
    }
}

impl Config {
    /// Loads defaults, then `toml_file` when given, then the environment, and validates.
    pub fn load(toml_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(toml_file, |figment| figment, |figment| figment)
    }

    /// Like [`Config::load`], with a layer of mode defaults right above the built-in ones
    /// (`stowage dev`) and a last layer of overrides (command-line flags).
    pub fn load_with(
        toml_file: Option<&Path>,
        mode_defaults: impl FnOnce(Figment) -> Figment,
        overrides: impl FnOnce(Figment) -> Figment,
    ) -> Result<Self, ConfigError> {
        let config = Self::read(toml_file, mode_defaults, overrides)?;
        config.validate()?;
        Ok(config)
    }

    /// The settings `stowage migrate` needs, read as [`Config::load`] reads them: it serves
    /// nothing, so no more than the database is required (not the auth a server needs).
    pub fn load_for_migrations(toml_file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::read(toml_file, |figment| figment, |figment| figment)
    }

    /// Every layer, parsed but not validated.
    fn read(
        toml_file: Option<&Path>,
        mode_defaults: impl FnOnce(Figment) -> Figment,
        overrides: impl FnOnce(Figment) -> Figment,
    ) -> Result<Self, ConfigError> {
        let mut figment = mode_defaults(Figment::from(Serialized::defaults(Config::default())));
        let file = toml_file
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("STOWAGE_CONFIG").map(Into::into));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(format!(
                    "STOWAGE_CONFIG: file {} does not exist",
                    file.display()
                )));
            }
            figment = figment.merge(Toml::file_exact(file));
        }
        figment = figment
            .merge(Env::raw().only(&["DATABASE_URL", "REDIS_URL"]))
            .merge(
                Env::prefixed("STOWAGE_")
                    // The CLI's own variables (`stowage upload` and the other client
                    // commands read them), not settings of a server.
                    .ignore(&["CONFIG", "TOKEN", "ENDPOINT"])
                    .split("__"),
            );
        overrides(figment).extract().map_err(describe)
    }

    /// Checks values that parse but make no sense, naming the variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let fail = |var: &str, why: &str| Err(ConfigError(format!("{var}: {why}")));
        if self.auth.hs256_secret.is_none() && self.auth.jwks_url.is_none() {
            return fail(
                "STOWAGE_AUTH__HS256_SECRET",
                "set it or STOWAGE_AUTH__JWKS_URL; calls cannot be authenticated otherwise",
            );
        }
        if let Some(secret) = &self.auth.hs256_secret
            && secret.len() < 16
        {
            return fail("STOWAGE_AUTH__HS256_SECRET", "must be at least 16 bytes");
        }
        if let Some(origin) = self.cors_origins.iter().find(|o| !is_origin(o)) {
            let hint = normal_origin(origin)
                .map(|o| format!("; a browser sends {o:?}"))
                .unwrap_or_default();
            return Err(ConfigError(format!(
                "STOWAGE_CORS_ORIGINS: {origin:?} is not an origin as a browser sends it \
                 (scheme://host[:port], no path, no trailing slash, not null; or * for \
                 any){hint}"
            )));
        }
        if self.auth.jwks_url.is_some() && self.auth.audience.is_none() {
            return fail(
                "STOWAGE_AUTH__AUDIENCE",
                "required with STOWAGE_AUTH__JWKS_URL: tokens the identity provider made for \
                 other applications would be accepted otherwise",
            );
        }
        if self.auth.jwks_url.is_some() && self.url_signing_key.is_none() {
            return fail(
                "STOWAGE_URL_SIGNING_KEY",
                "required when tokens are verified with STOWAGE_AUTH__JWKS_URL",
            );
        }
        // It alone stands between a file id and its bytes for anyone holding a link.
        if let Some(key) = &self.url_signing_key
            && key.len() < 32
        {
            return fail("STOWAGE_URL_SIGNING_KEY", "must be at least 32 bytes");
        }
        if let Some(key) = &self.url_signing_key_previous {
            if self.url_signing_key.is_none() {
                return fail(
                    "STOWAGE_URL_SIGNING_KEY_PREVIOUS",
                    "needs STOWAGE_URL_SIGNING_KEY (the key it was replaced by)",
                );
            }
            if key.len() < 32 {
                return fail(
                    "STOWAGE_URL_SIGNING_KEY_PREVIOUS",
                    "must be at least 32 bytes",
                );
            }
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return fail("STOWAGE_PUBLIC_URL", "must start with http:// or https://");
        }
        if let Some(url) = &self.ingest.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return fail(
                "STOWAGE_INGEST__PUBLIC_URL",
                "must start with http:// or https://",
            );
        }
        if self.max_message_size.as_u64() < 1024 * 1024 {
            return fail("STOWAGE_MAX_MESSAGE_SIZE", "must be at least 1 MiB");
        }
        // HTTP/2 windows: at least the protocol's default, at most its largest.
        let window = 65_535..=u64::from(u32::MAX >> 1);
        if !window.contains(&self.connections.stream_window.as_u64()) {
            return fail(
                "STOWAGE_CONNECTIONS__STREAM_WINDOW",
                "must be from 64 KiB to 2 GiB",
            );
        }
        if !window.contains(&self.connections.connection_window.as_u64()) {
            return fail(
                "STOWAGE_CONNECTIONS__CONNECTION_WINDOW",
                "must be from 64 KiB to 2 GiB",
            );
        }
        if self.connections.max == 0 {
            return fail("STOWAGE_CONNECTIONS__MAX", "must be at least 1");
        }
        if self.connections.per_address > self.connections.max {
            return fail(
                "STOWAGE_CONNECTIONS__PER_ADDRESS",
                "must be at most STOWAGE_CONNECTIONS__MAX (0: no bound)",
            );
        }
        self.rate_limit
            .validate()
            .map_err(|e| ConfigError(e.to_string()))?;
        if self.events.stream_max_len < 1000 || self.events.stream_max_len > 1_000_000_000 {
            return fail(
                "STOWAGE_EVENTS__STREAM_MAX_LEN",
                "must be between 1000 and 1000000000",
            );
        }
        if self.events.namespace.is_empty()
            || self.events.namespace.len() > 64
            || !self
                .events
                .namespace
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return fail(
                "STOWAGE_EVENTS__NAMESPACE",
                "must be 1..=64 of [A-Za-z0-9_.-]",
            );
        }
        if self.events.claim_idle < Duration::from_secs(1) {
            return fail("STOWAGE_EVENTS__CLAIM_IDLE", "must be at least 1 s");
        }
        if !(1..=1000).contains(&self.events.max_attempts) {
            return fail("STOWAGE_EVENTS__MAX_ATTEMPTS", "must be between 1 and 1000");
        }
        // Consumers remember applied events for 7 days: what is published again must be
        // younger, or it would be applied twice.
        if self.events.replay_window < Duration::from_secs(60)
            || self.events.replay_window > REPLAY_WINDOW_MAX
        {
            return fail(
                "STOWAGE_EVENTS__REPLAY_WINDOW",
                "must be between 1 min and 24 h (consumers remember events for 7 days)",
            );
        }
        if self.ingest.streams.window < Duration::from_millis(100)
            || self.ingest.streams.window > Duration::from_secs(24 * 3600)
        {
            return fail(
                "STOWAGE_INGEST__STREAMS__WINDOW",
                "must be between 100 ms and 24 h",
            );
        }
        if self.ingest.streams.max_buffered.as_u64() < self.max_message_size.as_u64() {
            return fail(
                "STOWAGE_INGEST__STREAMS__MAX_BUFFERED",
                "must hold at least one message (STOWAGE_MAX_MESSAGE_SIZE)",
            );
        }
        if self.ingest.streams.prefetch == 0 || self.ingest.streams.prefetch > 1000 {
            return fail(
                "STOWAGE_INGEST__STREAMS__PREFETCH",
                "must be between 1 and 1000",
            );
        }
        if self.ingest.streams.max_subscriptions == 0
            || self.ingest.streams.max_subscriptions > 10_000
        {
            return fail(
                "STOWAGE_INGEST__STREAMS__MAX_SUBSCRIPTIONS",
                "must be between 1 and 10000",
            );
        }
        if self.ingest.streams.retention < Duration::from_secs(1) {
            return fail("STOWAGE_INGEST__STREAMS__RETENTION", "must be at least 1 s");
        }
        if self.ingest.streams.max_screenshot.as_u64() > self.max_message_size.as_u64() {
            return fail(
                "STOWAGE_INGEST__STREAMS__MAX_SCREENSHOT",
                "must fit in one message (at most STOWAGE_MAX_MESSAGE_SIZE)",
            );
        }
        // S3's largest object; parts of an upload that large are already 525 MiB each.
        if self.ingest.max_file_size.as_u64() > 5 << 40 {
            return fail("STOWAGE_INGEST__MAX_FILE_SIZE", "must be at most 5 TiB");
        }
        if let Some(bad) = self
            .ingest
            .allowed_types
            .iter()
            .find(|t| !is_type_pattern(t))
        {
            return fail(
                "STOWAGE_INGEST__ALLOWED_TYPES",
                &format!("{bad:?} is not a MIME type (type/subtype) or family (type/*)"),
            );
        }
        if !(1..=20).contains(&self.lifecycle.recheck_attempts) {
            return fail("STOWAGE_LIFECYCLE__RECHECK_ATTEMPTS", "must be 1 to 20");
        }
        if self.lifecycle.recheck_backoff < Duration::from_secs(5)
            || self.lifecycle.recheck_backoff > Duration::from_secs(3600)
        {
            return fail("STOWAGE_LIFECYCLE__RECHECK_BACKOFF", "must be 5 s to 1 h");
        }
        if !(1.0..=10.0).contains(&self.lifecycle.recheck_backoff_factor) {
            return fail(
                "STOWAGE_LIFECYCLE__RECHECK_BACKOFF_FACTOR",
                "must be 1 to 10",
            );
        }
        if !(1..=64).contains(&self.lifecycle.recheck_concurrency) {
            return fail("STOWAGE_LIFECYCLE__RECHECK_CONCURRENCY", "must be 1 to 64");
        }
        if self.lifecycle.recheck_debounce < Duration::from_millis(100)
            || self.lifecycle.recheck_debounce > Duration::from_secs(3600)
        {
            return fail(
                "STOWAGE_LIFECYCLE__RECHECK_DEBOUNCE",
                "must be between 100 ms and 1 h",
            );
        }
        if self.lifecycle.gc_batch == 0 {
            return fail("STOWAGE_LIFECYCLE__GC_BATCH", "must be at least 1");
        }
        if self.lifecycle.gc_time < Duration::from_secs(1) || self.lifecycle.gc_time > GC_TIME_MAX {
            return fail(
                "STOWAGE_LIFECYCLE__GC_TIME",
                "must be between 1 s and 12 min",
            );
        }
        if self.lifecycle.reconcile_settle > Duration::from_secs(600) {
            return fail(
                "STOWAGE_LIFECYCLE__RECONCILE_SETTLE",
                "must be at most 10 min",
            );
        }
        if self.media.concurrency == 0 || self.media.concurrency > 64 {
            return fail("STOWAGE_MEDIA__CONCURRENCY", "must be between 1 and 64");
        }
        if self.media.max_attempts == 0 {
            return fail("STOWAGE_MEDIA__MAX_ATTEMPTS", "must be at least 1");
        }
        if self.media.job_timeout < Duration::from_secs(1) {
            return fail("STOWAGE_MEDIA__JOB_TIMEOUT", "must be at least 1 s");
        }
        if self.media.tool_timeout >= self.media.job_timeout {
            return fail(
                "STOWAGE_MEDIA__TOOL_TIMEOUT",
                "must be shorter than STOWAGE_MEDIA__JOB_TIMEOUT",
            );
        }
        if self.media.rescan_interval < Duration::from_secs(1)
            || self.media.rescan_interval > Duration::from_secs(7 * 24 * 3600)
        {
            return fail(
                "STOWAGE_MEDIA__RESCAN_INTERVAL",
                "must be between 1 s and 7 days",
            );
        }
        if self.media.rescan_window > Duration::from_secs(366 * 24 * 3600) {
            return fail("STOWAGE_MEDIA__RESCAN_WINDOW", "must be at most 366 days");
        }
        if self.media.max_pixels < 1_000_000 {
            return fail("STOWAGE_MEDIA__MAX_PIXELS", "must be at least 1000000");
        }
        if let Some(url) = &self.media.clamd_url
            && !(url.starts_with("tcp://") || url.starts_with("unix://"))
        {
            return fail(
                "STOWAGE_MEDIA__CLAMD_URL",
                "must start with tcp:// or unix://",
            );
        }
        if self.db_pool_size == 0 {
            return fail("STOWAGE_DB_POOL_SIZE", "must be at least 1");
        }
        if self.service_token.is_some() && self.service_token_file.is_some() {
            return fail(
                "STOWAGE_SERVICE_TOKEN_FILE",
                "give the token or a file that holds it, not both",
            );
        }
        if self.quota.default_limit.as_u64() == 0 {
            return fail("STOWAGE_QUOTA__DEFAULT_LIMIT", "must be above zero");
        }
        if self.ingest.part_size.as_u64() < 5 * 1024 * 1024 {
            return fail(
                "STOWAGE_INGEST__PART_SIZE",
                "must be at least 5 MiB (the S3 minimum part size)",
            );
        }
        if self.ingest.session_ttl.is_zero()
            || self.ingest.session_ttl > Duration::from_secs(7 * 24 * 3600)
        {
            return fail(
                "STOWAGE_INGEST__SESSION_TTL",
                "must be between 1 s and 7 days",
            );
        }
        if self.ingest.chunk_size.as_u64() == 0 || self.ingest.chunk_size > self.ingest.max_chunk {
            return fail(
                "STOWAGE_INGEST__CHUNK_SIZE",
                "must be above zero and at most STOWAGE_INGEST__MAX_CHUNK",
            );
        }
        if self.ingest.chunk_size.as_u64() + 64 * 1024 > self.max_message_size.as_u64() {
            return fail(
                "STOWAGE_INGEST__CHUNK_SIZE",
                "must leave 64 KiB of STOWAGE_MAX_MESSAGE_SIZE for the message around it",
            );
        }
        if !self.ingest.tus_path.starts_with('/') || self.ingest.tus_path.len() < 2 {
            return fail(
                "STOWAGE_INGEST__TUS_PATH",
                "must start with / and name a path",
            );
        }
        if self.files.download_chunk.as_u64() == 0
            || self.files.download_chunk.as_u64() > self.max_message_size.as_u64() / 2
        {
            return fail(
                "STOWAGE_FILES__DOWNLOAD_CHUNK",
                "must be above zero and at most half of STOWAGE_MAX_MESSAGE_SIZE",
            );
        }
        // Zero would make a loop spin, or every call fail at once.
        for (name, value, least) in [
            (
                "STOWAGE_INGEST__SWEEP_INTERVAL",
                self.ingest.sweep_interval,
                Duration::from_millis(100),
            ),
            (
                "STOWAGE_QUOTA__RESERVATION_TTL",
                self.quota.reservation_ttl,
                Duration::from_secs(60),
            ),
            (
                "STOWAGE_INGEST__STREAMS__REDELIVER_AFTER",
                self.ingest.streams.redeliver_after,
                Duration::from_secs(1),
            ),
        ] {
            if value < least {
                return fail(name, &format!("must be at least {least:?}"));
            }
        }
        // Quota refuses longer holds; with a longer default every hold asked without a
        // lifetime (one-shot uploads) would be refused, naming a field its caller never sent.
        if self.quota.reservation_ttl > Duration::from_secs(7 * 24 * 3600) {
            return fail("STOWAGE_QUOTA__RESERVATION_TTL", "must be at most 7 days");
        }
        if self.ingest.streams.grace > self.ingest.streams.window * 10 {
            return fail(
                "STOWAGE_INGEST__STREAMS__GRACE",
                "must be at most 10 windows (STOWAGE_INGEST__STREAMS__WINDOW)",
            );
        }
        if self
            .peers
            .timeout
            .is_some_and(|t| t < Duration::from_millis(100))
        {
            return fail("STOWAGE_PEERS__TIMEOUT", "must be at least 100 ms");
        }
        // Signed links carry their expiry in whole seconds, as a u32 lifetime is asked for.
        if self.files.max_url_ttl < Duration::from_secs(1)
            || self.files.max_url_ttl > Duration::from_secs(u64::from(u32::MAX))
        {
            return fail(
                "STOWAGE_FILES__MAX_URL_TTL",
                "must be at least 1 s and at most 4294967295 s",
            );
        }
        Ok(())
    }

    /// Base URL of signed links.
    /// Base of upload links (no trailing `/`): where clients reach Ingest's tus endpoint.
    pub fn upload_link_base(&self) -> String {
        let host = match &self.ingest.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => self.public_base_url(),
        };
        format!("{host}{}", self.ingest.tus_path)
    }

    pub fn public_base_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => format!("http://{}", self.addr),
        }
    }

    /// Deadline of calls between services (default 30 s).
    pub fn peer_timeout(&self) -> Duration {
        self.peers.timeout.unwrap_or(Duration::from_secs(30))
    }
}

/// Turns figment's errors into one message per variable, named as the operator wrote it.
fn describe(error: figment::Error) -> ConfigError {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let source = e
                .metadata
                .as_ref()
                .map(|m| m.name.to_string())
                .unwrap_or_default();
            let name = if source.contains("STOWAGE_") {
                format!("STOWAGE_{}", e.path.join("__").to_uppercase())
            } else if source.contains("environment") {
                e.path.join("_").to_uppercase()
            } else if source.is_empty() {
                e.path.join(".")
            } else {
                format!("{} ({source})", e.path.join("."))
            };
            format!("{name}: {}", e.kind)
        })
        .collect();
    ConfigError(lines.join("; "))
}

/// `type/subtype` or `type/*`, in lowercase MIME token characters.
fn is_type_pattern(pattern: &str) -> bool {
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$&-^_.+".contains(&b))
    };
    match pattern.split_once('/') {
        Some((family, "*")) => token(family),
        Some((family, subtype)) => token(family) && token(subtype),
        None => false,
    }
}

/// Accepts `"a,b"` (environment) or `["a", "b"]` (TOML).
fn comma_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Raw::deserialize(deserializer)? {
        Raw::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        Raw::Many(v) => v,
    })
}

/// Whether `value` is an origin as a browser sends it in `Origin`: `scheme://host[:port]` in
/// its normal form (an http(s) origin lowercased, without its scheme's default port; an
/// extension's or an app's, `chrome-extension://<id>` or `capacitor://localhost`, as written),
/// or `*`. `null` (sandboxed frames, `file:` and `data:` pages) is none: allowing it would let
/// any such page call.
fn is_origin(value: &str) -> bool {
    value == "*" || normal_origin(value).as_deref() == Some(value)
}

/// The form of `value` a browser would send as its origin, if it names one.
fn normal_origin(value: &str) -> Option<String> {
    let url = url::Url::parse(value).ok()?;
    let bare = url.username().is_empty()
        && url.password().is_none()
        && url.query().is_none()
        && url.fragment().is_none()
        && url.host().is_some();
    if !bare {
        return None;
    }
    match url.scheme() {
        "http" | "https" => (url.path() == "/").then(|| url.origin().ascii_serialization()),
        _ => url.path().is_empty().then(|| url.as_str().to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        let mut config = Config::default();
        config.auth.hs256_secret = Some("a secret of sixteen bytes".into());
        config
    }

    /// Asserts `config` is refused with an error naming `var`.
    fn refused_naming(config: &Config, var: &str) {
        let error = config.validate().err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains(var)),
            "{error:?}"
        );
    }

    #[test]
    fn rescan_settings_out_of_range_are_refused_by_name() {
        let mut config = valid();
        config.media.rescan_interval = Duration::from_millis(500);
        refused_naming(&config, "STOWAGE_MEDIA__RESCAN_INTERVAL");
        config.media.rescan_interval = Duration::from_secs(8 * 24 * 3600);
        refused_naming(&config, "STOWAGE_MEDIA__RESCAN_INTERVAL");
        config.media.rescan_interval = Duration::from_secs(60);
        config.media.rescan_window = Duration::from_secs(400 * 24 * 3600);
        refused_naming(&config, "STOWAGE_MEDIA__RESCAN_WINDOW");
        // Zero turns re-scans off.
        config.media.rescan_window = Duration::ZERO;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn connection_settings_out_of_range_are_refused_by_name() {
        assert!(valid().validate().is_ok());
        let mut config = valid();
        config.connections.stream_window = ByteSize::kib(16);
        refused_naming(&config, "STOWAGE_CONNECTIONS__STREAM_WINDOW");
        let mut config = valid();
        config.connections.max = 0;
        refused_naming(&config, "STOWAGE_CONNECTIONS__MAX");
        let mut config = valid();
        config.connections.per_address = config.connections.max + 1;
        refused_naming(&config, "STOWAGE_CONNECTIONS__PER_ADDRESS");
    }

    #[test]
    fn cors_origins_must_be_origins() {
        let mut config = valid();
        config.cors_origins = vec![
            "https://app.example.com".into(),
            "http://localhost:5173".into(),
            "http://[::1]:8080".into(),
            "chrome-extension://abcdefghijklmnop".into(),
            "capacitor://localhost".into(),
            "*".into(),
        ];
        assert!(config.validate().is_ok(), "{:?}", config.validate());
        for (bad, hint) in [
            ("https://app.example.com/", Some("https://app.example.com")),
            ("https://app.example.com/path", None),
            (
                "https://app.example.com:443",
                Some("https://app.example.com"),
            ),
            ("HTTPS://APP.example.com", Some("https://app.example.com")),
            ("https://user@app.example.com", None),
            ("null", None),
            ("app.example.com", None),
            ("file:///tmp", None),
            ("chrome-extension://abc/page.html", None),
        ] {
            config.cors_origins = vec![bad.into()];
            refused_naming(&config, "STOWAGE_CORS_ORIGINS");
            let error = config
                .validate()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            if let Some(hint) = hint {
                assert!(
                    error.contains(&format!("a browser sends {hint:?}")),
                    "{error}"
                );
            }
        }
    }

    #[test]
    fn upload_links_point_at_ingest_where_it_is_reached() {
        let mut config = valid();
        config.public_url = Some("https://files.example.com".into());
        assert_eq!(config.upload_link_base(), "https://files.example.com/tus");
        config.ingest.public_url = Some("https://upload.example.com/".into());
        assert_eq!(config.upload_link_base(), "https://upload.example.com/tus");
        config.ingest.public_url = Some("upload.example.com".into());
        refused_naming(&config, "STOWAGE_INGEST__PUBLIC_URL");
    }

    #[test]
    fn a_previous_url_signing_key_needs_a_current_one_and_its_length() {
        let (current, previous) = ("c".repeat(32), "p".repeat(32));
        let mut config = valid();
        config.url_signing_key_previous = Some(previous.clone());
        refused_naming(&config, "STOWAGE_URL_SIGNING_KEY_PREVIOUS");
        config.url_signing_key = Some(current);
        assert!(config.validate().is_ok());
        config.url_signing_key_previous = Some("short".into());
        refused_naming(&config, "STOWAGE_URL_SIGNING_KEY_PREVIOUS");
    }

    #[test]
    fn a_gc_time_that_would_not_fit_in_a_job_is_refused_by_name() {
        for seconds in [0, 12 * 60 + 1] {
            let mut config = valid();
            config.lifecycle.gc_time = Duration::from_secs(seconds);
            refused_naming(&config, "STOWAGE_LIFECYCLE__GC_TIME");
        }
        let mut config = valid();
        config.lifecycle.gc_time = Duration::from_secs(12 * 60);
        assert!(config.validate().is_ok());
    }

    #[test]
    fn a_replay_window_past_what_consumers_remember_is_refused_by_name() {
        let mut config = valid();
        config.events.replay_window = Duration::from_secs(30 * 24 * 3600);
        refused_naming(&config, "STOWAGE_EVENTS__REPLAY_WINDOW");
        config.events.replay_window = REPLAY_WINDOW_MAX;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn zero_intervals_and_absurd_bounds_are_refused_by_name() {
        type BreakIt = fn(&mut Config);
        let cases: [(&str, BreakIt); 16] = [
            ("STOWAGE_SERVICE_TOKEN_FILE", |c| {
                c.service_token = Some("a token".into());
                c.service_token_file = Some("/run/secrets/token".into());
            }),
            ("STOWAGE_INGEST__MAX_FILE_SIZE", |c| {
                c.ingest.max_file_size = ByteSize::b((5 << 40) + 1);
            }),
            ("STOWAGE_INGEST__ALLOWED_TYPES", |c| {
                c.ingest.allowed_types = vec!["image".into()];
            }),
            ("STOWAGE_INGEST__ALLOWED_TYPES", |c| {
                c.ingest.allowed_types = vec!["Image/PNG".into()];
            }),
            ("STOWAGE_LIFECYCLE__RECHECK_ATTEMPTS", |c| {
                c.lifecycle.recheck_attempts = 0;
            }),
            ("STOWAGE_LIFECYCLE__RECHECK_BACKOFF", |c| {
                c.lifecycle.recheck_backoff = Duration::from_secs(1);
            }),
            ("STOWAGE_LIFECYCLE__RECHECK_BACKOFF_FACTOR", |c| {
                c.lifecycle.recheck_backoff_factor = f64::NAN;
            }),
            ("STOWAGE_LIFECYCLE__RECHECK_CONCURRENCY", |c| {
                c.lifecycle.recheck_concurrency = 0;
            }),
            ("STOWAGE_INGEST__SWEEP_INTERVAL", |c| {
                c.ingest.sweep_interval = Duration::ZERO;
            }),
            ("STOWAGE_QUOTA__RESERVATION_TTL", |c| {
                c.quota.reservation_ttl = Duration::ZERO;
            }),
            ("STOWAGE_QUOTA__RESERVATION_TTL", |c| {
                c.quota.reservation_ttl = Duration::from_secs(7 * 24 * 3600 + 1);
            }),
            ("STOWAGE_INGEST__STREAMS__REDELIVER_AFTER", |c| {
                c.ingest.streams.redeliver_after = Duration::ZERO;
            }),
            ("STOWAGE_INGEST__STREAMS__GRACE", |c| {
                c.ingest.streams.grace = Duration::from_secs(7 * 24 * 3600);
            }),
            ("STOWAGE_PEERS__TIMEOUT", |c| {
                c.peers.timeout = Some(Duration::ZERO);
            }),
            ("STOWAGE_EVENTS__STREAM_MAX_LEN", |c| {
                c.events.stream_max_len = u64::MAX;
            }),
            ("STOWAGE_EVENTS__MAX_ATTEMPTS", |c| {
                c.events.max_attempts = 0;
            }),
        ];
        for (name, break_it) in cases {
            let mut config = valid();
            break_it(&mut config);
            refused_naming(&config, name);
        }
    }

    #[test]
    fn a_signed_url_lifetime_out_of_range_is_refused_by_name() {
        for ttl in [Duration::ZERO, Duration::from_secs(u64::from(u32::MAX) + 1)] {
            let mut config = valid();
            config.files.max_url_ttl = ttl;
            refused_naming(&config, "STOWAGE_FILES__MAX_URL_TTL");
        }
    }
}
