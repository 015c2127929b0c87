//! Repeatable schedules against a real PostgreSQL.

// Helpers outside #[test] functions too: a panic is how a test fails.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{SCHEMA, client, fast_config, fresh_queue, queue_at};
use serde_json::json;
use stowage_jobs::{Error, Queue, Schedule, Scheduler};
use tokio_util::sync::CancellationToken;

/// Runs one scheduler of `schedules` per queue for `how_long` once they are recorded (which
/// a loaded machine may take a while to do), then stops them all.
async fn run_schedulers(queues: &[Queue], schedules: &[Schedule], how_long: Duration) {
    let shutdown = CancellationToken::new();
    let handles: Vec<_> = queues
        .iter()
        .map(|queue| {
            let scheduler = Scheduler::new(queue.clone(), schedules.to_vec()).unwrap();
            tokio::spawn(scheduler.run(shutdown.clone()))
        })
        .collect();
    let names = |listed: Vec<stowage_jobs::ScheduleInfo>| listed.into_iter().map(|s| s.name);
    let recorded = common::eventually(Duration::from_secs(30), "schedules recorded", || async {
        let listed: Vec<String> = names(queues[0].list_schedules().await.ok()?).collect();
        schedules
            .iter()
            .all(|s| listed.contains(&s.name))
            .then_some(())
    });
    recorded.await;
    tokio::time::sleep(how_long).await;
    shutdown.cancel();
    for handle in handles {
        tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("the scheduler stops")
            .unwrap();
    }
}

/// Keys of the jobs of `kind`, oldest first.
async fn keys(url: &str, kind: &str) -> Vec<String> {
    client(url)
        .await
        .query(
            &format!("SELECT key FROM {SCHEMA}.jobs WHERE kind = $1 ORDER BY created_at, id"),
            &[&kind],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Marks every queued job succeeded, every 50 ms, until aborted: a worker that does nothing.
fn finish_jobs(url: &str) -> tokio::task::JoinHandle<()> {
    let url = url.to_owned();
    tokio::spawn(async move {
        let db = client(&url).await;
        loop {
            db.execute(
                &format!("UPDATE {SCHEMA}.jobs SET state = 'succeeded' WHERE state = 'queued'"),
                &[],
            )
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// While a tick's run is still to finish (here: queued, no worker), the next ticks pass
/// instead of piling up runs of the same work; once it is done, the next tick runs.
#[tokio::test]
async fn a_tick_passes_while_the_last_run_is_unfinished() {
    let (queue, database) = fresh_queue(fast_config()).await;
    let url = database.url();
    let schedules = [Schedule::new(
        "sweep",
        Duration::from_secs(1),
        "sweep",
        json!({}),
    )];
    run_schedulers(
        std::slice::from_ref(&queue),
        &schedules,
        Duration::from_millis(3200),
    )
    .await;
    assert_eq!(keys(url, "sweep").await.len(), 1, "one run, still queued");
    client(url)
        .await
        .execute(
            &format!("UPDATE {SCHEMA}.jobs SET state = 'succeeded'"),
            &[],
        )
        .await
        .unwrap();
    run_schedulers(
        std::slice::from_ref(&queue),
        &schedules,
        Duration::from_millis(1500),
    )
    .await;
    assert_eq!(
        keys(url, "sweep").await.len(),
        2,
        "the next tick after it ran"
    );
}

#[tokio::test]
async fn three_replicas_enqueue_one_job_per_tick() {
    let (first, database) = fresh_queue(fast_config()).await;
    let url = database.url();
    let queues = vec![
        first,
        queue_at(url, fast_config()).await,
        queue_at(url, fast_config()).await,
    ];
    let schedules = [Schedule::new(
        "heartbeat",
        Duration::from_secs(1),
        "beat",
        json!({}),
    )];
    // Each tick's job done at once, as a worker would (a tick passes while its last run is
    // still to finish: see below).
    let finisher = finish_jobs(url);
    let started = std::time::Instant::now();
    run_schedulers(&queues, &schedules, Duration::from_millis(5200)).await;
    let elapsed = started.elapsed().as_secs_f64();
    finisher.abort();

    let keys = keys(url, "beat").await;
    let ticks: Vec<i64> = keys
        .iter()
        .map(|key| {
            key.strip_prefix("heartbeat@")
                .and_then(|tick| tick.parse().ok())
                .unwrap_or_else(|| panic!("unexpected key {key}"))
        })
        .collect();
    println!("{} jobs in {elapsed:.1} s: {ticks:?}", ticks.len());
    assert!(
        (3..=6).contains(&ticks.len()),
        "{} jobs for {elapsed:.1} s of 1 s ticks",
        ticks.len()
    );
    assert!(ticks.len() as f64 <= elapsed.ceil() + 1.0);
    // No tick twice (keys are unique anyway): ticks strictly increase.
    assert!(ticks.windows(2).all(|w| w[1] > w[0]), "ticks {ticks:?}");
    let info = &queues[0].list_schedules().await.unwrap()[0];
    let last = info.last_run_at.expect("fired");
    assert_eq!(last.timestamp(), *ticks.last().unwrap());
    assert_eq!(info.next_run_at - last, chrono::Duration::seconds(1));
}

#[tokio::test]
async fn ticks_missed_during_downtime_run_once() {
    let (queue, database) = fresh_queue(fast_config()).await;
    let url = database.url();
    let hourly = [Schedule::new(
        "reconcile",
        Duration::from_secs(3600),
        "reconcile",
        json!({"scope": "all"}),
    )];
    // First start: the schedule is recorded, its first tick is the next full hour.
    run_schedulers(
        std::slice::from_ref(&queue),
        &hourly,
        Duration::from_millis(300),
    )
    .await;
    let next = queue.list_schedules().await.unwrap()[0].next_run_at;
    assert_eq!(next.timestamp() % 3600, 0);

    // Five hours of downtime (and no job from the first start, should it have met a tick).
    client(url)
        .await
        .batch_execute(&format!(
            "UPDATE {SCHEMA}.schedules SET next_run_at = now() - interval '5 hours';
             DELETE FROM {SCHEMA}.jobs"
        ))
        .await
        .unwrap();
    run_schedulers(
        std::slice::from_ref(&queue),
        &hourly,
        Duration::from_millis(1000),
    )
    .await;

    let keys = keys(url, "reconcile").await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let now = queue.now().await.unwrap();
    let latest_tick = now.timestamp() - now.timestamp() % 3600;
    assert_eq!(keys[0], format!("reconcile@{latest_tick}"));
    let job = queue.get_by_key(&keys[0]).await.unwrap();
    assert_eq!(job.payload, json!({"scope": "all"}));
    let info = &queue.list_schedules().await.unwrap()[0];
    assert_eq!(info.next_run_at.timestamp(), latest_tick + 3600);
}

#[tokio::test]
async fn operators_can_pause_retime_and_run_a_schedule_now() {
    let (queue, database) = fresh_queue(fast_config()).await;
    let url = database.url();
    let schedules = [
        Schedule::new("purge-trash", Duration::from_secs(3600), "purge", json!({})),
        Schedule::new("fast", Duration::from_secs(1), "fast", json!({})),
    ];
    run_schedulers(
        std::slice::from_ref(&queue),
        &schedules,
        Duration::from_millis(200),
    )
    .await;

    let listed = queue.list_schedules().await.unwrap();
    let names: Vec<&str> = listed.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["fast", "purge-trash"]);
    let purge = &listed[1];
    assert_eq!(purge.interval, Duration::from_secs(3600));
    assert!(purge.enabled);

    // An operator's interval wins, moves the next tick onto its grid, survives a restart.
    let retimed = queue
        .set_interval("purge-trash", Duration::from_secs(7200))
        .await
        .unwrap();
    assert_eq!(retimed.interval, Duration::from_secs(7200));
    assert_eq!(retimed.default_interval, Duration::from_secs(3600));
    assert_eq!(retimed.next_run_at.timestamp() % 7200, 0);
    assert!(retimed.next_run_at > queue.now().await.unwrap());

    // A disabled schedule does not fire, across a restart.
    let paused = queue.set_enabled("fast", false).await.unwrap();
    assert!(!paused.enabled);
    // The first run may have crossed a tick of "fast" before the pause.
    let fired_before_pause = keys(url, "fast").await;
    run_schedulers(
        std::slice::from_ref(&queue),
        &schedules,
        Duration::from_millis(2500),
    )
    .await;
    assert_eq!(keys(url, "fast").await, fired_before_pause);
    let after_restart = queue.list_schedules().await.unwrap();
    assert!(!after_restart[0].enabled);
    assert_eq!(after_restart[1].interval, Duration::from_secs(7200));
    let reset = queue.reset_interval("purge-trash").await.unwrap();
    assert_eq!(reset.interval, Duration::from_secs(3600));
    assert_eq!(reset.next_run_at.timestamp() % 3600, 0);
    let resumed = queue.set_enabled("fast", true).await.unwrap();
    let now: DateTime<Utc> = queue.now().await.unwrap();
    assert!(resumed.next_run_at > now, "missed ticks are not replayed");

    // Run now: one job per call, outside the ticks.
    let first = queue.run_now("purge-trash").await.unwrap();
    let second = queue.run_now("purge-trash").await.unwrap();
    assert!(first.created && second.created);
    assert_ne!(first.id, second.id);
    let keys = keys(url, "purge").await;
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.starts_with("purge-trash@manual-")));

    assert!(matches!(
        queue.run_now("no-such-schedule").await,
        Err(Error::ScheduleNotFound(_))
    ));
    assert!(matches!(
        queue.set_enabled("no-such-schedule", true).await,
        Err(Error::ScheduleNotFound(_))
    ));
    assert!(matches!(
        queue
            .set_interval("purge-trash", Duration::from_millis(10))
            .await,
        Err(Error::Invalid {
            field: "interval",
            ..
        })
    ));
    assert!(matches!(
        Scheduler::new(
            queue.clone(),
            vec![Schedule::new(
                "a@b",
                Duration::from_secs(60),
                "k",
                json!({})
            )]
        ),
        Err(Error::Invalid { field: "name", .. })
    ));
}
