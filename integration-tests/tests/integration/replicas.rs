//! A 256 MiB upload whose chunks go round-robin to three Ingest replicas, one of which is
//! killed in the middle of a chunk; the client resumes from GetUpload on a survivor. On local
//! disk, S3 (moto) and Azure Blob Storage (Azurite) with real processes and SIGKILL, and on
//! the in-memory store with in-process replicas whose runtime is torn down at once.

use std::{net::SocketAddr, time::Duration};

use nix::sys::signal::Signal;
use stowage::Role;
use stowage_integration_tests::{
    complete, create_session, download, get_session, random_bytes, sha256, usage, write_chunks,
};
use stowage_testkit::{Processes, Replica, Setup, channel, token, wait_serving};
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
            let target = channel(ingest[1]);
            let (who, id) = (alice.clone(), s.id.clone());
            let in_flight = tokio::spawn(async move {
                write_chunks(target, &who, &id, vec![(offset as u64, piece)]).await
            });
            tokio::time::sleep(Duration::from_millis(15)).await;
            kill();
            killed = true;
            alive[1] = false;
            let outcome = in_flight.await?;
            assert!(
                outcome.is_err() || outcome.is_ok(),
                "either way the session decides"
            );
            offset = resume_offset(ingest[0], &alice, &s.id).await?;
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
