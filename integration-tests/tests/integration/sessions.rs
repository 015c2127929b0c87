//! Resumable sessions on one mesh: offsets, checksums, concurrent writers, quota, expiry, on
//! local disk (part objects) and memory (native multipart with held-back small chunks).

use std::time::Duration;

use futures::future::join_all;
use stowage_integration_tests::{
    complete, create_session, download, eventually, get_session, ingest, put_chunk, random_bytes,
    sha256, usage, write_chunks,
};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(30);

async fn setups() -> anyhow::Result<Vec<Setup>> {
    Ok(vec![Setup::new().await?, Setup::memory().await?])
}

#[tokio::test]
async fn chunks_through_both_doors_make_a_byte_exact_file() -> anyhow::Result<()> {
    for setup in setups().await? {
        let mesh = Mesh::start(&setup).await?;
        let alice = token("alice", &[]);
        // Sizes chosen to exercise held-back chunks below the native minimum part.
        let data = random_bytes(13 * 1024 * 1024 + 123);
        let s = create_session(
            mesh.channel(),
            &alice,
            "video.bin",
            Some(data.len() as u64),
            &sha256(&data),
        )
        .await?;
        assert_eq!(s.offset, 0);
        assert!(s.chunk_size_hint > 0 && s.expires_at.is_some());
        let mut offset = 0usize;
        for (i, size) in [1 << 20, 3 << 20, 6 << 20].into_iter().enumerate() {
            let chunk = &data[offset..offset + size];
            let after = if i % 2 == 0 {
                put_chunk(
                    mesh.channel(),
                    &alice,
                    &s.id,
                    offset as u64,
                    &chunk[..size.min(4 << 20)],
                )
                .await?;
                if size > 4 << 20 {
                    put_chunk(
                        mesh.channel(),
                        &alice,
                        &s.id,
                        (offset + (4 << 20)) as u64,
                        &chunk[4 << 20..],
                    )
                    .await?
                } else {
                    get_session(mesh.channel(), &alice, &s.id).await?
                }
            } else {
                write_chunks(
                    mesh.channel(),
                    &alice,
                    &s.id,
                    vec![(offset as u64, chunk.to_vec())],
                )
                .await?
            };
            offset += size;
            assert_eq!(after.offset, offset as u64);
        }
        write_chunks(
            mesh.channel(),
            &alice,
            &s.id,
            vec![(offset as u64, data[offset..].to_vec())],
        )
        .await?;
        let file = complete(mesh.channel(), &alice, &s.id).await?;
        assert_eq!(file.sha256, sha256(&data));
        let again = complete(mesh.channel(), &alice, &s.id).await?;
        assert_eq!(again.id, file.id, "Complete is idempotent");
        let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
        assert_eq!(sha256(&bytes), sha256(&data));
        let account = usage(mesh.channel(), &alice).await?;
        assert_eq!(
            (account.used_bytes, account.reserved_bytes),
            (data.len() as u64, 0),
            "{}",
            setup.blob_url
        );
        assert!(
            mesh.stored_objects("staging").await?.is_empty(),
            "staging cleaned"
        );
        assert_eq!(mesh.stored_objects("users").await?.len(), 1);
        mesh.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn bad_chunks_are_refused_and_the_session_stays_resumable() -> anyhow::Result<()> {
    for setup in setups().await? {
        let mesh = Mesh::start(&setup).await?;
        let alice = token("alice", &[]);
        let data = random_bytes(3 << 20);
        let s = create_session(
            mesh.channel(),
            &alice,
            "a.bin",
            Some(data.len() as u64),
            &"0".repeat(64),
        )
        .await?;
        put_chunk(mesh.channel(), &alice, &s.id, 0, &data[..1 << 20]).await?;

        let wrong = put_chunk(mesh.channel(), &alice, &s.id, 5, &data[5..10])
            .await
            .expect_err("wrong offset");
        assert_eq!(wrong.code(), Code::FailedPrecondition);
        assert_eq!(
            wrong
                .metadata()
                .get("upload-offset")
                .map(|v| v.to_str().unwrap_or_default().to_owned()),
            Some((1 << 20).to_string())
        );
        assert!(
            wrong.message().contains("expected 1048576"),
            "{}",
            wrong.message()
        );

        let past = put_chunk(
            mesh.channel(),
            &alice,
            &s.id,
            1 << 20,
            &random_bytes((2 << 20) + 1),
        )
        .await
        .expect_err("past the end");
        assert_eq!(past.code(), Code::InvalidArgument);
        assert!(
            past.message().starts_with("chunk.data"),
            "{}",
            past.message()
        );

        let bad_sum = stowage_integration_tests::ingest(mesh.channel())
            .put_chunk(authed(
                pb::PutChunkRequest {
                    upload_id: s.id.clone(),
                    chunk: Some(pb::Chunk {
                        offset: 1 << 20,
                        data: data[1 << 20..2 << 20].to_vec().into(),
                        sha256: sha256(b"other"),
                        size_bytes: None,
                    }),
                },
                &alice,
            ))
            .await
            .expect_err("bad checksum");
        assert_eq!(bad_sum.code(), Code::InvalidArgument);
        assert!(
            bad_sum.message().starts_with("chunk.sha256"),
            "{}",
            bad_sum.message()
        );

        let early = complete(mesh.channel(), &alice, &s.id)
            .await
            .expect_err("incomplete");
        assert_eq!(early.code(), Code::FailedPrecondition);
        assert_eq!(
            get_session(mesh.channel(), &alice, &s.id).await?.offset,
            1 << 20,
            "still at its last good offset"
        );

        put_chunk(mesh.channel(), &alice, &s.id, 1 << 20, &data[1 << 20..]).await?;
        let wrong_sha = complete(mesh.channel(), &alice, &s.id)
            .await
            .expect_err("sha differs");
        assert_eq!(wrong_sha.code(), Code::InvalidArgument);
        assert!(
            wrong_sha.message().contains("expected_sha256"),
            "{}",
            wrong_sha.message()
        );
        let after = get_session(mesh.channel(), &alice, &s.id).await?;
        assert_eq!(
            (after.offset, after.state),
            (3 << 20, pb::UploadState::Open as i32)
        );
        let other = put_chunk(mesh.channel(), &token("bob", &[]), &s.id, 3 << 20, b"x")
            .await
            .expect_err("not bob's");
        assert_eq!(other.code(), Code::NotFound);
        let other = get_session(mesh.channel(), &token("bob", &[]), &s.id)
            .await
            .expect_err("not bob's");
        assert_eq!(other.code(), Code::NotFound);
        mesh.stop().await?;
    }
    Ok(())
}

/// A WriteChunks call whose messages the test sends one by one.
struct OpenStream {
    send: tokio::sync::mpsc::Sender<pb::WriteChunksRequest>,
    call: tokio::task::JoinHandle<Result<pb::UploadSession, tonic::Status>>,
}

impl OpenStream {
    fn start(mesh: &Mesh, token: &str) -> Self {
        let (send, receive) = tokio::sync::mpsc::channel(16);
        let (channel, token) = (mesh.channel(), token.to_owned());
        let call = tokio::spawn(async move {
            let messages = tokio_stream::wrappers::ReceiverStream::new(receive);
            let response = ingest(channel)
                .write_chunks(authed(messages, &token))
                .await?;
            Ok(response.into_inner().session.unwrap_or_default())
        });
        Self { send, call }
    }

    async fn chunk(&self, upload_id: &str, offset: usize, data: &[u8]) -> anyhow::Result<()> {
        let message = pb::WriteChunksRequest {
            upload_id: upload_id.to_owned(),
            chunk: Some(pb::Chunk {
                offset: offset as u64,
                data: bytes::Bytes::copy_from_slice(data),
                ..Default::default()
            }),
        };
        self.send
            .send(message)
            .await
            .map_err(|_| anyhow::anyhow!("the call ended"))
    }
}

/// A WriteChunks stream holds its session (staging one chunk while recording the one before)
/// only while chunks keep coming: a stalled client holds nothing, and everything it sent is
/// recorded; a client that vanishes mid-stream holds nothing either.
#[tokio::test]
async fn a_stream_holds_its_session_only_while_chunks_come() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let mib = 1 << 20;
    let data = random_bytes(6 * mib);
    let s = create_session(mesh.channel(), &alice, "held.bin", Some(6 << 20), "").await?;
    let offset = || async {
        Ok::<_, tonic::Status>(get_session(mesh.channel(), &alice, &s.id).await?.offset)
    };

    // Two chunks, then the client stalls with the call open: both are recorded.
    let stalled = OpenStream::start(&mesh, &alice);
    stalled.chunk(&s.id, 0, &data[..mib]).await?;
    stalled.chunk(&s.id, mib, &data[mib..2 * mib]).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while offset().await? < 2 * mib as u64 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second chunk was never recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another writer goes on meanwhile; the stalled stream's next chunk is then refused.
    put_chunk(
        mesh.channel(),
        &alice,
        &s.id,
        2 * mib as u64,
        &data[2 * mib..3 * mib],
    )
    .await?;
    stalled
        .chunk(&s.id, 2 * mib, &data[2 * mib..3 * mib])
        .await?;
    let refused = stalled.call.await?.expect_err("a chunk at a stale offset");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");

    // A client that vanishes in the middle of its chunks: the session is free again at once
    // (at most its last chunk is sent again).
    let vanishing = OpenStream::start(&mesh, &alice);
    vanishing
        .chunk(&s.id, 3 * mib, &data[3 * mib..4 * mib])
        .await?;
    vanishing
        .chunk(&s.id, 4 * mib, &data[4 * mib..5 * mib])
        .await?;
    vanishing.call.abort();
    // Its connection to PostgreSQL is closed rather than pooled with the lock (where any call
    // that got it next would pass the check: locks are taken again freely by their holder).
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held: i64 = pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .await?
            .get(0);
        if held == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "an advisory lock stayed held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let at = offset().await? as usize;
        match put_chunk(mesh.channel(), &alice, &s.id, at as u64, &data[at..]).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::Aborted && std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => anyhow::bail!("the session stayed held: {e:?}"),
        }
    }
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
    assert_eq!(bytes, data);

    // Two streams racing over one session: one writes it all, the other is refused at its
    // first chunk, and the file is the winner's bytes.
    let other = random_bytes(6 * mib);
    let s = create_session(mesh.channel(), &alice, "race.bin", Some(6 << 20), "").await?;
    let racers = [&data, &other].map(|bytes| {
        let chunks: Vec<(u64, Vec<u8>)> = bytes
            .chunks(mib)
            .enumerate()
            .map(|(i, c)| ((i * mib) as u64, c.to_vec()))
            .collect();
        write_chunks(mesh.channel(), &alice, &s.id, chunks)
    });
    let results = join_all(racers).await;
    let winners: Vec<usize> = (0..2).filter(|&i| results[i].is_ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            matches!(r.code(), Code::Aborted | Code::FailedPrecondition),
            "{r:?}"
        );
    }
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
    assert_eq!(&bytes, [&data, &other][winners[0]]);
    mesh.stop().await
}

/// While a stream holds a session's writer lock (here taken by the test, as a stream on another
/// replica would hold it), every other door is refused as busy, without waiting: a chunk, a
/// second stream, an abort, a completion. Once it lets go, they go through.
#[tokio::test]
async fn a_session_held_by_a_stream_refuses_other_writers_until_it_lets_go() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(2 << 20);
    let s = create_session(mesh.channel(), &alice, "held.bin", Some(2 << 20), "").await?;
    put_chunk(mesh.channel(), &alice, &s.id, 0, &data[..1 << 20]).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let stream = pool.get().await?;
    let lock = "hashtextextended($1::text, 11)";
    stream
        .execute(&format!("SELECT pg_advisory_lock({lock})"), &[&s.id])
        .await?;

    let busy = |r: Result<pb::UploadSession, tonic::Status>| match r {
        Err(e) if e.code() == Code::Aborted => Ok(()),
        other => Err(anyhow::anyhow!("expected ABORTED, got {other:?}")),
    };
    busy(put_chunk(mesh.channel(), &alice, &s.id, 1 << 20, &data[1 << 20..]).await)?;
    busy(
        write_chunks(
            mesh.channel(),
            &alice,
            &s.id,
            vec![(1 << 20, data[1 << 20..].to_vec())],
        )
        .await,
    )?;
    let aborted = ingest(mesh.channel())
        .abort_upload(authed(
            pb::AbortUploadRequest {
                upload_id: s.id.clone(),
            },
            &alice,
        ))
        .await;
    busy(aborted.map(|r| r.into_inner().session.unwrap_or_default()))?;
    let completed = complete(mesh.channel(), &alice, &s.id).await;
    assert_eq!(
        completed.map(|_| ()).map_err(|e| e.code()),
        Err(Code::Aborted)
    );
    assert_eq!(
        get_session(mesh.channel(), &alice, &s.id).await?.offset,
        1 << 20
    );

    stream
        .execute(&format!("SELECT pg_advisory_unlock({lock})"), &[&s.id])
        .await?;
    put_chunk(mesh.channel(), &alice, &s.id, 1 << 20, &data[1 << 20..]).await?;
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
    assert_eq!(bytes, data);
    mesh.stop().await
}

/// A chunk that reached Ingest whole is written and recorded even if its client hangs up
/// before the answer, through both doors. The write is held up at its first statement (the test
/// locks the sessions' table), the client call is dropped, then the table is let go.
///
/// Dropped with the call instead, the write's staging could go on without the session's lock on
/// a blocking thread, and land over the bytes of the next writer at the same offset.
#[tokio::test]
async fn a_chunk_that_arrived_whole_is_written_even_if_its_client_hangs_up() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let watcher = pool.get().await?;
    for door in ["PutChunk", "WriteChunks"] {
        let data = random_bytes(2 << 20);
        let s = create_session(mesh.channel(), &alice, "hung.bin", Some(2 << 20), "").await?;
        let mut blocker = pool.get().await?;
        let table = blocker.transaction().await?;
        table
            .batch_execute("LOCK TABLE ingest.uploads IN EXCLUSIVE MODE")
            .await?;
        let (channel, token, id) = (mesh.channel(), alice.clone(), s.id.clone());
        let first = data[..1 << 20].to_vec();
        let call = tokio::spawn(async move {
            match door {
                "PutChunk" => put_chunk(channel, &token, &id, 0, &first).await,
                _ => write_chunks(channel, &token, &id, vec![(0, first)]).await,
            }
        });
        let watcher = &watcher;
        eventually(
            PATIENCE,
            "the chunk's write waits for the table",
            || async move {
                let waiting: i64 = watcher
                    .query_one(
                        // The chunk's lock statement, not the one-shot sweep's that may wait too.
                        "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                         WHERE NOT l.granted AND l.relation = 'ingest.uploads'::regclass
                           AND a.query LIKE '%AS writable%'",
                        &[],
                    )
                    .await?
                    .get(0);
                Ok(waiting > 0)
            },
        )
        .await?;
        call.abort();
        assert!(call.await.is_err_and(|e| e.is_cancelled()));
        // Time for the server to hear of the reset before the write can go on.
        tokio::time::sleep(Duration::from_millis(300)).await;
        table.commit().await?;

        let (channel, token, id) = (mesh.channel(), &alice, &s.id);
        eventually(PATIENCE, door, || {
            let channel = channel.clone();
            async move { Ok(get_session(channel, token, id).await?.offset == 1 << 20) }
        })
        .await?;
        put_chunk(mesh.channel(), &alice, &s.id, 1 << 20, &data[1 << 20..]).await?;
        let file = complete(mesh.channel(), &alice, &s.id).await?;
        let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
        assert!(bytes == data, "{door}: the file is not the bytes sent");
    }
    mesh.stop().await
}

#[tokio::test]
async fn two_writers_on_one_session_never_both_succeed() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let chunk = 512 * 1024;
    let data = random_bytes(8 * chunk);
    let s = create_session(
        mesh.channel(),
        &alice,
        "race.bin",
        Some(data.len() as u64),
        "",
    )
    .await?;
    let (mut offset, mut rounds) = (0, 0);
    while offset < data.len() {
        rounds += 1;
        anyhow::ensure!(
            rounds <= 200,
            "no progress past offset {offset} in 200 rounds"
        );
        let part = &data[offset..offset + chunk];
        let attempts =
            (0..2).map(|_| put_chunk(mesh.channel(), &alice, &s.id, offset as u64, part));
        let results = join_all(attempts).await;
        let accepted = results.iter().filter(|r| r.is_ok()).count();
        assert!(accepted <= 1, "two writers succeeded at offset {offset}");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(r.code(), Code::Aborted | Code::FailedPrecondition),
                "{r:?}"
            );
        }
        if accepted == 1 {
            offset += chunk;
        }
    }
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
    assert_eq!(bytes, data);
    mesh.stop().await
}

#[tokio::test]
async fn parallel_sessions_beyond_the_quota_fail_at_create() -> anyhow::Result<()> {
    let setup = Setup::new()
        .await?
        .with_default_limit(10 * 100_000 + 99_999);
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let creates = (0..50).map(|i| {
        let alice = alice.clone();
        let channel = mesh.channel();
        async move { create_session(channel, &alice, &format!("f{i}"), Some(100_000), "").await }
    });
    let results = join_all(creates).await;
    let sessions: Vec<pb::UploadSession> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect();
    assert_eq!(sessions.len(), 10);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code() == Code::ResourceExhausted)
    );
    let uploads = sessions.iter().map(|s| {
        let (alice, channel, id) = (alice.clone(), mesh.channel(), s.id.clone());
        async move {
            put_chunk(channel.clone(), &alice, &id, 0, &random_bytes(100_000)).await?;
            complete(channel, &alice, &id).await
        }
    });
    for r in join_all(uploads).await {
        r?;
    }
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (1_000_000, 0));
    mesh.stop().await
}

#[tokio::test]
async fn expired_sessions_are_swept_and_cannot_complete() -> anyhow::Result<()> {
    for setup in setups().await? {
        let mesh = Mesh::start_with(&setup, |c| {
            c.ingest.session_ttl = Duration::from_secs(1);
            c.ingest.sweep_interval = Duration::from_millis(300);
        })
        .await?;
        let alice = token("alice", &[]);
        let s = create_session(mesh.channel(), &alice, "late.bin", Some(2 << 20), "").await?;
        put_chunk(mesh.channel(), &alice, &s.id, 0, &random_bytes(1 << 20)).await?;
        assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 2 << 20);
        // The sweep marks the session expired, then releases its hold and removes its
        // staging: both are waited for.
        eventually(
            PATIENCE,
            "the hold released and the staging gone",
            || async {
                let account = usage(mesh.channel(), &alice).await?;
                assert_eq!(account.used_bytes, 0, "nothing charged");
                Ok(account.reserved_bytes == 0 && mesh.stored_objects("").await?.is_empty())
            },
        )
        .await?;
        let state = get_session(mesh.channel(), &alice, &s.id).await?.state;
        assert_eq!(state, pb::UploadState::Expired as i32);
        let late = complete(mesh.channel(), &alice, &s.id)
            .await
            .expect_err("expired");
        assert_eq!(late.code(), Code::FailedPrecondition);
        mesh.stop().await?;
    }
    Ok(())
}

/// A session nobody wrote to for longer than the sweep's `idle_seconds` but not past the
/// expiry its client was told is left alone: the client resumes it hours later.
#[tokio::test]
async fn an_idle_session_is_left_alone_until_its_expiry() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(2 << 20);
    let s = create_session(mesh.channel(), &alice, "resumed.bin", Some(2 << 20), "").await?;
    put_chunk(mesh.channel(), &alice, &s.id, 0, &data[..1 << 20]).await?;
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    pool.get()
        .await?
        .execute(
            "UPDATE ingest.uploads SET updated_at = now() - interval '3 hours'
             WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await?;
    let swept = ingest(mesh.channel())
        .sweep_uploads(authed(
            pb::SweepUploadsRequest {
                idle_seconds: 3600,
                ..Default::default()
            },
            &token("lifecycle", &["service"]),
        ))
        .await?
        .into_inner();
    assert!(swept.upload_ids.is_empty(), "{swept:?}");
    let session = get_session(mesh.channel(), &alice, &s.id).await?;
    assert_eq!(
        (session.state, session.offset),
        (pb::UploadState::Open as i32, 1 << 20)
    );
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 2 << 20);
    put_chunk(mesh.channel(), &alice, &s.id, 1 << 20, &data[1 << 20..]).await?;
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
    assert!(bytes == data, "the file is not the bytes sent");
    mesh.stop().await
}

/// On S3 (moto), an expired session leaves nothing behind: its native multipart upload is
/// aborted (S3 keeps and bills the parts of one never ended), its held-back bytes under
/// `staging/` are deleted, its hold is given back, and it cannot complete.
#[tokio::test]
async fn an_expired_session_on_s3_leaves_no_multipart_upload_or_staging() -> anyhow::Result<()> {
    let mut setup = Setup::s3().await?;
    for (name, value) in [
        ("STOWAGE_INGEST__SESSION_TTL", "1h"),
        ("STOWAGE_INGEST__SWEEP_INTERVAL", "300ms"),
    ] {
        setup.env.push((name.into(), value.into()));
    }
    let endpoint = setup
        .env
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let bucket = setup.blob_url.trim_start_matches("s3://").to_owned();
    let processes = stowage_testkit::Processes::all(&setup).await?;
    let addr = processes.addr(stowage::Role::Ingest);
    let alice = token("alice", &[]);
    let s = create_session(
        stowage_testkit::channel(addr),
        &alice,
        "late.bin",
        Some(12 << 20),
        "",
    )
    .await?;
    // A native part (over 5 MiB), then a chunk held back under staging/ until more comes.
    let data = random_bytes(7 << 20);
    write_chunks(
        stowage_testkit::channel(addr),
        &alice,
        &s.id,
        vec![
            (0, data[..6 << 20].to_vec()),
            (6 << 20, data[6 << 20..].to_vec()),
        ],
    )
    .await?;
    // What the bucket holds, asked of S3 itself: unfinished multipart uploads, staging keys.
    let http = reqwest::Client::new();
    let left = || async {
        let uploads = http
            .get(format!("{endpoint}/{bucket}?uploads"))
            .send()
            .await?
            .text()
            .await?;
        let staged = http
            .get(format!("{endpoint}/{bucket}?list-type=2&prefix=staging/"))
            .send()
            .await?
            .text()
            .await?;
        anyhow::Ok((
            uploads.matches("<UploadId>").count(),
            staged.matches("<Key>").count(),
        ))
    };
    assert_eq!(
        left().await?,
        (1, 1),
        "one upload under way, one chunk held back"
    );
    assert_eq!(
        usage(stowage_testkit::channel(addr), &alice)
            .await?
            .reserved_bytes,
        12 << 20
    );
    // Past its expiry now.
    stowage_db::connect(&setup.database_url, 1)?
        .get()
        .await?
        .execute(
            "UPDATE ingest.uploads SET expires_at = now() - interval '1 second'
             WHERE id = $1::text::uuid",
            &[&s.id],
        )
        .await?;
    eventually(PATIENCE, "the expired session's traces gone", || async {
        let account = usage(stowage_testkit::channel(addr), &alice).await?;
        Ok(left().await? == (0, 0) && account.reserved_bytes == 0)
    })
    .await?;
    let late = complete(stowage_testkit::channel(addr), &alice, &s.id)
        .await
        .expect_err("expired");
    assert_eq!(late.code(), Code::FailedPrecondition);
    Ok(())
}

/// While its length is deferred, a session holds quota for what it has received, grown in
/// place: a user cannot stage past their limit before saying how long the file is, and can
/// still use all of it.
#[tokio::test]
async fn a_deferred_length_holds_quota_for_what_arrived() -> anyhow::Result<()> {
    const MIB: usize = 1 << 20;
    let setup = Setup::new().await?.with_default_limit(5 << 20);
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(6 * MIB);
    let s = create_session(mesh.channel(), &alice, "long.bin", None, "").await?;
    // The hold runs ahead of what arrived by as much as it held; where that does not fit, it
    // covers what arrived, and leaves the rest of the limit free.
    for (i, held) in [1, 3, 3, 4, 5].into_iter().enumerate() {
        let chunk = &data[i * MIB..(i + 1) * MIB];
        put_chunk(mesh.channel(), &alice, &s.id, (i * MIB) as u64, chunk).await?;
        let account = usage(mesh.channel(), &alice).await?;
        assert_eq!(
            (account.used_bytes, account.reserved_bytes),
            (0, (held * MIB) as u64),
            "after chunk {i}"
        );
    }
    // A sixth MiB is past the limit, through either door: refused before anything is
    // staged, the session where it was.
    let past = put_chunk(mesh.channel(), &alice, &s.id, 5 << 20, &data[5 * MIB..])
        .await
        .expect_err("past the limit");
    assert_eq!(past.code(), Code::ResourceExhausted, "{past:?}");
    let past = write_chunks(
        mesh.channel(),
        &alice,
        &s.id,
        vec![(5 << 20, data[5 * MIB..].to_vec())],
    )
    .await
    .expect_err("past the limit");
    assert_eq!(past.code(), Code::ResourceExhausted, "{past:?}");
    assert_eq!(
        get_session(mesh.channel(), &alice, &s.id).await?.offset,
        5 << 20
    );
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 5 << 20);
    // The file ends at 5 MiB: all of the limit, with its bytes held once.
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    assert_eq!(file.sha256, sha256(&data[..5 * MIB]));
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (5 << 20, 0));
    mesh.stop().await
}

#[tokio::test]
async fn deferred_length_and_abort() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(10 << 20);
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(3 << 20);
    let s = create_session(mesh.channel(), &alice, "stream.bin", None, "").await?;
    assert_eq!(s.size_bytes, None);
    put_chunk(mesh.channel(), &alice, &s.id, 0, &data[..1 << 20]).await?;
    let last = stowage_integration_tests::ingest(mesh.channel())
        .put_chunk(authed(
            pb::PutChunkRequest {
                upload_id: s.id.clone(),
                chunk: Some(pb::Chunk {
                    offset: 1 << 20,
                    data: data[1 << 20..].to_vec().into(),
                    sha256: sha256(&data[1 << 20..]),
                    size_bytes: Some(3 << 20),
                }),
            },
            &alice,
        ))
        .await?
        .into_inner()
        .session
        .unwrap_or_default();
    assert_eq!(last.size_bytes, Some(3 << 20));
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    assert_eq!(file.sha256, sha256(&data));
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 3 << 20);

    let aborted = create_session(mesh.channel(), &alice, "gone.bin", Some(2 << 20), "").await?;
    put_chunk(
        mesh.channel(),
        &alice,
        &aborted.id,
        0,
        &random_bytes(1 << 20),
    )
    .await?;
    stowage_integration_tests::ingest(mesh.channel())
        .abort_upload(authed(
            pb::AbortUploadRequest {
                upload_id: aborted.id.clone(),
            },
            &alice,
        ))
        .await?;
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (3 << 20, 0));
    assert!(mesh.stored_objects("staging").await?.is_empty());
    let after = put_chunk(mesh.channel(), &alice, &aborted.id, 1 << 20, b"x")
        .await
        .expect_err("aborted");
    assert_eq!(after.code(), Code::FailedPrecondition);
    mesh.stop().await
}

/// Puts session `id` back to where a completer that crashed right after placing the file in
/// the store left it: `completing`, the placement not recorded.
async fn forget_the_placement(setup: &Setup, id: &str) -> anyhow::Result<()> {
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let changed = pool
        .get()
        .await?
        .execute(
            "UPDATE ingest.uploads SET state = 'completing', placed = false WHERE id = $1::text::uuid",
            &[&id],
        )
        .await?;
    anyhow::ensure!(changed == 1, "no session {id}");
    Ok(())
}

/// A completer that placed the file and crashed before recording it leaves the next one a
/// store where the native upload is gone: it finds the file in place and finishes, for a
/// deferred length whose bytes were held back and for an empty file.
#[tokio::test]
async fn a_completion_repeated_after_the_file_was_placed_converges() -> anyhow::Result<()> {
    for setup in setups().await? {
        let mesh = Mesh::start(&setup).await?;
        let alice = token("alice", &[]);
        let data = random_bytes(1 << 20);
        let deferred = create_session(mesh.channel(), &alice, "held.bin", None, "").await?;
        put_chunk(mesh.channel(), &alice, &deferred.id, 0, &data).await?;
        let empty = create_session(mesh.channel(), &alice, "empty.bin", Some(0), "").await?;
        for (session, bytes) in [(&deferred, &data[..]), (&empty, &[][..])] {
            let file = complete(mesh.channel(), &alice, &session.id).await?;
            forget_the_placement(&setup, &session.id).await?;
            let again = complete(mesh.channel(), &alice, &session.id)
                .await
                .map_err(|e| anyhow::anyhow!("{}: {e:?}", setup.blob_url))?;
            assert_eq!(again.id, file.id);
            let (_, stored) = download(mesh.channel(), &alice, &file.id, None).await?;
            assert_eq!(sha256(&stored), sha256(bytes));
        }
        let account = usage(mesh.channel(), &alice).await?;
        assert_eq!(
            (account.used_bytes, account.reserved_bytes),
            (1 << 20, 0),
            "charged once: {}",
            setup.blob_url
        );
        mesh.stop().await?;
    }
    Ok(())
}

/// A client that gives up on CompleteUpload while a step is slow (here Files, waiting on a
/// table lock) leaves no completion lock behind: the next Complete finishes the file.
#[tokio::test]
async fn a_completion_whose_client_gave_up_leaves_no_lock_behind() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(1 << 20);
    let s = create_session(mesh.channel(), &alice, "slow.bin", Some(1 << 20), "").await?;
    put_chunk(mesh.channel(), &alice, &s.id, 0, &data).await?;

    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let mut blocker = pool.get().await?;
    let blocking = blocker.transaction().await?;
    blocking
        .batch_execute("LOCK TABLE files.files IN SHARE MODE")
        .await?;
    let mut request = authed(
        pb::CompleteUploadRequest {
            upload_id: s.id.clone(),
        },
        &alice,
    );
    request.set_timeout(Duration::from_millis(500));
    let gave_up = ingest(mesh.channel())
        .complete_upload(request)
        .await
        .expect_err("Files is stalled");
    assert!(
        matches!(gave_up.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{gave_up:?}"
    );
    // The completion lock of the session, held by any backend of this database.
    let held = || async {
        let n: i64 = pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
                 WHERE d.datname = current_database() AND l.locktype = 'advisory' AND l.granted \
                 AND ((l.classid::bigint << 32) | l.objid::bigint) \
                     = hashtextextended($1::text::uuid::text, 7)",
                &[&s.id],
            )
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    eventually(
        Duration::from_secs(5),
        "the completion lock let go",
        || async { Ok(held().await? == 0) },
    )
    .await?;
    blocking.commit().await?;
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    assert_eq!(file.sha256, sha256(&data));
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (1 << 20, 0));
    mesh.stop().await
}

/// A CreateUpload that stopped between its row and its hold (here the hold's id is taken out
/// of the row, as a crash before recording it would leave it) is finished by its retry: the
/// session holds its quota, and completes.
#[tokio::test]
async fn a_retried_create_finishes_a_session_left_without_its_hold() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(50_000);
    let (mesh_ref, alice_ref) = (&mesh, &alice);
    let create_of = |size: u64| async move {
        ingest(mesh_ref.channel())
            .create_upload(authed(
                pb::CreateUploadRequest {
                    size_bytes: Some(size),
                    metadata: Some(pb::UploadMetadata {
                        display_name: "retried.bin".into(),
                        ..Default::default()
                    }),
                    idempotency_key: "create-once".into(),
                    ..Default::default()
                },
                alice_ref,
            ))
            .await
            .map(|r| r.into_inner().session.unwrap_or_default())
    };
    let create = || create_of(50_000);
    let first = create().await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .execute(
            "UPDATE ingest.uploads SET reservation_id = NULL WHERE id = $1::text::uuid",
            &[&first.id],
        )
        .await?;
    // The key again for another size is the caller's mistake: refused, nothing changed.
    let other = create_of(60_000)
        .await
        .expect_err("another size under the key");
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert!(
        other.message().starts_with("idempotency_key:") && other.message().contains("50000"),
        "{other:?}"
    );
    let again = create().await?;
    assert_eq!(again.id, first.id);
    assert_eq!(again.size_bytes, Some(50_000));
    put_chunk(mesh.channel(), &alice, &again.id, 0, &data).await?;
    let file = complete(mesh.channel(), &alice, &again.id).await?;
    assert_eq!(file.sha256, sha256(&data));
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (50_000, 0),
        "one hold, turned into usage once"
    );
    mesh.stop().await
}

/// Sessions of unknown length hold no quota, so one user keeps at most 100 open: the next is
/// RESOURCE_EXHAUSTED and leaves no row; one completed or aborted makes room; sized sessions
/// (bounded by the quota) are not counted.
#[tokio::test]
async fn one_user_keeps_at_most_a_hundred_uploads_of_unknown_length_open() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let dana = token("dana", &[]);
    let mut open = Vec::new();
    for i in 0..100 {
        open.push(create_session(mesh.channel(), &dana, &format!("f{i}"), None, "").await?);
    }
    let refused = create_session(mesh.channel(), &dana, "one more", None, "")
        .await
        .expect_err("101st");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("unknown length"), "{refused:?}");
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let rows: i64 = pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM ingest.uploads WHERE owner_id = 'dana'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(rows, 100, "the refused one left no row");
    create_session(mesh.channel(), &dana, "sized", Some(10), "").await?;
    create_session(mesh.channel(), &token("erin", &[]), "other", None, "").await?;
    ingest(mesh.channel())
        .abort_upload(authed(
            pb::AbortUploadRequest {
                upload_id: open[0].id.clone(),
            },
            &dana,
        ))
        .await?;
    create_session(mesh.channel(), &dana, "room again", None, "").await?;
    mesh.stop().await
}

/// A disk that fails under a stream of chunks (the staging file swapped for /dev/full, which
/// refuses every write): the stream fails, no offset past the failure is recorded, and once
/// the disk is back the client resumes from the last good offset to a byte-exact file.
#[tokio::test]
async fn a_disk_failing_under_a_stream_records_no_offset_past_it() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let root = setup
        .blob_dir
        .as_ref()
        .map(|d| d.path().to_owned())
        .expect("a local-disk store");
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let piece = 4 << 20;
    let data = random_bytes(3 * piece);
    let s = create_session(
        mesh.channel(),
        &alice,
        "disk.bin",
        Some(data.len() as u64),
        "",
    )
    .await?;
    let first = write_chunks(
        mesh.channel(),
        &alice,
        &s.id,
        vec![(0, data[..piece].to_vec())],
    )
    .await?;
    assert_eq!(first.offset, piece as u64);

    let staged = root.join("staging").join(&s.id).join("data");
    let kept = staged.with_file_name("data.kept");
    std::fs::rename(&staged, &kept)?;
    std::os::unix::fs::symlink("/dev/full", &staged)?;
    let rest = |from: usize| {
        (from..data.len())
            .step_by(piece)
            .map(|o| (o as u64, data[o..o + piece].to_vec()))
            .collect::<Vec<_>>()
    };
    let failed = write_chunks(mesh.channel(), &alice, &s.id, rest(piece)).await;
    assert!(failed.is_err(), "{failed:?}");
    let now = get_session(mesh.channel(), &alice, &s.id).await?;
    assert_eq!(
        now.offset, piece as u64,
        "nothing recorded past the failure"
    );

    std::fs::remove_file(&staged)?;
    std::fs::rename(&kept, &staged)?;
    let resumed = write_chunks(mesh.channel(), &alice, &s.id, rest(now.offset as usize)).await?;
    assert_eq!(resumed.offset, data.len() as u64);
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) =
        stowage_integration_tests::download(mesh.channel(), &alice, &file.id, None).await?;
    assert!(
        bytes == data,
        "the stored file is the source, byte for byte"
    );
    assert_eq!(file.sha256, sha256(&data));
    mesh.stop().await
}
