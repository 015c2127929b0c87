//! Helpers the integration tests share: upload, download and list as a client would.

use std::time::Duration;

pub mod cpu;

use futures::StreamExt;
use rand::RngCore;
use sha2::{Digest, Sha256};
use stowage_proto::v1::{
    self as pb, files_client::FilesClient, ingest_client::IngestClient, quota_client::QuotaClient,
    upload_request::Part,
};
use stowage_testkit::{Mesh, authed};
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
    upload_with_key(channel, token, name, data, declared, tags, "").await
}

/// Like [`upload_declaring`], with an idempotency key (none when empty).
pub async fn upload_with_key(
    channel: Channel,
    token: &str,
    name: &str,
    data: &[u8],
    declared: u64,
    tags: &[&str],
    idempotency_key: &str,
) -> Result<pb::File, Status> {
    let header = pb::UploadRequest {
        part: Some(Part::Header(pb::UploadHeader {
            size_bytes: declared,
            metadata: Some(pb::UploadMetadata {
                display_name: name.to_owned(),
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                ..Default::default()
            }),
            idempotency_key: idempotency_key.to_owned(),
        })),
    };
    let chunks: Vec<pb::UploadRequest> = data
        .chunks(1 << 20)
        .map(|c| pb::UploadRequest {
            part: Some(Part::Data(bytes::Bytes::copy_from_slice(c))),
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
    download_request(
        channel,
        token,
        pb::DownloadRequest {
            file_id: file_id.to_owned(),
            range,
            variant: String::new(),
        },
    )
    .await
}

/// Downloads one variant (thumbnail, preview, poster) of a file.
pub async fn download_variant(
    channel: Channel,
    token: &str,
    file_id: &str,
    variant: &str,
) -> Result<(pb::DownloadHeader, Vec<u8>), Status> {
    download_request(
        channel,
        token,
        pb::DownloadRequest {
            file_id: file_id.to_owned(),
            range: None,
            variant: variant.to_owned(),
        },
    )
    .await
}

async fn download_request(
    channel: Channel,
    token: &str,
    request: pb::DownloadRequest,
) -> Result<(pb::DownloadHeader, Vec<u8>), Status> {
    let mut stream = FilesClient::new(channel)
        .max_decoding_message_size(16 << 20)
        .download(authed(request, token))
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

/// Reads `file_id` with `token` (an admin token sees quarantined files) until Media is done
/// with it (status no longer PROCESSING), for at most `patience`.
pub async fn wait_processed(
    channel: Channel,
    token: &str,
    file_id: &str,
    patience: Duration,
) -> Result<pb::File, Status> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let file = FilesClient::new(channel.clone())
            .get_file(authed(
                pb::GetFileRequest {
                    file_id: file_id.to_owned(),
                },
                token,
            ))
            .await?
            .into_inner()
            .file
            .ok_or_else(|| Status::internal("no file"))?;
        if file.status != pb::FileStatus::Processing as i32 {
            return Ok(file);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(Status::deadline_exceeded(format!(
                "{} ({file_id}) still processing after {patience:?}",
                file.display_name
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Files client with a default deadline.
pub fn files(channel: Channel) -> FilesClient<Channel> {
    FilesClient::new(channel)
}

/// Where file `id`'s original is stored, as Files tells a service (end users are not told).
pub async fn storage_key(channel: Channel, id: &str) -> Result<String, Status> {
    let file = files(channel)
        .get_file(authed(
            stowage_proto::v1::GetFileRequest { file_id: id.into() },
            &stowage_testkit::token("files", &["service"]),
        ))
        .await?
        .into_inner()
        .file
        .ok_or_else(|| Status::internal("no file"))?;
    Ok(file.storage_key)
}

/// Quota client.
pub fn quota(channel: Channel) -> QuotaClient<Channel> {
    QuotaClient::new(channel)
}

/// Moves file `id` to the trash as the holder of `token`.
pub async fn trash(channel: Channel, token: &str, id: &str) -> Result<(), Status> {
    files(channel)
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: id.to_owned(),
            },
            token,
        ))
        .await?;
    Ok(())
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

/// Waits until `count` statements whose text contains `text` wait for a lock in the database
/// of `pool` (a test holding a lock sees its victims queue up before letting go).
pub async fn lock_waiters(pool: &stowage_db::PgPool, text: &str, count: i64) -> anyhow::Result<()> {
    let pattern = format!("%{text}%");
    eventually(
        PATIENCE,
        &format!("{count} waiting on a lock: {text}"),
        || async {
            let waiting: i64 = pool
                .get()
                .await?
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'
                   AND query LIKE $1",
                    &[&pattern],
                )
                .await?
                .get(0);
            Ok(waiting >= count)
        },
    )
    .await
}

/// A user's history as `UserEvents` gives it to them, newest first: each event's name and
/// detail.
pub async fn user_history(
    channel: Channel,
    token: &str,
) -> anyhow::Result<Vec<(String, serde_json::Value)>> {
    let events = stowage_proto::v1::lifecycle_client::LifecycleClient::new(channel)
        .user_events(authed(
            stowage_proto::v1::UserEventsRequest::default(),
            token,
        ))
        .await?
        .into_inner()
        .events;
    Ok(events
        .into_iter()
        .map(|e| {
            let detail = serde_json::from_str(&e.detail_json).unwrap_or_default();
            (e.event, detail)
        })
        .collect())
}

/// Polls `check` every 100 ms until it holds; an error naming `what` after `patience`.
pub async fn eventually<F, Fut>(patience: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while !check().await? {
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!("{what}: not so after {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Turns every Lifecycle schedule off, as an operator can, once the scheduler has recorded
/// them, and waits until no scheduled job is left to run. Ticks fall on the wall clock's grid
/// (every minute for two of them), so a tick could otherwise run a job in the middle of a test
/// that counts what its own runs did.
pub async fn lifecycle_schedules_off(channel: Channel, database_url: &str) -> anyhow::Result<()> {
    let admin = stowage_testkit::token("root", &["admin"]);
    let client = stowage_proto::v1::lifecycle_client::LifecycleClient::new(channel);
    let list = || {
        let mut client = client.clone();
        let admin = admin.clone();
        async move {
            anyhow::Ok(
                client
                    .list_schedules(authed(pb::ListSchedulesRequest {}, &admin))
                    .await?
                    .into_inner()
                    .schedules,
            )
        }
    };
    eventually(
        Duration::from_secs(60),
        "Lifecycle's schedules recorded",
        || async { Ok(list().await?.len() == stowage_lifecycle::TASKS.len()) },
    )
    .await?;
    for schedule in list().await? {
        client
            .clone()
            .set_schedule(authed(
                pb::SetScheduleRequest {
                    name: schedule.name,
                    interval_seconds: 0,
                    enabled: Some(false),
                },
                &admin,
            ))
            .await?;
    }
    let pool = stowage_db::connect(database_url, 1)?;
    let conn = pool.get().await?;
    eventually(Duration::from_secs(60), "no scheduled Lifecycle job pending", || async {
        let pending: i64 = conn
            .query_one(
                "SELECT count(*) FROM lifecycle.jobs WHERE state IN ('queued', 'running', 'failed')",
                &[],
            )
            .await?
            .get(0);
        Ok(pending == 0)
    })
    .await
}

/// Topics Media announced for `file_id` (its outbox, published or not), once there are
/// `count` of them or [`PATIENCE`] has passed: Media announces an outcome after Files shows
/// it, so a test that saw the status waits here for the announcement.
pub async fn media_announced(
    pool: &stowage_db::PgPool,
    file_id: &str,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let topics: Vec<String> = pool
            .get()
            .await?
            .query(
                "SELECT topic FROM media.outbox WHERE key = $1 ORDER BY id",
                &[&file_id],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if topics.len() >= count || tokio::time::Instant::now() > deadline {
            return Ok(topics);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many of Media's jobs are running now.
pub async fn media_jobs_running(pool: &stowage_db::PgPool) -> anyhow::Result<i64> {
    Ok(pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM media.jobs WHERE state = 'running'",
            &[],
        )
        .await?
        .get(0))
}

/// Waits until none of Media's jobs is running: a job's state is recorded after its handler
/// returns, which is after Files shows the file's new status.
pub async fn media_jobs_settled(pool: &stowage_db::PgPool) -> anyhow::Result<()> {
    eventually(PATIENCE, "Media's jobs done running", || async {
        Ok(media_jobs_running(pool).await? == 0)
    })
    .await
}

/// The first page of `token`'s files (ListFiles with no filter).
pub async fn listed_files(channel: Channel, token: &str) -> Result<Vec<pb::File>, Status> {
    Ok(files(channel)
        .list_files(authed(pb::ListFilesRequest::default(), token))
        .await?
        .into_inner()
        .files)
}

/// Peak resident memory of this process so far (VmHWM), in bytes; 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Default wait for things that happen in the background.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Client of Ingest.
pub fn ingest(channel: Channel) -> stowage_proto::v1::ingest_client::IngestClient<Channel> {
    stowage_proto::v1::ingest_client::IngestClient::new(channel).max_encoding_message_size(64 << 20)
}

/// Opens a resumable session for `size` bytes.
pub async fn create_session(
    channel: Channel,
    token: &str,
    name: &str,
    size: Option<u64>,
    expected_sha256: &str,
) -> Result<pb::UploadSession, Status> {
    let response = ingest(channel)
        .create_upload(authed(
            pb::CreateUploadRequest {
                size_bytes: size,
                metadata: Some(pb::UploadMetadata {
                    display_name: name.to_owned(),
                    expected_sha256: expected_sha256.to_owned(),
                    ..Default::default()
                }),
                idempotency_key: String::new(),
                ..Default::default()
            },
            token,
        ))
        .await?;
    response
        .into_inner()
        .session
        .ok_or_else(|| Status::internal("no session"))
}

/// Writes one chunk with PutChunk.
pub async fn put_chunk(
    channel: Channel,
    token: &str,
    upload_id: &str,
    offset: u64,
    data: &[u8],
) -> Result<pb::UploadSession, Status> {
    let response = ingest(channel)
        .put_chunk(authed(
            pb::PutChunkRequest {
                upload_id: upload_id.to_owned(),
                chunk: Some(pb::Chunk {
                    offset,
                    data: bytes::Bytes::copy_from_slice(data),
                    sha256: String::new(),
                    size_bytes: None,
                }),
            },
            token,
        ))
        .await?;
    response
        .into_inner()
        .session
        .ok_or_else(|| Status::internal("no session"))
}

/// Writes chunks with one WriteChunks stream.
pub async fn write_chunks<D: Into<bytes::Bytes>>(
    channel: Channel,
    token: &str,
    upload_id: &str,
    chunks: Vec<(u64, D)>,
) -> Result<pb::UploadSession, Status> {
    let first = upload_id.to_owned();
    let messages: Vec<pb::WriteChunksRequest> = chunks
        .into_iter()
        .enumerate()
        .map(|(i, (offset, data))| pb::WriteChunksRequest {
            upload_id: if i == 0 { first.clone() } else { String::new() },
            chunk: Some(pb::Chunk {
                offset,
                data: data.into(),
                sha256: String::new(),
                size_bytes: None,
            }),
        })
        .collect();
    let response = ingest(channel)
        .write_chunks(authed(futures::stream::iter(messages), token))
        .await?;
    response
        .into_inner()
        .session
        .ok_or_else(|| Status::internal("no session"))
}

/// The session's state.
pub async fn get_session(
    channel: Channel,
    token: &str,
    upload_id: &str,
) -> Result<pb::UploadSession, Status> {
    let response = ingest(channel)
        .get_upload(authed(
            pb::GetUploadRequest {
                upload_id: upload_id.to_owned(),
            },
            token,
        ))
        .await?;
    response
        .into_inner()
        .session
        .ok_or_else(|| Status::internal("no session"))
}

/// Completes a session.
pub async fn complete(channel: Channel, token: &str, upload_id: &str) -> Result<pb::File, Status> {
    let response = ingest(channel)
        .complete_upload(authed(
            pb::CompleteUploadRequest {
                upload_id: upload_id.to_owned(),
            },
            token,
        ))
        .await?;
    response
        .into_inner()
        .file
        .ok_or_else(|| Status::internal("no file"))
}

/// The text a mesh serves at `/metrics`.
pub async fn scrape(mesh: &Mesh) -> anyhow::Result<String> {
    Ok(reqwest::get(format!("http://{}/metrics", mesh.addr))
        .await?
        .text()
        .await?)
}

/// The value of the first sample in `text` whose line starts with `name` and contains every
/// label.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A WebP variant of `size` bytes of `fill`, kept inline.
pub fn inline_variant(name: &str, size: usize, fill: u8) -> pb::Variant {
    pb::Variant {
        name: name.to_owned(),
        mime_type: "image/webp".into(),
        size_bytes: size as u64,
        width: 1,
        height: 1,
        inline_data: vec![fill; size],
        ..Default::default()
    }
}

/// SetVariants of `file_id` with `variants`, as the service `token` sends it.
pub fn set_variants(
    file_id: &str,
    variants: Vec<pb::Variant>,
    token: &str,
) -> tonic::Request<pb::SetVariantsRequest> {
    authed(
        pb::SetVariantsRequest {
            file_id: file_id.to_owned(),
            variants,
            ..Default::default()
        },
        token,
    )
}

/// The node scripts the tests drive (integration-tests/js, with its node_modules).
pub fn js_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("js")
}

/// Runs `node {script} {args}` in [`js_dir`] with `env` set, killed after `bound`; its
/// output, once it succeeded (else an error with what it wrote to stderr).
pub async fn node(
    script: &str,
    args: &[&std::ffi::OsStr],
    env: &[(&str, &str)],
    bound: Duration,
) -> anyhow::Result<String> {
    let run = tokio::process::Command::new("node")
        .arg(js_dir().join(script))
        .args(args)
        .envs(env.iter().copied())
        .current_dir(js_dir())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(bound, run)
        .await
        .map_err(|_| anyhow::anyhow!("node {script} still running after {bound:?}"))??;
    anyhow::ensure!(
        out.status.success(),
        "node {script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
