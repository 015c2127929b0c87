//! SIGTERM during an upload: the client gets an error and nothing stays charged or stored.

use std::time::Duration;

use nix::sys::signal::Signal;
use stowage::Role;
use stowage_integration_tests::{PATIENCE, download, random_bytes, sha256, usage};
use stowage_proto::v1::{self as pb, ingest_client::IngestClient, upload_request::Part};
use stowage_testkit::{Processes, Setup, authed, channel, token};

type Answer = tokio::task::JoinHandle<Result<tonic::Response<pb::UploadResponse>, tonic::Status>>;

/// Starts a one-shot upload of `size` bytes named `name` and sends its header: the test sends
/// the data through the sender ([`data_message`]) and reads the server's answer from the handle.
async fn open_upload(
    addr: std::net::SocketAddr,
    token: &str,
    name: &str,
    size: u64,
) -> anyhow::Result<(tokio::sync::mpsc::Sender<pb::UploadRequest>, Answer)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadRequest>(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let token = token.to_owned();
    let upload = tokio::spawn(async move {
        IngestClient::new(channel(addr))
            .upload(authed(stream, &token))
            .await
    });
    tx.send(pb::UploadRequest {
        part: Some(Part::Header(pb::UploadHeader {
            size_bytes: size,
            metadata: Some(pb::UploadMetadata {
                display_name: name.into(),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })),
    })
    .await?;
    Ok((tx, upload))
}

/// A data message carrying `chunk`.
fn data_message(chunk: &[u8]) -> pb::UploadRequest {
    pb::UploadRequest {
        part: Some(Part::Data(chunk.to_vec().into())),
    }
}

/// A setup whose Ingest takes an upload idle for `ttl` for abandoned, sweeping every `interval`.
async fn sweeping(ttl: &str, interval: &str) -> anyhow::Result<Setup> {
    let mut setup = Setup::new().await?;
    setup.env.extend([
        ("STOWAGE_INGEST__SESSION_TTL".into(), ttl.into()),
        ("STOWAGE_INGEST__SWEEP_INTERVAL".into(), interval.into()),
    ]);
    Ok(setup)
}

#[tokio::test]
async fn sigterm_mid_upload_fails_the_client_and_leaves_nothing() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mut processes = Processes::all(&setup).await?;
    let addr = processes.addr(Role::Ingest);
    let alice = token("alice", &[]);
    let data = random_bytes(64 << 20);

    // A slow client: one 1 MiB message every 20 ms.
    let (tx, upload) = open_upload(addr, &alice, "big.bin", data.len() as u64).await?;
    let feeder = tokio::spawn(async move {
        for chunk in data.chunks(1 << 20) {
            if tx.send(data_message(chunk)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    // Let about 16 MiB go through, then ask the server to stop.
    tokio::time::sleep(Duration::from_millis(400)).await;
    processes.process(Role::Ingest).signal(Signal::SIGTERM)?;
    let result = tokio::time::timeout(Duration::from_secs(30), upload).await??;
    let status = result.expect_err("the upload must fail");
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
        ),
        "got {status:?}"
    );
    feeder.abort();
    assert!(
        processes
            .process_mut(Role::Ingest)
            .wait(Duration::from_secs(20))
            .await?,
        "clean exit code"
    );

    // Restart on the same data and look.
    let processes = Processes::all(&setup).await?;
    let account = usage(channel(processes.addr(Role::Quota)), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (0, 0),
        "nothing charged or held"
    );
    let listed = stowage_integration_tests::files(channel(processes.addr(Role::Files)))
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert!(listed.files.is_empty());
    assert!(
        setup.stored_objects("users").is_empty(),
        "no blob: {:?}",
        setup.stored_objects("users")
    );
    Ok(())
}

#[tokio::test]
async fn sigkill_mid_upload_is_cleaned_up_by_the_sweeper() -> anyhow::Result<()> {
    let setup = sweeping("1s", "300ms").await?;
    let processes = Processes::all(&setup).await?;
    let addr = processes.addr(Role::Ingest);
    let alice = token("alice", &[]);
    let data = random_bytes(64 << 20);

    let (tx, upload) = open_upload(addr, &alice, "big.bin", data.len() as u64).await?;
    for chunk in data.chunks(1 << 20).take(20) {
        tx.send(data_message(chunk)).await?;
    }
    let quota = channel(processes.addr(Role::Quota));
    stowage_integration_tests::eventually(PATIENCE, "the upload holds its quota", || async {
        Ok(usage(quota.clone(), &alice).await?.reserved_bytes == 64 << 20)
    })
    .await?;
    processes.process(Role::Ingest).signal(Signal::SIGKILL)?;
    assert!(upload.await?.is_err());
    drop(processes);

    let processes = Processes::all(&setup).await?;
    let quota = channel(processes.addr(Role::Quota));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let account = usage(quota.clone(), &alice).await?;
        if account.reserved_bytes == 0 && setup.stored_objects("users").is_empty() {
            assert_eq!(account.used_bytes, 0);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not swept: {account:?} {:?}",
            setup.stored_objects("users")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_slow_one_shot_upload_is_not_taken_for_abandoned() -> anyhow::Result<()> {
    // The sweeper takes one-shot uploads idle for the session TTL (1 s here) as abandoned; this
    // upload streams for about 3 s and must show it is alive meanwhile.
    let setup = sweeping("1s", "100ms").await?;
    let processes = Processes::all(&setup).await?;
    let addr = processes.addr(Role::Ingest);
    let alice = token("alice", &[]);
    let data = random_bytes(30 << 16);

    let (tx, upload) = open_upload(addr, &alice, "slow.bin", data.len() as u64).await?;
    for chunk in data.chunks(1 << 16) {
        tx.send(data_message(chunk)).await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(tx);
    let file = upload
        .await??
        .into_inner()
        .file
        .ok_or_else(|| anyhow::anyhow!("no file in the answer"))?;
    assert_eq!(file.sha256, sha256(&data));
    let (_, stored) = download(channel(addr), &alice, &file.id, None).await?;
    assert_eq!(stored, data, "the stored bytes are the bytes sent");
    let account = usage(channel(processes.addr(Role::Quota)), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (data.len() as u64, 0)
    );
    Ok(())
}
