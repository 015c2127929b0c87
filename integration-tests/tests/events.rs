//! Events between services: every `file.created` reaches a consumer at least once and is
//! applied exactly once, even when Redis restarts without persistence in the middle.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use stowage_events::{Consumer, ConsumerSettings, Event, EventHandler, HandlerError, topics};
use stowage_local::LocalRedis;
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};
use tokio_util::sync::CancellationToken;

/// Counts deliveries and applies each event by bumping a per-file counter in its
/// transaction: a second application would show as a count of 2.
struct Recorder {
    group: &'static str,
    deliveries: AtomicUsize,
}

#[async_trait]
impl EventHandler for Recorder {
    async fn handle(
        &self,
        event: &Event,
        tx: &stowage_db::Transaction<'_>,
    ) -> Result<(), HandlerError> {
        self.deliveries.fetch_add(1, Ordering::SeqCst);
        let file_id: uuid::Uuid = event
            .key
            .parse()
            .map_err(|e| HandlerError(format!("{e}")))?;
        tx.execute(
            "INSERT INTO probe.applied (grp, file_id, times) VALUES ($1, $2, 1)
             ON CONFLICT (grp, file_id) DO UPDATE SET times = applied.times + 1",
            &[&self.group, &file_id],
        )
        .await?;
        Ok(())
    }
}

async fn register(
    files: &mut pb::files_client::FilesClient<tonic::transport::Channel>,
    service: &str,
    n: usize,
) -> uuid::Uuid {
    let id = uuid::Uuid::new_v4();
    files
        .register_file(authed(
            pb::RegisterFileRequest {
                owner_id: "alice".into(),
                file_id: id.to_string(),
                display_name: format!("f{n}.txt"),
                kind: pb::FileKind::Document as i32,
                mime_type: "text/plain".into(),
                size_bytes: 1,
                sha256: "00".repeat(32),
                storage_key: format!("users/alice/document/2026/11/{id}.txt"),
                status: pb::FileStatus::Ready as i32,
                idempotency_key: id.to_string(),
                ..Default::default()
            },
            service,
        ))
        .await
        .expect("register");
    id
}

#[tokio::test]
async fn file_created_survives_a_redis_restart_and_is_applied_once() -> anyhow::Result<()> {
    let redis = LocalRedis::start().await?;
    let port = redis.port();
    let redis_url = redis.url();
    let setup = Setup::new().await?;
    let url = redis_url.clone();
    let mesh = Mesh::start_with(&setup, |c| c.redis_url = Some(url)).await?;

    // A consumer group of its own, with its dedupe table and effect table in a schema.
    let pool = stowage_db::connect(&setup.database_url, 4)?;
    stowage_events::migrate(&pool, "probe").await?;
    pool.get()
        .await?
        .batch_execute("CREATE TABLE probe.applied (grp text, file_id uuid, times int NOT NULL, PRIMARY KEY (grp, file_id))")
        .await?;
    let client = stowage_runtime::redis::connect(&redis_url).await?;
    let stop = CancellationToken::new();
    let start_group = |group: &'static str| {
        let recorder = Arc::new(Recorder {
            group,
            deliveries: AtomicUsize::new(0),
        });
        let consumer = Consumer::new(
            &client,
            pool.clone(),
            "probe",
            group,
            &[topics::FILE_CREATED],
            Arc::clone(&recorder) as Arc<dyn EventHandler>,
            ConsumerSettings {
                block: Duration::from_millis(200),
                claim_idle: Duration::from_secs(2),
                namespace: setup.namespace(),
                ..ConsumerSettings::default()
            },
        );
        (recorder, tokio::spawn(consumer.run(stop.clone())))
    };
    // One group reads throughout; the other starts only after the restart, so the events
    // published before it exist nowhere but in the outbox when Redis comes back empty.
    let (early, early_task) = start_group("early");

    let service = token("svc", &["service"]);
    let mut files = stowage_integration_tests::files(mesh.channel());
    let mut created = HashSet::new();
    for n in 0..300 {
        created.insert(register(&mut files, &service, n).await);
    }
    // Stopped without persistence: streams, groups and pending deliveries are gone.
    redis.stop().await;
    for n in 300..700 {
        created.insert(register(&mut files, &service, n).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let redis = LocalRedis::start_on(port).await?;
    for n in 700..1000 {
        created.insert(register(&mut files, &service, n).await);
    }
    let (late, late_task) = start_group("late");

    let conn = pool.get().await?;
    for (group, recorder) in [("early", &early), ("late", &late)] {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let applied: i64 = conn
                .query_one(
                    "SELECT count(*) FROM probe.applied WHERE grp = $1",
                    &[&group],
                )
                .await?
                .get(0);
            if applied == 1000 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "group {group}: only {applied} of 1000 file.created events applied after 90 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let rows = conn
            .query(
                "SELECT file_id, times FROM probe.applied WHERE grp = $1",
                &[&group],
            )
            .await?;
        let applied: HashSet<uuid::Uuid> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            applied, created,
            "group {group}: every created file is applied"
        );
        let twice = rows.iter().filter(|r| r.get::<_, i32>(1) != 1).count();
        assert_eq!(
            twice, 0,
            "group {group}: {twice} events applied more than once"
        );
        // Repeats (replay after the restart) are recognised before the handler runs.
        assert_eq!(
            recorder.deliveries.load(Ordering::SeqCst),
            1000,
            "group {group}"
        );
    }

    stop.cancel();
    early_task.await?;
    late_task.await?;
    mesh.stop().await?;
    redis.stop().await;
    Ok(())
}

/// Records like [`Recorder`], but fails the first `failures` times it meets `poison`: the
/// first of them by panicking, as a handler's bug would.
struct Flaky {
    inner: Recorder,
    poison: std::sync::Mutex<String>,
    failures: AtomicUsize,
}

#[async_trait]
impl EventHandler for Flaky {
    async fn handle(
        &self,
        event: &Event,
        tx: &stowage_db::Transaction<'_>,
    ) -> Result<(), HandlerError> {
        let poisoned = self.poison.lock().map(|p| *p == event.key).unwrap_or(false);
        if poisoned
            && let Ok(left) = self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            assert!(left < 2, "poisoned, and the handler panics");
            return Err(HandlerError("poisoned".into()));
        }
        self.inner.handle(event, tx).await
    }
}

#[tokio::test]
async fn a_failing_event_holds_back_only_itself_and_the_rest_of_its_read_apply_once()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 4)?;
    stowage_events::migrate(&pool, "probe").await?;
    pool.get()
        .await?
        .batch_execute("CREATE TABLE probe.applied (grp text, file_id uuid, times int NOT NULL, PRIMARY KEY (grp, file_id))")
        .await?;
    // Twenty events wait in the stream before the group reads, so that its first read holds
    // them all; the eleventh fails twice, the first time by a panic.
    let service = token("svc", &["service"]);
    let mut files = stowage_integration_tests::files(mesh.channel());
    let mut created = Vec::new();
    for n in 0..20 {
        created.push(register(&mut files, &service, n).await);
    }
    let conn = pool.get().await?;
    stowage_integration_tests::eventually(Duration::from_secs(30), "events relayed", || async {
        let pending: i64 = stowage_db::connect(&setup.database_url, 1)?
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM files.outbox WHERE published_at IS NULL",
                &[],
            )
            .await?
            .get(0);
        Ok(pending == 0)
    })
    .await?;
    let flaky = Arc::new(Flaky {
        inner: Recorder {
            group: "flaky",
            deliveries: AtomicUsize::new(0),
        },
        poison: std::sync::Mutex::new(created[10].to_string()),
        failures: AtomicUsize::new(2),
    });
    let client = stowage_runtime::redis::connect(&setup.redis_url).await?;
    let member = |claim_idle: Duration, stop: CancellationToken| {
        let consumer = Consumer::new(
            &client,
            pool.clone(),
            "probe",
            "flaky",
            &[topics::FILE_CREATED],
            Arc::clone(&flaky) as Arc<dyn EventHandler>,
            ConsumerSettings {
                block: Duration::from_millis(200),
                claim_idle,
                namespace: setup.namespace(),
                ..ConsumerSettings::default()
            },
        );
        tokio::spawn(consumer.run(stop))
    };
    let applied = || async {
        let rows = conn
            .query(
                "SELECT file_id, times FROM probe.applied WHERE grp = 'flaky'",
                &[],
            )
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| (r.get::<_, uuid::Uuid>(0), r.get::<_, i32>(1)))
                .collect::<Vec<_>>(),
        )
    };
    // No redelivery within the test: whatever applies, applies from the first read.
    let first_stop = CancellationToken::new();
    let first = member(Duration::from_secs(600), first_stop.clone());
    stowage_integration_tests::eventually(Duration::from_secs(20), "19 applied", || async {
        Ok(applied().await?.len() >= 19)
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let early = applied().await?;
    assert_eq!(early.len(), 19, "all but the failing event apply");
    assert!(
        early.iter().all(|(id, _)| *id != created[10]),
        "the failing event is held back"
    );
    first_stop.cancel();
    first.await?;
    // Another member claims the pending delivery; the event now applies.
    let stop = CancellationToken::new();
    let second = member(Duration::from_millis(500), stop.clone());
    stowage_integration_tests::eventually(Duration::from_secs(20), "20 applied", || async {
        Ok(applied().await?.len() == 20)
    })
    .await?;
    assert!(
        applied().await?.iter().all(|(_, times)| *times == 1),
        "every event applied exactly once"
    );
    stop.cancel();
    second.await?;
    mesh.stop().await
}

/// The `file.created` and `upload.completed` events staged for `file_id` in the outboxes of
/// Files and Ingest (published or not): `(topic, key, payload)`, Files' first.
async fn staged(
    setup: &Setup,
    file_id: &str,
) -> anyhow::Result<Vec<(String, String, serde_json::Value)>> {
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let mut events = Vec::new();
    for schema in ["files", "ingest"] {
        let rows = conn
            .query(
                &format!(
                    "SELECT topic, key, payload FROM {schema}.outbox
                     WHERE payload->>'file_id' = $1 AND topic IN ($2, $3) ORDER BY id"
                ),
                &[&file_id, &topics::FILE_CREATED, &topics::UPLOAD_COMPLETED],
            )
            .await?;
        events.extend(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))));
    }
    Ok(events)
}

/// Wakes on every notification of `schema`'s outbox channel (the relay's); returns once it
/// listens.
async fn listening(
    setup: &Setup,
    schema: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Arc<tokio::sync::Notify>> {
    let wake = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(stowage_db::listen(
        stowage_db::PgTarget::parse(&setup.database_url)?,
        format!("stowage_outbox_{schema}"),
        Arc::clone(&wake),
        stop.clone(),
    ));
    // The first wake says the LISTEN is in place.
    tokio::time::timeout(Duration::from_secs(30), wake.notified()).await?;
    Ok(wake)
}

#[tokio::test]
async fn an_upload_announces_itself_once_with_what_it_stored() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let stop = CancellationToken::new();
    let files_woken = listening(&setup, "files", &stop).await?;
    let ingest_woken = listening(&setup, "ingest", &stop).await?;
    let alice = token("alice", &[]);
    let data = stowage_integration_tests::random_bytes(3000);
    let file =
        stowage_integration_tests::upload(mesh.channel(), &alice, "a.bin", &data, &["t"]).await?;
    let events = staged(&setup, &file.id).await?;
    let topics: Vec<&str> = events.iter().map(|(t, ..)| t.as_str()).collect();
    assert_eq!(topics, [topics::FILE_CREATED, topics::UPLOAD_COMPLETED]);
    // Each staged event woke its relay.
    for woken in [&files_woken, &ingest_woken] {
        tokio::time::timeout(Duration::from_secs(10), woken.notified())
            .await
            .expect("the outbox's channel was notified");
    }

    let (_, key, created) = &events[0];
    assert_eq!(key, &file.id);
    assert_eq!(
        *created,
        serde_json::json!({
            "file_id": file.id,
            "owner_id": "alice",
            "kind": "other",
            "mime_type": file.mime_type,
            "size_bytes": 3000,
            "storage_key": file.storage_key,
            "sha256": stowage_integration_tests::sha256(&data),
            "status": "ready",
        })
    );
    let (_, upload_key, completed) = &events[1];
    uuid::Uuid::parse_str(upload_key)?;
    assert_eq!(
        *completed,
        serde_json::json!({
            "upload_id": upload_key,
            "owner_id": "alice",
            "file_id": file.id,
            "size_bytes": 3000,
            "sha256": stowage_integration_tests::sha256(&data),
        })
    );

    // A retried registration (same id, key and blob) answers with the file and announces
    // nothing more, nor wakes the relay.
    let service = token("ingest", &["service"]);
    let again = pb::files_client::FilesClient::new(mesh.channel())
        .register_file(authed(
            pb::RegisterFileRequest {
                owner_id: "alice".into(),
                file_id: file.id.clone(),
                display_name: "a.bin".into(),
                kind: pb::FileKind::Other as i32,
                mime_type: file.mime_type.clone(),
                size_bytes: 3000,
                sha256: file.sha256.clone(),
                storage_key: file.storage_key.clone(),
                status: pb::FileStatus::Ready as i32,
                idempotency_key: upload_key.clone(),
                ..Default::default()
            },
            &service,
        ))
        .await?
        .into_inner()
        .file
        .expect("file");
    assert_eq!(
        (again.id, again.created_at),
        (file.id.clone(), file.created_at)
    );
    assert_eq!(staged(&setup, &file.id).await?.len(), 2);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), files_woken.notified())
            .await
            .is_err(),
        "a registration that inserted nothing notified the relay"
    );

    // A session's completion (staged by other code) announces the same fields.
    let session =
        stowage_integration_tests::create_session(mesh.channel(), &alice, "b.bin", Some(3000), "")
            .await?;
    stowage_integration_tests::put_chunk(mesh.channel(), &alice, &session.id, 0, &data).await?;
    let second = stowage_integration_tests::complete(mesh.channel(), &alice, &session.id).await?;
    let events = staged(&setup, &second.id).await?;
    let (topic, key, completed) = events.last().expect("events of the session");
    assert_eq!(
        (topic.as_str(), key),
        (topics::UPLOAD_COMPLETED, &session.id)
    );
    assert_eq!(
        *completed,
        serde_json::json!({
            "upload_id": session.id,
            "owner_id": "alice",
            "file_id": second.id,
            "size_bytes": 3000,
            "sha256": stowage_integration_tests::sha256(&data),
        })
    );
    stop.cancel();
    mesh.stop().await
}
