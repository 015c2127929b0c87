//! The process-wide Prometheus recorder behind every `metrics::counter!` / `histogram!` /
//! `gauge!` in Stowage, and its text rendering for `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Latency buckets in seconds: from a cached metadata read to a long upload chunk.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets of clean-up runs, which take from a moment to half an hour.
const LONG_RUN_BUCKETS: &[f64] = &[0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0];

/// Buckets of jobs: an image's Media job takes a second or less, a video's up to 5 min, a
/// Lifecycle run up to half an hour (the seconds buckets stop at a minute).
const JOB_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0,
];

/// Installs the recorder once per process; later calls return the same handle. `None` when
/// another recorder was installed first (then metrics go there).
pub fn install_recorder() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(SECONDS_BUCKETS)
                .ok()?
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "stowage_cleanup_run_seconds".into(),
                    ),
                    LONG_RUN_BUCKETS,
                )
                .ok()?
                .set_buckets_for_metric(
                    metrics_exporter_prometheus::Matcher::Full(
                        "stowage_job_duration_seconds".into(),
                    ),
                    JOB_BUCKETS,
                )
                .ok()?;
            match builder.install_recorder() {
                Ok(handle) => Some(handle),
                Err(error) => {
                    tracing::warn!(%error, "prometheus recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The current values in the Prometheus text format.
pub fn render_metrics() -> String {
    install_recorder()
        .map(PrometheusHandle::render)
        .unwrap_or_default()
}
