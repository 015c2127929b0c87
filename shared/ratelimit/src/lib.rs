//! Rate limits per user and per client address, kept in Redis so that every replica of every
//! service counts against the same buckets.
//!
//! - [`Limits`] is the configuration: one [`Rule`] (sustained rate and burst) per [`Class`] of
//!   call, for users and for addresses, plus what to do when Redis does not answer.
//! - [`Limiter::check`] runs one Lua script (GCRA on Redis's clock) that takes a call from the
//!   buckets of all its [`Subject`]s at once, or from none of them.
//! - [`RateLimitLayer`] puts the check in front of a tonic service or axum routes and answers
//!   RESOURCE_EXHAUSTED (gRPC) or 429 (HTTP) with `retry-after`.
//!
//! Redis holds only the buckets, which rebuild themselves: after a restart every subject starts
//! with a full burst. While Redis is down the limiter is *degraded*: calls pass (fail-open, the
//! default) or are refused with UNAVAILABLE (fail-closed), and one call a second tries Redis
//! again.
//!
//! Metrics (through the `metrics` facade; the process installs the recorder):
//! - `stowage_rate_limited_total{class, subject}`: calls refused, by class and by the subject
//!   (`user` or `ip`) whose bucket was empty;
//! - `stowage_rate_limiter_errors_total`: checks that could not reach Redis;
//! - `stowage_rate_limiter_degraded`: 1 while degraded, else 0.

mod class;
mod layer;
mod limiter;
mod limits;

pub use class::{Class, classify_grpc_path, classify_http};
pub use layer::{Classifier, RateLimitLayer, RateLimitService, client_ip};
pub use limiter::{DEFAULT_KEY_PREFIX, Decision, Limiter, Subject};
pub use limits::{ClassRules, Limits, LimitsError, Rule};
