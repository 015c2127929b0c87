//! Outbox-to-consumer latency: events staged one transaction each at a steady rate, relayed
//! to Redis Streams and applied by a consumer group; prints p50 / p99 / max of the time from
//! the commit request to the handler. Run by `scripts/bench events` (not a test).

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use stowage_events::{
    Consumer, ConsumerSettings, Event, EventHandler, HandlerError, Relay, RelaySettings,
};
use tokio_util::sync::CancellationToken;

struct Clock {
    staged: Mutex<Vec<Option<Instant>>>,
    seen: Mutex<Vec<Duration>>,
}

#[async_trait]
impl EventHandler for Clock {
    async fn handle(
        &self,
        event: &Event,
        _: &stowage_db::Transaction<'_>,
    ) -> Result<(), HandlerError> {
        let n: usize = event
            .key
            .parse()
            .map_err(|e| HandlerError(format!("{e}")))?;
        let staged = self
            .staged
            .lock()
            .ok()
            .and_then(|s| s.get(n).copied().flatten());
        if let (Some(at), Ok(mut seen)) = (staged, self.seen.lock()) {
            seen.push(at.elapsed());
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rate: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(500);
    let seconds: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10);
    let total = rate * seconds;
    let url = stowage_testkit::fresh_database().await?;
    let redis_url = stowage_testkit::servers().await.redis_url.clone();
    let pool = stowage_db::connect(&url, 8)?;
    stowage_events::migrate(&pool, "bench").await?;
    let redis = stowage_runtime::redis::connect(&redis_url).await?;
    let stop = CancellationToken::new();
    let relay = Relay::new(
        pool.clone(),
        &url,
        "bench",
        redis.clone(),
        RelaySettings::default(),
    )?;
    let relay_task = tokio::spawn(relay.run(stop.clone()));
    let clock = Arc::new(Clock {
        staged: Mutex::new(vec![None; total]),
        seen: Mutex::new(Vec::with_capacity(total)),
    });
    let topic = format!("bench.{}", uuid::Uuid::new_v4().simple());
    let consumer = Consumer::new(
        &redis,
        pool.clone(),
        "bench",
        "bench",
        &[topic.as_str()],
        Arc::clone(&clock) as Arc<dyn EventHandler>,
        ConsumerSettings::default(),
    );
    let consumer_task = tokio::spawn(consumer.run(stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut conn = pool.get().await?;
    for n in 0..total {
        tick.tick().await;
        let tx = conn.transaction().await?;
        stowage_events::stage(
            &tx,
            "bench",
            &topic,
            &n.to_string(),
            &serde_json::json!({ "n": n }),
        )
        .await?;
        // Stamped before the commit: once it returns, the consumer may already have run
        // (an event stamped after it would not be counted).
        if let Ok(mut staged) = clock.staged.lock()
            && let Some(slot) = staged.get_mut(n)
        {
            *slot = Some(Instant::now());
        }
        tx.commit().await?;
    }
    let produced_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while clock.seen.lock().map(|s| s.len()).unwrap_or(0) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let _ = tokio::join!(relay_task, consumer_task);
    let mut seen = clock.seen.lock().map(|s| s.clone()).unwrap_or_default();
    seen.sort();
    println!(
        "outbox -> consumer: {} of {total} events at {rate}/s (offered over {:.1} s); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        seen.len(),
        produced_in.as_secs_f64(),
        percentile(&seen, 0.50).as_secs_f64() * 1e3,
        percentile(&seen, 0.99).as_secs_f64() * 1e3,
        seen.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    Ok(())
}
