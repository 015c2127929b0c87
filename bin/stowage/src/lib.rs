//! Wires the five Stowage services into one process: `serve(roles, config, listener,
//! shutdown)` is what `stowage serve`, `stowage dev` and the tests call.

use std::{collections::HashMap, sync::Arc};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use stowage_blob::Blobs;
use stowage_events::{Consumer, ConsumerSettings};
use stowage_events::{Relay, RelaySettings};
use stowage_files::{Catalog, FilesGrpc, UrlSigner};
use stowage_ingest::{
    AllowedTypes, EventStreams, IngestGrpc, Registration, SessionSettings, Sessions, Staging,
    StreamSettings, Uploader, Uploads,
};
use stowage_jobs::{Queue, QueueConfig, Schedule, Scheduler, Worker};
use stowage_lifecycle::{ActivityEvents, Lifecycle, LifecycleGrpc};
use stowage_media::{
    FileEvents, Media, MediaGrpc, MediaSettings, clamd::Clamd, imaging::DecodeLimits, rescan,
    video::Tools,
};
use stowage_quota::{Quota, QuotaGrpc};
use stowage_ratelimit::Limiter;
use stowage_runtime::{
    Background, Config, DegradedProbe, Dependency, GrpcServer, Minter, Verifier,
    mesh::{
        self, FilesApi, GrpcFiles, GrpcIngest, GrpcMedia, GrpcQuota, IngestApi, LocalFiles,
        LocalIngest, LocalMedia, LocalQuota, MediaApi, QuotaApi, ServiceAuth,
    },
    signing::SigningKeys,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// jemalloc, for every binary that runs Stowage (`stowage`, the benches, the tests). Each chunk
/// of an upload gets buffers of its own, 8 MiB and more, in gRPC's encoder and decoder; jemalloc
/// reuses freed ones (with `oversize_threshold:0`, see `.cargo/config.toml`) where glibc returns
/// them to the kernel, whose fresh pages cost a fault and a zeroing each. 1 GiB through
/// WriteChunks: 369–571 MB/s with glibc, 590–653 MB/s with jemalloc, the code otherwise the same.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod cli;
pub mod client;
pub mod dev;

/// A service a process can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Uploads and event streams.
    Ingest,
    /// File metadata and downloads.
    Files,
    /// Limits and usage.
    Quota,
    /// Derivatives and antivirus.
    Media,
    /// Scheduled clean-up and history.
    Lifecycle,
}

impl Role {
    /// All five.
    pub const ALL: [Role; 5] = [
        Role::Ingest,
        Role::Files,
        Role::Quota,
        Role::Media,
        Role::Lifecycle,
    ];
}

/// How this process's services authenticate to the others: `STOWAGE_SERVICE_TOKEN` if set
/// (checked now, by the same verifier the peers use: a value that is no token, or one without
/// the service scope, would fail every call between services), else tokens minted from the
/// HS256 secret.
fn service_auth(
    config: &Config,
    verifier: &Verifier,
    roles: &[Role],
) -> anyhow::Result<ServiceAuth> {
    let check = |variable: &str, token: &str| -> anyhow::Result<()> {
        let identity = verifier.verify(token).map_err(|e| {
            anyhow::anyhow!("{variable}: not a token this deployment accepts ({e})")
        })?;
        anyhow::ensure!(
            identity.service,
            "{variable}: the token lacks the \"service\" scope"
        );
        Ok(())
    };
    if let Some(token) = &config.service_token {
        check("STOWAGE_SERVICE_TOKEN", token)?;
        if let Some(expires) = expiry(token) {
            // Read once: past its expiry every call between services is refused.
            tracing::warn!(%expires, "STOWAGE_SERVICE_TOKEN expires; give a token that something renews through STOWAGE_SERVICE_TOKEN_FILE");
        }
        return Ok(ServiceAuth::Static(token.clone()));
    }
    if let Some(path) = &config.service_token_file {
        let file = stowage_runtime::mesh::TokenFile::watch(
            path,
            stowage_runtime::mesh::TokenFile::LOOK_EVERY,
        )
        .with_context(|| format!("STOWAGE_SERVICE_TOKEN_FILE: cannot read {}", path.display()))?;
        check("STOWAGE_SERVICE_TOKEN_FILE", &file.token())?;
        return Ok(ServiceAuth::File(file));
    }
    if let Some(minter) = Minter::from_config(&config.auth) {
        return Ok(ServiceAuth::Mint(minter));
    }
    // Without a secret to mint with, only a process that serves every role itself (its calls
    // stay in process) can do without a token.
    anyhow::ensure!(
        roles.len() == Role::ALL.len(),
        "STOWAGE_SERVICE_TOKEN or STOWAGE_SERVICE_TOKEN_FILE: required when services call each \
         other over the network and no STOWAGE_AUTH__HS256_SECRET can mint their tokens"
    );
    Ok(ServiceAuth::Static(String::new()))
}

/// When `token` (a JWT, verified already) expires, if it says.
fn expiry(token: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp(unverified_claims(token)?.get("exp")?.as_i64()?, 0)
}

/// The claims of JWT `token`, read without checking its signature: only for what needs no
/// trust (a verified token's expiry, whose sessions a client keeps apart).
pub(crate) fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let payload = URL_SAFE_NO_PAD
        .decode(token.split('.').nth(1)?.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice(&payload).ok()
}

/// Applies the migrations of `roles`' schemas.
pub async fn migrate(pool: &stowage_db::PgPool, roles: &[Role]) -> anyhow::Result<()> {
    for role in roles {
        match role {
            Role::Ingest => stowage_ingest::migrate(pool).await?,
            Role::Files => stowage_files::migrate(pool).await?,
            Role::Quota => stowage_quota::migrate(pool).await?,
            Role::Media => stowage_media::migrate(pool).await?,
            Role::Lifecycle => stowage_lifecycle::migrate(pool).await?,
        }
        if let Some(schema) = outbox_schema(*role) {
            stowage_events::migrate(pool, schema).await?;
        }
    }
    Ok(())
}

/// The schema whose outbox a role publishes, for the roles that produce events.
fn outbox_schema(role: Role) -> Option<&'static str> {
    match role {
        Role::Ingest => Some(stowage_ingest::SCHEMA),
        Role::Files => Some(stowage_files::SCHEMA),
        Role::Quota => Some(stowage_quota::SCHEMA),
        Role::Media => Some(stowage_media::SCHEMA),
        Role::Lifecycle => Some(stowage_lifecycle::SCHEMA),
    }
}

/// Room on a local-disk store, checked with readiness by the processes that take uploads:
/// `stowage_store_available_bytes`, `_capacity_bytes` and `_min_free_bytes` for dashboards
/// and alerts, and degraded (in `/healthz`) while less than `min_free` bytes are free, where
/// every upload is refused (0: never).
fn store_space_probe(blobs: Blobs, min_free: u64) -> DegradedProbe {
    DegradedProbe {
        name: "store_space",
        check: Box::new(move || {
            let Some(space) = blobs.space() else {
                return Some("the store's filesystem cannot be read".to_owned());
            };
            metrics::gauge!("stowage_store_available_bytes").set(space.available as f64);
            metrics::gauge!("stowage_store_capacity_bytes").set(space.total as f64);
            metrics::gauge!("stowage_store_min_free_bytes").set(min_free as f64);
            (min_free > 0 && space.available < min_free).then(|| {
                format!(
                    "{} bytes free, under STOWAGE_INGEST__MIN_FREE ({min_free}): uploads are refused",
                    space.available
                )
            })
        }),
    }
}

/// Keys of signed download URLs and upload links: configured, or derived from the HS256
/// secret; with the key being rotated out, when set.
fn signing_keys(config: &Config) -> anyhow::Result<SigningKeys> {
    let previous = config
        .url_signing_key_previous
        .as_deref()
        .map(str::as_bytes);
    if let Some(key) = &config.url_signing_key {
        return Ok(SigningKeys::new(key.as_bytes(), previous));
    }
    let secret = config
        .auth
        .hs256_secret
        .as_ref()
        .context("STOWAGE_URL_SIGNING_KEY: required")?;
    let derived = Sha256::digest(format!("stowage-url-signing\0{secret}"));
    Ok(SigningKeys::new(&derived, previous))
}

fn peer_url<'a>(url: &'a Option<String>, var: &str) -> anyhow::Result<&'a str> {
    url.as_deref()
        .with_context(|| format!("{var}: required when this process does not run that service"))
}

/// Serves `roles` on `listener` until `shutdown`, then drains.
pub async fn serve(
    roles: &[Role],
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with(roles, config, None, listener, shutdown).await
}

/// Like [`serve`], over an object store built by the caller (tests share one in-memory store
/// between several in-process replicas).
pub async fn serve_with(
    roles: &[Role],
    config: Config,
    blobs: Option<Blobs>,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    // Everything that can be checked without a network goes first, so a bad value fails fast.
    let blobs = match blobs {
        Some(b) => b,
        None => Blobs::from_url(&config.blob_url)?,
    };
    let database_url = config
        .database_url
        .as_deref()
        .context("DATABASE_URL: required")?;
    let verifier = Verifier::new(&config.auth, shutdown.clone()).await?;
    let tus_verifier = verifier.clone();
    let service_auth = service_auth(&config, &verifier, roles)?;
    // One pool per service, as if each ran alone: a service waiting on another (Ingest on
    // Quota, in process) must never wait for a connection its caller is holding.
    let connect = || stowage_db::connect(database_url, config.db_pool_size).context("DATABASE_URL");
    let pool = connect()?;
    let (quota_pool, files_pool, ingest_pool, media_pool, lifecycle_pool) =
        (connect()?, connect()?, connect()?, connect()?, connect()?);
    migrate(&pool, roles)
        .await
        .context("DATABASE_URL: cannot apply migrations")?;
    let background = Background::new(shutdown.clone());
    let redis = match &config.redis_url {
        Some(url) => Some(
            stowage_runtime::redis::connect(url)
                .await
                .context("REDIS_URL")?,
        ),
        None => None,
    };
    let timeout = config.peer_timeout();
    let max_message = usize::try_from(config.max_message_size.as_u64()).unwrap_or(usize::MAX);
    let mut server = GrpcServer::new(verifier, config.cors_origins.clone(), config.shutdown_grace);
    server.with_connections(config.connections.clone());
    let limiter = match &redis {
        Some(redis) if config.rate_limit.enabled => {
            // Under the mesh's namespace, as its streams: meshes sharing a Redis keep their
            // own buckets (`stowage:rl:…` by default, as before namespaces applied).
            let prefix = format!("{}:rl", config.events.namespace);
            let limiter = Limiter::with_prefix(redis.clone(), config.rate_limit.clone(), prefix);
            server.limit_rate(limiter.clone(), &config.ingest.tus_path);
            Some(limiter)
        }
        _ => None,
    };

    let quota_local = roles.contains(&Role::Quota).then(|| {
        let quota = Quota::new(
            quota_pool.clone(),
            config.quota.default_limit.as_u64(),
            config.quota.reservation_ttl,
        );
        spawn_usage_gauges(&background, quota.clone());
        Arc::new(QuotaGrpc::new(quota))
    });
    let quota_api = || -> anyhow::Result<Arc<dyn QuotaApi>> {
        Ok(match &quota_local {
            Some(q) => Arc::new(LocalQuota::new(Arc::clone(q), timeout)),
            None => Arc::new(GrpcQuota::new(
                mesh::channel(
                    peer_url(&config.peers.quota, "STOWAGE_PEERS__QUOTA")?,
                    timeout,
                )?,
                service_auth.clone(),
                timeout,
            )),
        })
    };
    let scanning = config.media.enabled && config.media.clamd_url.is_some();
    let catalog = Catalog::new(files_pool.clone()).hold_unscanned(scanning);
    let registration = if config.media.enabled {
        Registration::Media { scanning }
    } else {
        Registration::Ready
    };
    let files_local = if roles.contains(&Role::Files) {
        let signer = UrlSigner::new(signing_keys(&config)?, config.public_base_url());
        server.merge_http(stowage_files::http_routes(
            catalog.clone(),
            Arc::clone(&blobs.store),
            signer.clone(),
        ));
        Some(Arc::new(FilesGrpc::new(
            catalog,
            blobs.clone(),
            quota_api()?,
            signer,
            config.files.max_url_ttl,
            usize::try_from(config.files.download_chunk.as_u64()).unwrap_or(256 * 1024),
        )))
    } else {
        None
    };
    let files_api = || -> anyhow::Result<Arc<dyn FilesApi>> {
        Ok(match &files_local {
            Some(f) => Arc::new(LocalFiles::new(Arc::clone(f), timeout)),
            None => Arc::new(GrpcFiles::new(
                mesh::channel(
                    peer_url(&config.peers.files, "STOWAGE_PEERS__FILES")?,
                    timeout,
                )?,
                service_auth.clone(),
                timeout,
            )),
        })
    };

    // Chunk writes whose clients went away run on after the server drains: waited for below.
    let mut chunk_writes = None;
    let ingest_local = if roles.contains(&Role::Ingest) {
        let (quota, files) = (quota_api()?, files_api()?);
        let uploader = Uploader {
            uploads: Uploads::new(ingest_pool.clone()),
            store: Arc::clone(&blobs.store),
            quota: Arc::clone(&quota),
            files: Arc::clone(&files),
            max_file_size: config.ingest.max_file_size.as_u64(),
            min_free: config.ingest.min_free.as_u64(),
            part_size: usize::try_from(config.ingest.part_size.as_u64()).unwrap_or(8 << 20),
            shutdown: shutdown.clone(),
            local_root: blobs.local_root.clone(),
            registration,
            allowed: AllowedTypes::new(config.ingest.allowed_types.clone()),
            // The sweeper below takes one-shot uploads idle for the session TTL as abandoned.
            touch_every: stowage_ingest::TOUCH_EVERY_MAX.min(config.ingest.session_ttl / 2),
        };
        let sessions = Sessions::new(
            ingest_pool.clone(),
            Staging::new(&blobs),
            Arc::clone(&blobs.store),
            quota,
            files,
            SessionSettings {
                ttl: config.ingest.session_ttl,
                chunk_size_hint: u32::try_from(config.ingest.chunk_size.as_u64())
                    .unwrap_or(8 << 20),
                max_file_size: config.ingest.max_file_size.as_u64(),
                max_chunk: usize::try_from(config.ingest.max_chunk.as_u64()).unwrap_or(64 << 20),
                min_free: config.ingest.min_free.as_u64(),
                registration,
                allowed: AllowedTypes::new(config.ingest.allowed_types.clone()),
            },
        );
        let links =
            stowage_ingest::UploadLinks::new(signing_keys(&config)?, config.upload_link_base());
        server.merge_http(stowage_ingest::tus_routes(
            sessions.clone(),
            tus_verifier.clone(),
            Some(links.clone()),
            &config.ingest.tus_path,
        ));
        spawn_sweeper(
            &background,
            sessions.clone(),
            uploader.clone(),
            config.ingest.sweep_interval,
            config.ingest.session_ttl,
        );
        let streams_config = &config.ingest.streams;
        let streams = EventStreams::start(
            ingest_pool.clone(),
            &blobs,
            StreamSettings {
                window: streams_config.window,
                grace: streams_config.grace,
                max_buffered: usize::try_from(streams_config.max_buffered.as_u64())
                    .unwrap_or(usize::MAX),
                inline_max: usize::try_from(streams_config.inline_max.as_u64())
                    .unwrap_or(usize::MAX),
                max_screenshot: usize::try_from(streams_config.max_screenshot.as_u64())
                    .unwrap_or(usize::MAX),
                keep_screenshots: streams_config.keep_screenshots,
                redeliver_after: streams_config.redeliver_after,
                retention: streams_config.retention,
                prefetch: streams_config.prefetch,
                max_subscriptions: streams_config.max_subscriptions,
                write_delay: streams_config.write_delay,
                codec: streams_config.codec,
            },
            shutdown.clone(),
        );
        chunk_writes = Some(sessions.clone());
        Some(Arc::new(
            IngestGrpc::new(uploader, sessions, shutdown.clone())
                .with_streams(streams)
                .with_links(links),
        ))
    } else {
        None
    };
    let ingest_api = || -> anyhow::Result<Arc<dyn IngestApi>> {
        Ok(match &ingest_local {
            Some(i) => Arc::new(LocalIngest::new(Arc::clone(i), timeout)),
            None => Arc::new(GrpcIngest::new(
                mesh::channel(
                    peer_url(&config.peers.ingest, "STOWAGE_PEERS__INGEST")?,
                    timeout,
                )?,
                service_auth.clone(),
                timeout,
            )),
        })
    };

    let media_local = if roles.contains(&Role::Media) {
        let media = start_media(
            &config,
            media_pool.clone(),
            database_url,
            files_api()?,
            Arc::clone(&blobs.store),
            redis.as_ref(),
            &background,
        )?;
        Some(Arc::new(MediaGrpc::new(media)))
    } else {
        None
    };
    let media_api = || -> anyhow::Result<Arc<dyn MediaApi>> {
        Ok(match &media_local {
            Some(m) => Arc::new(LocalMedia::new(Arc::clone(m), timeout)),
            None => Arc::new(GrpcMedia::new(
                mesh::channel(
                    peer_url(&config.peers.media, "STOWAGE_PEERS__MEDIA")?,
                    timeout,
                )?,
                service_auth.clone(),
                timeout,
            )),
        })
    };

    for role in roles {
        match role {
            Role::Quota => {
                if let Some(q) = &quota_local {
                    server.add_service(
                        stowage_proto::v1::quota_server::QuotaServer::from_arc(Arc::clone(q))
                            .max_decoding_message_size(max_message)
                            .max_encoding_message_size(max_message),
                    );
                }
            }
            Role::Files => {
                if let Some(f) = &files_local {
                    server.add_service(
                        stowage_proto::v1::files_server::FilesServer::from_arc(Arc::clone(f))
                            .max_decoding_message_size(max_message)
                            .max_encoding_message_size(max_message),
                    );
                }
            }
            Role::Ingest => {
                if let Some(i) = &ingest_local {
                    server.add_service(
                        stowage_proto::v1::ingest_server::IngestServer::from_arc(Arc::clone(i))
                            .max_decoding_message_size(max_message)
                            .max_encoding_message_size(max_message),
                    );
                }
            }
            Role::Media => {
                if let Some(m) = &media_local {
                    server.add_service(
                        stowage_proto::v1::media_server::MediaServer::from_arc(Arc::clone(m))
                            .max_decoding_message_size(max_message)
                            .max_encoding_message_size(max_message),
                    );
                }
            }
            Role::Lifecycle => {
                let lifecycle = start_lifecycle(
                    &config,
                    redis.as_ref(),
                    lifecycle_pool.clone(),
                    database_url,
                    ingest_api()?,
                    files_api()?,
                    quota_api()?,
                    media_api()?,
                    &blobs,
                    &background,
                )?;
                server.add_service(LifecycleGrpc::new(lifecycle).into_server(max_message));
            }
        }
    }

    let mut dependencies = vec![Dependency::Postgres(pool.clone())];
    if let Some(redis) = &redis {
        dependencies.push(Dependency::Redis(redis.clone()));
        for schema in roles.iter().filter_map(|r| outbox_schema(*r)) {
            let relay = Relay::new(
                pool.clone(),
                database_url,
                schema,
                redis.clone(),
                RelaySettings {
                    stream_max_len: config.events.stream_max_len,
                    replay_window: config.events.replay_window,
                    namespace: config.events.namespace.clone(),
                    ..RelaySettings::default()
                },
            )
            .context("DATABASE_URL")?;
            background.spawn("outbox-relay", relay.run(shutdown.clone()));
        }
    } else {
        tracing::warn!(
            "REDIS_URL unset: events stay in the outboxes until a relay can publish them"
        );
    }
    let mut degraded: Vec<DegradedProbe> = limiter
        .map(|limiter| DegradedProbe {
            name: "rate_limiter",
            check: Box::new(move || {
                let open = limiter.limits().fail_open;
                limiter.degraded().then(|| {
                    if open {
                        "redis unreachable, calls pass unlimited"
                    } else {
                        "redis unreachable, limited calls refused"
                    }
                    .to_owned()
                })
            }),
        })
        .into_iter()
        .collect();
    if blobs.local_root.is_some() && roles.contains(&Role::Ingest) {
        degraded.push(store_space_probe(
            blobs.clone(),
            config.ingest.min_free.as_u64(),
        ));
    }
    server.watch_readiness(&background, dependencies, degraded);
    match config.metrics_addr {
        None => {
            server.merge_http(stowage_runtime::server::public_metrics_routes());
        }
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("STOWAGE_METRICS_ADDR: cannot listen on {addr}"))?;
            let stop = shutdown.clone();
            background.spawn("metrics", async move {
                if let Err(error) = stowage_runtime::server::serve_metrics(listener, stop).await {
                    tracing::error!(%error, "metrics endpoint failed");
                }
            });
        }
    }
    tracing::info!(
        addr = %listener.local_addr()?,
        services = ?server.service_names(),
        store = %blobs.url,
        "serving"
    );
    let served = server.serve(listener, shutdown).await;
    // One chunk's write each: seconds at most, well inside a pod's termination grace after
    // the server's own.
    if let Some(sessions) = chunk_writes
        && tokio::time::timeout(std::time::Duration::from_secs(10), sessions.drain_writes())
            .await
            .is_err()
    {
        tracing::warn!("chunk writes still running 10 s after the server stopped");
    }
    background.wait().await;
    Ok(served?)
}

/// Lifecycle's queue, schedules and worker, started on `background`.
#[allow(clippy::too_many_arguments)]
fn start_lifecycle(
    config: &Config,
    redis: Option<&fred::clients::Client>,
    pool: stowage_db::PgPool,
    database_url: &str,
    ingest: Arc<dyn IngestApi>,
    files: Arc<dyn FilesApi>,
    quota: Arc<dyn QuotaApi>,
    media: Arc<dyn MediaApi>,
    blobs: &Blobs,
    background: &Background,
) -> anyhow::Result<Arc<Lifecycle>> {
    let queue = Queue::new(
        pool.clone(),
        database_url,
        stowage_lifecycle::SCHEMA,
        QueueConfig {
            // A run pages through every user: minutes, not seconds.
            job_timeout: stowage_runtime::config::LIFECYCLE_JOB_TIMEOUT,
            visibility_timeout: stowage_runtime::config::LIFECYCLE_JOB_TIMEOUT * 2,
            // Runs are idempotent and may take half an hour: one still running 20 s after a
            // SIGTERM is handed back well within the pod's 60 s grace, not left claimed (and
            // its schedule's ticks skipped) for the hour its claim would last.
            drain: std::time::Duration::from_secs(20),
            ..QueueConfig::default()
        },
    )
    .context("lifecycle queue")?;
    let mut lifecycle = Lifecycle::new(
        pool.clone(),
        queue.clone(),
        ingest,
        files,
        quota,
        media,
        Arc::clone(&blobs.store),
    )
    .with_local_root(blobs.local_root.clone())
    .with_reconcile_settle(config.lifecycle.reconcile_settle)
    .with_gc_batch(config.lifecycle.gc_batch)
    .with_gc_time(config.lifecycle.gc_time)
    .with_rechecks(&config.lifecycle);
    match redis {
        Some(redis) => {
            lifecycle = lifecycle.with_redis(redis.clone(), &config.events.namespace);
            let consumer = Consumer::new(
                redis,
                pool,
                stowage_lifecycle::SCHEMA,
                stowage_lifecycle::CONSUMER_GROUP,
                ActivityEvents::TOPICS,
                Arc::new(ActivityEvents::new(config.lifecycle.recheck_debounce)),
                ConsumerSettings {
                    claim_idle: config.events.claim_idle,
                    max_attempts: config.events.max_attempts,
                    namespace: config.events.namespace.clone(),
                    ..ConsumerSettings::default()
                },
            );
            background.spawn(
                "lifecycle-events",
                consumer.run(background.shutdown().clone()),
            );
        }
        None => tracing::warn!("REDIS_URL unset: Lifecycle does not see activity"),
    }
    let lifecycle = Arc::new(lifecycle);
    background.spawn(
        "lifecycle-rechecks",
        Arc::clone(&lifecycle).run_rechecks(
            std::time::Duration::from_millis(200),
            background.shutdown().clone(),
        ),
    );
    let handler: Arc<dyn stowage_jobs::Handler> = lifecycle.clone();
    let worker = Worker::new(
        queue.clone(),
        HashMap::from([(stowage_lifecycle::TASK_JOB.to_owned(), handler)]),
    );
    background.spawn(
        "lifecycle-worker",
        worker.run(background.shutdown().clone()),
    );
    let scheduler =
        Scheduler::new(queue, stowage_lifecycle::schedules()).context("lifecycle schedules")?;
    background.spawn(
        "lifecycle-scheduler",
        scheduler.run(background.shutdown().clone()),
    );
    Ok(lifecycle)
}

/// Media's queue, worker and consumer of file events, started on `background`.
fn start_media(
    config: &Config,
    pool: stowage_db::PgPool,
    database_url: &str,
    files: Arc<dyn FilesApi>,
    store: Arc<dyn object_store::ObjectStore>,
    redis: Option<&fred::clients::Client>,
    background: &Background,
) -> anyhow::Result<Arc<Media>> {
    let settings = &config.media;
    let queue = Queue::new(
        pool.clone(),
        database_url,
        stowage_media::SCHEMA,
        QueueConfig {
            concurrency: settings.concurrency,
            job_timeout: settings.job_timeout,
            visibility_timeout: settings.job_timeout * 2,
            max_attempts: settings.max_attempts,
            backoff_base: settings.backoff_base,
            backoff_cap: settings.backoff_cap,
            ..QueueConfig::default()
        },
    )
    .context("STOWAGE_MEDIA__*: bad queue settings")?;
    let scanner = settings
        .clamd_url
        .as_deref()
        .map(|url| Clamd::new(url, settings.scan_timeout))
        .transpose()
        .context("STOWAGE_MEDIA__CLAMD_URL")?;
    // Working directories of jobs a killed process left (an emptyDir outlives the container),
    // at start and then every job timeout: those whose lock no process holds. Those of an
    // older release, without a lock, when at least an hour old: the directory may be shared
    // with Media processes whose own job timeout is longer, and their live directories are
    // not this one's to remove.
    let older_than = (settings.job_timeout * 2).max(std::time::Duration::from_secs(3600));
    let shutdown = background.shutdown().clone();
    let every = settings.job_timeout;
    background.spawn("media-work-dir-sweeper", async move {
        loop {
            let swept = tokio::task::spawn_blocking(move || {
                Media::sweep_work_dirs(&std::env::temp_dir(), older_than)
            })
            .await
            .unwrap_or(0);
            if swept > 0 {
                tracing::info!(swept, "left-over media working directories removed");
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    });
    let media = Arc::new(Media::new(
        pool.clone(),
        queue.clone(),
        files,
        store,
        scanner,
        MediaSettings {
            limits: DecodeLimits {
                max_pixels: settings.max_pixels,
                max_input: settings.max_image_size.as_u64(),
                ..DecodeLimits::default()
            },
            decode_timeout: settings.tool_timeout,
            max_video_size: settings.max_video_size.as_u64(),
            tools: Tools {
                ffprobe: settings.ffprobe.clone(),
                ffmpeg: settings.ffmpeg.clone(),
                heif_convert: settings.heif_convert.clone(),
                timeout: settings.tool_timeout,
                memory: settings.tool_memory.as_u64(),
            },
            decode_slots: settings.concurrency,
            job_timeout: settings.job_timeout,
            rescan_window: settings.rescan_window,
            rescan_interval: settings.rescan_interval,
        },
    ));
    let handler: Arc<dyn stowage_jobs::Handler> = media.clone();
    let worker = Worker::new(
        queue.clone(),
        HashMap::from([(stowage_media::PROCESS_JOB.to_owned(), handler)]),
    );
    background.spawn("media-worker", worker.run(background.shutdown().clone()));
    // Re-scans in a worker of their own, one at a time: a wave of them after a signature
    // update never holds new uploads back, nor takes all of clamd. Started with re-scans off
    // too: jobs queued while they were on end (as no-ops) instead of standing due for ever.
    let rescans = media.rescan_handler();
    let rescan_queue = Queue::new(
        pool.clone(),
        database_url,
        stowage_media::SCHEMA,
        QueueConfig {
            concurrency: 1,
            ..queue.config().clone()
        },
    )
    .context("STOWAGE_MEDIA__*: bad queue settings")?;
    let rescan_worker = Worker::new(
        rescan_queue,
        HashMap::from([
            (rescan::RESCAN_CHECK_JOB.to_owned(), rescans.clone()),
            (rescan::RESCAN_JOB.to_owned(), rescans),
        ]),
    );
    background.spawn(
        "media-rescan-worker",
        rescan_worker.run(background.shutdown().clone()),
    );
    if media.rescans_on() {
        // Shown from the start: an alert on their increase sees the first one.
        metrics::counter!("stowage_media_rescans_queued_total").increment(0);
        metrics::counter!("stowage_media_rescans_found_total").increment(0);
        let scheduler = Scheduler::new(
            queue.clone(),
            vec![Schedule::new(
                rescan::RESCAN_SCHEDULE,
                settings.rescan_interval,
                rescan::RESCAN_CHECK_JOB,
                serde_json::json!({}),
            )],
        )
        .context("STOWAGE_MEDIA__RESCAN_INTERVAL")?;
        background.spawn(
            "media-rescan-scheduler",
            scheduler.run(background.shutdown().clone()),
        );
    }
    match redis {
        Some(redis) => {
            let consumer = Consumer::new(
                redis,
                pool,
                stowage_media::SCHEMA,
                stowage_media::CONSUMER_GROUP,
                FileEvents::TOPICS,
                Arc::new(FileEvents::new(queue)),
                ConsumerSettings {
                    claim_idle: config.events.claim_idle,
                    max_attempts: config.events.max_attempts,
                    namespace: config.events.namespace.clone(),
                    ..ConsumerSettings::default()
                },
            );
            background.spawn("media-events", consumer.run(background.shutdown().clone()));
        }
        None => tracing::warn!("REDIS_URL unset: Media does not hear of new files"),
    }
    Ok(media)
}

/// How often Quota's process reads the totals of every account for its gauges.
const USAGE_GAUGES_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Every minute, the bytes stored and held over all accounts, and how many accounts there are
/// and are full, as gauges (`stowage_stored_bytes`, `stowage_reserved_bytes`,
/// `stowage_quota_accounts`, `stowage_quota_accounts_full`): one read of the accounts table,
/// by each Quota replica (the same figures; dashboards take the `max`).
fn spawn_usage_gauges(background: &Background, quota: stowage_quota::Quota) {
    let shutdown = background.shutdown().clone();
    background.spawn("usage-gauges", async move {
        loop {
            match quota.stats().await {
                Ok(stats) => {
                    metrics::gauge!("stowage_stored_bytes").set(stats.used as f64);
                    metrics::gauge!("stowage_reserved_bytes").set(stats.reserved as f64);
                    metrics::gauge!("stowage_quota_accounts").set(stats.accounts as f64);
                    metrics::gauge!("stowage_quota_accounts_full").set(stats.full as f64);
                }
                Err(error) => tracing::warn!(%error, "usage totals not read for the gauges"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(USAGE_GAUGES_INTERVAL) => {}
            }
        }
    });
}

/// Every `interval`, sweeps expired upload sessions and one-shot uploads abandoned for
/// longer than `abandoned_after`, so that their holds come back within a minute of their end,
/// and finishes completions a crash interrupted. Lifecycle's `orphan_uploads` (every 15 min,
/// `Ingest.SweepUploads`) is the other sweep, with the policy's idle time for one-shots.
fn spawn_sweeper(
    background: &Background,
    sessions: Sessions,
    uploader: Uploader,
    interval: std::time::Duration,
    abandoned_after: std::time::Duration,
) {
    let shutdown = background.shutdown().clone();
    background.spawn("upload-sweeper", async move {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            if let Err(error) = sessions.sweep_expired(100, false).await {
                tracing::warn!(%error, "upload sweep failed");
            }
            if let Err(error) = sessions.finish_interrupted(100).await {
                tracing::warn!(%error, "interrupted completions not finished");
            }
            if let Err(error) = uploader.sweep_abandoned(abandoned_after).await {
                tracing::warn!(%error, "abandoned upload sweep failed");
            }
        }
    });
}

/// Parses `all` or one role name.
pub fn roles_of(name: &str) -> anyhow::Result<Vec<Role>> {
    use clap::ValueEnum;
    if name == "all" {
        return Ok(Role::ALL.to_vec());
    }
    match Role::from_str(name, true) {
        Ok(role) => Ok(vec![role]),
        Err(_) => {
            bail!("unknown service {name:?}: use ingest, files, quota, media, lifecycle or all")
        }
    }
}
