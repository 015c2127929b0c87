//! Throwaway PostgreSQL and Redis servers started from the system's own binaries (`initdb`,
//! `postgres`, `redis-server`), for `stowage dev` and the test kit.
//!
//! PostgreSQL refuses to run as root; when we are root the server runs as the `postgres`
//! user (or `nobody`) and its data directory is handed to that user.

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::{Pid, User, chown},
};
mod scratch;

pub use scratch::ScratchDatabase;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

/// Errors of starting a local server.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A binary is missing.
    #[error(
        "{0} not found on PATH; install it (scripts/setup does) or set DATABASE_URL / REDIS_URL"
    )]
    Missing(&'static str),
    /// A command failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// What was run.
        what: &'static str,
        /// Its output.
        detail: String,
    },
    /// The server did not come up in time.
    #[error("{0} did not become ready within 30 s")]
    Timeout(&'static str),
    /// I/O.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A free TCP port on 127.0.0.1, for a server started next. Picked at random below the range
/// the kernel gives outgoing connections their ports from: the port is free now but bound
/// only later, by another process, and meanwhile any connection made on the machine could
/// take a port of that range (seen in tests: a server failing on "Address already in use",
/// its port then answered by someone else). And reserved for this process's life against
/// every other process picking ports this way (a lock on a file per port under the temp dir):
/// two test processes never pick the same port, and a server a test restarts on its port
/// finds it still its own.
pub fn free_port() -> std::io::Result<u16> {
    Ok(port_held()?.local_addr()?.port())
}

/// `n` different free ports, as [`free_port`] picks them (each held while the next is picked,
/// so one call never gives the same port twice).
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| port_held())
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter()
        .map(|listener| Ok(listener.local_addr()?.port()))
        .collect()
}

/// A listener on a port picked as [`free_port`] says.
fn port_held() -> std::io::Result<TcpListener> {
    const LOWEST: u16 = 10_000;
    let below = ephemeral_ports_start();
    if below > LOWEST + 1_000 {
        for _ in 0..64 {
            // Below `below - LOWEST`, itself a u16: the cast keeps every bit.
            let pick = (uuid::Uuid::new_v4().as_u128() % u128::from(below - LOWEST)) as u16;
            let port = LOWEST + pick;
            if let Ok(listener) = TcpListener::bind(("127.0.0.1", port))
                && reserve(port)
            {
                return Ok(listener);
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
}

/// Locks of the ports this process picked, held until it exits (the kernel lets go of them
/// then, however it ends).
static RESERVED: std::sync::Mutex<Vec<nix::fcntl::Flock<std::fs::File>>> =
    std::sync::Mutex::new(Vec::new());

/// Reserves `port` for this process against others that pick ports with [`free_port`]: an
/// exclusive lock on `{temp}/stowage-ports/{port}` (a directory every user may write in, as
/// the temp dir itself; a lock needs only reading). False when another process holds it; a
/// lock that cannot be had at all (no such directory for us) reserves nothing and lets the
/// port be taken as it is.
fn reserve(port: u16) -> bool {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = std::env::temp_dir().join("stowage-ports");
    if !dir.is_dir() && std::fs::create_dir(&dir).is_ok() {
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777));
    }
    let path = dir.join(port.to_string());
    let file = std::fs::File::open(&path).or_else(|_| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o666)
            .open(&path)
    });
    let Ok(file) = file else {
        return true;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(held) => {
            RESERVED
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(held);
            true
        }
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => false,
        Err(_) => true,
    }
}

/// The first port of the kernel's range for outgoing connections (Linux's default 32768).
fn ephemeral_ports_start() -> u16 {
    // Read once: free_ports picks several in a row.
    static START: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    *START.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(32_768)
    })
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

/// The user PostgreSQL runs as when we are root.
fn unprivileged_user() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    User::from_name("postgres")
        .ok()
        .flatten()
        .or_else(|| User::from_name("nobody").ok().flatten())
}

fn chown_tree(path: &Path, user: &User) -> std::io::Result<()> {
    chown(path, Some(user.uid), Some(user.gid)).map_err(std::io::Error::from)?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), user)?;
        }
    }
    Ok(())
}

fn command(program: &str, user: Option<&User>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(user) = user {
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// A PostgreSQL server in a directory of ours.
#[derive(Debug)]
pub struct LocalPostgres {
    child: Child,
    port: u16,
    data_dir: PathBuf,
}

impl LocalPostgres {
    /// Starts PostgreSQL on a free port with its data in `data_dir` (created with `initdb`
    /// when empty). `durable: false` turns fsync off, for tests.
    pub async fn start(data_dir: &Path, durable: bool) -> Result<Self, LocalError> {
        Self::start_with(data_dir, durable, &[]).await
    }

    /// Like [`LocalPostgres::start`], with more server settings (`name=value`, as `-c`
    /// takes them).
    pub async fn start_with(
        data_dir: &Path,
        durable: bool,
        settings: &[&str],
    ) -> Result<Self, LocalError> {
        Self::spawn(data_dir, durable, settings, false).await
    }

    /// `stowage dev`'s server: durable, in a process group of its own, so that Ctrl-C at the
    /// terminal reaches only `stowage dev`, which stops the server once the services using it
    /// have drained, not under them. (Test servers stay in the group of the run, which a
    /// Ctrl-C then ends whole.)
    pub async fn start_for_dev(data_dir: &Path) -> Result<Self, LocalError> {
        Self::spawn(data_dir, true, &[], true).await
    }

    async fn spawn(
        data_dir: &Path,
        durable: bool,
        settings: &[&str],
        own_group: bool,
    ) -> Result<Self, LocalError> {
        for bin in ["initdb", "postgres"] {
            if !on_path(bin) {
                return Err(LocalError::Missing(if bin == "initdb" {
                    "initdb"
                } else {
                    "postgres"
                }));
            }
        }
        let user = unprivileged_user();
        std::fs::create_dir_all(data_dir)?;
        if let Some(user) = &user {
            // The parent must be traversable by the server's user.
            if let Some(parent) = data_dir.parent() {
                let _ = chown(parent, Some(user.uid), Some(user.gid));
            }
            chown_tree(data_dir, user)?;
        }
        if !data_dir.join("PG_VERSION").exists() {
            let out = command("initdb", user.as_ref())
                .args(["-D"])
                .arg(data_dir)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ])
                .output()
                .await?;
            if !out.status.success() {
                return Err(LocalError::Failed {
                    what: "initdb",
                    detail: String::from_utf8_lossy(&out.stderr).into_owned(),
                });
            }
        }
        let port = free_port()?;
        // Appended to, never truncated: a second server tried on a directory whose server runs
        // must not cut that one's log (nor read its lines as its own reason).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))?;
        let log_start = log.metadata()?.len();
        if let Some(user) = &user {
            chown(&data_dir.join("server.log"), Some(user.uid), Some(user.gid))
                .map_err(std::io::Error::from)?;
        }
        let mut cmd = command("postgres", user.as_ref());
        if own_group {
            cmd.process_group(0);
        }
        cmd.arg("-D")
            .arg(data_dir)
            .args(["-p", &port.to_string(), "-h", "127.0.0.1", "-k", ""])
            .args(["-c", "max_connections=400", "-c", "shared_buffers=128MB"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if !durable {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                // A throwaway server's WAL is only crash recovery it will never do: keep it
                // to ~256 MB (1 GB by default, on a test machine's disk beside gigabytes of
                // build).
                "-c",
                "max_wal_size=256MB",
            ]);
        }
        for setting in settings {
            cmd.args(["-c", setting]);
        }
        let child = cmd.spawn()?;
        let mut server = Self {
            child,
            port,
            data_dir: data_dir.to_owned(),
        };
        server.wait_ready(log_start).await?;
        Ok(server)
    }

    /// Waits until the server answers; `log_start` is where its own lines begin in the log.
    async fn wait_ready(&mut self, log_start: u64) -> Result<(), LocalError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls)
                .await
                .is_ok()
            {
                return Ok(());
            }
            // Ended already (another server on the same directory, say): its log says why,
            // now rather than at the deadline.
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LocalError::Failed {
                    what: "postgres",
                    detail: format!("exited ({status}): {}", self.log_tail(log_start)),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default();
        tracing::error!(%log, "postgres did not start");
        Err(LocalError::Timeout("postgres"))
    }

    /// The last lines this server wrote to the log (from byte `from`).
    fn log_tail(&self, from: u64) -> String {
        let log = std::fs::read(self.data_dir.join("server.log")).unwrap_or_default();
        let own = log
            .get(usize::try_from(from).unwrap_or(0)..)
            .unwrap_or_default();
        let own = String::from_utf8_lossy(own);
        let lines: Vec<&str> = own.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates database `db` unless it exists.
    pub async fn create_database(&self, db: &str) -> Result<(), LocalError> {
        let (client, driver) = connect(&self.url("postgres")).await?;
        let exists = client
            .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db])
            .await
            .map_err(|e| failed("query", e))?
            .is_some();
        if !exists {
            client
                .batch_execute(&format!("CREATE DATABASE \"{}\"", db.replace('"', "")))
                .await
                .map_err(|e| failed("create database", e))?;
        }
        drop(client);
        let _ = driver.await;
        Ok(())
    }

    /// Stops the server cleanly (fast shutdown) and waits for it.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// A Redis server without persistence.
#[derive(Debug)]
pub struct LocalRedis {
    child: Child,
    port: u16,
}

/// `redis-server` on `port` of 127.0.0.1 (0: no plain port), keeping nothing on disk, logging
/// only warnings, killed with its handle: the base of every throwaway server (a TLS-only one
/// adds its options).
pub fn redis_command(port: u16) -> Command {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--loglevel", "warning"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

impl LocalRedis {
    /// Starts `redis-server` on a free port.
    pub async fn start() -> Result<Self, LocalError> {
        Self::start_on(free_port()?).await
    }

    /// `stowage dev`'s server, in a process group of its own (see
    /// [`LocalPostgres::start_for_dev`]).
    pub async fn start_for_dev() -> Result<Self, LocalError> {
        Self::spawn(free_port()?, true).await
    }

    /// Starts `redis-server` on `port` (tests restart a server where clients expect it).
    pub async fn start_on(port: u16) -> Result<Self, LocalError> {
        Self::spawn(port, false).await
    }

    async fn spawn(port: u16, own_group: bool) -> Result<Self, LocalError> {
        if !on_path("redis-server") {
            return Err(LocalError::Missing("redis-server"));
        }
        let mut command = redis_command(port);
        if own_group {
            command.process_group(0);
        }
        let child = command.args(["--protected-mode", "yes"]).spawn()?;
        let server = Self { child, port };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if ping(SocketAddr::from(([127, 0, 0, 1], port))).await {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(LocalError::Timeout("redis-server"))
    }

    /// URL of the server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// A client of the database at `url`, and the task driving its connection (ends once the
/// client is dropped).
async fn connect(
    url: &str,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), LocalError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| failed("connect", e))?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((client, driver))
}

/// Runs `statement` (one or more, no parameters) on the database at `url`; a failure says it
/// was `what`.
async fn execute(url: &str, what: &'static str, statement: &str) -> Result<(), LocalError> {
    let (client, driver) = connect(url).await?;
    let executed = client.batch_execute(statement).await;
    drop(client);
    let _ = driver.await;
    executed.map_err(|e| failed(what, e))
}

fn failed(what: &'static str, e: tokio_postgres::Error) -> LocalError {
    LocalError::Failed {
        what,
        detail: e.to_string(),
    }
}

async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).await.is_ok() && (&buf == b"+PONG\r\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_port_picked_is_reserved_for_this_process() {
        let port = super::free_port().expect("a port");
        // Held already, by this process's own lock: not picked again, by it or another.
        assert!(!super::reserve(port));
        // flock(1) exits with 75 when the lock is held (and only then).
        let child = std::process::Command::new("flock")
            .args(["--nonblock", "--exclusive", "--conflict-exit-code", "75"])
            .arg(
                std::env::temp_dir()
                    .join("stowage-ports")
                    .join(port.to_string()),
            )
            .arg("true")
            .status()
            .expect("flock(1)");
        assert_eq!(
            child.code(),
            Some(75),
            "another process took the lock of {port}"
        );
    }
}
