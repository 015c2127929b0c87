//! The queue and its workers against a real PostgreSQL.

// Helpers outside #[test] functions too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use common::{SCHEMA, client, eventually, fast_config, fresh_queue, spawn_worker};
use serde_json::json;
use stowage_jobs::{Error, JobError, JobState, NewJob, Queue, QueueConfig, handler_fn};
use uuid::Uuid;

async fn state_of(queue: &Queue, id: Uuid) -> JobState {
    queue.get(id).await.expect("job exists").state
}

#[tokio::test]
async fn one_key_is_one_job() {
    let (queue, _database) = fresh_queue(fast_config()).await;
    let first = queue
        .enqueue(NewJob::new("thumbnail", "file-1", json!({"n": 1})))
        .await
        .unwrap();
    let second = queue
        .enqueue(NewJob::new("thumbnail", "file-1", json!({"n": 2})))
        .await
        .unwrap();
    assert!(first.created);
    assert!(!second.created);
    assert_eq!(first.id, second.id);
    // The first payload stands.
    assert_eq!(queue.get(first.id).await.unwrap().payload, json!({"n": 1}));

    // Concurrent enqueues of one key: one creates, all agree on the id.
    let racers: Vec<_> = (0..10)
        .map(|i| {
            let queue = queue.clone();
            tokio::spawn(async move {
                queue
                    .enqueue(NewJob::new("thumbnail", "file-2", json!({ "racer": i })))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut results = Vec::new();
    for racer in racers {
        results.push(racer.await.unwrap());
    }
    assert_eq!(results.iter().filter(|r| r.created).count(), 1);
    assert!(results.iter().all(|r| r.id == results[0].id));
    let (depth, _) = queue.depth().await.unwrap();
    assert_eq!(depth[&JobState::Queued], 2);
}

#[tokio::test]
async fn three_workers_run_each_of_200_jobs_exactly_once() {
    let (queue, database) = fresh_queue(fast_config()).await;
    let url = database.url();
    let runs: Arc<Mutex<HashMap<Uuid, u32>>> = Arc::default();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            queue
                .enqueue(NewJob::new("count", format!("job-{i}"), json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    let mut workers = Vec::new();
    let mut per_worker = Vec::new();
    for _ in 0..3 {
        // Each worker has its own pool, as separate replicas would.
        let replica = common::queue_at(url, fast_config()).await;
        let ran = Arc::new(AtomicU32::new(0));
        let (runs, ran_here) = (runs.clone(), ran.clone());
        let handler = handler_fn(move |job| {
            let (runs, ran_here) = (runs.clone(), ran_here.clone());
            async move {
                *runs.lock().unwrap().entry(job.id).or_default() += 1;
                ran_here.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
                Ok(())
            }
        });
        workers.push(spawn_worker(&replica, vec![("count", handler)]));
        per_worker.push(ran);
    }
    // The second half arrives while the workers run.
    for i in 100..200 {
        ids.push(
            queue
                .enqueue(NewJob::new("count", format!("job-{i}"), json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    eventually(Duration::from_secs(60), "200 jobs succeeded", || async {
        let (depth, _) = queue.depth().await.unwrap();
        (depth[&JobState::Succeeded] == 200).then_some(())
    })
    .await;
    for (shutdown, handle) in workers {
        shutdown.cancel();
        handle.await.unwrap();
    }

    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 200);
    for id in &ids {
        assert_eq!(
            runs.get(id),
            Some(&1),
            "job {id} ran {:?} times",
            runs.get(id)
        );
    }
    let page = queue.list(None, 1000, None).await.unwrap();
    assert!(
        page.jobs
            .iter()
            .all(|job| job.state == JobState::Succeeded && job.attempts == 1)
    );
    let busy = per_worker
        .iter()
        .filter(|ran| ran.load(Ordering::Relaxed) > 0)
        .count();
    assert!(busy >= 2, "only {busy} of 3 workers ran jobs");
}

#[tokio::test]
async fn a_failing_job_backs_off_exponentially_then_is_dead() {
    let base = Duration::from_millis(200);
    let config = QueueConfig {
        backoff_base: base,
        backoff_cap: Duration::from_secs(60),
        ..fast_config()
    };
    let (queue, _database) = fresh_queue(config).await;
    let started: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let times = started.clone();
    let handler = handler_fn(move |_job| {
        let times = times.clone();
        async move {
            let mut times = times.lock().unwrap();
            times.push(Instant::now());
            Err(JobError::retry(format!("boom {}", times.len())))
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![("flaky", handler)]);
    let id = queue
        .enqueue(NewJob {
            max_attempts: Some(4),
            ..NewJob::new("flaky", "flaky-1", json!({}))
        })
        .await
        .unwrap()
        .id;
    eventually(Duration::from_secs(30), "the job to be dead", || async {
        (state_of(&queue, id).await == JobState::Dead).then_some(())
    })
    .await;
    shutdown.cancel();
    worker.await.unwrap();

    let job = queue.get(id).await.unwrap();
    assert_eq!(job.attempts, 4);
    assert_eq!(job.last_error.as_deref(), Some("boom 4"));
    let times = started.lock().unwrap().clone();
    assert_eq!(times.len(), 4, "one run per attempt");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let backoff = base * 2u32.pow(i as u32);
        assert!(*gap >= backoff, "gap {i} is {gap:?}, backoff {backoff:?}");
    }
    assert!(gaps.windows(2).all(|w| w[1] > w[0]), "gaps grow: {gaps:?}");
}

#[tokio::test]
async fn a_permanent_error_is_dead_at_once_and_an_operator_can_requeue_it() {
    let (queue, _database) = fresh_queue(fast_config()).await;
    let runs = Arc::new(AtomicU32::new(0));
    let counter = runs.clone();
    let handler = handler_fn(move |job| {
        let counter = counter.clone();
        async move {
            // First run: hostile input. After the operator's requeue: fine.
            if counter.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(JobError::permanent("not an image: hostile file"));
            }
            assert_eq!(job.attempts, 1, "requeue resets attempts");
            Ok(())
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![("scan", handler)]);
    let id = queue
        .enqueue(NewJob::new("scan", "scan-1", json!({})))
        .await
        .unwrap()
        .id;
    eventually(Duration::from_secs(10), "the job to be dead", || async {
        (state_of(&queue, id).await == JobState::Dead).then_some(())
    })
    .await;
    let dead = queue.get(id).await.unwrap();
    assert_eq!(dead.attempts, 1);
    assert_eq!(
        dead.last_error.as_deref(),
        Some("not an image: hostile file")
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let requeued = queue.requeue(id).await.unwrap();
    assert_eq!(requeued.state, JobState::Queued);
    assert_eq!(requeued.attempts, 0);
    eventually(
        Duration::from_secs(10),
        "the requeued job to succeed",
        || async { (state_of(&queue, id).await == JobState::Succeeded).then_some(()) },
    )
    .await;
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!(queue.get(id).await.unwrap().last_error, None);
    shutdown.cancel();
    worker.await.unwrap();

    // A queued job has nothing to requeue; an unknown one is not found.
    let queued = queue
        .enqueue(NewJob::new("other", "other-1", json!({})))
        .await
        .unwrap();
    assert!(matches!(
        queue.requeue(queued.id).await,
        Err(Error::NotRequeueable {
            state: JobState::Queued,
            ..
        })
    ));
    assert!(matches!(
        queue.requeue_key("no-such-key").await,
        Err(Error::JobNotFound(_))
    ));
}

#[tokio::test]
async fn a_job_over_its_timeout_fails() {
    let config = QueueConfig {
        job_timeout: Duration::from_millis(300),
        visibility_timeout: Duration::from_secs(5),
        ..fast_config()
    };
    let (queue, _database) = fresh_queue(config).await;
    let handler = handler_fn(|_job| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok(())
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![("slow", handler)]);
    let id = queue
        .enqueue(NewJob {
            max_attempts: Some(1),
            ..NewJob::new("slow", "slow-1", json!({}))
        })
        .await
        .unwrap()
        .id;
    eventually(Duration::from_secs(10), "the job to be dead", || async {
        (state_of(&queue, id).await == JobState::Dead).then_some(())
    })
    .await;
    let job = queue.get(id).await.unwrap();
    assert!(
        job.last_error
            .as_deref()
            .unwrap_or("")
            .contains("timed out"),
        "{:?}",
        job.last_error
    );
    shutdown.cancel();
    worker.await.unwrap();
}

#[tokio::test]
async fn a_notification_wakes_an_idle_worker_even_after_its_connection_dropped() {
    let config = QueueConfig {
        idle_poll: Duration::from_secs(30),
        ..fast_config()
    };
    let (queue, database) = fresh_queue(config).await;
    let url = database.url();
    let (ran_tx, mut ran_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = handler_fn(move |job| {
        let ran_tx = ran_tx.clone();
        async move {
            let _ = ran_tx.send((job.key.clone(), Instant::now(), job.traceparent.clone()));
            Ok(())
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![("wake", handler)]);
    let admin = client(url).await;
    let listening = || async {
        let row = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database()
                   AND application_name = 'stowage-listener' AND query LIKE 'LISTEN%'",
                &[],
            )
            .await
            .unwrap();
        (row.get::<_, i64>(0) == 1).then_some(())
    };
    eventually(Duration::from_secs(10), "the worker to listen", listening).await;
    // Let the worker settle into its idle wait (30 s without a notification).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let enqueued_at = Instant::now();
    queue
        .enqueue(NewJob {
            traceparent: Some(traceparent.to_owned()),
            ..NewJob::new("wake", "wake-1", json!({}))
        })
        .await
        .unwrap();
    let (key, ran_at, seen_traceparent) =
        tokio::time::timeout(Duration::from_secs(5), ran_rx.recv())
            .await
            .expect("picked up within 5 s")
            .unwrap();
    assert_eq!(key, "wake-1");
    assert_eq!(seen_traceparent.as_deref(), Some(traceparent));
    println!("wake-up latency {:?}", ran_at - enqueued_at);

    // The listening connection dies; the worker reconnects and listens again.
    let terminated = admin
        .query_one(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database()
               AND application_name = 'stowage-listener') t",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(terminated, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    eventually(
        Duration::from_secs(10),
        "the worker to listen again",
        listening,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    queue
        .enqueue(NewJob::new("wake", "wake-2", json!({})))
        .await
        .unwrap();
    let (key, _, _) = tokio::time::timeout(Duration::from_secs(5), ran_rx.recv())
        .await
        .expect("picked up within 5 s after a reconnection")
        .unwrap();
    assert_eq!(key, "wake-2");
    shutdown.cancel();
    worker.await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_the_running_job_finish_and_claims_nothing_more() {
    let config = QueueConfig {
        concurrency: 1,
        ..fast_config()
    };
    let (queue, _database) = fresh_queue(config).await;
    let finished = Arc::new(AtomicBool::new(false));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let done = finished.clone();
    let handler = handler_fn(move |job| {
        let (done, started_tx) = (done.clone(), started_tx.clone());
        async move {
            let _ = started_tx.send(job.id);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            done.store(true, Ordering::SeqCst);
            Ok(())
        }
    });
    let first = queue
        .enqueue(NewJob::new("long", "long-1", json!({})))
        .await
        .unwrap()
        .id;
    let second = queue
        .enqueue(NewJob::new("long", "long-2", json!({})))
        .await
        .unwrap()
        .id;
    let (shutdown, worker) = spawn_worker(&queue, vec![("long", handler)]);
    let running = tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("a job starts")
        .unwrap();
    assert_eq!(running, first);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), worker)
        .await
        .expect("the worker returns")
        .unwrap();
    assert!(
        finished.load(Ordering::SeqCst),
        "returned before the job ended"
    );
    assert_eq!(state_of(&queue, first).await, JobState::Succeeded);
    let untouched = queue.get(second).await.unwrap();
    assert_eq!(untouched.state, JobState::Queued);
    assert_eq!(untouched.attempts, 0);
}

#[tokio::test]
async fn a_worker_whose_claim_was_taken_over_cannot_overwrite_the_newer_state() {
    let (queue, database) = fresh_queue(fast_config()).await;
    let url = database.url();
    let release = Arc::new(AtomicBool::new(false));
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let gate = release.clone();
    let handler = handler_fn(move |job| {
        let (gate, started_tx) = (gate.clone(), started_tx.clone());
        async move {
            let _ = started_tx.send(job.id);
            while !gate.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![("gated", handler)]);
    let id = queue
        .enqueue(NewJob::new("gated", "gated-1", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::timeout(Duration::from_secs(10), started_rx.recv())
        .await
        .expect("the job starts")
        .unwrap();
    // What another worker's claim does once this one's lapsed: a new token, a new attempt.
    let admin = client(url).await;
    admin
        .execute(
            &format!(
                "UPDATE {SCHEMA}.jobs SET claim = gen_random_uuid(), attempts = attempts + 1,
                     locked_by = 'other-worker' WHERE id = $1"
            ),
            &[&id],
        )
        .await
        .unwrap();
    release.store(true, Ordering::SeqCst);
    // Returning from run means the first worker has recorded (or discarded) its outcome.
    shutdown.cancel();
    worker.await.unwrap();
    let job = queue.get(id).await.unwrap();
    assert_eq!(
        job.state,
        JobState::Running,
        "the stale success was discarded"
    );
    assert_eq!(job.attempts, 2);
    assert_eq!(job.locked_by.as_deref(), Some("other-worker"));
}

#[tokio::test]
async fn jobs_list_newest_first_in_pages_and_enqueue_follows_the_callers_transaction() {
    let (queue, _database) = fresh_queue(fast_config()).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            queue
                .enqueue(NewJob::new("list", format!("list-{i}"), json!({ "i": i })))
                .await
                .unwrap()
                .id,
        );
    }

    // A rolled-back transaction leaves no job; a committed one does.
    let mut conn = queue.pool().get().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    queue
        .enqueue_in(&tx, NewJob::new("list", "in-tx-rolled-back", json!({})))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(matches!(
        queue.get_by_key("in-tx-rolled-back").await,
        Err(Error::JobNotFound(_))
    ));
    let tx = conn.transaction().await.unwrap();
    let committed = queue
        .enqueue_in(&tx, NewJob::new("list", "in-tx-committed", json!({})))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    ids.push(committed.id);
    assert_eq!(
        queue.get_by_key("in-tx-committed").await.unwrap().id,
        committed.id
    );

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = queue.list(None, 2, cursor).await.unwrap();
        assert!(page.jobs.len() <= 2);
        seen.extend(page.jobs.iter().map(|job| job.id));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let newest_first: Vec<Uuid> = ids.iter().rev().copied().collect();
    assert_eq!(seen, newest_first);
    let queued = queue.list(Some(JobState::Queued), 100, None).await.unwrap();
    assert_eq!(queued.jobs.len(), 6);
    assert!(
        queue
            .list(Some(JobState::Dead), 100, None)
            .await
            .unwrap()
            .jobs
            .is_empty()
    );

    let (depth, oldest) = queue.depth().await.unwrap();
    assert_eq!(depth[&JobState::Queued], 6);
    assert_eq!(depth.values().sum::<u64>(), 6);
    assert!(oldest < Duration::from_secs(60));
}

#[tokio::test]
async fn workers_delete_succeeded_jobs_kept_long_enough_and_nothing_else() {
    let config = QueueConfig {
        keep_succeeded: Duration::from_secs(1),
        ..fast_config()
    };
    let (queue, _database) = fresh_queue(config).await;
    let handler = handler_fn(|job| async move {
        match job.key.as_str() {
            "bad" => Err(JobError::permanent("hostile input")),
            _ => Ok(()),
        }
    });
    let (shutdown, worker) = spawn_worker(&queue, vec![("work", handler)]);
    let done = queue
        .enqueue(NewJob::new("work", "good", json!({})))
        .await
        .unwrap()
        .id;
    let dead = queue
        .enqueue(NewJob::new("work", "bad", json!({})))
        .await
        .unwrap()
        .id;
    eventually(
        Duration::from_secs(30),
        "the succeeded job to be deleted",
        || async { matches!(queue.get(done).await, Err(Error::JobNotFound(_))).then_some(()) },
    )
    .await;
    assert_eq!(state_of(&queue, dead).await, JobState::Dead);
    // Its key is free: the same key makes a new job.
    let again = queue
        .enqueue(NewJob::new("work", "good", json!({})))
        .await
        .unwrap()
        .id;
    assert_ne!(again, done);
    shutdown.cancel();
    worker.await.unwrap();
}
