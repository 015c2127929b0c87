//! The Ingest gRPC service. The one-shot `Upload` is implemented; resumable sessions and
//! event streams answer UNIMPLEMENTED until they land.

use stowage_proto::v1::{self as pb, ingest_server};
use stowage_runtime::identity;
use tonic::{Request, Response, Status, Streaming};

use crate::oneshot::Uploader;

/// The tonic service of Ingest.
#[derive(Clone)]
pub struct IngestGrpc {
    uploader: Uploader,
}

impl IngestGrpc {
    /// Serves uploads through `uploader`.
    pub fn new(uploader: Uploader) -> Self {
        Self { uploader }
    }

    /// The tonic server, with message limits.
    pub fn into_server(self, max_message: usize) -> ingest_server::IngestServer<Self> {
        ingest_server::IngestServer::new(self)
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message)
    }
}

#[tonic::async_trait]
impl ingest_server::Ingest for IngestGrpc {
    async fn upload(
        &self,
        request: Request<Streaming<pb::UploadRequest>>,
    ) -> Result<Response<pb::UploadResponse>, Status> {
        let caller = identity(&request)?;
        let stream = request.into_inner();
        let file = self.uploader.upload(&caller.user_id, stream).await?;
        Ok(Response::new(pb::UploadResponse { file: Some(file) }))
    }
}
