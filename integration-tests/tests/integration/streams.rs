//! Event streams: every acknowledged event survives a SIGKILL of Ingest and appears exactly
//! once, in order, in the sealed batches; windows seal on time; consumer groups get each
//! batch once and resume from their cursor; acknowledgements delete screenshots.

use std::{collections::HashMap, time::Duration};

use futures::StreamExt;
use stowage::Role;
use stowage_proto::v1::{self as pb, ingest_client::IngestClient};
use stowage_testkit::{Mesh, Processes, Setup, authed, channel, token};
use tonic::{Code, transport::Channel};

const PER_STREAM: u64 = 100_000;
const FRAME: u64 = 2_000;

pub(crate) fn event(seq: u64, screenshot: Option<Vec<u8>>) -> pb::Event {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pb::Event {
        timestamp: Some(prost_types::Timestamp {
            seconds: i64::try_from(now.as_secs()).unwrap_or(0),
            nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
        }),
        r#type: "input".into(),
        payload: seq.to_be_bytes().to_vec(),
        screenshot: screenshot.map(|data| pb::Screenshot {
            source: Some(pb::screenshot::Source::InlineData(data)),
            mime_type: "image/png".into(),
            width: 1,
            height: 1,
        }),
    }
}

pub(crate) fn frame(stream: &str, first: u64, last: u64) -> pb::AppendEventsRequest {
    pb::AppendEventsRequest {
        stream_id: stream.to_owned(),
        first_seq: first,
        events: (first..=last).map(|s| event(s, None)).collect(),
    }
}

/// A mesh sealing windows of 500 ms 200 ms after their end, storing screenshots over 1 KiB,
/// and keeping the newest `keep` stored screenshots of a stream after acknowledgement.
pub(crate) async fn half_second_windows(setup: &Setup, keep: usize) -> anyhow::Result<Mesh> {
    Mesh::start_with(setup, |c| {
        c.ingest.streams.window = Duration::from_millis(500);
        c.ingest.streams.grace = Duration::from_millis(200);
        c.ingest.streams.inline_max = stowage_runtime::config::ByteSize::kib(1);
        c.ingest.streams.keep_screenshots = keep;
    })
    .await
}

/// Sends `frames` on one AppendEvents call and records every acknowledgement in `acked`
/// until the server stops answering (or answered them all).
pub(crate) async fn append(
    channel: Channel,
    token: &str,
    frames: Vec<pb::AppendEventsRequest>,
    acked: &mut HashMap<String, u64>,
) {
    let expected = frames.len();
    let call = IngestClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
        .append_events(authed(futures::stream::iter(frames), token))
        .await;
    let Ok(response) = call else {
        return;
    };
    let mut answers = response.into_inner();
    let mut seen = 0;
    while let Some(Ok(answer)) = answers.next().await {
        let entry = acked.entry(answer.stream_id).or_default();
        *entry = (*entry).max(answer.durable_seq);
        seen += 1;
        if seen == expected {
            break;
        }
    }
}

/// Reads batches of `group` (acknowledging each) until `want` events per stream arrived;
/// returns each stream's seqs in delivery order and the last cursor.
pub(crate) async fn drain(
    channel: Channel,
    token: &str,
    group: &str,
    cursor: &str,
    want: &HashMap<String, u64>,
) -> anyhow::Result<(HashMap<String, Vec<u64>>, Vec<pb::EventBatch>)> {
    let mut client = IngestClient::new(channel).max_decoding_message_size(64 << 20);
    let mut batches = client
        .subscribe_batches(authed(
            pb::SubscribeBatchesRequest {
                consumer_group: group.into(),
                cursor: cursor.into(),
                ..Default::default()
            },
            token,
        ))
        .await?
        .into_inner();
    let mut seqs: HashMap<String, Vec<u64>> = HashMap::new();
    let mut received = Vec::new();
    let done = |seqs: &HashMap<String, Vec<u64>>| {
        want.iter()
            .all(|(s, n)| seqs.get(s).map_or(0, Vec::len) as u64 >= *n)
    };
    while !done(&seqs) {
        let next = tokio::time::timeout(Duration::from_secs(60), batches.next()).await;
        let Ok(Some(message)) = next else {
            anyhow::bail!(
                "batches stopped: have {:?}",
                seqs.iter()
                    .map(|(s, v)| (s.clone(), v.len()))
                    .collect::<Vec<_>>()
            );
        };
        let batch = message?.batch.expect("batch");
        let list = seqs.entry(batch.stream_id.clone()).or_default();
        for (i, e) in batch.events.iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            assert_eq!(e.payload, seq.to_be_bytes(), "payload of seq {seq}");
            list.push(seq);
        }
        assert_eq!(
            batch.last_seq,
            batch.first_seq + batch.events.len() as u64 - 1
        );
        client
            .ack_batch(authed(
                pb::AckBatchRequest {
                    consumer_group: group.into(),
                    batch_id: batch.id.clone(),
                },
                token,
            ))
            .await?;
        received.push(batch);
    }
    Ok((seqs, received))
}

#[tokio::test]
async fn acknowledged_events_survive_a_kill_and_appear_once_in_order() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    setup.env.extend([
        (
            "STOWAGE_INGEST__STREAMS__WINDOW".to_owned(),
            "1s".to_owned(),
        ),
        (
            "STOWAGE_INGEST__STREAMS__GRACE".to_owned(),
            "300ms".to_owned(),
        ),
    ]);
    let mut processes = Processes::split(&setup).await?;
    let alice = token("alice", &[]);
    let streams: Vec<String> = (0..3).map(|i| format!("agent-{i}")).collect();
    let frames_upto = |from: &HashMap<String, u64>, upto: u64| {
        let mut frames = Vec::new();
        let mut next: HashMap<&String, u64> = streams
            .iter()
            .map(|s| (s, from.get(s).copied().unwrap_or(0) + 1))
            .collect();
        loop {
            let mut any = false;
            for s in &streams {
                let first = next[s];
                if first > upto {
                    continue;
                }
                let last = (first + FRAME - 1).min(upto);
                frames.push(frame(s, first, last));
                next.insert(s, last + 1);
                any = true;
            }
            if !any {
                return frames;
            }
        }
    };

    // First half, acknowledged.
    let mut acked = HashMap::new();
    let ingest = channel(processes.addr(Role::Ingest));
    append(
        ingest.clone(),
        &alice,
        frames_upto(&acked, PER_STREAM / 2),
        &mut acked,
    )
    .await;
    assert!(
        streams
            .iter()
            .all(|s| acked.get(s) == Some(&(PER_STREAM / 2))),
        "{acked:?}"
    );

    // More frames in flight when Ingest is SIGKILLed: the kill comes as soon as the first of
    // them is acknowledged, with the call open and the last quarter just sent.
    let (feed, frames) = futures::channel::mpsc::unbounded();
    let (before_kill, with_kill) = (
        frames_upto(&acked, PER_STREAM * 5 / 8),
        frames_upto(
            &streams
                .iter()
                .map(|s| (s.clone(), PER_STREAM * 5 / 8))
                .collect(),
            PER_STREAM * 3 / 4,
        ),
    );
    for f in before_kill {
        feed.unbounded_send(f)?;
    }
    let mut answers = IngestClient::new(ingest.clone())
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
        .append_events(authed(frames, &alice))
        .await?
        .into_inner();
    let mut acked_before_kill = acked.clone();
    let mut note = |answer: pb::AppendEventsResponse| {
        let entry = acked_before_kill.entry(answer.stream_id).or_default();
        *entry = (*entry).max(answer.durable_seq);
        answer.durable_seq
    };
    while let Some(answer) = answers.next().await {
        if note(answer?) > PER_STREAM / 2 {
            break;
        }
    }
    for f in with_kill {
        feed.unbounded_send(f)?;
    }
    processes
        .process(Role::Ingest)
        .signal(nix::sys::signal::Signal::SIGKILL)?;
    while let Some(Ok(answer)) = answers.next().await {
        note(answer);
    }
    drop(feed);
    assert!(
        streams.iter().any(|s| acked_before_kill
            .get(s)
            .is_some_and(|&seq| seq > PER_STREAM / 2)),
        "{acked_before_kill:?}"
    );
    println!("acknowledged when Ingest was killed: {acked_before_kill:?}");
    processes.restart(&setup, Role::Ingest).await?;

    // The client re-sends everything not acknowledged, then the rest.
    let ingest = channel(processes.addr(Role::Ingest));
    let mut acked = acked_before_kill.clone();
    append(
        ingest.clone(),
        &alice,
        frames_upto(&acked_before_kill, PER_STREAM),
        &mut acked,
    )
    .await;
    assert!(
        streams.iter().all(|s| acked.get(s) == Some(&PER_STREAM)),
        "{acked:?}"
    );

    let want: HashMap<String, u64> = streams.iter().map(|s| (s.clone(), PER_STREAM)).collect();
    let (seqs, _) = drain(ingest, &alice, "analysis", "", &want).await?;
    for stream in &streams {
        let expected: Vec<u64> = (1..=PER_STREAM).collect();
        assert!(
            seqs[stream] == expected,
            "{stream}: not exactly 1..={PER_STREAM} in order"
        );
    }
    Ok(())
}

#[tokio::test]
async fn windows_seal_groups_get_each_batch_once_and_acks_delete_screenshots() -> anyhow::Result<()>
{
    let setup = Setup::new().await?;
    let mesh = half_second_windows(&setup, 1).await?;
    let bob = token("bob", &[]);
    // Three windows of events, each with one large (stored) and one small (inline) screenshot.
    let mut acked = HashMap::new();
    for w in 0..3u64 {
        let first = w * 10 + 1;
        let events: Vec<pb::Event> = (first..first + 10)
            .map(|s| match s - first {
                0 => event(s, Some(vec![7u8; 4096])),
                1 => event(s, Some(vec![8u8; 100])),
                _ => event(s, None),
            })
            .collect();
        let started = std::time::Instant::now();
        append(
            mesh.channel(),
            &bob,
            vec![pb::AppendEventsRequest {
                stream_id: "desk".into(),
                first_seq: first,
                events,
            }],
            &mut acked,
        )
        .await;
        assert_eq!(acked.get("desk"), Some(&(first + 9)));
        tokio::time::sleep(Duration::from_millis(600).saturating_sub(started.elapsed())).await;
    }
    let screens = mesh.stored_objects("events/bob/desk/screens").await?;
    assert_eq!(
        screens.len(),
        3,
        "large screenshots go to the store: {screens:?}"
    );

    // All three windows sealed (each 500 ms, sealed 200 ms after its end).
    batches_sealed(&setup, 3).await?;
    // The group gets every event once, in order.
    let want: HashMap<String, u64> = [("desk".to_owned(), 30)].into();
    let (seqs, batches) = drain(mesh.channel(), &bob, "g1", "", &want).await?;
    assert_eq!(seqs["desk"], (1..=30).collect::<Vec<u64>>());
    // At least one batch per window (an append that commits after its window's grace goes
    // into a batch of its own).
    assert!(
        batches.len() >= 3,
        "one batch per window: {}",
        batches.len()
    );
    // Each sealed batch was announced (batch.sealed, in the seal's transaction).
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let announced: Vec<(String, i64)> = pool
        .get()
        .await?
        .query(
            "SELECT payload->>'stream_id', (payload->>'event_count')::bigint
             FROM ingest.outbox WHERE topic = 'batch.sealed' ORDER BY (payload->>'seq')::bigint",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(announced.len(), batches.len(), "{announced:?}");
    assert!(announced.iter().all(|(stream, _)| stream == "desk"));
    assert_eq!(announced.iter().map(|(_, n)| n).sum::<i64>(), 30);
    for b in &batches {
        let (start, end) = (b.window_start.expect("start"), b.window_end.expect("end"));
        let length =
            (end.seconds - start.seconds) * 1000 + i64::from((end.nanos - start.nanos) / 1_000_000);
        assert_eq!(length, 500);
    }
    // A second group gets them all too; after a "restart" from a cursor, only later ones.
    let (_, again) = drain(
        mesh.channel(),
        &bob,
        "g2",
        &batches[0].cursor,
        &[("desk".to_owned(), 20)].into(),
    )
    .await?;
    assert!(again.iter().all(|b| b.first_seq > batches[0].last_seq));
    // Acknowledged batches' stored screenshots are gone, except the newest one (dev keep).
    let left = mesh.stored_objects("events/bob/desk/screens").await?;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("/screens/000000000021-"), "{left:?}");
    // Consumer lag: g1 acknowledged everything; g2 started after the first batch, which it
    // never acknowledges.
    let metrics = format!("http://{}/metrics", mesh.addr);
    stowage_integration_tests::eventually(Duration::from_secs(10), "consumer lag", || async {
        let text = reqwest::get(&metrics).await?.text().await?;
        let lag = |group: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with("stowage_stream_consumer_lag_batches")
                        && l.contains(&format!("group=\"{group}\""))
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        Ok(lag("bob/g1") == Some(0.0) && lag("bob/g2") == Some(1.0))
    })
    .await?;
    // Inline screenshots came back inline.
    let inline = batches
        .iter()
        .flat_map(|b| b.events.iter())
        .filter(|e| {
            matches!(
                e.screenshot.as_ref().and_then(|s| s.source.as_ref()),
                Some(pb::screenshot::Source::InlineData(d)) if d.len() == 100
            )
        })
        .count();
    assert_eq!(inline, 3);
    // Another user sees none of bob's batches.
    let mut other = IngestClient::new(mesh.channel())
        .subscribe_batches(authed(
            pb::SubscribeBatchesRequest {
                consumer_group: "g3".into(),
                ..Default::default()
            },
            &token("eve", &[]),
        ))
        .await?
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_millis(800), other.next())
            .await
            .is_err()
    );
    mesh.stop().await
}

#[tokio::test]
async fn a_slow_writer_slows_clients_down_and_memory_stays_under_the_ceiling() -> anyhow::Result<()>
{
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.streams.write_delay = Duration::from_millis(500);
        c.ingest.streams.max_buffered = stowage_runtime::config::ByteSize::mib(16);
    })
    .await?;
    let carol = token("carol", &[]);
    const FRAMES: u64 = 150;
    const EVENTS: u64 = 1_000;
    // 150 MB of events, made as the client is allowed to send them.
    let frames = futures::stream::iter(0..FRAMES).map(|f| {
        let first = f * EVENTS + 1;
        pb::AppendEventsRequest {
            stream_id: "busy".into(),
            first_seq: first,
            events: (first..first + EVENTS)
                .map(|s| {
                    let mut e = event(s, None);
                    e.payload = vec![0u8; 1024];
                    e
                })
                .collect(),
        }
    });
    let before = stowage_integration_tests::peak_rss_bytes();
    let started = std::time::Instant::now();
    let mut answers = IngestClient::new(mesh.channel())
        .max_encoding_message_size(64 << 20)
        .append_events(authed(frames, &carol))
        .await?
        .into_inner();
    let mut durable = 0;
    while let Some(answer) = answers.next().await {
        durable = answer?.durable_seq;
        if durable == FRAMES * EVENTS {
            break;
        }
    }
    // Every frame acknowledged: slowed to the writer's pace, not failed. Each write takes at
    // most what the 16 MiB ceiling holds, and 500 ms: 150 MB need at least eight of them.
    assert_eq!(durable, FRAMES * EVENTS);
    let took = started.elapsed();
    println!("150 MB through a writer delayed 500 ms per write: {took:?}");
    assert!(
        took >= Duration::from_secs(3),
        "150 MB went through a writer of 500 ms per write in {took:?}: not held back"
    );
    // The server never held much more than its 16 MiB ceiling (plus a write and HTTP/2
    // windows), far from the 150 MB sent.
    let grown = stowage_integration_tests::peak_rss_bytes().saturating_sub(before);
    println!("peak RSS growth: {} MiB", grown >> 20);
    assert!(grown < 100 << 20, "peak RSS grew by {} MiB", grown >> 20);
    mesh.stop().await
}

/// A frame PostgreSQL refuses (for a check Ingest does not make; here a constraint the test
/// adds) does not take the frames written with it down: they are written one by one, the
/// good ones acknowledged, the refused one refused for good, not to be sent again.
#[tokio::test]
async fn a_frame_the_database_refuses_does_not_fail_the_frames_written_with_it()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        // Long enough for both frames below to wait for the same write.
        c.ingest.streams.write_delay = Duration::from_millis(300);
    })
    .await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "ALTER TABLE ingest.event_segments ADD CONSTRAINT modern
                CHECK (min_ts IS NULL OR min_ts >= '1900-01-01')",
        )
        .await?;
    let alice = token("alice", &[]);
    let mut old = frame("desk", 3, 4);
    old.events[1].timestamp = Some(prost_types::Timestamp {
        seconds: -15_000_000_000, // 1494
        nanos: 0,
    });
    let mut answers = IngestClient::new(mesh.channel())
        .append_events(authed(
            futures::stream::iter([frame("desk", 1, 2), old]),
            &alice,
        ))
        .await?
        .into_inner();
    let first = answers.next().await.expect("an answer")?;
    assert_eq!(first.durable_seq, 2);
    let refused = answers
        .next()
        .await
        .expect("an answer")
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("events"), "{refused:?}");
    drop(answers);
    // The stream goes on from the last good frame.
    assert_eq!(
        append_one(mesh.channel(), &alice, frame("desk", 3, 4)).await?,
        4
    );
    mesh.stop().await
}

/// Waits until at least `n` batches are sealed.
pub(crate) async fn batches_sealed(setup: &Setup, n: i64) -> anyhow::Result<()> {
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    stowage_integration_tests::eventually(
        Duration::from_secs(10),
        &format!("{n} batches"),
        || async {
            let sealed: i64 = pool
                .get()
                .await?
                .query_one("SELECT count(*) FROM ingest.event_batches", &[])
                .await?
                .get(0);
            Ok(sealed >= n)
        },
    )
    .await
}

/// Sends one frame on its own call; returns the durable seq or the status.
async fn append_one(
    channel: Channel,
    token: &str,
    frame: pb::AppendEventsRequest,
) -> Result<u64, tonic::Status> {
    let mut answers = IngestClient::new(channel)
        .max_encoding_message_size(64 << 20)
        .append_events(authed(futures::stream::iter([frame]), token))
        .await?
        .into_inner();
    match answers.next().await {
        Some(answer) => answer.map(|a| a.durable_seq),
        None => Err(tonic::Status::unknown("no answer")),
    }
}

/// Asserts `answer` is a refusal with `code` naming `field`; returns the status.
fn refused(answer: Result<u64, tonic::Status>, code: tonic::Code, field: &str) -> tonic::Status {
    let status = answer.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(field), "{}", status.message());
    status
}

#[tokio::test]
async fn bad_frames_get_a_clear_status_and_store_nothing() -> anyhow::Result<()> {
    use object_store::ObjectStoreExt;
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.streams.inline_max = stowage_runtime::config::ByteSize::kib(4);
        c.ingest.streams.max_screenshot = stowage_runtime::config::ByteSize::kib(64);
    })
    .await?;
    let (alice, bob) = (token("alice", &[]), token("bob", &[]));
    let with_shot = |seq: u64, bytes: usize| event(seq, Some(vec![7u8; bytes]));
    // Alice's stream holds seqs 1..=10, one with a stored screenshot.
    let mut first = frame("desk", 1, 10);
    first.events[4] = with_shot(5, 10_000);
    assert_eq!(append_one(mesh.channel(), &alice, first).await?, 10);
    let stored = || async {
        let mut keys = mesh.stored_objects("events/alice/desk/screens").await?;
        keys.sort();
        anyhow::Ok(keys)
    };
    let before = stored().await?;
    assert_eq!(before.len(), 1, "{before:?}");

    // Every bad frame below carries a screenshot big enough to be stored: none may stay.
    let mut gap = frame("desk", 12, 14);
    gap.events[0] = with_shot(12, 10_000);
    let status = refused(
        append_one(mesh.channel(), &alice, gap).await,
        tonic::Code::FailedPrecondition,
        "first_seq",
    );
    assert_eq!(
        status
            .metadata()
            .get("expected-seq")
            .map(|v| v.to_str().ok()),
        Some(Some("11"))
    );

    // Sequence numbers past what can be stored (2^63 - 1), or counted.
    let mut past = frame("desk", u64::MAX - 1, u64::MAX);
    past.first_seq = u64::MAX;
    past.events[1] = with_shot(u64::MAX, 10_000);
    refused(
        append_one(mesh.channel(), &alice, past).await,
        tonic::Code::InvalidArgument,
        "first_seq",
    );

    let mut oversize = frame("desk", 11, 13);
    oversize.events[0] = with_shot(11, 10_000);
    oversize.events[2].payload = vec![1u8; (1 << 20) + 1];
    refused(
        append_one(mesh.channel(), &alice, oversize).await,
        tonic::Code::InvalidArgument,
        "events.payload",
    );

    // A time chrono takes but PostgreSQL does not (7500 BC): refused here, not by the
    // statement that writes every user's frames of the moment together.
    let mut ancient = frame("desk", 11, 12);
    ancient.events[0] = with_shot(11, 10_000);
    ancient.events[1].timestamp = Some(prost_types::Timestamp {
        seconds: -300_000_000_000,
        nanos: 0,
    });
    refused(
        append_one(mesh.channel(), &alice, ancient).await,
        tonic::Code::InvalidArgument,
        "events.timestamp",
    );

    let mut big_shot = frame("desk", 11, 12);
    big_shot.events[0] = with_shot(11, 10_000);
    big_shot.events[1] = with_shot(12, 65 * 1024);
    refused(
        append_one(mesh.channel(), &alice, big_shot).await,
        tonic::Code::InvalidArgument,
        "events.screenshot.inline_data",
    );

    // Bob's `desk` is a stream of his own: his frames never reach (or overwrite the
    // screenshots of) Alice's. Seq 5 is a gap in his, which starts at 1.
    let mut foreign = frame("desk", 5, 11);
    foreign.events[0] = event(5, Some(vec![9u8; 10_000]));
    let status = append_one(mesh.channel(), &bob, foreign).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert_eq!(
        status.metadata().get("expected-seq").map(|v| v.as_bytes()),
        Some(&b"1"[..]),
        "{status:?}"
    );

    // Keys under events/ are Ingest's own: a client cannot point at them.
    let mut forged = frame("desk", 11, 11);
    forged.events[0].screenshot = Some(pb::Screenshot {
        source: Some(pb::screenshot::Source::StorageKey(before[0].clone())),
        mime_type: "image/png".into(),
        width: 1,
        height: 1,
    });
    refused(
        append_one(mesh.channel(), &alice, forged).await,
        tonic::Code::InvalidArgument,
        "events.screenshot.storage_key",
    );

    // Nothing of any of them was kept: the stream is still at 10, its one screenshot intact.
    assert_eq!(stored().await?, before);
    let bytes = mesh
        .blobs
        .store
        .get(&object_store::path::Path::from(before[0].as_str()))
        .await?
        .bytes()
        .await?;
    assert_eq!(bytes.len(), 10_000);
    assert!(bytes.iter().all(|b| *b == 7));
    assert_eq!(
        append_one(mesh.channel(), &alice, frame("desk", 11, 12)).await?,
        12
    );
    mesh.stop().await
}

/// A batch's stored screenshots stay until every consumer group that reads the stream has
/// acknowledged it: the first group's acknowledgement does not take them from the others.
#[tokio::test]
async fn screenshots_stay_until_every_group_has_acknowledged_their_batch() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.streams.window = Duration::from_millis(300);
        c.ingest.streams.grace = Duration::from_millis(100);
        c.ingest.streams.inline_max = stowage_runtime::config::ByteSize::kib(1);
    })
    .await?;
    let carol = token("carol", &[]);
    let mut acked = HashMap::new();
    let events = vec![
        event(1, Some(vec![7u8; 4096])),
        event(2, Some(vec![9u8; 4096])),
    ];
    append(
        mesh.channel(),
        &carol,
        vec![pb::AppendEventsRequest {
            stream_id: "cam".into(),
            first_seq: 1,
            events,
        }],
        &mut acked,
    )
    .await;
    assert_eq!(acked.get("cam"), Some(&2));
    batches_sealed(&setup, 1).await?;
    assert_eq!(
        mesh.stored_objects("events/carol/cam/screens").await?.len(),
        2
    );

    // Group "archive" takes the batch and is still working on it.
    let mut client = IngestClient::new(mesh.channel()).max_decoding_message_size(64 << 20);
    let mut archive = client
        .subscribe_batches(authed(
            pb::SubscribeBatchesRequest {
                consumer_group: "archive".into(),
                ..Default::default()
            },
            &carol,
        ))
        .await?
        .into_inner();
    let batch = tokio::time::timeout(Duration::from_secs(10), archive.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("no batch"))??
        .batch
        .ok_or_else(|| anyhow::anyhow!("empty message"))?;
    // Its events name the stored screenshots, which the owner reads back; nobody else does.
    let keys: Vec<String> = batch
        .events
        .iter()
        .filter_map(|e| match e.screenshot.as_ref()?.source.as_ref()? {
            pb::screenshot::Source::StorageKey(key) => Some(key.clone()),
            pb::screenshot::Source::InlineData(_) => None,
        })
        .collect();
    assert_eq!(keys.len(), 2);
    let reader = client.clone();
    let read = |key: &str, who: &str| {
        let mut client = reader.clone();
        let request = authed(
            pb::GetScreenshotRequest {
                storage_key: key.to_owned(),
            },
            who,
        );
        async move {
            client
                .get_screenshot(request)
                .await
                .map(|r| r.into_inner().data)
        }
    };
    assert_eq!(read(&keys[0], &carol).await?.as_ref(), &[7u8; 4096][..]);
    assert_eq!(read(&keys[1], &carol).await?.as_ref(), &[9u8; 4096][..]);
    let mallory = token("mallory", &[]);
    assert_eq!(
        read(&keys[0], &mallory).await.err().map(|s| s.code()),
        Some(Code::NotFound)
    );
    let refused = read("users/carol/image/2026/12/x.png", &carol).await.err();
    assert_eq!(
        refused.as_ref().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    assert!(
        refused.is_some_and(|s| s.message().contains("storage_key")),
        "the refusal names the field"
    );
    // Group "analysis" reads and acknowledges it: the screenshots stay for "archive".
    drain(
        mesh.channel(),
        &carol,
        "analysis",
        "",
        &[("cam".to_owned(), 2)].into(),
    )
    .await?;
    assert_eq!(
        mesh.stored_objects("events/carol/cam/screens").await?.len(),
        2
    );
    assert_eq!(read(&keys[1], &carol).await?.len(), 4096);
    // The last group's acknowledgement deletes them.
    let deleted = client
        .ack_batch(authed(
            pb::AckBatchRequest {
                consumer_group: "archive".into(),
                batch_id: batch.id.clone(),
            },
            &carol,
        ))
        .await?
        .into_inner()
        .screenshots_deleted;
    assert_eq!(deleted, 2);
    assert_eq!(
        mesh.stored_objects("events/carol/cam/screens").await?,
        Vec::<String>::new()
    );
    assert_eq!(
        read(&keys[0], &carol).await.err().map(|s| s.code()),
        Some(Code::NotFound)
    );
    mesh.stop().await
}

#[tokio::test]
async fn sealed_batches_and_their_screenshots_go_after_the_retention() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.streams.window = Duration::from_millis(300);
        c.ingest.streams.grace = Duration::from_millis(100);
        c.ingest.streams.inline_max = stowage_runtime::config::ByteSize::kib(1);
        c.ingest.streams.retention = Duration::from_secs(2);
    })
    .await?;
    let carol = token("carol", &[]);
    let mut first = frame("phone", 1, 5);
    first.events[0] = event(1, Some(vec![3u8; 4096]));
    assert_eq!(append_one(mesh.channel(), &carol, first).await?, 5);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let batches = || async {
        let n: i64 = pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM ingest.event_batches WHERE stream_id = 'carol/phone'",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    stowage_integration_tests::eventually(Duration::from_secs(10), "sealed", || async {
        Ok(batches().await? == 1)
    })
    .await?;
    let stored = mesh.stored_objects("events/carol/phone").await?;
    assert_eq!(stored.len(), 2, "batch and screenshot: {stored:?}");
    // Unacknowledged or not, two seconds after sealing both objects and the row are gone.
    stowage_integration_tests::eventually(Duration::from_secs(15), "expired", || async {
        Ok(batches().await? == 0 && mesh.stored_objects("events/carol/phone").await?.is_empty())
    })
    .await?;
    mesh.stop().await
}

#[tokio::test]
async fn batches_a_group_member_dropped_go_to_the_member_still_reading() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.streams.window = Duration::from_millis(300);
        c.ingest.streams.grace = Duration::from_millis(100);
        c.ingest.streams.redeliver_after = Duration::from_secs(1);
    })
    .await?;
    let dan = token("dan", &[]);
    // Two streams, three windows each: their batches interleave in sealing order.
    for w in 0..3u64 {
        let started = std::time::Instant::now();
        let first = w * 10 + 1;
        for stream in ["desk", "phone"] {
            let acked = append_one(mesh.channel(), &dan, frame(stream, first, first + 9)).await?;
            assert_eq!(acked, first + 9);
        }
        tokio::time::sleep(Duration::from_millis(400).saturating_sub(started.elapsed())).await;
    }
    batches_sealed(&setup, 6).await?;
    // Member A of group "pair" reads the desk stream, takes its batches and dies without
    // acknowledging any.
    let mut a = IngestClient::new(mesh.channel())
        .subscribe_batches(authed(
            pb::SubscribeBatchesRequest {
                consumer_group: "pair".into(),
                stream_ids: vec!["desk".into()],
                ..Default::default()
            },
            &dan,
        ))
        .await?
        .into_inner();
    a.next().await.expect("a batch")?;
    drop(a);
    // Member B reads both streams: the phone batches at once (its cursor moves past the desk
    // ones), then the desk batches once A's claims time out. Every event once.
    let want: HashMap<String, u64> = [("desk".to_owned(), 30), ("phone".to_owned(), 30)].into();
    let (seqs, batches) = drain(mesh.channel(), &dan, "pair", "", &want).await?;
    for stream in ["desk", "phone"] {
        let mut all = seqs[stream].clone();
        all.sort_unstable();
        assert_eq!(all, (1..=30).collect::<Vec<u64>>(), "{stream}");
    }
    let mut ids: Vec<&str> = batches.iter().map(|b| b.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), batches.len(), "no batch twice");
    mesh.stop().await
}

#[tokio::test]
async fn a_seal_in_progress_does_not_hold_back_appends_to_its_stream() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let dave = token("dave", &[]);
    assert_eq!(
        append_one(mesh.channel(), &dave, frame("kiosk", 1, 10)).await?,
        10
    );
    // What a sealer holds while it writes a window's objects to the store: its batch row,
    // inserted, referencing the stream's row (a KEY SHARE lock on it until its commit).
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let mut conn = pool.get().await?;
    let seal = conn.transaction().await?;
    seal.execute(
        "INSERT INTO ingest.event_batches (id, stream_id, owner_id, window_start, window_end,
             first_seq, last_seq, event_count, storage_key)
         VALUES (gen_random_uuid(), 'dave/kiosk', 'dave', now(), now(), 1, 10, 10, 'events/dave/kiosk/x')",
        &[],
    )
    .await?;
    let appended = tokio::time::timeout(
        Duration::from_secs(10),
        append_one(mesh.channel(), &dave, frame("kiosk", 11, 20)),
    )
    .await;
    seal.rollback().await?;
    assert_eq!(
        appended.map_err(|_| anyhow::anyhow!("the append waited for the seal"))??,
        20
    );
    mesh.stop().await
}

/// A process serves at most `max_subscriptions` subscriptions at once (each may hold batches
/// in memory): one more is refused with RESOURCE_EXHAUSTED, and a closed one frees its place.
#[tokio::test]
async fn subscriptions_past_the_most_a_process_serves_are_refused() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| c.ingest.streams.max_subscriptions = 1).await?;
    let bob = token("bob", &[]);
    let subscribe = |group: &str| {
        let mut client = IngestClient::new(mesh.channel());
        let request = authed(
            pb::SubscribeBatchesRequest {
                consumer_group: group.into(),
                ..Default::default()
            },
            &bob,
        );
        async move { client.subscribe_batches(request).await }
    };
    let first = subscribe("g1").await?;
    let refused = subscribe("g2").await.expect_err("one at most");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    drop(first);
    stowage_integration_tests::eventually(Duration::from_secs(10), "a place freed", || async {
        Ok(subscribe("g3").await.is_ok())
    })
    .await?;
    mesh.stop().await
}

/// One user holds at most an eighth of a process's subscriptions: others still find a place.
#[tokio::test]
async fn one_user_cannot_take_every_subscription() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| c.ingest.streams.max_subscriptions = 16).await?;
    let subscribe = |who: &str, group: &str| {
        let mut client = IngestClient::new(mesh.channel());
        let request = authed(
            pb::SubscribeBatchesRequest {
                consumer_group: group.into(),
                ..Default::default()
            },
            &token(who, &[]),
        );
        async move { client.subscribe_batches(request).await }
    };
    let _first = subscribe("bob", "g1").await?;
    let _second = subscribe("bob", "g2").await?;
    let refused = subscribe("bob", "g3").await.expect_err("two at most");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("one user"), "{refused:?}");
    let _alice = subscribe("alice", "g1").await?;
    mesh.stop().await
}

/// Streams are named per user: two users appending to `desk` each have their own stream,
/// seqs from 1, and each reads back only their own events.
#[tokio::test]
async fn two_users_streams_of_one_name_are_two_streams() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.streams.window = Duration::from_millis(300);
        c.ingest.streams.grace = Duration::from_millis(100);
    })
    .await?;
    let (ann, ben) = (token("ann", &[]), token("ben", &[]));
    assert_eq!(
        append_one(mesh.channel(), &ann, frame("desk", 1, 5)).await?,
        5
    );
    assert_eq!(
        append_one(mesh.channel(), &ben, frame("desk", 1, 3)).await?,
        3
    );
    batches_sealed(&setup, 2).await?;
    let want = |n: u64| [("desk".to_owned(), n)].into();
    // Ann names her group as a service names its own: it is hers (ann/svc), and what she
    // reads and acknowledges is not taken from the service's group.
    let (ann_seqs, ann_batches) = drain(mesh.channel(), &ann, "svc", "", &want(5)).await?;
    assert_eq!(ann_seqs["desk"], (1..=5).collect::<Vec<u64>>());
    assert!(ann_batches.iter().all(|b| b.stream_id == "desk"));
    // Ann's group is behind on nothing: Ben's batch, unread, is not of a stream it reads.
    let metrics = format!("http://{}/metrics", mesh.addr);
    stowage_integration_tests::eventually(Duration::from_secs(15), "ann's group at 0", || async {
        let text = reqwest::get(&metrics).await?.text().await?;
        Ok(text
            .lines()
            .any(|l| l.starts_with("stowage_stream_consumer_lag_batches{group=\"ann/svc\"} 0")))
    })
    .await?;
    let (ben_seqs, _) = drain(mesh.channel(), &ben, "h", "", &want(3)).await?;
    assert_eq!(ben_seqs["desk"], (1..=3).collect::<Vec<u64>>());
    // A service reads both, named {owner}/{stream}.
    let service = token("analysis", &["service"]);
    let both: HashMap<String, u64> =
        [("ann/desk".to_owned(), 5), ("ben/desk".to_owned(), 3)].into();
    let (all, _) = drain(mesh.channel(), &service, "svc", "", &both).await?;
    assert_eq!(all["ann/desk"].len(), 5);
    assert_eq!(all["ben/desk"].len(), 3);
    // A service's group is named without '/': those are users' groups.
    let mut client = IngestClient::new(mesh.channel());
    let refused = client
        .ack_batch(authed(
            pb::AckBatchRequest {
                consumer_group: "ann/svc".into(),
                batch_id: uuid::Uuid::new_v4().to_string(),
            },
            &service,
        ))
        .await
        .expect_err("a user's group");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("consumer_group"), "{refused:?}");
    mesh.stop().await
}

/// A stream named before streams were per owner is renamed to its owner's key on upgrade:
/// Ingest's migrations of the release before (to V8) and rows written as it wrote them, then
/// the service started on them (applying V9 on). Its owner appends on from its durable seq,
/// and reads a stored screenshot by the key its events carry.
#[tokio::test]
async fn streams_named_before_they_were_per_owner_go_on() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    stowage_db::migrate(
        &pool,
        stowage_ingest::SCHEMA,
        stowage_ingest::migrations().set_target(stowage_db::MigrationTarget::Version(8)),
    )
    .await?;
    pool.get()
        .await?
        .batch_execute(
            "INSERT INTO ingest.event_streams (stream_id, owner_id, durable_seq) VALUES ('desk', 'zed', 7);
             INSERT INTO ingest.event_segments (stream_id, first_seq, last_seq, data)
                 VALUES ('desk', 6, 7, '\\x00');
             INSERT INTO ingest.event_batches (id, stream_id, owner_id, window_start, window_end,
                 first_seq, last_seq, event_count, storage_key, screenshots)
                 VALUES (gen_random_uuid(), 'desk', 'zed', now(), now(), 1, 5, 5,
                         'events/desk/2026/12/04/1-000000000001.evb',
                         ARRAY['events/desk/screens/000000000003-abc.bin']);
             INSERT INTO ingest.event_readers (group_name, stream_id) VALUES ('g', 'desk');",
        )
        .await?;
    let mesh = Mesh::start(&setup).await?;
    let zed = token("zed", &[]);
    let legacy_shot = "events/desk/screens/000000000003-abc.bin";
    use object_store::ObjectStoreExt as _;
    mesh.blobs
        .store
        .put(
            &object_store::path::Path::from(legacy_shot),
            vec![5u8; 10].into(),
        )
        .await?;
    let conn = pool.get().await?;
    let renamed: Vec<String> = conn
        .query(
            "SELECT stream_id FROM ingest.event_streams
             UNION ALL SELECT stream_id FROM ingest.event_segments
             UNION ALL SELECT stream_id FROM ingest.event_batches
             UNION ALL SELECT stream_id FROM ingest.event_readers",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(renamed, vec!["zed/desk"; 4]);
    drop(conn);
    // The owner goes on where the stream was.
    assert_eq!(
        append_one(mesh.channel(), &zed, frame("desk", 8, 9)).await?,
        9
    );
    let shot = IngestClient::new(mesh.channel())
        .get_screenshot(authed(
            pb::GetScreenshotRequest {
                storage_key: legacy_shot.into(),
            },
            &zed,
        ))
        .await?
        .into_inner()
        .data;
    assert_eq!(shot.as_ref(), &[5u8; 10][..]);
    // Another user's own `desk` does not make the old key theirs.
    let amy = token("amy", &[]);
    assert_eq!(
        append_one(mesh.channel(), &amy, frame("desk", 1, 1)).await?,
        1
    );
    let theirs = IngestClient::new(mesh.channel())
        .get_screenshot(authed(
            pb::GetScreenshotRequest {
                storage_key: legacy_shot.into(),
            },
            &amy,
        ))
        .await
        .err()
        .map(|s| s.code());
    assert_eq!(theirs, Some(Code::NotFound));
    mesh.stop().await
}

/// Acknowledged as each window seals, a stream keeps only its newest stored screenshot (dev
/// option: 1), not one per batch: one spared by its batch's acknowledgement is deleted by a
/// later one once a newer screenshot takes its place.
#[tokio::test]
async fn screenshots_acknowledged_batch_by_batch_keep_only_the_newest() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = half_second_windows(&setup, 1).await?;
    let bob = token("bob", &[]);
    let mut acked = HashMap::new();
    for w in 0..3u64 {
        let first = w * 2 + 1;
        let events = vec![event(first, Some(vec![7u8; 4096])), event(first + 1, None)];
        let frame = pb::AppendEventsRequest {
            stream_id: "desk".into(),
            first_seq: first,
            events,
        };
        append(mesh.channel(), &bob, vec![frame], &mut acked).await;
        assert_eq!(acked.get("desk"), Some(&(first + 1)));
        batches_sealed(&setup, i64::try_from(w + 1)?).await?;
        let (seqs, _) = drain(mesh.channel(), &bob, "g1", "", &[("desk".into(), 2)].into()).await?;
        assert_eq!(seqs["desk"], [first, first + 1]);
    }
    let left = mesh.stored_objects("events/bob/desk/screens").await?;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(left[0].contains("/screens/000000000005-"), "{left:?}");
    mesh.stop().await
}

/// Screenshots kept inline leave their batch once every group reading the stream has
/// acknowledged it, as stored ones are deleted then: a group that reads the stream later
/// finds each screenshot's type and size, not its bytes.
#[tokio::test]
async fn inline_screenshots_leave_the_batch_once_it_is_acknowledged() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = half_second_windows(&setup, 0).await?;
    let bob = token("bob", &[]);
    let mut acked = HashMap::new();
    let frame = pb::AppendEventsRequest {
        stream_id: "desk".into(),
        first_seq: 1,
        events: vec![event(1, Some(vec![8u8; 100])), event(2, None)],
    };
    append(mesh.channel(), &bob, vec![frame], &mut acked).await;
    assert_eq!(acked.get("desk"), Some(&2));
    batches_sealed(&setup, 1).await?;
    let want: HashMap<String, u64> = [("desk".into(), 2)].into();
    let inline = |batches: &[pb::EventBatch]| {
        batches
            .iter()
            .flat_map(|b| &b.events)
            .filter_map(|e| e.screenshot.clone())
            .collect::<Vec<_>>()
    };
    let (_, first) = drain(mesh.channel(), &bob, "g1", "", &want).await?;
    let shots = inline(&first);
    assert_eq!(shots.len(), 1);
    assert!(
        matches!(&shots[0].source, Some(pb::screenshot::Source::InlineData(d)) if d.len() == 100),
        "delivered whole before the acknowledgement"
    );
    let (_, later) = drain(mesh.channel(), &bob, "g2", "", &want).await?;
    let shots = inline(&later);
    assert_eq!(shots.len(), 1);
    assert_eq!(shots[0].source, None, "its bytes are gone");
    assert_eq!(
        (shots[0].mime_type.as_str(), shots[0].width, shots[0].height),
        ("image/png", 1, 1)
    );
    mesh.stop().await
}

/// An observer (`stowage events tail`) is sent the batches sealed from now on, or from the
/// oldest kept, and holds nothing back: the one consumer group's acknowledgement still
/// deletes the screenshot the observers saw.
#[tokio::test]
async fn an_observer_sees_sealed_batches_and_holds_nothing_back() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = half_second_windows(&setup, 0).await?;
    let erin = token("erin", &[]);
    let titled = |seq: u64, screenshot: Option<Vec<u8>>| pb::AppendEventsRequest {
        stream_id: "desk".into(),
        first_seq: seq,
        events: vec![pb::Event {
            r#type: "window".into(),
            payload: format!(r#"{{"title":"report {seq}"}}"#).into_bytes(),
            ..event(seq, screenshot)
        }],
    };
    let mut acked = HashMap::new();
    append(mesh.channel(), &erin, vec![titled(1, None)], &mut acked).await;
    batches_sealed(&setup, 1).await?;

    let client = IngestClient::new(mesh.channel()).max_decoding_message_size(64 << 20);
    let subscribe = |cursor: &str, group: &str, observe: bool| {
        let mut client = client.clone();
        let request = authed(
            pb::SubscribeBatchesRequest {
                consumer_group: group.into(),
                cursor: cursor.into(),
                observe,
                ..Default::default()
            },
            &erin,
        );
        async move { client.subscribe_batches(request).await }
    };
    let mut from_now = subscribe("", "", true).await?.into_inner();
    let mut from_start = subscribe("0", "", true).await?.into_inner();
    let mut tail = tokio::process::Command::new(stowage_testkit::binary()?)
        .args(["events", "tail", "--from-start", "--addr"])
        .arg(format!("http://{}", mesh.addr))
        .env("STOWAGE_TOKEN", &erin)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let refused = subscribe("", "archive", true).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("consumer_group"), "{refused}");

    append(
        mesh.channel(),
        &erin,
        vec![titled(2, Some(vec![5u8; 4096]))],
        &mut acked,
    )
    .await;
    batches_sealed(&setup, 2).await?;
    // Another user observing from the start sees none of erin's batches.
    let mut bob = IngestClient::new(mesh.channel())
        .subscribe_batches(authed(
            pb::SubscribeBatchesRequest {
                cursor: "0".into(),
                observe: true,
                ..Default::default()
            },
            &token("bob", &[]),
        ))
        .await?
        .into_inner();
    let seen = tokio::time::timeout(Duration::from_secs(1), bob.next()).await;
    assert!(seen.is_err(), "bob was sent {seen:?}");
    let first_seq = |b: pb::EventBatch| b.first_seq;
    assert_eq!(
        first_seq(next_batch(&mut from_now).await?),
        2,
        "from now on"
    );
    assert_eq!(first_seq(next_batch(&mut from_start).await?), 1);
    assert_eq!(first_seq(next_batch(&mut from_start).await?), 2);

    let stdout = tail.stdout.take().expect("piped");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let mut printed = Vec::new();
    while printed.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await??;
        printed.push(line.ok_or_else(|| anyhow::anyhow!("tail ended: {printed:?}"))?);
    }
    assert!(
        printed[0].ends_with(r#"  desk  window  {"title":"report 1"}"#),
        "{printed:?}"
    );
    assert!(
        printed[1].contains(r#"  desk  window  {"title":"report 2"}  [screenshot image/png 1x1, events/erin/desk/screens/"#),
        "{printed:?}"
    );
    tail.kill().await?;

    // The group reading the stream takes both batches and acknowledges them: the screenshot
    // goes, though two observers are still watching.
    let mut archive = subscribe("", "archive", false).await?.into_inner();
    let mut deleted = 0;
    for _ in 0..2 {
        let batch = next_batch(&mut archive).await?;
        deleted += client
            .clone()
            .ack_batch(authed(
                pb::AckBatchRequest {
                    consumer_group: "archive".into(),
                    batch_id: batch.id,
                },
                &erin,
            ))
            .await?
            .into_inner()
            .screenshots_deleted;
    }
    assert_eq!(deleted, 1);
    assert!(
        mesh.stored_objects("events/erin/desk/screens")
            .await?
            .is_empty()
    );
    drop((from_now, from_start));
    // A tail whose server goes away says so by its exit status, for a script to start it
    // again.
    let mut tail = tokio::process::Command::new(stowage_testkit::binary()?)
        .args(["events", "tail", "--from-start", "--addr"])
        .arg(format!("http://{}", mesh.addr))
        .env("STOWAGE_TOKEN", &erin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    // Subscribed once it prints the batches kept from the start.
    let stdout = tail.stdout.take().expect("piped");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await??;
    assert!(first.is_some(), "the tail printed the kept batches");
    mesh.stop().await?;
    let status = tokio::time::timeout(Duration::from_secs(30), tail.wait()).await??;
    assert!(!status.success(), "{status:?}");
    Ok(())
}

/// The next batch of a subscription, within 10 s.
async fn next_batch(
    batches: &mut tonic::Streaming<pb::SubscribeBatchesResponse>,
) -> anyhow::Result<pb::EventBatch> {
    let message = tokio::time::timeout(Duration::from_secs(10), batches.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the stream ended"))??;
    message.batch.ok_or_else(|| anyhow::anyhow!("no batch"))
}
