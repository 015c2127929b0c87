//! Media: its API is declared in `proto/stowage/v1/media.proto`; every RPC answers UNIMPLEMENTED
//! until the service lands (see the issue tracker), never a made-up answer.

pub mod imaging;

use stowage_proto::v1::media_server;

/// The tonic service of Media.
#[derive(Clone, Copy, Debug, Default)]
pub struct MediaGrpc;

impl MediaGrpc {
    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> media_server::MediaServer<Self> {
        media_server::MediaServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

#[tonic::async_trait]
impl media_server::Media for MediaGrpc {}
