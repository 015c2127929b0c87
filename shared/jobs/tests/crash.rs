//! A worker process killed with SIGKILL in the middle of a job: the job is taken again once
//! the claim lapses, and completes.
//!
//! The test re-runs its own binary as the worker process: the child test
//! `child_worker_until_killed` runs a worker only when `CHILD_DATABASE_ENV` names a database,
//! and returns at once otherwise (as it does in a normal test run).

// Helpers outside #[test] functions too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, process::Stdio, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};
use common::{client, eventually, queue_at, spawn_worker};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::json;
use stowage_jobs::{Handler, JobError, JobState, NewJob, QueueConfig, Worker, handler_fn};
use tokio_util::sync::CancellationToken;

const CHILD_DATABASE_ENV: &str = "STOWAGE_JOBS_CRASH_CHILD_DATABASE_URL";
const KIND: &str = "crashy";

/// The child's claims last 3 s; its handler would time out after 2.9 s, by which time the
/// parent has long killed it (the parent checks that the job is still running).
fn child_config() -> QueueConfig {
    QueueConfig {
        visibility_timeout: Duration::from_secs(3),
        job_timeout: Duration::from_millis(2900),
        idle_poll: Duration::from_millis(200),
        ..QueueConfig::default()
    }
}

async fn record_start(url: &str, job_id: uuid::Uuid, attempt: u32, worker: &str) {
    client(url)
        .await
        .execute(
            "INSERT INTO starts (job_id, attempt, worker) VALUES ($1, $2, $3)",
            &[&job_id, &i32::try_from(attempt).unwrap(), &worker],
        )
        .await
        .unwrap();
}

/// The worker process the crash test starts (this test binary again, running the same test
/// with the database named in its environment), until the test kills it.
async fn child_worker_until_killed(url: String) {
    let queue = queue_at(&url, child_config()).await;
    let handler_url = url.clone();
    let handler: Arc<dyn Handler> = handler_fn(move |job| {
        let url = handler_url.clone();
        async move {
            record_start(&url, job.id, job.attempts, "child").await;
            tokio::time::sleep(Duration::from_secs(600)).await;
            Err(JobError::retry("the child was meant to be killed"))
        }
    });
    let handlers = HashMap::from([(KIND.to_owned(), handler)]);
    Worker::new(queue, handlers)
        .run(CancellationToken::new())
        .await;
}

#[tokio::test]
async fn a_killed_workers_job_runs_again_after_the_visibility_timeout() {
    if let Ok(url) = std::env::var(CHILD_DATABASE_ENV) {
        return child_worker_until_killed(url).await;
    }
    let database = common::fresh_database().await;
    let url = database.url().to_owned();
    let parent_config = QueueConfig {
        visibility_timeout: Duration::from_secs(2),
        job_timeout: Duration::from_secs(1),
        idle_poll: Duration::from_millis(500),
        ..QueueConfig::default()
    };
    let queue = queue_at(&url, parent_config).await;
    let db = client(&url).await;
    db.batch_execute(
        "CREATE TABLE starts (
             job_id uuid NOT NULL, attempt integer NOT NULL, worker text NOT NULL,
             at timestamptz NOT NULL DEFAULT clock_timestamp())",
    )
    .await
    .unwrap();
    let id = queue
        .enqueue(NewJob::new(KIND, "crashy-1", json!({})))
        .await
        .unwrap()
        .id;

    let exe = std::env::current_exe().unwrap();
    let mut child = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "a_killed_workers_job_runs_again_after_the_visibility_timeout",
            "--nocapture",
        ])
        .env(CHILD_DATABASE_ENV, &url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let first_start: DateTime<Utc> = eventually(
        Duration::from_secs(60),
        "the child to start the job",
        || async {
            db.query_opt("SELECT at FROM starts WHERE attempt = 1", &[])
                .await
                .unwrap()
                .map(|row| row.get(0))
        },
    )
    .await;
    let pid = child.id().expect("the child runs");
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL).unwrap();
    let status = child.wait().await.unwrap();
    assert!(!status.success(), "the child was killed");

    // The child died holding the claim: the job is still running under it.
    let held = queue.get(id).await.unwrap();
    assert_eq!(held.state, JobState::Running);
    assert_eq!(held.attempts, 1);
    let lapses_at = held.locked_until.expect("a running job has a claim");
    assert!(held.locked_by.is_some());

    let handler_url = url.clone();
    let handler = handler_fn(move |job| {
        let url = handler_url.clone();
        async move {
            record_start(&url, job.id, job.attempts, "parent").await;
            Ok(())
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![(KIND, handler)]);
    eventually(Duration::from_secs(30), "the job to succeed", || async {
        (queue.get(id).await.unwrap().state == JobState::Succeeded).then_some(())
    })
    .await;
    shutdown.cancel();
    worker.await.unwrap();

    let job = queue.get(id).await.unwrap();
    assert_eq!(job.attempts, 2);
    let starts = db
        .query("SELECT attempt, worker, at FROM starts ORDER BY at", &[])
        .await
        .unwrap();
    let starts: Vec<(i32, String, DateTime<Utc>)> = starts
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!((starts[0].0, starts[0].1.as_str()), (1, "child"));
    assert_eq!((starts[1].0, starts[1].1.as_str()), (2, "parent"));
    assert!(
        starts[1].2 >= lapses_at,
        "taken again at {} before the claim lapsed at {lapses_at}",
        starts[1].2
    );
    let waited = starts[1].2 - first_start;
    println!("second attempt {waited} after the first");
    assert!(
        waited < chrono::Duration::seconds(15),
        "taken again late: {waited}"
    );
}

/// A worker told to stop lets its running job go on for `drain`, then hands it back: queued
/// again at once, the attempt not counted, so another worker runs it now rather than once the
/// claim (here 10 s) lapses.
#[tokio::test]
async fn a_stopping_worker_hands_back_the_jobs_still_running_after_its_drain() {
    let config = QueueConfig {
        drain: Duration::from_millis(500),
        ..common::fast_config()
    };
    let (queue, _database) = common::fresh_queue(config).await;
    let id = queue
        .enqueue(NewJob::new(KIND, "long", json!({})))
        .await
        .unwrap()
        .id;
    let started = Arc::new(tokio::sync::Notify::new());
    let long: Arc<dyn Handler> = handler_fn({
        let started = started.clone();
        move |_job| {
            let started = started.clone();
            async move {
                started.notify_one();
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            }
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![(KIND, long)]);
    tokio::time::timeout(Duration::from_secs(30), started.notified())
        .await
        .expect("the job starts");
    let stopping = std::time::Instant::now();
    shutdown.cancel();
    worker.await.unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "stopped after its drain"
    );
    let handed = queue.get(id).await.unwrap();
    assert_eq!(
        (handed.state, handed.attempts, handed.locked_by),
        (JobState::Queued, 0, None)
    );

    let quick: Arc<dyn Handler> = handler_fn(|_job| async { Ok(()) });
    let (shutdown, worker) = spawn_worker(&queue, vec![(KIND, quick)]);
    eventually(
        Duration::from_secs(5),
        "another worker to run it",
        || async { (queue.get(id).await.unwrap().state == JobState::Succeeded).then_some(()) },
    )
    .await;
    shutdown.cancel();
    worker.await.unwrap();
    assert_eq!(queue.get(id).await.unwrap().attempts, 1);
}
