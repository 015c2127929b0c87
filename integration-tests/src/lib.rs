//! Helpers the integration tests share: upload, download and list as a client would.

use std::time::Duration;

use futures::StreamExt;
use rand::RngCore;
use sha2::{Digest, Sha256};
use stowage_proto::v1::{
    self as pb, files_client::FilesClient, ingest_client::IngestClient, quota_client::QuotaClient,
    upload_request::Part,
};
use stowage_testkit::authed;
use tonic::{Status, transport::Channel};

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut data = vec![0u8; n];
    rand::rng().fill_bytes(&mut data);
    data
}

/// Lowercase hex SHA-256.
pub fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Uploads `data` in 1 MiB messages with the one-shot `Upload` call.
pub async fn upload(
    channel: Channel,
    token: &str,
    name: &str,
    data: &[u8],
    tags: &[&str],
) -> Result<pb::File, Status> {
    upload_declaring(channel, token, name, data, data.len() as u64, tags).await
}

/// Like [`upload`], declaring `declared` bytes whatever `data` holds.
pub async fn upload_declaring(
    channel: Channel,
    token: &str,
    name: &str,
    data: &[u8],
    declared: u64,
    tags: &[&str],
) -> Result<pb::File, Status> {
    let header = pb::UploadRequest {
        part: Some(Part::Header(pb::UploadHeader {
            size_bytes: declared,
            metadata: Some(pb::UploadMetadata {
                display_name: name.to_owned(),
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })),
    };
    let chunks: Vec<pb::UploadRequest> = data
        .chunks(1 << 20)
        .map(|c| pb::UploadRequest {
            part: Some(Part::Data(c.to_vec())),
        })
        .collect();
    let stream = futures::stream::iter(std::iter::once(header).chain(chunks));
    let response = IngestClient::new(channel)
        .upload(authed(stream, token))
        .await?;
    response
        .into_inner()
        .file
        .ok_or_else(|| Status::internal("no file in response"))
}

/// Downloads a file (or a range of it) and returns the header and the bytes.
pub async fn download(
    channel: Channel,
    token: &str,
    file_id: &str,
    range: Option<pb::ByteRange>,
) -> Result<(pb::DownloadHeader, Vec<u8>), Status> {
    let mut stream = FilesClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .download(authed(
            pb::DownloadRequest {
                file_id: file_id.to_owned(),
                range,
                variant: String::new(),
            },
            token,
        ))
        .await?
        .into_inner();
    let first = stream
        .next()
        .await
        .ok_or_else(|| Status::internal("empty stream"))??;
    let header = first.header.ok_or_else(|| Status::internal("no header"))?;
    let mut data = Vec::new();
    while let Some(message) = stream.next().await {
        data.extend_from_slice(&message?.data);
    }
    Ok((header, data))
}

/// Files client with a default deadline.
pub fn files(channel: Channel) -> FilesClient<Channel> {
    FilesClient::new(channel)
}

/// Quota client.
pub fn quota(channel: Channel) -> QuotaClient<Channel> {
    QuotaClient::new(channel)
}

/// The caller's account.
pub async fn usage(channel: Channel, token: &str) -> Result<pb::Account, Status> {
    let response = QuotaClient::new(channel)
        .get_usage(authed(pb::GetUsageRequest::default(), token))
        .await?;
    response
        .into_inner()
        .account
        .ok_or_else(|| Status::internal("no account"))
}

/// Default wait for things that happen in the background.
pub const PATIENCE: Duration = Duration::from_secs(30);
