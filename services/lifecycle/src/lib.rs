//! Lifecycle: its API is declared in `proto/stowage/v1/lifecycle.proto`; every RPC answers UNIMPLEMENTED
//! until the service lands (see the issue tracker), never a made-up answer.

use stowage_proto::v1::lifecycle_server;

/// The tonic service of Lifecycle.
#[derive(Clone, Copy, Debug, Default)]
pub struct LifecycleGrpc;

impl LifecycleGrpc {
    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> lifecycle_server::LifecycleServer<Self> {
        lifecycle_server::LifecycleServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

#[tonic::async_trait]
impl lifecycle_server::Lifecycle for LifecycleGrpc {}
