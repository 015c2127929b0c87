//! Test kit: real PostgreSQL and Redis (started once per test run by `stowage-testenv`, or
//! once per test process when run without it), a fresh database per test, an in-process mesh
//! and a harness that runs the real `stowage` binary, one process per service; a throwaway
//! ClamAV daemon for the tests that scan, and a Redis Cluster for those that need one.

mod clamd;
pub use clamd::{EICAR, EICAR_SIGNATURE, LocalClamd, SIGNATURE_VERSION};
mod otlp;
pub use otlp::{OtlpCollector, RecordedSpan};
mod redis_cluster;
pub use redis_cluster::LocalRedisCluster;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use stowage::Role;
use stowage_local::{LocalPostgres, LocalRedis, ScratchDatabase};
pub use stowage_runtime::Minter;
use stowage_runtime::{Config, config::AuthConfig};
use tokio::{
    process::{Child, Command},
    sync::OnceCell,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::{Request, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// HS256 secret every test process shares.
pub const TEST_SECRET: &str = "stowage-test-secret-0123456789abcdef";

/// Where the shared servers are.
#[derive(Debug)]
pub struct Servers {
    /// URL of the `postgres` admin database.
    pub postgres_admin_url: String,
    /// Redis URL.
    pub redis_url: String,
}

static SERVERS: OnceCell<Servers> = OnceCell::const_new();

/// The shared servers: from `STOWAGE_TEST_DATABASE_URL` / `STOWAGE_TEST_REDIS_URL` (set by
/// `stowage-testenv`), or started now for this process and stopped by a watchdog when it
/// exits.
pub async fn servers() -> &'static Servers {
    SERVERS
        .get_or_init(|| async {
            match start_servers().await {
                Ok(s) => s,
                Err(e) => panic!("test servers unavailable: {e:#}"),
            }
        })
        .await
}

async fn start_servers() -> anyhow::Result<Servers> {
    if let (Ok(pg), Ok(redis)) = (
        std::env::var("STOWAGE_TEST_DATABASE_URL"),
        std::env::var("STOWAGE_TEST_REDIS_URL"),
    ) {
        return Ok(Servers {
            postgres_admin_url: pg,
            redis_url: redis,
        });
    }
    let dir = tempfile::Builder::new()
        .prefix("stowage-test-")
        .tempdir()?
        .keep();
    let pg = LocalPostgres::start(&dir.join("pg"), false).await?;
    let redis = LocalRedis::start().await?;
    let servers = Servers {
        postgres_admin_url: pg.url("postgres"),
        redis_url: redis.url(),
    };
    // Statics are never dropped: a watchdog stops the servers when this process ends.
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; kill -INT {pg} {redis} 2>/dev/null; sleep 2; rm -rf {dir}",
        me = std::process::id(),
        pg = pg_pid(&pg),
        redis = redis_pid(&redis),
        dir = dir.display()
    );
    std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::mem::forget(pg);
    std::mem::forget(redis);
    Ok(servers)
}

fn pg_pid(pg: &LocalPostgres) -> String {
    format!("$(pgrep -f 'postgres -D .* -p {}' | head -1)", pg.port())
}

fn redis_pid(redis: &LocalRedis) -> String {
    format!("$(pgrep -f 'redis-server .*:{}' | head -1)", redis.port())
}

/// Creates an empty database for one test and returns its URL. The database stays until the
/// shared server stops; a [`Setup`]'s is dropped with it.
pub async fn fresh_database() -> anyhow::Result<String> {
    Ok(scratch_database().await?.keep())
}

/// An empty database on the shared server, dropped with the value.
async fn scratch_database() -> anyhow::Result<ScratchDatabase> {
    Ok(ScratchDatabase::create(&servers().await.postgres_admin_url).await?)
}

/// A token for `user` with `scopes`, valid for an hour.
pub fn token(user: &str, scopes: &[&str]) -> String {
    minter().mint(user, scopes, Duration::from_secs(3600))
}

/// The minter of [`TEST_SECRET`].
pub fn minter() -> Minter {
    minter_with(TEST_SECRET)
}

/// A minter of another secret (for forged tokens).
pub fn minter_with(secret: &str) -> Minter {
    Minter::from_config(&AuthConfig {
        hs256_secret: Some(secret.into()),
        ..AuthConfig::default()
    })
    .unwrap_or_else(|| unreachable!("a secret is configured"))
}

/// A token for `user` that expired `ago`.
pub fn expired_token(user: &str, ago: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    minter().mint_until(user, &[], now.saturating_sub(ago).as_secs())
}

/// `message` with `authorization: Bearer {token}`.
pub fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    if let Ok(value) = MetadataValue::try_from(format!("Bearer {token}")) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// A lazily connected channel to `http://{addr}`.
pub fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap_or_else(|_| unreachable!("a socket address is a valid uri"))
        .connect_lazy()
}

/// Where a test's data lives: its own database and its own object store.
#[derive(Debug)]
pub struct Setup {
    /// Database URL.
    pub database_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Object store URL.
    pub blob_url: String,
    /// Directory of a `file://` store (removed at drop).
    pub blob_dir: Option<tempfile::TempDir>,
    /// Default quota limit, if not the built-in one.
    pub default_limit: Option<u64>,
    /// Extra environment of spawned processes (the store server's endpoint and credentials).
    pub env: Vec<(String, String)>,
    /// The S3-compatible or Azure-compatible server, kept alive with the setup.
    pub store_server: Option<StoreServer>,
    /// Drops the database with the setup (declared last: dropped after the store server).
    _database: ScratchDatabase,
}

impl Setup {
    /// A fresh database and a fresh local-disk store.
    pub async fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("stowage-blobs-")
            .tempdir()?;
        Self::with_store(format!("file://{}", dir.path().display()), Some(dir), None).await
    }

    /// A fresh database and an in-memory store (in-process meshes only).
    pub async fn memory() -> anyhow::Result<Self> {
        Self::with_store("memory://".into(), None, None).await
    }

    /// A fresh database and a bucket on a fresh S3-compatible server (moto). Only processes
    /// spawned by [`Processes`] can reach it: its settings travel in their environment.
    pub async fn s3() -> anyhow::Result<Self> {
        let server = StoreServer::moto().await?;
        Self::with_store(server.blob_url.clone(), None, Some(server)).await
    }

    /// A fresh database and a container on a fresh Azure Blob Storage emulator (Azurite).
    /// Only processes spawned by [`Processes`] can reach it, as with [`Setup::s3`].
    pub async fn azure() -> anyhow::Result<Self> {
        let server = StoreServer::azurite().await?;
        Self::with_store(server.blob_url.clone(), None, Some(server)).await
    }

    /// A fresh database beside the store at `blob_url` (its directory, or its server).
    async fn with_store(
        blob_url: String,
        blob_dir: Option<tempfile::TempDir>,
        store_server: Option<StoreServer>,
    ) -> anyhow::Result<Self> {
        let database = scratch_database().await?;
        Ok(Self {
            database_url: database.url().to_owned(),
            redis_url: servers().await.redis_url.clone(),
            blob_url,
            blob_dir,
            default_limit: None,
            env: store_server
                .as_ref()
                .map(|s| s.env.clone())
                .unwrap_or_default(),
            store_server,
            _database: database,
        })
    }

    /// Sets the default quota of new accounts.
    pub fn with_default_limit(mut self, bytes: u64) -> Self {
        self.default_limit = Some(bytes);
        self
    }

    /// Every object under `prefix` of a `file://` store, as relative paths.
    pub fn stored_objects(&self, prefix: &str) -> Vec<String> {
        let Some(dir) = &self.blob_dir else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut stack = vec![dir.path().join(prefix)];
        while let Some(p) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&p) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    stack.push(path);
                } else if let Ok(rel) = path.strip_prefix(dir.path()) {
                    out.push(rel.display().to_string());
                }
            }
        }
        out.sort();
        out
    }

    /// Prefix of this setup's Redis keys: tests share one Redis, and each mesh must hear only
    /// its own events (its database's name).
    pub fn namespace(&self) -> String {
        self.database_url
            .rsplit('/')
            .next()
            .and_then(|db| db.split('?').next())
            .unwrap_or("stowage")
            .to_owned()
    }

    /// The configuration a process of this setup runs with.
    pub fn config(&self, addr: SocketAddr) -> Config {
        let mut config = Config {
            addr,
            database_url: Some(self.database_url.clone()),
            redis_url: Some(self.redis_url.clone()),
            blob_url: self.blob_url.clone(),
            db_pool_size: 8,
            shutdown_grace: Duration::from_secs(5),
            ..Config::default()
        };
        config.auth.hs256_secret = Some(TEST_SECRET.into());
        config.events.namespace = self.namespace();
        if let Some(limit) = self.default_limit {
            config.quota.default_limit = stowage_runtime::config::ByteSize::b(limit);
        }
        config
    }
}

/// All five services in this process (`serve all` wiring), on a free port.
pub struct Mesh {
    /// Address of every service.
    pub addr: SocketAddr,
    /// The mesh's object store (shared with it, also for `memory://`).
    pub blobs: stowage_blob::Blobs,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Mesh {
    /// Starts the mesh over `setup`.
    pub async fn start(setup: &Setup) -> anyhow::Result<Self> {
        Self::start_with(setup, |_| {}).await
    }

    /// Starts the mesh over `setup` with `tweak` applied to its configuration.
    pub async fn start_with(
        setup: &Setup,
        tweak: impl FnOnce(&mut Config),
    ) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut config = setup.config(addr);
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let blobs = stowage_blob::Blobs::from_url(&setup.blob_url)?;
        let task = tokio::spawn(stowage::serve_with(
            &Role::ALL,
            config,
            Some(blobs.clone()),
            listener,
            shutdown.clone(),
        ));
        let mesh = Self {
            addr,
            blobs,
            shutdown,
            task,
        };
        wait_serving(addr, "stowage.v1.Files").await?;
        Ok(mesh)
    }

    /// Keys of every object under `prefix` in the mesh's store.
    pub async fn stored_objects(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        use futures::TryStreamExt;
        let prefix = (!prefix.is_empty()).then(|| stowage_blob::ObjectPath::from(prefix));
        let mut keys: Vec<String> = self
            .blobs
            .store
            .list(prefix.as_ref())
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await?;
        keys.sort();
        Ok(keys)
    }

    /// A channel to the mesh.
    pub fn channel(&self) -> Channel {
        channel(self.addr)
    }

    /// Stops the mesh and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.task.await?
    }
}

/// Waits until `service` reports SERVING on `addr` (at most 30 s).
pub async fn wait_serving(addr: SocketAddr, service: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut client = HealthClient::new(channel(addr));
    loop {
        let status = client
            .check(HealthCheckRequest {
                service: service.to_owned(),
            })
            .await
            .map(|r| r.into_inner().status);
        if matches!(status, Ok(s) if s == ServingStatus::Serving as i32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{service} on {addr} not serving after 30 s: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Path of the `stowage` binary built next to the test executable (or `STOWAGE_BIN`).
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("STOWAGE_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/test-binary → target/<profile>/stowage
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("unexpected test binary location")?;
    let path = dir.join("stowage");
    if !path.exists() {
        bail!(
            "{} does not exist; build it with `cargo build -p stowage`",
            path.display()
        );
    }
    Ok(path)
}

/// One running `stowage serve` process.
pub struct Process {
    /// Roles it serves.
    pub roles: Vec<Role>,
    /// Its address.
    pub addr: SocketAddr,
    child: Child,
}

impl Process {
    /// Sends `signal` to the process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self.child.id().context("process already gone")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(i32::try_from(pid)?), signal)?;
        Ok(())
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Waits for the process to exit (at most `timeout`) and returns whether it exited 0.
    pub async fn wait(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .context("process did not exit in time")??;
        Ok(status.success())
    }
}

/// Real `stowage` processes over one [`Setup`].
pub struct Processes {
    /// The processes.
    pub processes: Vec<Process>,
    peers: Vec<(&'static str, String)>,
}

impl Processes {
    /// One process per service, each calling the others over gRPC.
    pub async fn split(setup: &Setup) -> anyhow::Result<Self> {
        Self::cluster(setup, 1).await
    }

    /// One process per service, with `ingest_replicas` Ingest processes.
    pub async fn cluster(setup: &Setup, ingest_replicas: usize) -> anyhow::Result<Self> {
        // Every port of the cluster picked at once, so no two processes get the same one.
        let mut free = stowage_local::free_ports(Role::ALL.len() + ingest_replicas.max(1) - 1)?
            .into_iter()
            .map(|port| SocketAddr::from(([127, 0, 0, 1], port)));
        let ports: Vec<(Role, SocketAddr)> = Role::ALL.iter().copied().zip(free.by_ref()).collect();
        let peer = |role: Role| {
            ports
                .iter()
                .find(|(r, _)| *r == role)
                .map(|(_, a)| format!("http://{a}"))
                .unwrap_or_default()
        };
        let peers = [
            ("STOWAGE_PEERS__QUOTA", peer(Role::Quota)),
            ("STOWAGE_PEERS__FILES", peer(Role::Files)),
            ("STOWAGE_PEERS__INGEST", peer(Role::Ingest)),
            ("STOWAGE_PEERS__MEDIA", peer(Role::Media)),
            ("STOWAGE_PEERS__LIFECYCLE", peer(Role::Lifecycle)),
        ];
        let mut processes = Vec::new();
        for (role, addr) in &ports {
            processes.push(spawn(setup, &[*role], *addr, &peers)?);
        }
        for addr in free {
            processes.push(spawn(setup, &[Role::Ingest], addr, &peers)?);
        }
        let this = Self {
            processes,
            peers: peers.to_vec(),
        };
        this.wait_ready().await?;
        Ok(this)
    }

    /// Starts the process serving `role` again on its address (after a kill), and waits for
    /// it to serve.
    pub async fn restart(&mut self, setup: &Setup, role: Role) -> anyhow::Result<()> {
        let peers = self.peers.clone();
        let process = self.process_mut(role);
        let (roles, addr) = (process.roles.clone(), process.addr);
        let _ = process.child.start_kill();
        let _ = process.child.wait().await;
        *process = spawn(setup, &roles, addr, &peers)?;
        wait_serving(addr, service_name(role)).await
    }

    /// One `serve all` process.
    pub async fn all(setup: &Setup) -> anyhow::Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], stowage_local::free_port()?));
        let this = Self {
            processes: vec![spawn(setup, &Role::ALL, addr, &[])?],
            peers: Vec::new(),
        };
        this.wait_ready().await?;
        Ok(this)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        for p in &self.processes {
            for role in &p.roles {
                wait_serving(p.addr, service_name(*role)).await?;
            }
        }
        Ok(())
    }

    /// Addresses of every process serving `role`.
    pub fn addrs(&self, role: Role) -> Vec<SocketAddr> {
        self.processes
            .iter()
            .filter(|p| p.roles.contains(&role))
            .map(|p| p.addr)
            .collect()
    }

    /// Address of the process serving `role`.
    pub fn addr(&self, role: Role) -> SocketAddr {
        self.process(role).addr
    }

    /// The process serving `role`.
    pub fn process(&self, role: Role) -> &Process {
        self.processes
            .iter()
            .find(|p| p.roles.contains(&role))
            .unwrap_or_else(|| unreachable!("every role is served"))
    }

    /// Mutable access to the process serving `role`.
    pub fn process_mut(&mut self, role: Role) -> &mut Process {
        self.processes
            .iter_mut()
            .find(|p| p.roles.contains(&role))
            .unwrap_or_else(|| unreachable!("every role is served"))
    }
}

/// The gRPC name of a role's service.
pub fn service_name(role: Role) -> &'static str {
    use stowage_proto::service_names as n;
    match role {
        Role::Ingest => n::INGEST,
        Role::Files => n::FILES,
        Role::Quota => n::QUOTA,
        Role::Media => n::MEDIA,
        Role::Lifecycle => n::LIFECYCLE,
    }
}

fn spawn(
    setup: &Setup,
    roles: &[Role],
    addr: SocketAddr,
    peers: &[(&str, String)],
) -> anyhow::Result<Process> {
    let service = if roles.len() == 1 {
        format!("{:?}", roles[0]).to_lowercase()
    } else {
        "all".to_owned()
    };
    let mut cmd = Command::new(binary()?);
    cmd.args(["serve", &service])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("STOWAGE_ADDR", addr.to_string())
        .env("DATABASE_URL", &setup.database_url)
        .env("REDIS_URL", &setup.redis_url)
        .env("STOWAGE_BLOB_URL", &setup.blob_url)
        .env("STOWAGE_AUTH__HS256_SECRET", TEST_SECRET)
        .env("STOWAGE_DB_POOL_SIZE", "8")
        .env("STOWAGE_SHUTDOWN_GRACE", "5s")
        .env("STOWAGE_EVENTS__NAMESPACE", setup.namespace())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(limit) = setup.default_limit {
        cmd.env("STOWAGE_QUOTA__DEFAULT_LIMIT", limit.to_string());
    }
    for (k, v) in peers {
        cmd.env(k, v);
    }
    for (k, v) in &setup.env {
        cmd.env(k, v);
    }
    Ok(Process {
        roles: roles.to_vec(),
        addr,
        child: cmd.spawn()?,
    })
}

/// A cloud store's server on a free port with one bucket (or container): moto's S3 server
/// (PyPI) or Azurite's Blob service (npm, in integration-tests/js), both kept in memory.
#[derive(Debug)]
pub struct StoreServer {
    child: Child,
    /// `STOWAGE_BLOB_URL` of the bucket.
    pub blob_url: String,
    /// What a process needs in its environment to reach the server.
    pub env: Vec<(String, String)>,
}

/// Azurite's well-known development account and key (published in Azure's documentation).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl StoreServer {
    /// Starts `moto_server` and creates a bucket.
    pub async fn moto() -> anyhow::Result<Self> {
        let port = stowage_local::free_port()?;
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context(
                "moto_server not found (scripts/setup installs it: pip install 'moto[server]')",
            )?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let bucket = fresh_bucket_name();
        let url = format!("{endpoint}/{bucket}");
        until_created("moto_server", || {
            vec!["-X".into(), "PUT".into(), url.clone()]
        })
        .await?;
        let env = [
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "false"),
        ];
        Ok(Self {
            child,
            blob_url: format!("s3://{bucket}"),
            env: owned(&env),
        })
    }

    /// Starts Azurite's Blob service and creates a container (a request signed with the
    /// emulator's shared key, as any Azure client signs it).
    pub async fn azurite() -> anyhow::Result<Self> {
        let port = stowage_local::free_port()?;
        let azurite = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../integration-tests/js/node_modules/.bin/azurite-blob");
        let child = Command::new(&azurite)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .args(["--inMemoryPersistence", "--skipApiVersionCheck", "--silent"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| {
                format!(
                    "{} not found (scripts/setup installs it)",
                    azurite.display()
                )
            })?;
        let endpoint = format!("http://127.0.0.1:{port}");
        let container = fresh_bucket_name();
        let url = format!("{endpoint}/{AZURITE_ACCOUNT}/{container}?restype=container");
        let resource =
            format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{container}\nrestype:container");
        until_created("azurite", || {
            let date = chrono::Utc::now()
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string();
            let version = "2021-08-06";
            let to_sign = format!(
                "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{resource}"
            );
            let signature = shared_key_signature(&to_sign);
            [
                "-X".to_owned(),
                "PUT".to_owned(),
                "-H".to_owned(),
                format!("x-ms-date: {date}"),
                "-H".to_owned(),
                format!("x-ms-version: {version}"),
                "-H".to_owned(),
                format!("Authorization: SharedKey {AZURITE_ACCOUNT}:{signature}"),
                "-H".to_owned(),
                "Content-Length: 0".to_owned(),
                url.clone(),
            ]
            .into()
        })
        .await?;
        let env = [
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", endpoint.as_str()),
        ];
        Ok(Self {
            child,
            blob_url: format!("az://{container}"),
            env: owned(&env),
        })
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Azure's shared-key signature of `to_sign` with Azurite's key: base64 of its HMAC-SHA256.
fn shared_key_signature(to_sign: &str) -> String {
    use base64::{Engine, engine::general_purpose::STANDARD};
    use hmac::{Hmac, KeyInit, Mac};
    let key = STANDARD
        .decode(AZURITE_KEY)
        .expect("Azurite's key is base64");
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(to_sign.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

fn fresh_bucket_name() -> String {
    format!("b{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Runs `curl -sf {args()}` until it succeeds (the server is up and made the bucket), for at
/// most 30 s; `args` is called for each try (a signed request carries its time).
async fn until_created(server: &str, args: impl Fn() -> Vec<String>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let created = tokio::process::Command::new("curl")
            .arg("-sf")
            .args(args())
            .output()
            .await;
        if matches!(created, Ok(ref o) if o.status.success()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{server} did not create a bucket within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Services of one process running on a runtime of their own, so that [`Replica::kill`]
/// can stop them at once, mid-request, as SIGKILL would (the in-memory store lives in the
/// test process, so `memory://` replicas cannot be separate processes).
pub struct Replica {
    /// Address.
    pub addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Replica {
    /// Starts `roles` with `peers` (for the roles it does not run) over the shared `blobs`.
    pub fn start(
        setup: &Setup,
        roles: &[Role],
        blobs: &stowage_blob::Blobs,
        peers: &[(Role, SocketAddr)],
    ) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let mut config = setup.config(addr);
        for (role, peer) in peers {
            let url = Some(format!("http://{peer}"));
            match role {
                Role::Quota => config.peers.quota = url,
                Role::Files => config.peers.files = url,
                Role::Ingest => config.peers.ingest = url,
                Role::Media => config.peers.media = url,
                Role::Lifecycle => config.peers.lifecycle = url,
            }
        }
        let roles = roles.to_vec();
        let blobs = blobs.clone();
        runtime.spawn(async move {
            let listener = match tokio::net::TcpListener::from_std(std_listener) {
                Ok(l) => l,
                Err(e) => return tracing::error!(error = %e, "replica listener"),
            };
            if let Err(e) = stowage::serve_with(
                &roles,
                config,
                Some(blobs),
                listener,
                CancellationToken::new(),
            )
            .await
            {
                tracing::error!(error = %e, "replica stopped");
            }
        });
        Ok(Self {
            addr,
            runtime: Some(runtime),
        })
    }

    /// Stops everything at once: in-flight calls die, connections drop.
    pub fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}
