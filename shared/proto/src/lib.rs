//! Generated protobuf and tonic code for the Stowage API (`proto/stowage/v1`).
//!
//! The code is built by `build.rs` with protox, so no system `protoc` is needed.

#![allow(clippy::all, missing_docs)]

/// Package `stowage.v1`.
pub mod v1 {
    tonic::include_proto!("stowage.v1");
}

/// Encoded `FileDescriptorSet` of every Stowage proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/stowage_descriptor.bin"));

/// Fully qualified gRPC service names, as used by health checks and reflection.
pub mod service_names {
    /// `stowage.v1.Ingest`.
    pub const INGEST: &str = "stowage.v1.Ingest";
    /// `stowage.v1.Files`.
    pub const FILES: &str = "stowage.v1.Files";
    /// `stowage.v1.Quota`.
    pub const QUOTA: &str = "stowage.v1.Quota";
    /// `stowage.v1.Media`.
    pub const MEDIA: &str = "stowage.v1.Media";
    /// `stowage.v1.Lifecycle`.
    pub const LIFECYCLE: &str = "stowage.v1.Lifecycle";
}
