//! Installs the global subscriber: filtered logs to stderr and, when an OTLP endpoint is
//! configured, an OpenTelemetry layer that turns spans into exported traces.

use std::sync::OnceLock;

use opentelemetry::{global, trace::TracerProvider as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use serde::{Deserialize, Serialize};
use tracing::Level;
use tracing_subscriber::{EnvFilter, Layer, filter::Targets, fmt, prelude::*};

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (for log collectors), with the current span's fields.
    Json,
}

/// The tracer provider of this process, kept so spans still buffered can be flushed at exit.
static PROVIDER: OnceLock<Option<SdkTracerProvider>> = OnceLock::new();

/// Handle on the process's telemetry; [`Telemetry::shutdown`] flushes buffered spans.
#[derive(Debug, Clone, Copy)]
pub struct Telemetry {
    /// Whether spans are exported over OTLP.
    pub exporting: bool,
}

impl Telemetry {
    /// Flushes and stops the span exporter. Call once, as the process ends.
    pub fn shutdown(self) {
        if let Some(Some(provider)) = PROVIDER.get()
            && let Err(error) = provider.shutdown()
        {
            tracing::warn!(%error, "span exporter did not shut down cleanly");
        }
    }
}

/// Whether the standard variables ask for an OTLP trace exporter.
fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
    let exporter_none = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v == "none");
    !disabled
        && !exporter_none
        && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

fn tracer_provider(service_name: &str) -> Option<SdkTracerProvider> {
    if !otlp_configured() {
        return None;
    }
    // The exporter reads OTEL_EXPORTER_OTLP_* itself; the batch processor reads OTEL_BSP_*.
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            eprintln!("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the span exporter: {error}");
            return None;
        }
    };
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service_name.to_owned());
    Some(
        SdkTracerProvider::builder()
            .with_resource(Resource::builder().with_service_name(name).build())
            .with_batch_exporter(exporter)
            .build(),
    )
}

/// Installs logs (filtered by `RUST_LOG`), the W3C trace-context propagator and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, span export over OTLP/gRPC
/// under `service_name` (unless `OTEL_SERVICE_NAME` says otherwise).
///
/// Must run inside a Tokio runtime (the exporter's gRPC client needs one). The first call
/// wins; later calls (several services in one test process) change nothing.
pub fn init(service_name: &str, format: LogFormat) -> Telemetry {
    let provider = PROVIDER.get_or_init(|| {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let provider = tracer_provider(service_name);
        // `RUST_LOG` filters logs only: a quiet log must not switch traces off.
        let filter = EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn"));
        let otel = provider.as_ref().map(|p| {
            global::set_tracer_provider(p.clone());
            tracing_opentelemetry::layer()
                .with_tracer(p.tracer("stowage"))
                .with_filter(
                    Targets::new()
                        .with_default(Level::INFO)
                        .with_target("h2", Level::WARN)
                        .with_target("hyper", Level::WARN)
                        .with_target("tower", Level::WARN),
                )
                .boxed()
        });
        let logs = match format {
            LogFormat::Text => fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
            LogFormat::Json => fmt::layer()
                .json()
                .with_current_span(true)
                .with_writer(std::io::stderr)
                .with_filter(filter)
                .boxed(),
        };
        // Already initialised elsewhere in this process (tests): keep the first subscriber.
        let _ = tracing_subscriber::registry()
            .with(otel)
            .with(logs)
            .try_init();
        provider
    });
    Telemetry {
        exporting: provider.is_some(),
    }
}
