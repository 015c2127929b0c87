//! Test support: one PostgreSQL server per test process (or the one named by
//! `STOWAGE_TEST_DATABASE_URL`), a fresh database per test, and queues on it.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    future::Future,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use stowage_jobs::{Handler, Queue, QueueConfig, Worker};
use stowage_local::{LocalPostgres, ScratchDatabase};
use tokio::{sync::OnceCell, task::JoinHandle};
use tokio_util::sync::CancellationToken;

/// Schema the tests' queues live in.
pub const SCHEMA: &str = "media";

static ADMIN_URL: OnceCell<String> = OnceCell::const_new();

/// URL of the `postgres` database of the test server.
pub async fn admin_url() -> &'static str {
    ADMIN_URL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("STOWAGE_TEST_DATABASE_URL") {
                return url;
            }
            start_server().await
        })
        .await
}

async fn start_server() -> String {
    let dir = tempfile::Builder::new()
        .prefix("stowage-jobs-test-")
        .tempdir()
        .expect("temp dir")
        .keep();
    let pg = LocalPostgres::start(&dir.join("pg"), false)
        .await
        .expect("PostgreSQL starts (initdb and postgres on PATH?)");
    let url = pg.url("postgres");
    // Statics are never dropped: a watchdog stops the server when this process ends. It
    // outlives us by design, so it is never waited for.
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
         kill -INT $(head -1 {dir}/pg/postmaster.pid) 2>/dev/null; sleep 2; rm -rf {dir}",
        me = std::process::id(),
        dir = dir.display()
    );
    #[allow(clippy::zombie_processes)]
    std::process::Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("watchdog starts");
    std::mem::forget(pg);
    url
}

/// An empty database, dropped with the value.
pub async fn fresh_database() -> ScratchDatabase {
    ScratchDatabase::create(admin_url().await)
        .await
        .expect("create database")
}

/// Settings that keep tests quick: short backoff and timeouts.
pub fn fast_config() -> QueueConfig {
    QueueConfig {
        backoff_base: Duration::from_millis(100),
        backoff_cap: Duration::from_secs(1),
        visibility_timeout: Duration::from_secs(10),
        job_timeout: Duration::from_secs(5),
        idle_poll: Duration::from_secs(1),
        ..QueueConfig::default()
    }
}

/// A migrated queue on database `url`, with a pool of its own.
pub async fn queue_at(url: &str, config: QueueConfig) -> Queue {
    let pool = stowage_db::connect(url, 16).expect("pool");
    stowage_jobs::migrate(&pool, SCHEMA)
        .await
        .expect("migrations apply");
    Queue::new(pool, url, SCHEMA, config).expect("valid queue")
}

/// A queue on a fresh database, and the database (dropped with it: keep it as long as the
/// queue).
pub async fn fresh_queue(config: QueueConfig) -> (Queue, ScratchDatabase) {
    let database = fresh_database().await;
    (queue_at(database.url(), config).await, database)
}

/// A worker running in the background until the returned token is cancelled.
pub fn spawn_worker(
    queue: &Queue,
    handlers: Vec<(&str, Arc<dyn Handler>)>,
) -> (CancellationToken, JoinHandle<()>) {
    let handlers: HashMap<String, Arc<dyn Handler>> = handlers
        .into_iter()
        .map(|(kind, handler)| (kind.to_owned(), handler))
        .collect();
    let shutdown = CancellationToken::new();
    let worker = Worker::new(queue.clone(), handlers);
    let handle = tokio::spawn(worker.run(shutdown.clone()));
    (shutdown, handle)
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain connection to `url` for the test's own statements.
pub async fn client(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    client
}
