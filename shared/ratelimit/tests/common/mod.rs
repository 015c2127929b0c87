//! Redis for the tests: `STOWAGE_TEST_REDIS_URL` when set, else a throwaway `redis-server`.

#![allow(dead_code)] // Each test binary uses its own part of this module.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use fred::prelude::{Builder, Client, ClientLike, Config, ReconnectPolicy};
use stowage_local::LocalRedis;
use stowage_ratelimit::{ClassRules, Limits, Rule};

/// A Redis to test against; a local server lives as long as this value.
pub struct TestRedis {
    pub url: String,
    _local: Option<LocalRedis>,
}

/// The shared Redis of `STOWAGE_TEST_REDIS_URL`, or a fresh local one.
pub async fn redis() -> TestRedis {
    match std::env::var("STOWAGE_TEST_REDIS_URL") {
        Ok(url) if !url.is_empty() => TestRedis { url, _local: None },
        _ => {
            let local = LocalRedis::start().await.expect("start redis-server");
            TestRedis {
                url: local.url(),
                _local: Some(local),
            }
        }
    }
}

/// A client of its own (one per simulated replica) that reconnects every 100 ms.
pub async fn client(url: &str) -> Client {
    let client = Builder::from_config(Config::from_url(url).expect("redis url"))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
        })
        .set_policy(ReconnectPolicy::new_constant(0, 100))
        .build()
        .expect("redis client");
    client.init().await.expect("connect to redis");
    client
}

/// A key prefix no other test (or run) uses.
pub fn prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "stowage:rl:test:{}:{nanos}:{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The same rule for every class.
pub fn every_class(rule: Rule) -> ClassRules {
    ClassRules {
        upload: rule,
        download: rule,
        list: rule,
        admin: rule,
        other: rule,
    }
}

/// Limits with `user` and `ip` for every class, failing open or closed.
pub fn limits(user: Rule, ip: Rule, fail_open: bool) -> Limits {
    Limits {
        fail_open,
        user: every_class(user),
        ip: every_class(ip),
        ..Limits::default()
    }
}
