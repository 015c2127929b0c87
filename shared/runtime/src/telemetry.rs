//! Logs, traces and metrics: see [`stowage_telemetry`].

pub use stowage_telemetry::*;
