//! Integration tests against real PostgreSQL, Redis and object stores: one test binary with a
//! module per area (one link, and one binary of ~110 MB on disk, where a binary per file made
//! 24 of them). Run one area with `cargo nextest run -p stowage-integration-tests sessions::`.

mod auth;
mod bad_input;
mod browser;
mod cli;
mod dev;
mod discovery;
mod events;
mod flow;
mod grpc_web;
mod lifecycle;
mod media;
mod media_scan;
mod metrics;
mod operations;
mod quota;
mod rate_limit;
mod redis_cluster;
mod replicas;
mod sessions;
mod shutdown;
mod signed_url;
mod streams;
mod tls;
mod tracing;
mod tus;
