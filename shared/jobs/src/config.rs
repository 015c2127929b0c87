//! How a queue retries, how many jobs a worker runs and how long it waits.

use std::time::Duration;

use crate::Error;

/// Longest duration accepted for any setting: beyond it a typo is likelier than intent.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// Settings of a [`Queue`](crate::Queue) and of the workers that serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Delay before the first retry; the n-th retry waits `backoff_base * 2^(n-1)`.
    pub backoff_base: Duration,
    /// Longest delay between two attempts.
    pub backoff_cap: Duration,
    /// Jobs one worker runs at once.
    pub concurrency: usize,
    /// How long a claim lasts: a job whose worker died is taken again after this. Must be
    /// longer than `job_timeout`, so a live worker's job is never taken from it.
    pub visibility_timeout: Duration,
    /// How long a handler may run before its attempt counts as failed.
    pub job_timeout: Duration,
    /// Attempts of a job that does not say otherwise, after which it is dead.
    pub max_attempts: u32,
    /// Longest sleep of an idle worker between two looks at the table, in case a
    /// notification was lost.
    pub idle_poll: Duration,
    /// How long succeeded jobs are kept (for `ListJobs` and their keys, which refuse a second
    /// job while the first is kept) before the workers delete them.
    pub keep_succeeded: Duration,
    /// How long a stopping worker lets its running jobs go on. Those still running then are
    /// stopped and handed back: queued again at once for another worker, the attempt not
    /// counted. Shorter than the process's grace before it is killed, or a long job's claim
    /// outlives its worker and the job waits for the claim to lapse.
    pub drain: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(5 * 60),
            concurrency: 3,
            visibility_timeout: Duration::from_secs(10 * 60),
            job_timeout: Duration::from_secs(5 * 60),
            max_attempts: 5,
            idle_poll: Duration::from_secs(5),
            keep_succeeded: Duration::from_secs(7 * 24 * 3600),
            drain: Duration::from_secs(5 * 60),
        }
    }
}

impl QueueConfig {
    /// Checks the settings; the error names the first field at fault.
    pub fn validate(&self) -> Result<(), Error> {
        let positive = [
            ("backoff_base", self.backoff_base),
            ("backoff_cap", self.backoff_cap),
            ("visibility_timeout", self.visibility_timeout),
            ("job_timeout", self.job_timeout),
            ("idle_poll", self.idle_poll),
            ("keep_succeeded", self.keep_succeeded),
            ("drain", self.drain),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err(Error::invalid(field, "must be longer than zero"));
            }
            if value > MAX_DURATION {
                return Err(Error::invalid(
                    field,
                    format!("must be at most {MAX_DURATION:?}, is {value:?}"),
                ));
            }
        }
        if self.backoff_cap < self.backoff_base {
            return Err(Error::invalid(
                "backoff_cap",
                format!(
                    "must be at least backoff_base ({:?}), is {:?}",
                    self.backoff_base, self.backoff_cap
                ),
            ));
        }
        if self.job_timeout >= self.visibility_timeout {
            return Err(Error::invalid(
                "job_timeout",
                format!(
                    "must be shorter than visibility_timeout ({:?}), is {:?}",
                    self.visibility_timeout, self.job_timeout
                ),
            ));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            return Err(Error::invalid("concurrency", "must be between 1 and 1024"));
        }
        check_max_attempts("max_attempts", self.max_attempts)
    }

    /// Delay before the attempt that follows failed attempt number `attempts` (1-based):
    /// `min(cap, base * 2^(attempts-1))`, stretched by up to 10 % so that jobs that failed
    /// together do not all return together. Never shorter than the unjittered delay.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempts.saturating_sub(1));
        let delay = self
            .backoff_base
            .saturating_mul(factor)
            .min(self.backoff_cap);
        let stretch = 1.0 + rand::random_range(0.0..0.1);
        Duration::try_from_secs_f64(delay.as_secs_f64() * stretch)
            .unwrap_or(delay)
            .min(self.backoff_cap)
            .max(delay)
    }
}

/// Attempts are stored as `integer`.
pub(crate) fn check_max_attempts(field: &'static str, value: u32) -> Result<(), Error> {
    if value == 0 || i32::try_from(value).is_err() {
        return Err(Error::invalid(
            field,
            format!("must be between 1 and {}, is {value}", i32::MAX),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        QueueConfig::default().validate().unwrap();
    }

    #[test]
    fn job_timeout_must_be_shorter_than_visibility() {
        let config = QueueConfig {
            job_timeout: Duration::from_secs(60),
            visibility_timeout: Duration::from_secs(60),
            ..QueueConfig::default()
        };
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "job_timeout",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn zero_concurrency_and_attempts_are_refused() {
        let config = QueueConfig {
            concurrency: 0,
            ..QueueConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(Error::Invalid {
                field: "concurrency",
                ..
            })
        ));
        let config = QueueConfig {
            max_attempts: 0,
            ..QueueConfig::default()
        };
        assert!(matches!(
            config.validate(),
            Err(Error::Invalid {
                field: "max_attempts",
                ..
            })
        ));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = QueueConfig {
            backoff_base: Duration::from_secs(2),
            backoff_cap: Duration::from_secs(300),
            ..QueueConfig::default()
        };
        for (attempts, expected) in [(1, 2), (2, 4), (3, 8), (4, 16), (8, 256), (9, 300)] {
            let delay = config.backoff(attempts);
            let floor = Duration::from_secs(expected);
            assert!(delay >= floor, "attempt {attempts}: {delay:?} < {floor:?}");
            assert!(
                delay <= floor.mul_f64(1.1).min(config.backoff_cap),
                "attempt {attempts}: {delay:?} too long"
            );
        }
        assert_eq!(config.backoff(u32::MAX), Duration::from_secs(300));
    }
}
