//! What every Stowage process reports about itself: logs that carry trace ids, OpenTelemetry
//! traces exported over OTLP (configured by the standard `OTEL_*` variables, off when none is
//! set), W3C trace context carried across gRPC calls, events and jobs, and Prometheus metrics.

mod init;
mod metrics_endpoint;
pub mod propagation;
pub mod rpc;

pub use init::{LogFormat, Telemetry, init};
pub use metrics_endpoint::{install_recorder, render_metrics};
pub use propagation::{
    current_traceparent, inject_headers, set_parent_from_headers, set_parent_from_traceparent,
};
pub use rpc::RpcTelemetryLayer;
