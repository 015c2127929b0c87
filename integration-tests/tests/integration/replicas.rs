//! A 256 MiB upload whose chunks go round-robin to three Ingest replicas, one of which is
//! killed in the middle of a chunk; the client resumes from GetUpload on a survivor. On local
//! disk, S3 (moto) and Azure Blob Storage (Azurite) with real processes and SIGKILL, and on
//! the in-memory store with in-process replicas whose runtime is torn down at once.

use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use stowage::Role;
use stowage_integration_tests::{
    complete, create_session, download, get_session, ingest as ingest_client, random_bytes, sha256,
    usage, write_chunks,
};
use stowage_proto::v1 as pb;
use stowage_testkit::{Processes, Replica, Setup, authed, channel, token, wait_serving};
use tonic::Code;

const SIZE: usize = 256 << 20;
const CHUNK: usize = 8 << 20;

/// Uploads across `ingest` replicas, calling `kill` on replica 1 while a chunk is in flight.
async fn upload_through_a_crash(
    ingest: &[SocketAddr],
    files: SocketAddr,
    quota: SocketAddr,
    kill: &mut (dyn FnMut() + Send),
) -> anyhow::Result<()> {
    let alice = token("alice", &[]);
    let data = random_bytes(SIZE);
    let digest = sha256(&data);
    let s = create_session(
        channel(ingest[0]),
        &alice,
        "movie.bin",
        Some(SIZE as u64),
        &digest,
    )
    .await?;
    let mut alive = [true; 3];
    let (mut offset, mut turn, mut killed) = (0usize, 0usize, false);
    let mut resumed = 0;
    while offset < SIZE {
        let r = turn % 3;
        turn += 1;
        if !alive[r] {
            continue;
        }
        let end = (offset + CHUNK).min(SIZE);
        let piece = data[offset..end].to_vec();
        if !killed && r == 1 && offset >= 64 << 20 {
            offset = cut_mid_chunk(ingest, &alice, &s.id, offset, &piece, kill).await?;
            killed = true;
            alive[1] = false;
            continue;
        }
        let mut attempts = 0;
        loop {
            match write_chunks(
                channel(ingest[r]),
                &alice,
                &s.id,
                vec![(offset as u64, piece.clone())],
            )
            .await
            {
                Ok(after) => {
                    offset = after.offset as usize;
                    break;
                }
                // The killed replica's lock is released when its connection drops.
                Err(e) if e.code() == Code::Aborted && attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // A chunk the killed replica had in flight can be recorded after the offset
                // was read (its statement was sent before the kill): the server refuses the
                // stale offset, and the client goes on from the one it has now.
                Err(e) if e.code() == Code::FailedPrecondition && resumed < 3 => {
                    resumed += 1;
                    offset = resume_offset(ingest[0], &alice, &s.id).await?;
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    assert!(killed, "a replica was killed mid-upload");
    let file = complete(channel(ingest[2]), &alice, &s.id).await?;
    assert_eq!(file.sha256, digest);
    let (_, bytes) = download(channel(files), &alice, &file.id, None).await?;
    assert_eq!(bytes.len(), SIZE);
    assert_eq!(sha256(&bytes), digest, "stored bytes equal the source");
    let account = usage(channel(quota), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (SIZE as u64, 0),
        "charged once, exactly"
    );
    Ok(())
}

/// Sends `piece` (at `offset`) to replica 1 as one `WriteChunks` call of two halves, and
/// `kill`s the replica once the first half is recorded and the second is sent, the call
/// still open (so it can never be acknowledged). Returns the offset a survivor gives then:
/// the first half kept, the second whole or not at all.
async fn cut_mid_chunk(
    ingest: &[SocketAddr],
    token: &str,
    id: &str,
    offset: usize,
    piece: &[u8],
    kill: &mut (dyn FnMut() + Send),
) -> anyhow::Result<usize> {
    let half = piece.len() / 2;
    let message = |at: usize, data: &[u8], first: bool| pb::WriteChunksRequest {
        upload_id: if first { id.to_owned() } else { String::new() },
        chunk: Some(pb::Chunk {
            offset: at as u64,
            data: bytes::Bytes::copy_from_slice(data),
            ..Default::default()
        }),
    };
    let (sender, messages) = futures::channel::mpsc::unbounded();
    sender.unbounded_send(message(offset, &piece[..half], true))?;
    let mut client = ingest_client(channel(ingest[1]));
    let request = authed(messages, token);
    let call = tokio::spawn(async move { client.write_chunks(request).await });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while resume_offset(ingest[0], token, id).await? < offset + half {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the first half was not recorded in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sender.unbounded_send(message(offset + half, &piece[half..], false))?;
    kill();
    let cut = call.await?;
    assert!(cut.is_err(), "a call cut by SIGKILL was answered: {cut:?}");
    drop(sender);
    let after = resume_offset(ingest[0], token, id).await?;
    assert!(
        after == offset + half || after == offset + piece.len(),
        "offset {after} after a kill while {}..{} was being written: a chunk is kept whole or not at all",
        offset + half,
        offset + piece.len()
    );
    Ok(after)
}

async fn resume_offset(addr: SocketAddr, token: &str, id: &str) -> anyhow::Result<usize> {
    Ok(get_session(channel(addr), token, id).await?.offset as usize)
}

async fn with_processes(setup: Setup) -> anyhow::Result<()> {
    let processes = Processes::cluster(&setup, 3).await?;
    let ingest = processes.addrs(Role::Ingest);
    assert_eq!(ingest.len(), 3);
    let victim = processes
        .processes
        .iter()
        .position(|p| p.addr == ingest[1])
        .ok_or_else(|| anyhow::anyhow!("no victim"))?;
    let mut kill = || {
        processes.processes[victim]
            .signal(Signal::SIGKILL)
            .expect("SIGKILL");
    };
    upload_through_a_crash(
        &ingest,
        processes.addr(Role::Files),
        processes.addr(Role::Quota),
        &mut kill,
    )
    .await
}

#[tokio::test]
async fn three_ingest_processes_one_killed_local_disk() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    with_processes(setup).await
}

#[tokio::test]
async fn three_ingest_processes_one_killed_s3() -> anyhow::Result<()> {
    let setup = Setup::s3().await?;
    with_processes(setup).await
}

#[tokio::test]
async fn three_ingest_processes_one_killed_azure() -> anyhow::Result<()> {
    let setup = Setup::azure().await?;
    with_processes(setup).await
}

#[tokio::test]
async fn three_ingest_replicas_one_killed_memory() -> anyhow::Result<()> {
    let setup = Setup::memory().await?;
    let blobs = stowage_blob_of(&setup)?;
    let others = Replica::start(
        &setup,
        // Not Lifecycle: it needs Ingest's address, and the Ingest replicas need this one.
        &[Role::Files, Role::Quota, Role::Media],
        &blobs,
        &[],
    )?;
    wait_serving(others.addr, "stowage.v1.Files").await?;
    let peers = [(Role::Quota, others.addr), (Role::Files, others.addr)];
    let mut replicas = Vec::new();
    for _ in 0..3 {
        let r = Replica::start(&setup, &[Role::Ingest], &blobs, &peers)?;
        wait_serving(r.addr, "stowage.v1.Ingest").await?;
        replicas.push(r);
    }
    let ingest: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let victim = std::sync::Mutex::new(replicas.remove(1));
    let mut kill = || {
        if let Ok(mut v) = victim.lock() {
            v.kill();
        }
    };
    upload_through_a_crash(&ingest, others.addr, others.addr, &mut kill).await
}

fn stowage_blob_of(setup: &Setup) -> anyhow::Result<stowage_blob::Blobs> {
    Ok(stowage_blob::Blobs::from_url(&setup.blob_url)?)
}
