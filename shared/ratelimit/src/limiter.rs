//! The limiter: one Lua script per check, shared by every replica through Redis, and what a
//! check answers when Redis does not.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    sync::{
        Arc, LazyLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use fred::prelude::{Client, ClientLike, Error as RedisError, LuaInterface, Options};
use sha1::{Digest, Sha1};

use crate::{Class, Limits};

/// Prefix of every bucket key unless [`Limiter::with_prefix`] says otherwise.
pub const DEFAULT_KEY_PREFIX: &str = "stowage:rl";

const SCRIPT: &str = include_str!("gcra.lua");

/// SHA-1 of [`SCRIPT`], as `EVALSHA` wants it. Computed here rather than by `SCRIPT LOAD`: the
/// first `EVALSHA` on a Redis that lacks the script fails with NOSCRIPT, and the `EVAL` that
/// follows loads it, so a restarted Redis heals without a separate step.
static SCRIPT_SHA: LazyLock<String> = LazyLock::new(|| hex::encode(Sha1::digest(SCRIPT)));

/// While Redis fails, at most one check per this interval tries it again; the others follow
/// the fail-open / fail-closed policy at once.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Who a limit applies to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// An authenticated user (the token's `sub`).
    User(String),
    /// A client address. IPv6 addresses share one bucket per /64 network, since a single
    /// client usually holds a whole /64; IPv4-mapped IPv6 addresses count as IPv4.
    Ip(IpAddr),
}

impl Subject {
    /// `user` or `ip`, the `subject` label of the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Subject::User(_) => "user",
            Subject::Ip(_) => "ip",
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::User(user) => write!(f, "user {user}"),
            Subject::Ip(ip) => write!(f, "ip {}", IpBucket(*ip)),
        }
    }
}

/// How an IP address appears in a key: IPv4 as is, IPv6 as its /64 network.
struct IpBucket(IpAddr);

impl fmt::Display for IpBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.to_canonical() {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => {
                let [a, b, c, d, ..] = v6.segments();
                write!(f, "{}/64", Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
            }
        }
    }
}

/// The answer of a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The call may go on (also when Redis is down and the policy is fail-open).
    Allowed,
    /// A subject is over its limit; the call may be retried after `retry_after`.
    Limited {
        /// How long until the call would be allowed.
        retry_after: Duration,
    },
    /// Redis did not answer and the policy is fail-closed.
    Unavailable,
}

/// Why a check could not reach a verdict.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("unexpected reply from the rate-limit script: {0:?}")]
    Reply(Vec<i64>),
}

/// Checks calls against per-user and per-IP limits kept in Redis. Cheap to clone; clones share
/// the connection and the degraded state.
#[derive(Clone)]
pub struct Limiter {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    limits: Limits,
    prefix: String,
    health: Health,
}

/// Whether Redis failed last time, and when it may be tried again.
struct Health {
    degraded: AtomicBool,
    epoch: Instant,
    /// Milliseconds since `epoch` before which no check tries Redis while degraded.
    next_probe_ms: AtomicU64,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("limits", &self.inner.limits)
            .field("prefix", &self.inner.prefix)
            .field("degraded", &self.degraded())
            .finish_non_exhaustive()
    }
}

impl Limiter {
    /// A limiter that keeps its buckets in Redis through `client`, under
    /// [`DEFAULT_KEY_PREFIX`]. The client should reconnect on its own (as
    /// `stowage_runtime::redis::connect` sets it up); the limiter never waits for it.
    pub fn new(client: Client, limits: Limits) -> Self {
        Self::with_prefix(client, limits, DEFAULT_KEY_PREFIX)
    }

    /// Like [`Limiter::new`], with keys under `prefix` (a mesh's namespace's; tests use one
    /// each).
    pub fn with_prefix(client: Client, limits: Limits, prefix: impl Into<String>) -> Self {
        metrics::gauge!("stowage_rate_limiter_degraded").set(0.0);
        Self {
            inner: Arc::new(Inner {
                client,
                limits,
                prefix: prefix.into(),
                health: Health {
                    degraded: AtomicBool::new(false),
                    epoch: Instant::now(),
                    next_probe_ms: AtomicU64::new(0),
                },
            }),
        }
    }

    /// The settings this limiter applies.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Whether the last attempt to reach Redis failed: calls then pass (fail-open) or are
    /// refused (fail-closed) without being counted. For the health detail.
    pub fn degraded(&self) -> bool {
        self.inner.health.degraded.load(Ordering::Acquire)
    }

    /// The Redis key of `subject`'s bucket for `class`:
    /// `{prefix}:{{class}}:u:{user}` or `{prefix}:{{class}}:ip:{address}`.
    ///
    /// The braces around the class are a Redis Cluster hash tag: all buckets of one class live
    /// in one slot, so the script can check a user and an address in one atomic step there
    /// too.
    pub fn key(&self, class: Class, subject: &Subject) -> String {
        let prefix = &self.inner.prefix;
        match subject {
            Subject::User(user) => format!("{prefix}:{{{class}}}:u:{user}"),
            Subject::Ip(ip) => format!("{prefix}:{{{class}}}:ip:{}", IpBucket(*ip)),
        }
    }

    /// Takes one call of `class` from the bucket of every subject, only if all of them allow
    /// it. Never waits for Redis longer than the configured `redis_timeout`.
    pub async fn check(&self, class: Class, subjects: &[Subject]) -> Decision {
        let limits = &self.inner.limits;
        if !limits.enabled || subjects.is_empty() {
            return Decision::Allowed;
        }
        let health = &self.inner.health;
        if self.degraded() && !health.claim_probe() {
            return self.without_redis();
        }

        let mut keys = Vec::with_capacity(subjects.len());
        let mut kinds = Vec::with_capacity(subjects.len());
        let mut args = Vec::with_capacity(2 * subjects.len());
        for subject in subjects {
            let key = self.key(class, subject);
            // A subject named twice would be read twice before either write and so counted
            // once; dropping the repeat says the same thing plainly.
            if keys.contains(&key) {
                continue;
            }
            let rule = match subject {
                Subject::User(_) => limits.user.rule(class),
                Subject::Ip(_) => limits.ip.rule(class),
            };
            let interval = rule.interval_micros();
            args.push(interval.to_string());
            args.push(interval.saturating_mul(u64::from(rule.burst)).to_string());
            keys.push(key);
            kinds.push(subject);
        }

        let timeout = limits.redis_timeout;
        let verdict = match tokio::time::timeout(timeout, self.run_script(keys, args)).await {
            Ok(result) => result,
            Err(_) => Err(CheckError::Timeout(timeout)),
        };
        match verdict {
            Ok(None) => {
                self.redis_answered();
                Decision::Allowed
            }
            Ok(Some((retry_after, worst))) => {
                self.redis_answered();
                let subject = kinds.get(worst).copied();
                let kind = subject.map_or("user", Subject::kind);
                metrics::counter!(
                    "stowage_rate_limited_total",
                    "class" => class.as_str(),
                    "subject" => kind,
                )
                .increment(1);
                tracing::debug!(
                    class = class.as_str(),
                    subject = subject.map(tracing::field::display),
                    retry_after_ms = retry_after.as_millis() as u64,
                    "rate limited"
                );
                Decision::Limited { retry_after }
            }
            Err(error) => {
                self.redis_failed(&error);
                self.without_redis()
            }
        }
    }

    /// Runs the script: `None` when allowed, else how long to wait and the index (in `keys`)
    /// of the bucket that makes the call wait longest.
    async fn run_script(
        &self,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Option<(Duration, usize)>, CheckError> {
        let client = self.inner.client.with_options(&Options {
            timeout: Some(self.inner.limits.redis_timeout),
            // While disconnected, fail now instead of queueing until Redis is back: a check
            // that ran late would charge a call that was long answered.
            fail_fast: true,
            max_attempts: Some(1),
            ..Options::default()
        });
        let reply: Vec<i64> = match client
            .evalsha(SCRIPT_SHA.as_str(), keys.clone(), args.clone())
            .await
        {
            Err(error) if error.details().starts_with("NOSCRIPT") => {
                tracing::debug!("rate-limit script not cached by redis, sending it");
                client.eval(SCRIPT, keys, args).await?
            }
            result => result?,
        };
        match reply.as_slice() {
            [1, ..] => Ok(None),
            &[0, retry_after_ms, worst] if retry_after_ms > 0 && worst >= 1 => Ok(Some((
                Duration::from_millis(retry_after_ms.unsigned_abs()),
                (worst - 1) as usize,
            ))),
            _ => Err(CheckError::Reply(reply)),
        }
    }

    /// The decision when Redis cannot be asked.
    fn without_redis(&self) -> Decision {
        if self.inner.limits.fail_open {
            Decision::Allowed
        } else {
            Decision::Unavailable
        }
    }

    fn redis_answered(&self) {
        if self.inner.health.degraded.swap(false, Ordering::AcqRel) {
            metrics::gauge!("stowage_rate_limiter_degraded").set(0.0);
            tracing::info!("redis answers again, rate limits apply");
        }
    }

    fn redis_failed(&self, error: &CheckError) {
        let health = &self.inner.health;
        health.next_probe_ms.store(
            health.now_ms() + PROBE_INTERVAL.as_millis() as u64,
            Ordering::Release,
        );
        metrics::counter!("stowage_rate_limiter_errors_total").increment(1);
        let fail_open = self.inner.limits.fail_open;
        if health.degraded.swap(true, Ordering::AcqRel) {
            tracing::debug!(%error, "rate limiter still cannot reach redis");
        } else {
            metrics::gauge!("stowage_rate_limiter_degraded").set(1.0);
            if fail_open {
                tracing::warn!(%error, "rate limiter cannot reach redis, calls pass unlimited");
            } else {
                tracing::error!(%error, "rate limiter cannot reach redis, calls are refused");
            }
        }
    }
}

impl Health {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether this check is the one that tries Redis again now.
    fn claim_probe(&self) -> bool {
        let now = self.now_ms();
        let next = self.next_probe_ms.load(Ordering::Acquire);
        now >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    now + PROBE_INTERVAL.as_millis() as u64,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_share_a_bucket_per_64_and_mapped_ipv4_counts_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(IpBucket(a).to_string(), "2001:db8:1:2::/64");
        assert_eq!(IpBucket(a).to_string(), IpBucket(b).to_string());
        assert_ne!(IpBucket(a).to_string(), IpBucket(c).to_string());
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(IpBucket(mapped).to_string(), "10.0.0.7");
    }
}
