//! Queue throughput: jobs enqueued per second (one producer, one job per statement), and jobs
//! completed per second by one and by three workers (default concurrency 3, no-op handler).
//!
//! `cargo run --release -p stowage-jobs --example queue_bench [-- JOBS]`
//!
//! Uses the server of `STOWAGE_BENCH_DATABASE_URL` (an admin URL to database `postgres`), or
//! starts a throwaway PostgreSQL with fsync off, as the tests do.

use std::{
    collections::HashMap,
    error::Error,
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::json;
use stowage_jobs::{Handler, JobState, NewJob, Queue, QueueConfig, Worker, handler_fn};
use stowage_local::{LocalPostgres, ScratchDatabase};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let jobs: u64 = match std::env::args().nth(1) {
        Some(n) => n.parse()?,
        None => 5000,
    };
    let mut local = None;
    let admin_url = match std::env::var("STOWAGE_BENCH_DATABASE_URL") {
        Ok(url) => url,
        Err(_) => {
            let dir = tempfile::Builder::new()
                .prefix("stowage-jobs-bench-")
                .tempdir()?;
            let pg = LocalPostgres::start(&dir.path().join("pg"), false).await?;
            let url = pg.url("postgres");
            local = Some((pg, dir));
            url
        }
    };
    // Dropped at the end, with what the rounds left in it.
    let database = ScratchDatabase::create(&admin_url).await?;
    let url = database.url();
    println!("{jobs} jobs per round, no-op handler, concurrency 3 per worker");
    for workers in [1, 3] {
        round(url, jobs, workers).await?;
    }
    drop(database);
    if let Some((pg, _dir)) = local {
        pg.stop().await;
    }
    Ok(())
}

async fn round(url: &str, jobs: u64, workers: usize) -> Result<(), Box<dyn Error>> {
    let schema = format!("bench{workers}");
    let pool = stowage_db::connect(url, 16)?;
    stowage_jobs::migrate(&pool, &schema).await?;
    let queue = Queue::new(pool, url, &schema, QueueConfig::default())?;

    let started = Instant::now();
    for i in 0..jobs {
        queue
            .enqueue(NewJob::new("noop", format!("job-{i}"), json!({ "i": i })))
            .await?;
    }
    let took = started.elapsed();
    println!(
        "  enqueue:                {jobs} in {:>6.2} s = {:>7.0} jobs/s",
        took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64()
    );

    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..workers {
        // Each worker has its own pool, as separate replicas would.
        let pool = stowage_db::connect(url, 8)?;
        let replica = Queue::new(pool, url, &schema, QueueConfig::default())?;
        let handler: Arc<dyn Handler> = handler_fn(|_job| async { Ok(()) });
        let handlers = HashMap::from([("noop".to_owned(), handler)]);
        handles.push(tokio::spawn(
            Worker::new(replica, handlers).run(shutdown.clone()),
        ));
    }
    loop {
        let (depth, _) = queue.depth().await?;
        if depth[&JobState::Succeeded] >= jobs {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    for handle in handles {
        handle.await?;
    }
    println!(
        "  complete, {workers} worker(s):    {jobs} in {:>6.2} s = {:>7.0} jobs/s",
        took.as_secs_f64(),
        jobs as f64 / took.as_secs_f64()
    );
    Ok(())
}
