//! Configuration: one rule per class for users and one for IP addresses, and what to do when
//! Redis does not answer.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Class;

/// A sustained rate with a burst on top.
///
/// An idle subject may make `burst` calls at once; after that, one call per `1 / per_second`
/// seconds.
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Calls per second allowed in the long run.
    pub per_second: f64,
    /// Calls allowed at once by a subject that has been idle.
    pub burst: u32,
}

impl Rule {
    /// A rule of `per_second` calls per second with a burst of `burst`.
    pub const fn new(per_second: f64, burst: u32) -> Self {
        Self { per_second, burst }
    }

    /// Microseconds between two calls at the sustained rate (at least 1).
    pub(crate) fn interval_micros(&self) -> u64 {
        // A float-to-int `as` saturates, so absurd rates cannot wrap around.
        ((1_000_000.0 / self.per_second).round() as u64).max(1)
    }

    fn scaled(self, factor: u32) -> Self {
        Self::new(
            self.per_second * f64::from(factor),
            self.burst.saturating_mul(factor),
        )
    }
}

/// One [`Rule`] per [`Class`].
#[derive(Clone, Copy, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRules {
    /// [`Class::Upload`].
    pub upload: Rule,
    /// [`Class::Download`].
    pub download: Rule,
    /// [`Class::List`].
    pub list: Rule,
    /// [`Class::Admin`].
    pub admin: Rule,
    /// [`Class::Other`].
    pub other: Rule,
}

impl ClassRules {
    /// The rule of `class`.
    pub fn rule(&self, class: Class) -> Rule {
        match class {
            Class::Upload => self.upload,
            Class::Download => self.download,
            Class::List => self.list,
            Class::Admin => self.admin,
            Class::Other => self.other,
        }
    }

    /// Per-user defaults: generous enough that a normal client, even a browser uploading in
    /// parallel chunks, never meets them.
    pub fn user_defaults() -> Self {
        Self {
            upload: Rule::new(50.0, 100),
            download: Rule::new(200.0, 400),
            list: Rule::new(50.0, 100),
            admin: Rule::new(20.0, 40),
            other: Rule::new(200.0, 400),
        }
    }

    /// Per-IP defaults: four times the per-user ones, since several users may share an address
    /// (an office behind NAT).
    pub fn ip_defaults() -> Self {
        let user = Self::user_defaults();
        Self {
            upload: user.upload.scaled(4),
            download: user.download.scaled(4),
            list: user.list.scaled(4),
            admin: user.admin.scaled(4),
            other: user.other.scaled(4),
        }
    }
}

/// Rate-limit settings, meant to be nested in the process configuration as `rate_limit`
/// (`STOWAGE_RATE_LIMIT__*`, e.g. `STOWAGE_RATE_LIMIT__USER__UPLOAD__BURST=20`).
///
/// Missing fields take their defaults. A rule given in part (only `burst`) is completed from
/// the defaults when the configuration is layered over `Limits::default()` (as figment does);
/// deserialized on its own, it must be given whole.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// `STOWAGE_RATE_LIMIT__ENABLED`: whether calls are limited at all (default true).
    pub enabled: bool,
    /// `STOWAGE_RATE_LIMIT__FAIL_OPEN`: when Redis does not answer, let calls through (true,
    /// the default) or refuse them with UNAVAILABLE (false).
    pub fail_open: bool,
    /// `STOWAGE_RATE_LIMIT__REDIS_TIMEOUT`: longest a check waits for Redis (default 100 ms).
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    /// `STOWAGE_RATE_LIMIT__TRUSTED_PROXIES`: how many reverse proxies that append to
    /// `X-Forwarded-For` stand in front of the service (default 0: the peer address is the
    /// client). See [`crate::client_ip`].
    pub trusted_proxies: usize,
    /// `STOWAGE_RATE_LIMIT__USER__*`: rules per authenticated user.
    pub user: ClassRules,
    /// `STOWAGE_RATE_LIMIT__IP__*`: rules per client address.
    pub ip: ClassRules,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            enabled: true,
            fail_open: true,
            redis_timeout: Duration::from_millis(100),
            trusted_proxies: 0,
            user: ClassRules::user_defaults(),
            ip: ClassRules::ip_defaults(),
        }
    }
}

/// A setting that parses but makes no sense, naming its variable.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {reason}")]
pub struct LimitsError {
    /// The environment variable at fault.
    pub variable: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl Limits {
    /// Checks the values, naming the variable of the first one at fault.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let fail = |variable: String, reason| Err(LimitsError { variable, reason });
        if self.redis_timeout.is_zero() {
            return fail(
                "STOWAGE_RATE_LIMIT__REDIS_TIMEOUT".into(),
                "must be above zero",
            );
        }
        for (who, rules) in [("USER", &self.user), ("IP", &self.ip)] {
            for class in Class::ALL {
                let rule = rules.rule(class);
                let name = class.as_str().to_ascii_uppercase();
                if !(rule.per_second.is_finite() && rule.per_second > 0.0) {
                    return fail(
                        format!("STOWAGE_RATE_LIMIT__{who}__{name}__PER_SECOND"),
                        "must be a number above zero",
                    );
                }
                if rule.burst == 0 {
                    return fail(
                        format!("STOWAGE_RATE_LIMIT__{who}__{name}__BURST"),
                        "must be at least 1",
                    );
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use figment::{
        Figment,
        providers::{Format, Serialized, Toml},
    };

    use super::*;

    #[test]
    fn defaults_are_valid_and_ip_rules_are_four_times_user_rules() {
        let limits = Limits::default();
        limits.validate().unwrap();
        assert_eq!(limits.user.upload, Rule::new(50.0, 100));
        assert_eq!(limits.ip.upload, Rule::new(200.0, 400));
        assert_eq!(limits.ip.admin, Rule::new(80.0, 160));
    }

    #[test]
    fn a_partial_override_keeps_the_other_defaults() {
        let limits: Limits = Figment::from(Serialized::defaults(Limits::default()))
            .merge(Toml::string(
                "fail_open = false\nredis_timeout = \"250ms\"\n[user.upload]\nburst = 7\n",
            ))
            .extract()
            .unwrap();
        assert!(!limits.fail_open);
        assert_eq!(limits.redis_timeout, Duration::from_millis(250));
        assert_eq!(limits.user.upload, Rule::new(50.0, 7));
        assert_eq!(limits.ip.upload, ClassRules::ip_defaults().upload);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let result: Result<Limits, _> = Figment::from(Serialized::defaults(Limits::default()))
            .merge(Toml::string("[user.uploads]\nburst = 7\n"))
            .extract();
        assert!(result.is_err());
    }

    #[test]
    fn validation_names_the_variable() {
        let mut limits = Limits::default();
        limits.ip.list.burst = 0;
        let error = limits.validate().unwrap_err();
        assert_eq!(error.variable, "STOWAGE_RATE_LIMIT__IP__LIST__BURST");
        limits.ip.list.burst = 1;
        limits.user.admin.per_second = f64::NAN;
        let error = limits.validate().unwrap_err();
        assert_eq!(
            error.variable,
            "STOWAGE_RATE_LIMIT__USER__ADMIN__PER_SECOND"
        );
    }

    #[test]
    fn interval_is_whole_microseconds_and_never_zero() {
        assert_eq!(Rule::new(1.0, 1).interval_micros(), 1_000_000);
        assert_eq!(Rule::new(3.0, 1).interval_micros(), 333_333);
        assert_eq!(Rule::new(1e9, 1).interval_micros(), 1);
    }
}
