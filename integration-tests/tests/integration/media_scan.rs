//! Antivirus with a real clamd (signature database made here, no download) and a Media
//! worker killed in the middle of its jobs.

use std::time::Duration;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use stowage::Role;
use stowage_integration_tests::{
    download, eventually, files, media_announced, media_jobs_settled, sample, scrape, upload,
    wait_processed,
};
use stowage_proto::v1::{self as pb, media_client::MediaClient};
use stowage_testkit::{
    EICAR, LocalClamd, Mesh, Processes, SIGNATURE_VERSION, Setup, authed, channel, token,
};
use tonic::Code;

const PATIENCE: Duration = Duration::from_secs(60);

async fn owner_sees(mesh: &Mesh, token: &str, file_id: &str) -> Result<pb::File, Code> {
    files(mesh.channel())
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file_id.to_owned(),
            },
            token,
        ))
        .await
        .map(|r| r.into_inner().file.unwrap_or_default())
        .map_err(|s| s.code())
}

async fn listed(mesh: &Mesh, token: &str) -> anyhow::Result<Vec<String>> {
    Ok(files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), token))
        .await?
        .into_inner()
        .files
        .into_iter()
        .map(|f| f.id)
        .collect())
}

/// Sets `file_id`'s status in Files as Media does (keeping its variants and reason).
async fn set_status(mesh: &Mesh, file_id: &str, status: pb::FileStatus) -> anyhow::Result<()> {
    files(mesh.channel())
        .set_variants(authed(
            pb::SetVariantsRequest {
                file_id: file_id.to_owned(),
                status: status as i32,
                ..Default::default()
            },
            &token("media", &["service"]),
        ))
        .await?;
    Ok(())
}

async fn quarantine(mesh: &Mesh, admin: &str) -> anyhow::Result<Vec<pb::QuarantinedFile>> {
    Ok(MediaClient::new(mesh.channel())
        .list_quarantine(authed(pb::ListQuarantineRequest::default(), admin))
        .await?
        .into_inner()
        .files)
}

#[tokio::test]
async fn infected_files_are_quarantined_and_a_scanner_outage_holds_files_back() -> anyhow::Result<()>
{
    let clamd = LocalClamd::start().await?;
    let setup = Setup::new().await?;
    let url = clamd.url();
    let mesh = Mesh::start_with(&setup, |config| {
        config.media.clamd_url = Some(url);
        config.media.scan_timeout = Duration::from_secs(5);
        config.media.backoff_base = Duration::from_millis(500);
        config.media.backoff_cap = Duration::from_secs(2);
        config.media.max_attempts = 100;
    })
    .await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);

    let infected = upload(mesh.channel(), &alice, "eicar.com", EICAR, &[]).await?;
    let clean = upload(mesh.channel(), &alice, "notes.txt", b"just words", &[]).await?;
    // With a scanner every file waits for its scan, plain text too.
    assert_eq!(clean.status, pb::FileStatus::Processing as i32);
    let seen = wait_processed(mesh.channel(), &admin, &infected.id, PATIENCE).await?;
    assert_eq!(seen.status, pb::FileStatus::Quarantined as i32);
    assert!(
        seen.status_reason.contains("EICAR"),
        "{}",
        seen.status_reason
    );
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    assert_eq!(
        media_announced(&pool, &infected.id, 1).await?,
        ["media.quarantined"]
    );
    // Her storage totals count what she can list: not the quarantined file.
    let stats = stowage_integration_tests::files(mesh.channel())
        .storage_stats(authed(pb::StorageStatsRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(
        (stats.file_count, stats.total_bytes),
        (1, b"just words".len() as u64),
        "{stats:?}"
    );
    let ready = wait_processed(mesh.channel(), &alice, &clean.id, PATIENCE).await?;
    assert_eq!(
        ready.status,
        pb::FileStatus::Ready as i32,
        "{}",
        ready.status_reason
    );

    // Invisible to its owner: not readable, not listed, not downloadable.
    assert_eq!(
        owner_sees(&mesh, &alice, &infected.id).await.map(|_| ()),
        Err(Code::NotFound)
    );
    assert_eq!(listed(&mesh, &alice).await?, vec![clean.id.clone()]);
    let fetched = download(mesh.channel(), &alice, &infected.id, None).await;
    assert_eq!(
        fetched.map(|_| ()).map_err(|s| s.code()),
        Err(Code::NotFound)
    );

    // No signed link serves it, not even one an admin asks for (a link is anyone's who has it).
    let link = stowage_integration_tests::files(mesh.channel())
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: infected.id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .expect_err("no link to a quarantined file");
    assert_eq!(link.code(), Code::FailedPrecondition, "{link:?}");
    assert!(link.message().contains("quarantined"), "{link:?}");

    // Admins list it and release it: processed without a second scan, then visible.
    let held = quarantine(&mesh, &admin).await?;
    assert_eq!(held.len(), 1);
    assert_eq!(
        held[0].file.as_ref().map(|f| f.id.as_str()),
        Some(infected.id.as_str())
    );
    assert!(held[0].signature.contains("EICAR"), "{}", held[0].signature);
    MediaClient::new(mesh.channel())
        .release_quarantined(authed(
            pb::ReleaseQuarantinedRequest {
                file_id: infected.id.clone(),
            },
            &admin,
        ))
        .await?;
    let released = wait_processed(mesh.channel(), &alice, &infected.id, PATIENCE).await?;
    assert_eq!(released.status, pb::FileStatus::Ready as i32);
    assert_eq!(
        media_announced(&pool, &infected.id, 3).await?,
        [
            "media.quarantined",
            "media.quarantine_released",
            "media.ready"
        ]
    );
    assert!(quarantine(&mesh, &admin).await?.is_empty());
    let (_, bytes) = download(mesh.channel(), &alice, &infected.id, None).await?;
    assert_eq!(bytes, EICAR);
    // Her history says what happened to it, and which admin released it.
    let history = || stowage_integration_tests::user_history(mesh.channel(), &alice);
    stowage_integration_tests::eventually(PATIENCE, "the quarantine in her history", || async {
        Ok(history().await?.len() >= 2)
    })
    .await?;
    let seen = history().await?;
    let about = |event: &str| {
        seen.iter()
            .find(|(e, detail)| e == event && detail["file_id"] == infected.id.as_str())
            .unwrap_or_else(|| panic!("no {event} in {seen:?}"))
    };
    let (released, quarantined) = (
        about("quarantine_released_by_admin"),
        about("file_quarantined"),
    );
    assert_eq!(released.1["admin"], "root", "{seen:?}");
    assert_eq!(quarantined.1["file_id"], infected.id.as_str(), "{seen:?}");
    assert!(
        quarantined.1["reason"]
            .as_str()
            .is_some_and(|r| r.contains("EICAR")),
        "{seen:?}"
    );

    // A row an earlier run left held (it failed before telling Files) goes once a later scan
    // of the file is clean: the list shows only files that are quarantined.
    pool.get()
        .await?
        .execute(
            "INSERT INTO media.quarantine (file_id, owner_id, signature)
             VALUES ($1::text::uuid, 'alice', 'Stale.Signature')",
            &[&clean.id],
        )
        .await?;
    assert_eq!(quarantine(&mesh, &admin).await?.len(), 1);
    media_jobs_settled(&pool).await?;
    set_status(&mesh, &clean.id, pb::FileStatus::Processing).await?;
    MediaClient::new(mesh.channel())
        .reprocess(authed(
            pb::ReprocessRequest {
                file_id: clean.id.clone(),
            },
            &admin,
        ))
        .await?;
    let rescanned = wait_processed(mesh.channel(), &alice, &clean.id, PATIENCE).await?;
    assert_eq!(rescanned.status, pb::FileStatus::Ready as i32);
    assert!(quarantine(&mesh, &admin).await?.is_empty());

    // Another one, purged by an admin: row and bytes gone.
    let second = upload(mesh.channel(), &alice, "again.com", EICAR, &[]).await?;
    wait_processed(mesh.channel(), &admin, &second.id, PATIENCE).await?;
    assert_eq!(quarantine(&mesh, &admin).await?.len(), 1);
    files(mesh.channel())
        .purge_file(authed(
            pb::PurgeFileRequest {
                file_id: second.id.clone(),
                ..Default::default()
            },
            &admin,
        ))
        .await?;
    assert!(quarantine(&mesh, &admin).await?.is_empty());
    let stored = mesh.stored_objects("users/alice").await?;
    assert!(!stored.iter().any(|k| k.contains(&second.id)), "{stored:?}");

    // Files holds a new file for the scan whatever its registrant says (an Ingest configured
    // without the scanner would say ready), so Media scans it.
    let said_ready = uuid::Uuid::new_v4();
    let key = format!("users/alice/document/2026/12/{said_ready}.txt");
    object_store::ObjectStoreExt::put(
        &*mesh.blobs.store,
        &object_store::path::Path::from(key.as_str()),
        b"said ready".to_vec().into(),
    )
    .await?;
    let registered = files(mesh.channel())
        .register_file(authed(
            pb::RegisterFileRequest {
                owner_id: "alice".into(),
                file_id: said_ready.to_string(),
                display_name: "said.txt".into(),
                kind: pb::FileKind::Document as i32,
                mime_type: "text/plain; charset=utf-8".into(),
                size_bytes: 10,
                sha256: "00".repeat(32),
                storage_key: key,
                status: pb::FileStatus::Ready as i32,
                idempotency_key: said_ready.to_string(),
                ..Default::default()
            },
            &token("stowage-internal", &["service"]),
        ))
        .await?
        .into_inner()
        .file
        .unwrap_or_default();
    assert_eq!(registered.status, pb::FileStatus::Processing as i32);
    let scanned = wait_processed(mesh.channel(), &alice, &registered.id, PATIENCE).await?;
    assert_eq!(scanned.status, pb::FileStatus::Ready as i32);

    // Scanner down: new files stay in processing and are not served...
    let port = clamd.port();
    clamd.stop().await?;
    let waiting = upload(mesh.channel(), &alice, "later.txt", b"scan me later", &[]).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let file = owner_sees(&mesh, &alice, &waiting.id)
        .await
        .map_err(|c| anyhow::anyhow!("{c:?}"))?;
    assert_eq!(file.status, pb::FileStatus::Processing as i32);
    let fetched = download(mesh.channel(), &alice, &waiting.id, None).await;
    assert_eq!(
        fetched.map(|_| ()).map_err(|s| s.code()),
        Err(Code::FailedPrecondition)
    );
    // The scan's failed attempts are retried, as Prometheus sees it.
    eventually(PATIENCE, "a retried media job counted", || async {
        let metrics = scrape(&mesh).await?;
        let retried = sample(
            &metrics,
            "stowage_jobs_retried_total",
            &["queue=\"media\"", "kind=\"media.process\""],
        );
        Ok(retried.unwrap_or(0.0) >= 1.0)
    })
    .await?;
    // ...and finish once it is back.
    let _clamd = LocalClamd::start_on(port).await?;
    let done = wait_processed(mesh.channel(), &alice, &waiting.id, PATIENCE).await?;
    assert_eq!(
        done.status,
        pb::FileStatus::Ready as i32,
        "{}",
        done.status_reason
    );
    download(mesh.channel(), &alice, &waiting.id, None).await?;
    mesh.stop().await
}

#[tokio::test]
async fn a_media_worker_killed_mid_job_leaves_no_duplicates_and_no_orphans() -> anyhow::Result<()> {
    let mut setup = Setup::new().await?;
    setup.env.extend([
        ("STOWAGE_MEDIA__JOB_TIMEOUT".to_owned(), "4s".to_owned()),
        ("STOWAGE_MEDIA__TOOL_TIMEOUT".to_owned(), "3s".to_owned()),
        ("STOWAGE_MEDIA__BACKOFF_BASE".to_owned(), "200ms".to_owned()),
        ("STOWAGE_MEDIA__CONCURRENCY".to_owned(), "2".to_owned()),
    ]);
    let mut processes = Processes::split(&setup).await?;
    let alice = token("alice", &[]);
    // Admins see variants' store keys.
    let admin = token("root", &["admin"]);
    let ingest = channel(processes.addr(Role::Ingest));
    let files_channel = channel(processes.addr(Role::Files));

    // Photo-sized images, so jobs are still running when the worker dies.
    let mut ids = Vec::new();
    for i in 0..6u8 {
        let img = RgbImage::from_fn(3000, 2000, |x, y| {
            Rgb([(x % 251) as u8 ^ i, (y % 241) as u8, ((x + y) % 239) as u8])
        });
        let mut jpeg = std::io::Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img).write_to(&mut jpeg, ImageFormat::Jpeg)?;
        let file = upload(
            ingest.clone(),
            &alice,
            &format!("p{i}.jpg"),
            jpeg.get_ref(),
            &[],
        )
        .await?;
        ids.push(file.id);
    }
    // Kill Media as soon as one of its jobs runs.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if stowage_integration_tests::media_jobs_running(&pool).await? > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no job ever ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    processes
        .process(Role::Media)
        .signal(nix::sys::signal::Signal::SIGKILL)?;
    processes.restart(&setup, Role::Media).await?;

    let mut referenced = Vec::new();
    for id in &ids {
        let file = wait_processed(files_channel.clone(), &admin, id, PATIENCE).await?;
        assert_eq!(
            file.status,
            pb::FileStatus::Ready as i32,
            "{}",
            file.status_reason
        );
        let mut names: Vec<&str> = file.variants.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "preview_1280_webp",
                "thumb_256_jpeg",
                "thumb_256_webp",
                "thumbhash"
            ]
        );
        referenced.extend(
            file.variants
                .iter()
                .filter(|v| !v.storage_key.is_empty())
                .map(|v| v.storage_key.clone()),
        );
    }
    // Every stored variant is referenced by a file, and nothing else lies under variants/
    // but the temporary file of a write the kill cut short (the store lists none, and
    // Lifecycle's blob_gc removes them: lifecycle.rs). At most one per job that was running,
    // each for a variant its retry then wrote whole.
    referenced.sort();
    let (unfinished, stored): (Vec<String>, Vec<String>) = setup
        .stored_objects("users/alice/variants")
        .into_iter()
        .partition(|path| {
            let name = path.rsplit('/').next().unwrap_or(path);
            stowage_blob::is_temporary(name)
        });
    assert_eq!(stored, referenced);
    assert!(unfinished.len() <= 2, "{unfinished:?}");
    for path in &unfinished {
        let (key, _) = path.split_once('#').unwrap_or((path, ""));
        assert!(referenced.iter().any(|r| r == key), "{path}");
    }
    // The runs the kill cut short were counted, and the runs that then finished forgot them:
    // one kill does not bring a file nearer to failing for good.
    let counted: i64 = pool
        .get()
        .await?
        .query_one("SELECT count(*) FROM media.unfinished_runs", &[])
        .await?
        .get(0);
    assert_eq!(counted, 0);
    Ok(())
}

/// A release Files cannot take in time (its table locked past the peer deadline) fails, and
/// the same release tried again once Files answers goes through: the file is not left
/// quarantined in Files while Media counts it released.
#[tokio::test]
async fn a_release_files_could_not_take_goes_through_when_tried_again() -> anyhow::Result<()> {
    let clamd = LocalClamd::start().await?;
    let setup = Setup::new().await?;
    let url = clamd.url();
    let mesh = Mesh::start_with(&setup, |config| {
        config.media.clamd_url = Some(url);
        config.peers.timeout = Some(Duration::from_secs(1));
    })
    .await?;
    let (alice, admin) = (token("alice", &[]), token("root", &["admin"]));
    let infected = upload(mesh.channel(), &alice, "eicar.com", EICAR, &[]).await?;
    let seen = wait_processed(mesh.channel(), &admin, &infected.id, PATIENCE).await?;
    assert_eq!(seen.status, pb::FileStatus::Quarantined as i32);
    let release = || {
        let mut media = MediaClient::new(mesh.channel());
        let request = authed(
            pb::ReleaseQuarantinedRequest {
                file_id: infected.id.clone(),
            },
            &admin,
        );
        async move { media.release_quarantined(request).await }
    };

    let pool = stowage_db::connect(&setup.database_url, 1)?;
    // While the file's run is still at it (its verdict not yet in Files), a release would be
    // overtaken by that verdict: refused until the job is done.
    media_jobs_settled(&pool).await?;
    set_status(&mesh, &infected.id, pb::FileStatus::Processing).await?;
    let set_job = |state: &'static str| {
        let (pool, id) = (pool.clone(), infected.id.clone());
        async move {
            pool.get()
                .await?
                .execute(
                    "UPDATE media.jobs SET state = $2, run_at = now() + interval '1 hour'
                      WHERE payload->>'file_id' = $1",
                    &[&id, &state],
                )
                .await?;
            anyhow::Ok(())
        }
    };
    set_job("queued").await?;
    let early = release().await.expect_err("a run still at it");
    assert_eq!(early.code(), Code::FailedPrecondition, "{early:?}");
    assert!(
        early.message().contains("queued, running or waiting"),
        "{early:?}"
    );
    assert_eq!(quarantine(&mesh, &admin).await?.len(), 1, "still held");
    // Nor while a run an admin retried is at it, though Files says quarantined: that run
    // would end without processing the released file again.
    set_status(&mesh, &infected.id, pb::FileStatus::Quarantined).await?;
    let retried = release().await.expect_err("a retried run at it");
    assert_eq!(retried.code(), Code::FailedPrecondition, "{retried:?}");
    assert_eq!(quarantine(&mesh, &admin).await?.len(), 1, "still held");
    set_job("succeeded").await?;
    // Nor when the job cannot be read (it may be running).
    pool.get()
        .await?
        .batch_execute("ALTER TABLE media.jobs RENAME TO jobs_away")
        .await?;
    let unknown = release().await;
    pool.get()
        .await?
        .batch_execute("ALTER TABLE media.jobs_away RENAME TO jobs")
        .await?;
    assert!(unknown.is_err(), "{unknown:?}");
    assert_eq!(quarantine(&mesh, &admin).await?.len(), 1, "still held");

    let mut blocker = pool.get().await?;
    let lock = blocker.transaction().await?;
    lock.batch_execute("LOCK TABLE files.files IN ACCESS EXCLUSIVE MODE")
        .await?;
    let failed = release().await;
    lock.rollback().await?;
    assert!(failed.is_err(), "Files could not answer: {failed:?}");
    assert_eq!(quarantine(&mesh, &admin).await?.len(), 1, "still held");

    release().await?;
    let released = wait_processed(mesh.channel(), &alice, &infected.id, PATIENCE).await?;
    assert_eq!(released.status, pb::FileStatus::Ready as i32);
    assert!(quarantine(&mesh, &admin).await?.is_empty());
    mesh.stop().await
}

/// `(scanner, signature version, scanned_at)` of `file_id`'s last clean scan as Media
/// recorded it.
async fn recorded_scan(
    pool: &stowage_db::PgPool,
    file_id: &str,
) -> anyhow::Result<Option<(String, Option<i64>, chrono::DateTime<chrono::Utc>)>> {
    Ok(pool
        .get()
        .await?
        .query_opt(
            "SELECT scanner, signatures, scanned_at FROM media.scans
             WHERE file_id = $1::text::uuid",
            &[&file_id],
        )
        .await?
        .map(|r| (r.get(0), r.get(1), r.get(2))))
}

/// Files of Media's re-scan jobs that ran, sorted.
async fn rescanned(pool: &stowage_db::PgPool) -> anyhow::Result<Vec<String>> {
    let mut files: Vec<String> = pool
        .get()
        .await?
        .query(
            "SELECT payload->>'file_id' FROM media.jobs
             WHERE kind = 'media.rescan' AND state = 'succeeded'",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    files.sort();
    Ok(files)
}

/// Waits until two more checks for re-scans ran to the end, and the jobs they queued.
async fn two_more_checks(pool: &stowage_db::PgPool) -> anyhow::Result<()> {
    let ended = || async {
        let count: i64 = pool
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM media.jobs
                 WHERE kind = 'media.rescan_check' AND state = 'succeeded'",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok(count)
    };
    let before = ended().await?;
    eventually(PATIENCE, "two more re-scan checks", || async {
        Ok(ended().await? >= before + 2)
    })
    .await?;
    media_jobs_settled(pool).await
}

async fn wait_status(
    mesh: &Mesh,
    admin: &str,
    file_id: &str,
    status: pb::FileStatus,
) -> anyhow::Result<pb::File> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let seen = files(mesh.channel())
            .get_file(authed(
                pb::GetFileRequest {
                    file_id: file_id.to_owned(),
                },
                admin,
            ))
            .await?
            .into_inner()
            .file
            .unwrap_or_default();
        if seen.status == status as i32 {
            return Ok(seen);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "{file_id} not {status:?} after {PATIENCE:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn files_that_scanned_clean_are_scanned_again_when_signatures_change() -> anyhow::Result<()> {
    let clamd = LocalClamd::start().await?;
    let setup = Setup::new().await?;
    let url = clamd.url();
    let mesh = Mesh::start_with(&setup, |config| {
        config.media.clamd_url = Some(url);
        config.media.scan_timeout = Duration::from_secs(5);
        // The check runs every second here (hourly by default).
        config.media.rescan_interval = Duration::from_secs(1);
    })
    .await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let pool = stowage_db::connect(&setup.database_url, 1)?;

    // Three files scan clean; each scan is recorded with what clamd reports it scans with
    // (before the run tells Files the file is ready).
    let payload: &[u8] = b"MZ pretend this is a dropper that nobody recognises yet";
    let macro_doc: &[u8] = b"a document whose macro only our own signatures know";
    let dropper = upload(mesh.channel(), &alice, "setup.exe", payload, &[]).await?;
    let doc = upload(mesh.channel(), &alice, "invoice.doc", macro_doc, &[]).await?;
    let notes = upload(mesh.channel(), &alice, "notes.txt", b"only words", &[]).await?;
    for file in [&dropper, &doc, &notes] {
        let seen = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
        assert_eq!(seen.status, pb::FileStatus::Ready as i32, "{seen:?}");
    }
    let version = clamd.version().await?;
    let first = SIGNATURE_VERSION as i64;
    assert!(version.contains(&format!("/{first}/")), "{version}");
    for file in [&dropper, &doc, &notes] {
        let (scanner, signatures, _) = recorded_scan(&pool, &file.id).await?.expect("recorded");
        assert_eq!(
            (scanner.as_str(), signatures),
            (version.as_str(), Some(first))
        );
    }
    // Nothing newer: the checks queue nothing.
    two_more_checks(&pool).await?;
    assert!(rescanned(&pool).await?.is_empty());

    // freshclam brings signatures that know the dropper: every file scanned with the older
    // ones is scanned again; the dropper is found and quarantined as any infected upload.
    clamd
        .update_signatures(SIGNATURE_VERSION + 1, "Stowage-Test-Dropper", payload)
        .await?;
    let held = wait_status(&mesh, &admin, &dropper.id, pb::FileStatus::Quarantined).await?;
    assert!(
        held.status_reason.contains("Stowage-Test-Dropper"),
        "{}",
        held.status_reason
    );
    assert_eq!(
        owner_sees(&mesh, &alice, &dropper.id).await.map(|_| ()),
        Err(Code::NotFound)
    );
    assert_eq!(
        media_announced(&pool, &dropper.id, 2).await?,
        ["media.ready", "media.quarantined"]
    );
    let listed = quarantine(&mesh, &admin).await?;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].signature, "Stowage-Test-Dropper.UNOFFICIAL");
    for file in [&doc, &notes] {
        let id = file.id.clone();
        let pool = &pool;
        eventually(
            PATIENCE,
            "scanned again with the new signatures",
            || async {
                Ok(recorded_scan(pool, &id)
                    .await?
                    .is_some_and(|s| s.1 == Some(first + 1)))
            },
        )
        .await?;
        let seen = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
        assert_eq!(seen.status, pb::FileStatus::Ready as i32);
    }
    assert_eq!(
        recorded_scan(&pool, &dropper.id).await?,
        None,
        "out of re-scans"
    );
    two_more_checks(&pool).await?;
    let mut all = vec![dropper.id.clone(), doc.id.clone(), notes.id.clone()];
    all.sort();
    assert_eq!(rescanned(&pool).await?, all, "each file once");
    // Counted for the alert on it (StowageRescanFoundMalware).
    let metrics = scrape(&mesh).await?;
    assert_eq!(
        sample(&metrics, "stowage_media_rescans_found_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "stowage_media_rescans_queued_total", &[]),
        Some(3.0)
    );

    // A database of our own that knows the document changes no version: no re-scan...
    clamd.add_signature("Stowage-Test-Macro", macro_doc).await?;
    two_more_checks(&pool).await?;
    assert_eq!(rescanned(&pool).await?.len(), 3);
    // ...until an admin asks for one, of every file of the window scanned clean.
    let mut media = MediaClient::new(mesh.channel());
    let refused = media
        .rescan(authed(pb::RescanRequest::default(), &alice))
        .await
        .expect_err("alice is no admin");
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let bad = media
        .rescan(authed(
            pb::RescanRequest {
                uploaded_after: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
            },
            &admin,
        ))
        .await
        .expect_err("no such time");
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains("uploaded_after"), "{bad:?}");
    // (A record of the quarantined dropper, as one left by a run that stopped half-way: its
    // re-scan leaves the file as it is.)
    pool.get()
        .await?
        .execute(
            "INSERT INTO media.scans (file_id, uploaded_at, scanner, signatures)
             VALUES ($1::text::uuid, now(), 'ClamAV 1.4.6', $2)",
            &[&dropper.id, &(first + 1)],
        )
        .await?;
    let notes_before = recorded_scan(&pool, &notes.id).await?.expect("recorded").2;
    let asked = media
        .rescan(authed(pb::RescanRequest::default(), &admin))
        .await?
        .into_inner();
    assert_eq!(asked.files, 3);
    wait_status(&mesh, &admin, &doc.id, pb::FileStatus::Quarantined).await?;
    let notes_id = notes.id.clone();
    eventually(PATIENCE, "the notes scanned again", || async {
        Ok(recorded_scan(&pool, &notes_id)
            .await?
            .is_some_and(|s| s.2 > notes_before))
    })
    .await?;
    media_jobs_settled(&pool).await?;
    assert_eq!(recorded_scan(&pool, &dropper.id).await?, None);
    assert_eq!(
        media_announced(&pool, &dropper.id, 2).await?,
        ["media.ready", "media.quarantined"],
        "the quarantined dropper is not announced again"
    );
    assert_eq!(rescanned(&pool).await?.len(), 6);
    assert_eq!(
        download(mesh.channel(), &alice, &notes.id, None).await?.1,
        b"only words"
    );
    mesh.stop().await
}
