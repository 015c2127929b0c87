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
    // Its uploader is not shown where it is stored (as Files does not show it); the events
    // for the services say.
    assert_eq!(file.storage_key, "");
    let storage_key = stowage_integration_tests::storage_key(mesh.channel(), &file.id).await?;
    assert!(!storage_key.is_empty());
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
            "storage_key": storage_key,
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
                storage_key: storage_key.clone(),
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

/// A producer and consumer groups of the test's own: schema `probe` (outbox, dedupe table,
/// and `probe.applied`, what [`Recorder`] writes) in `setup`'s database, over `redis`.
struct Probe {
    database_url: String,
    namespace: String,
    pool: stowage_db::PgPool,
    redis: fred::clients::Client,
}

impl Probe {
    async fn new(setup: &Setup, redis_url: &str) -> anyhow::Result<Self> {
        let pool = stowage_db::connect(&setup.database_url, 4)?;
        stowage_events::migrate(&pool, "probe").await?;
        pool.get()
            .await?
            .batch_execute("CREATE TABLE probe.applied (grp text, file_id uuid, times int NOT NULL, PRIMARY KEY (grp, file_id))")
            .await?;
        Ok(Self {
            database_url: setup.database_url.clone(),
            namespace: setup.namespace(),
            pool,
            redis: stowage_runtime::redis::connect(redis_url).await?,
        })
    }

    fn stream(&self, topic: &str) -> String {
        stowage_events::stream_key(&self.namespace, topic)
    }

    /// Stages `n` events of `topic`, each keyed by a fresh uuid (returned).
    async fn stage(&self, topic: &str, n: i64) -> anyhow::Result<HashSet<uuid::Uuid>> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "INSERT INTO probe.outbox (topic, key, payload)
                 SELECT $1, gen_random_uuid()::text, '{}'::jsonb FROM generate_series(1, $2::bigint)
                 RETURNING key",
                &[&topic, &n],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| r.get::<_, String>(0).parse())
            .collect::<Result<_, _>>()?)
    }

    /// Outbox rows matching `condition`.
    async fn outbox_count(&self, condition: &str) -> anyhow::Result<i64> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_one(
                &format!("SELECT count(*) FROM probe.outbox WHERE {condition}"),
                &[],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Waits until the relay has published every staged event.
    async fn all_published(&self) -> anyhow::Result<()> {
        stowage_integration_tests::eventually(Duration::from_secs(60), "all published", || async {
            Ok(self.outbox_count("published_at IS NULL").await? == 0)
        })
        .await
    }

    /// The relay, settling every 200 ms, its streams capped near `max_len` entries and
    /// keeping `window` of them (also its replay window).
    fn relay(
        &self,
        max_len: u64,
        window: Duration,
        stop: &CancellationToken,
    ) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let relay = stowage_events::Relay::new(
            self.pool.clone(),
            &self.database_url,
            "probe",
            self.redis.clone(),
            stowage_events::RelaySettings {
                stream_max_len: max_len,
                replay_window: window,
                settle_every: Duration::from_millis(200),
                idle_poll: Duration::from_millis(100),
                namespace: self.namespace.clone(),
                ..stowage_events::RelaySettings::default()
            },
        )?;
        Ok(tokio::spawn(relay.run(stop.clone())))
    }

    /// A member of `group` reading `topic`.
    fn consumer(
        &self,
        group: &str,
        topic: &str,
        handler: Arc<dyn EventHandler>,
        settings: ConsumerSettings,
        stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let consumer = Consumer::new(
            &self.redis,
            self.pool.clone(),
            "probe",
            group,
            &[topic],
            handler,
            ConsumerSettings {
                block: Duration::from_millis(200),
                namespace: self.namespace.clone(),
                ..settings
            },
        );
        tokio::spawn(consumer.run(stop.clone()))
    }

    /// `(file_id, times)` of what `group` applied.
    async fn applied(&self, group: &str) -> anyhow::Result<Vec<(uuid::Uuid, i32)>> {
        let rows = self
            .pool
            .get()
            .await?
            .query(
                "SELECT file_id, times FROM probe.applied WHERE grp = $1",
                &[&group],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Waits until `group` has applied `keys`, and asserts it applied each of them once and
    /// nothing else.
    async fn all_applied_once(
        &self,
        group: &str,
        keys: &HashSet<uuid::Uuid>,
    ) -> anyhow::Result<()> {
        let want = keys.len();
        stowage_integration_tests::eventually(
            Duration::from_secs(90),
            &format!("{want} events applied by {group}"),
            || async { Ok(self.applied(group).await?.len() >= want) },
        )
        .await?;
        let applied = self.applied(group).await?;
        let ids: HashSet<uuid::Uuid> = applied.iter().map(|(id, _)| *id).collect();
        assert_eq!(&ids, keys, "{group} applied exactly the staged events");
        let twice = applied.iter().filter(|(_, times)| *times != 1).count();
        assert_eq!(twice, 0, "{group}: {twice} events applied more than once");
        Ok(())
    }
}

fn recorder(group: &'static str) -> Arc<Recorder> {
    Arc::new(Recorder {
        group,
        deliveries: AtomicUsize::new(0),
    })
}

#[tokio::test]
async fn a_group_behind_the_length_cap_applies_every_event_and_streams_keep_only_what_groups_need()
-> anyhow::Result<()> {
    use fred::interfaces::StreamsInterface;
    let setup = Setup::new().await?;
    let probe = Probe::new(&setup, &setup.redis_url).await?;
    let topic = "probe.capped";
    let stream = probe.stream(topic);
    // The group exists before anything is published, and reads only once all of it is.
    probe
        .redis
        .xgroup_create::<(), _, _, _>(stream.as_str(), "slow", "0", true)
        .await?;
    let stop = CancellationToken::new();
    let relay = probe.relay(1000, Duration::from_secs(2), &stop)?;
    let keys = probe.stage(topic, 5000).await?;
    probe.all_published().await?;
    let length: u64 = probe.redis.xlen(stream.as_str()).await?;
    assert!(
        length < 2000,
        "the cap keeps the stream near 1000 entries, not {length}: most were cut unread"
    );

    let consumer = probe.consumer(
        "slow",
        topic,
        recorder("slow"),
        ConsumerSettings::default(),
        &stop,
    );
    probe.all_applied_once("slow", &keys).await?;
    // Once the group has everything, every row is settled and the stream trimmed to what
    // the group still needs (nothing; `MINID ~` leaves at most a part-filled node).
    stowage_integration_tests::eventually(
        Duration::from_secs(30),
        "rows settled, stream trimmed",
        || async {
            let length: u64 = probe.redis.xlen(stream.as_str()).await?;
            Ok(probe.outbox_count("settled_at IS NULL").await? == 0 && length <= 100)
        },
    )
    .await?;
    stop.cancel();
    relay.await?;
    consumer.await?;
    Ok(())
}

#[tokio::test]
async fn events_redis_lost_by_restarting_from_an_older_snapshot_are_published_again()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // A Redis of this test's own that keeps a snapshot only when told (SAVE).
    let dir = tempfile::tempdir()?;
    let port = stowage_local::free_port()?;
    let start_redis = || -> anyhow::Result<tokio::process::Child> {
        Ok(stowage_local::redis_command(port)
            .args(["--dir", &dir.path().display().to_string()])
            .spawn()?)
    };
    let mut server = start_redis()?;
    let url = format!("redis://127.0.0.1:{port}");
    stowage_integration_tests::eventually(Duration::from_secs(10), "redis up", || async {
        Ok(stowage_runtime::redis::connect(&url).await.is_ok())
    })
    .await?;
    let probe = Probe::new(&setup, &url).await?;
    let topic = "probe.snapshot";
    let stop = CancellationToken::new();
    let relay = probe.relay(1_000_000, Duration::from_secs(3600), &stop)?;
    let reading = CancellationToken::new();
    let consumer = probe.consumer(
        "g",
        topic,
        recorder("g"),
        ConsumerSettings::default(),
        &reading,
    );
    let mut keys = probe.stage(topic, 100).await?;
    probe.all_applied_once("g", &keys).await?;
    // The snapshot holds the first hundred (and the relay's epoch key); the next hundred are
    // published while the group does not read, and are in no snapshot.
    use fred::interfaces::ClientLike;
    let _: fred::types::Value = probe
        .redis
        .custom(fred::cmd!("SAVE"), Vec::<String>::new())
        .await?;
    reading.cancel();
    consumer.await?;
    keys.extend(probe.stage(topic, 100).await?);
    probe.all_published().await?;
    // Killed: it comes back from the snapshot, its epoch key there, the last hundred gone.
    server.kill().await?;
    let mut server = start_redis()?;
    let reading = CancellationToken::new();
    let consumer = probe.consumer(
        "g",
        topic,
        recorder("g"),
        ConsumerSettings::default(),
        &reading,
    );
    probe.all_applied_once("g", &keys).await?;
    reading.cancel();
    stop.cancel();
    consumer.await?;
    relay.await?;
    server.kill().await?;
    Ok(())
}

/// Fails every event keyed `refused` with a reason; records the rest as [`Recorder`] does.
struct Refuses {
    inner: Recorder,
    refused: uuid::Uuid,
}

#[async_trait]
impl EventHandler for Refuses {
    async fn handle(
        &self,
        event: &Event,
        tx: &stowage_db::Transaction<'_>,
    ) -> Result<(), HandlerError> {
        if event.key == self.refused.to_string() {
            return Err(HandlerError(format!("refused {}", event.key)));
        }
        self.inner.handle(event, tx).await
    }
}

#[tokio::test]
async fn an_event_that_fails_every_attempt_is_set_aside_as_a_dead_letter_and_acknowledged()
-> anyhow::Result<()> {
    use fred::interfaces::StreamsInterface;
    let setup = Setup::new().await?;
    let probe = Probe::new(&setup, &setup.redis_url).await?;
    let topic = "probe.poison";
    let stop = CancellationToken::new();
    let relay = probe.relay(1_000_000, Duration::from_secs(3600), &stop)?;
    let mut keys = probe.stage(topic, 20).await?;
    let refused = *keys.iter().next().expect("staged");
    keys.remove(&refused);
    let handler = Arc::new(Refuses {
        inner: Recorder {
            group: "g",
            deliveries: AtomicUsize::new(0),
        },
        refused,
    });
    let consumer = probe.consumer(
        "g",
        topic,
        handler,
        ConsumerSettings {
            claim_idle: Duration::from_millis(300),
            max_attempts: 3,
            ..ConsumerSettings::default()
        },
        &stop,
    );
    probe.all_applied_once("g", &keys).await?;
    let conn = probe.pool.get().await?;
    stowage_integration_tests::eventually(Duration::from_secs(30), "a dead letter", || async {
        Ok(conn
            .query_opt("SELECT 1 FROM probe.dead_events", &[])
            .await?
            .is_some())
    })
    .await?;
    let dead = conn
        .query_one(
            "SELECT consumer, event_id, topic, key, failures, last_error FROM probe.dead_events",
            &[],
        )
        .await?;
    assert_eq!(dead.get::<_, String>(0), "g");
    assert_eq!(dead.get::<_, String>(2), topic);
    assert_eq!(dead.get::<_, String>(3), refused.to_string());
    assert_eq!(dead.get::<_, i32>(4), 3, "three attempts");
    assert_eq!(dead.get::<_, String>(5), format!("refused {refused}"));
    let staged: uuid::Uuid = conn
        .query_one(
            "SELECT event_id FROM probe.outbox WHERE key = $1",
            &[&refused.to_string()],
        )
        .await?
        .get(0);
    assert_eq!(dead.get::<_, uuid::Uuid>(1), staged);
    let counting: i64 = conn
        .query_one("SELECT count(*) FROM probe.event_failures", &[])
        .await?
        .get(0);
    assert_eq!(counting, 0, "the failure count went with the dead letter");
    // Acknowledged (just after): nothing pending for the group, and the event never applied.
    let stream = probe.stream(topic);
    stowage_integration_tests::eventually(Duration::from_secs(10), "nothing pending", || async {
        let summary: fred::types::Value = probe.redis.xpending(stream.as_str(), "g", ()).await?;
        Ok(summary.into_array().first().and_then(|v| v.as_i64()) == Some(0))
    })
    .await?;
    assert!(
        probe
            .applied("g")
            .await?
            .iter()
            .all(|(id, _)| *id != refused),
        "the refused event was not applied"
    );
    stop.cancel();
    relay.await?;
    consumer.await?;
    Ok(())
}

#[tokio::test]
async fn members_of_a_group_that_are_gone_are_forgotten_unless_they_hold_deliveries()
-> anyhow::Result<()> {
    use fred::interfaces::StreamsInterface;
    let setup = Setup::new().await?;
    let probe = Probe::new(&setup, &setup.redis_url).await?;
    let topic = "probe.members";
    let stream = probe.stream(topic);
    let stop = CancellationToken::new();
    let relay = probe.relay(1_000_000, Duration::from_secs(3600), &stop)?;
    probe
        .redis
        .xgroup_create::<(), _, _, _>(stream.as_str(), "g", "0", true)
        .await?;
    probe.stage(topic, 1).await?;
    probe.all_published().await?;
    // Two members of processes that died: one had read nothing, one holds the delivery.
    let _: fred::types::Value = probe
        .redis
        .xreadgroup(
            "g",
            "idle-ghost",
            Some(1),
            None,
            false,
            stream.as_str(),
            "0",
        )
        .await?;
    let _: fred::types::Value = probe
        .redis
        .xreadgroup(
            "g",
            "holding-ghost",
            Some(1),
            None,
            false,
            stream.as_str(),
            ">",
        )
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let consumer = probe.consumer(
        "g",
        topic,
        recorder("g"),
        ConsumerSettings {
            // Long enough that the held delivery is not claimed meanwhile.
            claim_idle: Duration::from_secs(600),
            forget_members_after: Duration::from_secs(1),
            ..ConsumerSettings::default()
        },
        &stop,
    );
    let members = || async {
        let members: Vec<std::collections::HashMap<String, fred::types::Value>> =
            probe.redis.xinfo_consumers(stream.as_str(), "g").await?;
        let mut names: Vec<String> = members
            .iter()
            .filter_map(|m| m.get("name").and_then(|v| v.as_string()))
            .collect();
        names.sort();
        anyhow::Ok(names)
    };
    stowage_integration_tests::eventually(
        Duration::from_secs(20),
        "idle-ghost forgotten",
        || async { Ok(!members().await?.contains(&"idle-ghost".to_owned())) },
    )
    .await?;
    // The live member is listed only once a read gave it something (Redis 7.0).
    let left = members().await?;
    assert!(
        left.contains(&"holding-ghost".to_owned()),
        "the member holding a delivery stays: {left:?}"
    );
    stop.cancel();
    relay.await?;
    consumer.await?;
    Ok(())
}

/// A group created after the others have acknowledged everything (a new service, or one back
/// later than the others after a Redis restart) still reads the replay window's events: the
/// stream keeps them, acknowledged or not.
#[tokio::test]
async fn a_group_created_late_reads_what_the_others_acknowledged() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let probe = Probe::new(&setup, &setup.redis_url).await?;
    let topic = "probe.late";
    let stop = CancellationToken::new();
    let relay = probe.relay(1_000_000, Duration::from_secs(3600), &stop)?;
    let first = probe.consumer(
        "first",
        topic,
        recorder("first"),
        ConsumerSettings::default(),
        &stop,
    );
    let keys = probe.stage(topic, 300).await?;
    probe.all_applied_once("first", &keys).await?;
    stowage_integration_tests::eventually(Duration::from_secs(30), "all settled", || async {
        Ok(probe.outbox_count("settled_at IS NULL").await? == 0)
    })
    .await?;
    // Settled, and trimmed as far as the stream would be.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = probe.consumer(
        "late",
        topic,
        recorder("late"),
        ConsumerSettings::default(),
        &stop,
    );
    probe.all_applied_once("late", &keys).await?;
    stop.cancel();
    relay.await?;
    first.await?;
    late.await?;
    Ok(())
}

/// A process listens for every channel of a database on one connection (each listening
/// backend is woken by every notification of its database): all of a mesh's relays and job
/// workers share one. Each channel wakes only its own waiters; after the connection is cut,
/// every waiter is woken once it is back and notifications reach them again; the connection
/// closes when the last waiter stops.
#[tokio::test]
async fn a_process_listens_on_one_connection_per_database() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let listeners = || async {
        let rows = conn
            .query(
                "SELECT pid, query FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1",
                &[&stowage_db::LISTENER_APPLICATION_NAME],
            )
            .await?;
        anyhow::Ok(
            rows.iter()
                .map(|r| (r.get::<_, i32>(0), r.get::<_, String>(1)))
                .collect::<Vec<_>>(),
        )
    };
    // Five relays and two job queues (Media's, Lifecycle's), one connection (connecting in
    // the background after the mesh answers).
    stowage_integration_tests::eventually(
        Duration::from_secs(10),
        "the mesh listening",
        || async { Ok(!listeners().await?.is_empty()) },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let found = listeners().await?;
    assert_eq!(found.len(), 1, "{found:?}");
    mesh.stop().await?;
    stowage_integration_tests::eventually(
        Duration::from_secs(10),
        "the mesh's listener gone",
        || async { Ok(listeners().await?.is_empty()) },
    )
    .await?;

    let stop = CancellationToken::new();
    let (a, b) = (
        Arc::new(tokio::sync::Notify::new()),
        Arc::new(tokio::sync::Notify::new()),
    );
    for (channel, wake) in [("probe_a", &a), ("probe_b", &b)] {
        tokio::spawn(stowage_db::listen(
            stowage_db::PgTarget::parse(&setup.database_url)?,
            channel.to_owned(),
            Arc::clone(wake),
            stop.clone(),
        ));
        // The first wake says the LISTEN is in place.
        tokio::time::timeout(Duration::from_secs(10), wake.notified()).await?;
    }
    let woken = |wake: &Arc<tokio::sync::Notify>, within: u64| {
        let wake = Arc::clone(wake);
        async move {
            tokio::time::timeout(Duration::from_millis(within), wake.notified())
                .await
                .is_ok()
        }
    };
    // Any wake left from the start is taken.
    woken(&a, 200).await;
    woken(&b, 200).await;
    conn.execute("SELECT pg_notify('probe_a', '')", &[]).await?;
    assert!(woken(&a, 5000).await, "probe_a's waiter woken");
    assert!(!woken(&b, 500).await, "probe_b's waiter left asleep");
    conn.execute("SELECT pg_notify('probe_b', '')", &[]).await?;
    assert!(woken(&b, 5000).await, "probe_b's waiter woken");
    let found = listeners().await?;
    assert_eq!(found.len(), 1, "{found:?}");

    // Cut: both are woken once it listens again (what was sent meanwhile is lost), and it
    // carries notifications again.
    conn.execute("SELECT pg_terminate_backend($1)", &[&found[0].0])
        .await?;
    assert!(
        woken(&a, 10_000).await && woken(&b, 10_000).await,
        "woken on reconnection"
    );
    conn.execute("SELECT pg_notify('probe_b', '')", &[]).await?;
    assert!(
        woken(&b, 5000).await,
        "probe_b's waiter woken after the reconnection"
    );
    // The terminated backend may be listed a moment longer.
    stowage_integration_tests::eventually(
        Duration::from_secs(10),
        "one listener again",
        || async {
            let found = listeners().await?;
            Ok(
                found.len() == 1
                    && found[0].1.contains("probe_a")
                    && found[0].1.contains("probe_b"),
            )
        },
    )
    .await?;

    stop.cancel();
    stowage_integration_tests::eventually(
        Duration::from_secs(10),
        "the listener closed",
        || async { Ok(listeners().await?.is_empty()) },
    )
    .await
}

/// A relay prunes published rows past the outbox's retention (7 days) when it starts, not
/// only ten minutes into its run, whether every group acknowledged them or not (those it
/// counts as dropped, as an operator sees on /metrics); a recent row stays.
#[tokio::test]
async fn a_relay_prunes_rows_past_retention_from_its_first_pass() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // Its /metrics shows what this process (the probe's relay too) counts.
    let mesh = Mesh::start(&setup).await?;
    let probe = Probe::new(&setup, &setup.redis_url).await?;
    let keys: Vec<uuid::Uuid> = probe.stage("probe.pruned", 3).await?.into_iter().collect();
    let conn = probe.pool.get().await?;
    conn.execute(
        "UPDATE probe.outbox SET created_at = now() - interval '8 days',
                published_at = now() - interval '8 days', stream_ms = 1, stream_seq = 0,
                settled_at = CASE WHEN key = $1 THEN now() - interval '8 days' END
         WHERE key IN ($1, $2)",
        &[&keys[0].to_string(), &keys[1].to_string()],
    )
    .await?;
    let stop = CancellationToken::new();
    let relay = probe.relay(1000, Duration::from_secs(60), &stop)?;
    stowage_integration_tests::eventually(Duration::from_secs(30), "old rows pruned", || async {
        Ok(probe.outbox_count("true").await? == 1)
    })
    .await?;
    assert_eq!(
        probe.outbox_count(&format!("key = '{}'", keys[2])).await?,
        1
    );
    // One of the two pruned was never acknowledged by every group.
    let metrics = stowage_integration_tests::scrape(&mesh).await?;
    let dropped = stowage_integration_tests::sample(
        &metrics,
        "stowage_events_dropped_total",
        &["schema=\"probe\""],
    );
    assert_eq!(dropped, Some(1.0), "{metrics}");
    stop.cancel();
    relay.await?;
    mesh.stop().await
}
