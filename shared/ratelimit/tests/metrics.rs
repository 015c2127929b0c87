//! The metrics an operator watches: refused calls by class and subject, Redis errors, and the
//! degraded gauge. One test in its own binary, since it installs a process-wide recorder.

mod common;

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, Recorder, SharedString,
    Unit,
};
use stowage_local::LocalRedis;
use stowage_ratelimit::{Class, Decision, Limiter, Rule, Subject};

/// A counter or a gauge (as `f64` bits).
#[derive(Default)]
struct Value(AtomicU64);

impl CounterFn for Value {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

impl GaugeFn for Value {
    fn increment(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) + value);
    }

    fn decrement(&self, value: f64) {
        self.set(f64::from_bits(self.0.load(Ordering::Relaxed)) - value);
    }

    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// Keeps every counter and gauge by `name{label=value,...}`.
#[derive(Clone, Default)]
struct Memory(Arc<Mutex<BTreeMap<String, Arc<Value>>>>);

impl Memory {
    fn value(&self, key: &Key) -> Arc<Value> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        labels.sort();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        let mut values = self.0.lock().expect("metrics lock");
        values.entry(name).or_default().clone()
    }

    fn counter(&self, name: &str) -> u64 {
        let values = self.0.lock().expect("metrics lock");
        values
            .get(name)
            .map_or(0, |value| value.0.load(Ordering::Relaxed))
    }

    fn gauge(&self, name: &str) -> Option<f64> {
        let values = self.0.lock().expect("metrics lock");
        values
            .get(name)
            .map(|value| f64::from_bits(value.0.load(Ordering::Relaxed)))
    }
}

impl Recorder for Memory {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.value(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.value(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

#[tokio::test]
async fn refusals_errors_and_the_degraded_state_are_counted() {
    let memory = Memory::default();
    metrics::set_global_recorder(memory.clone()).expect("first recorder of this binary");
    let redis = LocalRedis::start().await.unwrap();
    let limiter = Limiter::with_prefix(
        common::client(&redis.url()).await,
        common::limits(Rule::new(0.01, 2), Rule::new(0.01, 3), true),
        common::prefix(),
    );
    assert_eq!(memory.gauge("stowage_rate_limiter_degraded{}"), Some(0.0));

    let alice = [Subject::User("alice".into())];
    for _ in 0..3 {
        limiter.check(Class::Upload, &alice).await;
    }
    // Two users behind one address: the third call finds the address's bucket empty.
    let address = Subject::Ip("192.0.2.1".parse().expect("ip address"));
    for user in ["bob", "carol"] {
        let subjects = [Subject::User(user.into()), address.clone()];
        for _ in 0..2 {
            limiter.check(Class::List, &subjects).await;
        }
    }
    assert_eq!(
        memory.counter("stowage_rate_limited_total{class=upload,subject=user}"),
        1
    );
    assert_eq!(
        memory.counter("stowage_rate_limited_total{class=list,subject=ip}"),
        1
    );
    assert_eq!(memory.counter("stowage_rate_limiter_errors_total{}"), 0);

    redis.stop().await;
    assert_eq!(
        limiter.check(Class::Upload, &alice).await,
        Decision::Allowed
    );

    assert_eq!(memory.counter("stowage_rate_limiter_errors_total{}"), 1);
    assert_eq!(memory.gauge("stowage_rate_limiter_degraded{}"), Some(1.0));
}
