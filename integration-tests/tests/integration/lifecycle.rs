//! Lifecycle's scheduled jobs, run on demand with short thresholds: timestamps are moved into
//! the past in the owning service's table (the test's controllable clock), the job runs, and
//! the test checks what a user would: sessions, blobs, rows and usage.

use std::time::Duration;

use stowage_integration_tests::{
    complete, create_session, eventually, files, get_session, lifecycle_schedules_off, put_chunk,
    quota, random_bytes, sample, scrape, upload, usage, wait_processed,
};
use stowage_proto::v1::{self as pb, lifecycle_client::LifecycleClient};
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::{Code, transport::Channel};

const PATIENCE: Duration = Duration::from_secs(60);

async fn run_now(mesh: &Mesh, name: &str, dry_run: bool) -> anyhow::Result<pb::Run> {
    run_now_on(mesh.channel(), name.to_owned(), dry_run).await
}

async fn run_now_on(channel: Channel, name: String, dry_run: bool) -> anyhow::Result<pb::Run> {
    Ok(LifecycleClient::new(channel)
        .run_now(authed(
            pb::RunNowRequest { name, dry_run },
            &token("root", &["admin"]),
        ))
        .await?
        .into_inner()
        .run
        .expect("run"))
}

/// The mesh, with Lifecycle's schedules off (the test runs each job itself).
async fn start(setup: &Setup) -> anyhow::Result<Mesh> {
    let mesh = Mesh::start(setup).await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    Ok(mesh)
}

/// A mesh whose usage reconciliation looks twice `settle` apart, without schedules and with
/// per-user rechecks an hour away: only the runs a test asks for repair.
async fn reconciling(setup: &Setup, settle: Duration) -> anyhow::Result<Mesh> {
    let mesh = Mesh::start_with(setup, |c| {
        c.lifecycle.reconcile_settle = settle;
        c.lifecycle.recheck_debounce = Duration::from_secs(3600);
    })
    .await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    Ok(mesh)
}

async fn sql(setup: &Setup, statement: &str, id: &str) -> anyhow::Result<u64> {
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let id = uuid::Uuid::parse_str(id)?;
    Ok(pool.get().await?.execute(statement, &[&id]).await?)
}

#[tokio::test]
async fn expired_sessions_are_swept_and_idle_ones_live_until_their_expiry() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // Only Lifecycle's run sweeps here: Ingest's own expiry sweep waits an hour.
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.sweep_interval = Duration::from_secs(3600)
    })
    .await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(300_000);
    let abandoned = create_session(mesh.channel(), &alice, "a.bin", Some(300_000), "").await?;
    let active = create_session(mesh.channel(), &alice, "b.bin", Some(300_000), "").await?;
    put_chunk(mesh.channel(), &alice, &abandoned.id, 0, &data[..100_000]).await?;
    put_chunk(mesh.channel(), &alice, &active.id, 0, &data[..100_000]).await?;
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 600_000);
    // The first one is past its expiry; nobody wrote to the second for three hours (the
    // policy's orphan_upload_hours is two), but its client was told it lives for 24.
    let moved = sql(
        &setup,
        "UPDATE ingest.uploads SET expires_at = now() - interval '1 minute',
                updated_at = now() - interval '1 day' WHERE id = $1",
        &abandoned.id,
    )
    .await?;
    assert_eq!(moved, 1);
    let idle = sql(
        &setup,
        "UPDATE ingest.uploads SET updated_at = now() - interval '3 hours' WHERE id = $1",
        &active.id,
    )
    .await?;
    assert_eq!(idle, 1);

    // A dry run lists the expired one and changes nothing.
    let dry = run_now(&mesh, "orphan_uploads", true).await?;
    assert_eq!(dry.acted, 1);
    assert_eq!(dry.report, [format!("upload {}", abandoned.id)]);
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 600_000);
    let staged = setup.stored_objects(&format!("staging/{}", abandoned.id));
    assert!(!staged.is_empty(), "a dry run removed the staging");

    let run = run_now(&mesh, "orphan_uploads", false).await?;
    assert_eq!((run.acted, run.failed, run.dry_run), (1, 0, false));
    let swept = get_session(mesh.channel(), &alice, &abandoned.id).await?;
    assert_eq!(swept.state, pb::UploadState::Expired as i32);
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 300_000);
    let staged = setup.stored_objects(&format!("staging/{}", abandoned.id));
    assert!(staged.is_empty(), "staging left: {staged:?}");
    let refused = complete(mesh.channel(), &alice, &abandoned.id).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|s| s.code()),
        Err(Code::FailedPrecondition)
    );

    // The idle session resumes where it was and finishes intact.
    let resumed = get_session(mesh.channel(), &alice, &active.id).await?;
    assert_eq!(
        (resumed.state, resumed.offset),
        (pb::UploadState::Open as i32, 100_000)
    );
    put_chunk(
        mesh.channel(),
        &alice,
        &active.id,
        100_000,
        &data[100_000..],
    )
    .await?;
    let file = complete(mesh.channel(), &alice, &active.id).await?;
    assert_eq!(file.size_bytes, 300_000);
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 300_000);

    // Runs are recorded, newest first.
    let runs = LifecycleClient::new(mesh.channel())
        .list_runs(authed(
            pb::ListRunsRequest {
                name: "orphan_uploads".into(),
                ..Default::default()
            },
            &token("root", &["admin"]),
        ))
        .await?
        .into_inner()
        .runs;
    // (A tick that fired while the mesh started, before the schedules were off, may have
    // recorded an older run.)
    let ids: Vec<&str> = runs.iter().take(2).map(|r| r.id.as_str()).collect();
    assert_eq!(ids, [run.id.as_str(), dry.id.as_str()]);
    assert!(runs[1].dry_run);
    assert!(runs.iter().all(|r| r.finished_at.is_some()));

    // A reservation past its expiry gives its bytes back.
    let carol = token("carol", &[]);
    create_session(mesh.channel(), &carol, "c.bin", Some(5_000), "").await?;
    assert_eq!(usage(mesh.channel(), &carol).await?.reserved_bytes, 5_000);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .execute(
            "UPDATE quota.reservations SET expires_at = now() - interval '1 minute'
             WHERE user_id = 'carol'",
            &[],
        )
        .await?;
    let run = run_now(&mesh, "reservations_expire", false).await?;
    assert_eq!(run.acted, 1);
    assert_eq!(usage(mesh.channel(), &carol).await?.reserved_bytes, 0);
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 0);
    mesh.stop().await
}

#[tokio::test]
async fn expired_trash_is_purged_once_even_by_two_runs_at_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let alice = token("alice", &[]);
    let png = {
        let img = image::RgbImage::from_pixel(400, 300, image::Rgb([9, 99, 199]));
        let mut out = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png)?;
        out.into_inner()
    };
    let old_picture = upload(mesh.channel(), &alice, "old.png", &png, &[]).await?;
    let old_data = upload(
        mesh.channel(),
        &alice,
        "old.bin",
        &random_bytes(50_000),
        &[],
    )
    .await?;
    let recent = upload(
        mesh.channel(),
        &alice,
        "recent.bin",
        &random_bytes(20_000),
        &[],
    )
    .await?;
    let kept = upload(
        mesh.channel(),
        &alice,
        "kept.bin",
        &random_bytes(10_000),
        &[],
    )
    .await?;
    let picture = wait_processed(mesh.channel(), &alice, &old_picture.id, PATIENCE).await?;
    assert!(!picture.variants.is_empty());
    // Files charges the variants right after it shows the file processed.
    let all = [&picture, &old_data, &recent, &kept]
        .iter()
        .map(|f| f.size_bytes)
        .sum::<u64>()
        + picture.variants.iter().map(|v| v.size_bytes).sum::<u64>();
    stowage_integration_tests::eventually(PATIENCE, "the variants charged", || async {
        Ok(usage(mesh.channel(), &alice).await?.used_bytes == all)
    })
    .await?;
    for file in [&old_picture, &old_data, &recent] {
        files(mesh.channel())
            .delete_file(authed(
                pb::DeleteFileRequest {
                    file_id: file.id.clone(),
                },
                &alice,
            ))
            .await?;
    }
    // Two of them went to trash 31 days ago (retention: 30).
    for file in [&old_picture, &old_data] {
        sql(
            &setup,
            "UPDATE files.files SET deleted_at = now() - interval '31 days' WHERE id = $1",
            &file.id,
        )
        .await?;
    }
    let before = usage(mesh.channel(), &alice).await?.used_bytes;
    let expected_drop = picture.size_bytes
        + picture.variants.iter().map(|v| v.size_bytes).sum::<u64>()
        + old_data.size_bytes;

    let (a, b) = tokio::join!(
        run_now(&mesh, "trash_purge", false),
        run_now(&mesh, "trash_purge", false)
    );
    let (a, b) = (a?, b?);
    assert_eq!(a.acted + b.acted, 2, "{a:?} {b:?}");
    assert_eq!(
        usage(mesh.channel(), &alice).await?.used_bytes,
        before - expected_drop
    );
    let stored = setup.stored_objects("users/alice");
    for gone in [&old_picture, &old_data] {
        assert!(!stored.iter().any(|k| k.contains(&gone.id)), "{stored:?}");
        let read = files(mesh.channel())
            .get_file(authed(
                pb::GetFileRequest {
                    file_id: gone.id.clone(),
                },
                &alice,
            ))
            .await;
        assert_eq!(read.map(|_| ()).map_err(|s| s.code()), Err(Code::NotFound));
    }
    // Recent trash and live files stay.
    for file in [&recent, &kept] {
        assert!(stored.iter().any(|k| k.contains(&file.id)), "{stored:?}");
    }
    // A third run has nothing left to do.
    assert_eq!(run_now(&mesh, "trash_purge", false).await?.acted, 0);
    mesh.stop().await
}

/// A clean-up purges what it listed as in trash since before its cutoff, and only if it still
/// is: a file restored after the listing (or restored and trashed again) stays, bytes and all.
#[tokio::test]
async fn a_purge_of_trash_listed_earlier_keeps_a_file_restored_meanwhile() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let data = random_bytes(30_000);
    let file = upload(mesh.channel(), &alice, "back.bin", &data, &[]).await?;
    let id = || file.id.clone();
    let trash = || async {
        files(mesh.channel())
            .delete_file(authed(pb::DeleteFileRequest { file_id: id() }, &alice))
            .await?;
        sql(
            &setup,
            "UPDATE files.files SET deleted_at = now() - interval '31 days' WHERE id = $1",
            &file.id,
        )
        .await
    };
    let cutoff = stowage_runtime::time::timestamp(chrono::Utc::now() - chrono::Duration::days(30));
    let purge = || async {
        files(mesh.channel())
            .purge_file(authed(
                pb::PurgeFileRequest {
                    file_id: id(),
                    trashed_before: Some(cutoff),
                },
                &admin,
            ))
            .await
    };
    trash().await?;
    // Listed as expired; the owner restores it before the purge comes.
    files(mesh.channel())
        .restore_file(authed(pb::RestoreFileRequest { file_id: id() }, &alice))
        .await?;
    let refused = purge().await.expect_err("restored");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    // Trashed again since: not in trash since before the cutoff either.
    files(mesh.channel())
        .delete_file(authed(pb::DeleteFileRequest { file_id: id() }, &alice))
        .await?;
    let refused = purge().await.expect_err("trashed again after the cutoff");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 30_000);
    assert!(
        setup
            .stored_objects("users/alice")
            .iter()
            .any(|k| k.contains(&file.id))
    );
    // In trash since before the cutoff: it goes.
    sql(
        &setup,
        "UPDATE files.files SET deleted_at = now() - interval '31 days' WHERE id = $1",
        &file.id,
    )
    .await?;
    assert_eq!(purge().await?.into_inner().freed_bytes, 30_000);
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 0);
    mesh.stop().await
}

/// A completion that registered its file and then stalled past its hold's life (the hold
/// lapsed, uncommitted) is not a drift: a repair would charge the file, and the commit that
/// follows would charge it again.
#[tokio::test]
async fn a_file_whose_lapsed_hold_is_still_to_be_committed_is_not_repaired() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = reconciling(&setup, Duration::from_secs(1)).await?;
    let service = token("stowage-internal", &["service"]);
    // As Ingest does it: the hold, the file registered, and (after the stall) the commit.
    let hold = quota(mesh.channel())
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "carol".into(),
                bytes: 5000,
                ttl_seconds: 1,
                idempotency_key: String::new(),
            },
            &service,
        ))
        .await?
        .into_inner()
        .reservation
        .unwrap_or_default();
    let file_id = uuid::Uuid::now_v7();
    files(mesh.channel())
        .register_file(authed(
            pb::RegisterFileRequest {
                owner_id: "carol".into(),
                file_id: file_id.to_string(),
                display_name: "stalled.bin".into(),
                kind: pb::FileKind::Other as i32,
                mime_type: "application/octet-stream".into(),
                size_bytes: 5000,
                sha256: "00".repeat(32),
                storage_key: format!("users/carol/other/2026/12/{file_id}.bin"),
                status: pb::FileStatus::Ready as i32,
                idempotency_key: file_id.to_string(),
                ..Default::default()
            },
            &service,
        ))
        .await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    quota(mesh.channel())
        .expire_reservations(authed(pb::ExpireReservationsRequest::default(), &service))
        .await?;
    let carol = token("carol", &[]);
    assert_eq!(usage(mesh.channel(), &carol).await?.reserved_bytes, 0);
    let run = run_now(&mesh, "usage_reconcile", false).await?;
    assert_eq!((run.acted, run.failed), (0, 0), "{run:?}");
    quota(mesh.channel())
        .commit(authed(
            pb::CommitRequest {
                reservation_id: hold.id,
                bytes: 5000,
            },
            &service,
        ))
        .await?;
    let account = usage(mesh.channel(), &carol).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (5000, 0),
        "charged once"
    );
    assert_eq!(run_now(&mesh, "usage_reconcile", false).await?.acted, 0);
    mesh.stop().await
}

/// Reconciliation pages through Quota's accounts and, beside each page, Files' owners between
/// its ids (a page at a time held, not every owner): drifts on the first, a middle and the last
/// page are repaired, and so is an owner with files whose account is gone.
#[tokio::test]
async fn usage_is_reconciled_page_by_page_of_accounts() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = reconciling(&setup, Duration::from_secs(1)).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    // 2,500 quiet accounts: three pages of a thousand.
    conn.execute(
        "INSERT INTO quota.accounts (user_id, limit_bytes)
         SELECT 'u' || lpad(i::text, 4, '0'), 1000000 FROM generate_series(0, 2499) i",
        &[],
    )
    .await?;
    let owners = ["u0500x", "u0999z", "u1500x", "zz-last"];
    for (i, owner) in owners.iter().enumerate() {
        let bytes = random_bytes(1_000 + i);
        upload(mesh.channel(), &token(owner, &[]), "f.bin", &bytes, &[]).await?;
    }
    for owner in ["u0500x", "u1500x", "zz-last"] {
        conn.execute(
            "UPDATE quota.accounts SET used_bytes = used_bytes + 777 WHERE user_id = $1",
            &[&owner],
        )
        .await?;
    }
    conn.batch_execute(
        "DELETE FROM quota.ledger WHERE user_id = 'u0999z';
         DELETE FROM quota.reservations WHERE user_id = 'u0999z';
         DELETE FROM quota.accounts WHERE user_id = 'u0999z';",
    )
    .await?;

    let run = run_now(&mesh, "usage_reconcile", false).await?;
    assert_eq!((run.acted, run.failed), (4, 0), "{run:?}");
    // 2,503 accounts and one owner without one.
    assert_eq!(run.examined, 2_504, "{run:?}");
    for (i, owner) in owners.iter().enumerate() {
        assert_eq!(
            usage(mesh.channel(), &token(owner, &[])).await?.used_bytes,
            1_000 + i as u64,
            "{owner}"
        );
    }
    assert_eq!(run_now(&mesh, "usage_reconcile", false).await?.acted, 0);
    mesh.stop().await
}

#[tokio::test]
async fn drifted_usage_is_repaired_and_correct_accounts_are_untouched() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // Only the runs repair here: per-user rechecks wait an hour.
    const SETTLE: Duration = Duration::from_secs(5);
    let mesh = reconciling(&setup, SETTLE).await?;
    let (alice, bob) = (token("alice", &[]), token("bob", &[]));
    upload(mesh.channel(), &alice, "a.bin", &random_bytes(70_000), &[]).await?;
    upload(mesh.channel(), &bob, "b.bin", &random_bytes(30_000), &[]).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.execute(
        "UPDATE quota.accounts SET used_bytes = used_bytes + 12345 WHERE user_id = 'alice'",
        &[],
    )
    .await?;
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 82_345);

    let run = run_now(&mesh, "usage_reconcile", false).await?;
    assert_eq!((run.acted, run.failed), (1, 0), "{run:?}");
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 70_000);
    assert_eq!(usage(mesh.channel(), &bob).await?.used_bytes, 30_000);
    let repairs: Vec<(String, i64)> = conn
        .query(
            "SELECT user_id, delta_bytes FROM quota.ledger WHERE kind = 'reconcile'",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(repairs, [("alice".to_owned(), -12_345)]);
    let metrics = reqwest::get(format!("http://{}/metrics", mesh.addr))
        .await?
        .text()
        .await?;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stowage_usage_drift_bytes") && l.ends_with(" 12345")),
        "drift metric"
    );
    // Nothing drifts any more.
    assert_eq!(run_now(&mesh, "usage_reconcile", false).await?.acted, 0);

    // A purge caught between its two steps (row gone, debit not yet made) is not a drift: the
    // run looks again after the settle time and finds it healed. The run's first look is held
    // on Files' table (after it read bob's account, 30,000 used) while the debit is made.
    conn.execute("DELETE FROM files.files WHERE owner_id = 'bob'", &[])
        .await?;
    let lock_pool = stowage_db::connect(&setup.database_url, 2)?;
    let mut locker = lock_pool.get().await?;
    let lock = locker.transaction().await?;
    lock.batch_execute("LOCK TABLE files.files IN ACCESS EXCLUSIVE MODE")
        .await?;
    let run = tokio::spawn(run_now_on(mesh.channel(), "usage_reconcile".into(), false));
    stowage_integration_tests::lock_waiters(&lock_pool, "GROUP BY owner_id ORDER BY owner_id", 1)
        .await?;
    let service = token("stowage-internal", &["service"]);
    quota(mesh.channel())
        .debit(authed(
            pb::DebitRequest {
                user_id: "bob".into(),
                bytes: 30_000,
                idempotency_key: "purge:test".into(),
                reason: "purge".into(),
            },
            &service,
        ))
        .await?;
    lock.rollback().await?;
    let run = run.await??;
    assert_eq!((run.acted, run.failed), (0, 0), "{run:?}");
    // It saw bob drifted at its first look: only then does it wait the settle time.
    let took = |r: &pb::Run| -> Option<i64> {
        Some(r.finished_at.as_ref()?.seconds - r.started_at.as_ref()?.seconds)
    };
    assert!(
        took(&run).is_some_and(|secs| secs >= SETTLE.as_secs() as i64 - 1),
        "the run did not wait for a second look: {run:?}"
    );
    assert_eq!(usage(mesh.channel(), &bob).await?.used_bytes, 0);
    let bob_repairs: i64 = conn
        .query_one(
            "SELECT count(*) FROM quota.ledger WHERE kind = 'reconcile' AND user_id = 'bob'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(bob_repairs, 0);
    // And a repair computed against a usage that has moved since is refused, naming why.
    let stale = quota(mesh.channel())
        .reconcile(authed(
            pb::ReconcileRequest {
                user_id: "alice".into(),
                actual_bytes: 1,
                expected_used_bytes: Some(12),
                idempotency_key: "reconcile:stale".into(),
            },
            &service,
        ))
        .await
        .expect_err("stale recount");
    assert_eq!(stale.code(), Code::Aborted);
    assert!(
        stale.message().contains("expected_used_bytes"),
        "{}",
        stale.message()
    );
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 70_000);

    // Operators see the schedules and can change the policy; bad values name their field.
    let admin = token("root", &["admin"]);
    let mut client = LifecycleClient::new(mesh.channel());
    let schedules = client
        .list_schedules(authed(pb::ListSchedulesRequest {}, &admin))
        .await?
        .into_inner()
        .schedules;
    let mut names: Vec<&str> = schedules.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "blob_gc",
            "ephemeral_cleanup",
            "history_prune",
            "inactivity",
            "orphan_uploads",
            "reservations_expire",
            "staging_cleanup",
            "stuck_processing",
            "trash_purge",
            "usage_reconcile"
        ]
    );
    let mut policy = client
        .get_policy(authed(pb::GetPolicyRequest {}, &admin))
        .await?
        .into_inner()
        .policy
        .expect("policy");
    assert_eq!(policy.trash_retention_days, 30);
    policy.trash_retention_days = 7;
    let set = client
        .set_policy(authed(
            pb::SetPolicyRequest {
                policy: Some(policy),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .policy;
    assert_eq!(set.map(|p| p.trash_retention_days), Some(7));
    policy.gc_safety_minutes = 0;
    let refused = client
        .set_policy(authed(
            pb::SetPolicyRequest {
                policy: Some(policy),
            },
            &admin,
        ))
        .await
        .expect_err("zero safety age");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("gc_safety_minutes"),
        "{}",
        refused.message()
    );
    let changed = client
        .set_schedule(authed(
            pb::SetScheduleRequest {
                name: "trash_purge".into(),
                interval_seconds: 120,
                enabled: Some(false),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .schedule
        .expect("schedule");
    assert_eq!((changed.interval_seconds, changed.enabled), (120, false));
    // Enabled again, then a new interval alone: it keeps running.
    for (interval_seconds, enabled) in [(0, Some(true)), (180, None)] {
        client
            .set_schedule(authed(
                pb::SetScheduleRequest {
                    name: "trash_purge".into(),
                    interval_seconds,
                    enabled,
                },
                &admin,
            ))
            .await?;
    }
    let kept = client
        .list_schedules(authed(pb::ListSchedulesRequest {}, &admin))
        .await?
        .into_inner()
        .schedules
        .into_iter()
        .find(|s| s.name == "trash_purge")
        .expect("trash_purge");
    assert_eq!((kept.interval_seconds, kept.enabled), (180, true));
    let unknown = client
        .set_schedule(authed(
            pb::SetScheduleRequest {
                name: "nope".into(),
                interval_seconds: 0,
                enabled: Some(true),
            },
            &admin,
        ))
        .await
        .expect_err("unknown schedule");
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert!(unknown.message().contains("name"), "{}", unknown.message());
    let denied = client
        .list_schedules(authed(pb::ListSchedulesRequest {}, &alice))
        .await
        .map(|_| ());
    assert_eq!(denied.map_err(|s| s.code()), Err(Code::PermissionDenied));
    mesh.stop().await
}

/// Moves a local-disk object's modification time `ago` into the past.
fn age(setup: &Setup, key: &str, ago: Duration) -> anyhow::Result<()> {
    let dir = setup.blob_dir.as_ref().expect("local-disk store");
    let file = std::fs::File::options()
        .write(true)
        .open(dir.path().join(key))?;
    file.set_modified(std::time::SystemTime::now() - ago)?;
    Ok(())
}

#[tokio::test]
async fn gc_deletes_unreferenced_blobs_after_the_safety_age_and_spares_uploads_in_flight()
-> anyhow::Result<()> {
    use object_store::{ObjectStoreExt, PutPayload, path::Path};
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let alice = token("alice", &[]);
    let kept_bytes = random_bytes(40_000);
    let kept = upload(mesh.channel(), &alice, "kept.bin", &kept_bytes, &[]).await?;
    let lost = upload(
        mesh.channel(),
        &alice,
        "lost.bin",
        &random_bytes(1_000),
        &[],
    )
    .await?;
    let planted = "users/alice/other/2020/01/planted.bin";
    mesh.blobs
        .store
        .put(&Path::from(planted), PutPayload::from(vec![7u8; 1234]))
        .await?;
    // A write that never finished (a crash before its rename): listings never show it.
    let unfinished = "users/alice/other/2020/01/half.bin#1234567";
    let unfinished_path = setup
        .blob_dir
        .as_ref()
        .expect("local-disk store")
        .path()
        .join(unfinished);
    std::fs::write(&unfinished_path, [7u8; 100])?;
    // An upload in flight: half its bytes staged.
    let flight_bytes = random_bytes(200_000);
    let flight = create_session(mesh.channel(), &alice, "flight.bin", Some(200_000), "").await?;
    put_chunk(
        mesh.channel(),
        &alice,
        &flight.id,
        0,
        &flight_bytes[..100_000],
    )
    .await?;

    // Young: nothing is touched.
    let run = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!(run.acted, 0, "{run:?}");
    assert!(
        setup
            .stored_objects("users/alice")
            .contains(&planted.to_owned())
    );

    // Two hours later (safety age: one hour), for every blob under users/ and staging/.
    for key in setup
        .stored_objects("users")
        .into_iter()
        .chain(setup.stored_objects("staging"))
    {
        age(&setup, &key, Duration::from_secs(2 * 3600))?;
    }
    age(&setup, unfinished, Duration::from_secs(2 * 3600))?;
    let dry = run_now(&mesh, "blob_gc", true).await?;
    assert_eq!(
        dry.report,
        [
            format!("unreferenced {planted}"),
            format!("unfinished write {unfinished}")
        ]
    );
    assert!(unfinished_path.exists());
    assert!(
        setup
            .stored_objects("users/alice")
            .contains(&planted.to_owned())
    );
    let run = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!((run.acted, run.failed), (2, 0), "{run:?}");
    assert!(!unfinished_path.exists());
    assert!(
        !setup
            .stored_objects("users/alice")
            .contains(&planted.to_owned())
    );
    let (_, bytes) =
        stowage_integration_tests::download(mesh.channel(), &alice, &kept.id, None).await?;
    assert_eq!(bytes, kept_bytes);

    // Staging: an orphan directory a day old goes, the live session's staging stays.
    let orphan = format!("staging/{}/data", uuid::Uuid::new_v4());
    mesh.blobs
        .store
        .put(
            &Path::from(orphan.as_str()),
            PutPayload::from(vec![1u8; 10]),
        )
        .await?;
    for key in setup.stored_objects("staging") {
        age(&setup, &key, Duration::from_secs(25 * 3600))?;
    }
    let run = run_now(&mesh, "staging_cleanup", false).await?;
    assert_eq!(run.acted, 1, "{run:?}");
    let staged = setup.stored_objects("staging");
    assert!(!staged.contains(&orphan), "{staged:?}");
    assert!(staged.iter().any(|k| k.contains(&flight.id)), "{staged:?}");
    put_chunk(
        mesh.channel(),
        &alice,
        &flight.id,
        100_000,
        &flight_bytes[100_000..],
    )
    .await?;
    let finished = complete(mesh.channel(), &alice, &flight.id).await?;
    let (_, bytes) =
        stowage_integration_tests::download(mesh.channel(), &alice, &finished.id, None).await?;
    assert_eq!(bytes, flight_bytes);

    // The other way: a row whose blob vanished is reported and marked.
    let lost_key = setup
        .stored_objects("users/alice")
        .into_iter()
        .find(|k| k.contains(&lost.id))
        .expect("lost file's blob");
    mesh.blobs
        .store
        .delete(&Path::from(lost_key.as_str()))
        .await?;
    sql(
        &setup,
        "UPDATE files.files SET created_at = now() - interval '2 hours' WHERE id = $1",
        &lost.id,
    )
    .await?;
    let run = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!(run.acted, 1, "{run:?}");
    let marked = wait_processed(mesh.channel(), &alice, &lost.id, PATIENCE).await?;
    assert_eq!(marked.status, pb::FileStatus::Failed as i32);
    assert!(
        marked.status_reason.contains("missing"),
        "{}",
        marked.status_reason
    );
    mesh.stop().await
}

/// A file placed in the store whose registration failed (here Files refuses it) is not
/// garbage: its upload still names it, and the completion retried later finds it.
#[tokio::test]
async fn gc_keeps_a_placed_file_whose_registration_is_still_to_come() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(100_000);
    let s = create_session(mesh.channel(), &alice, "waiting.bin", Some(100_000), "").await?;
    put_chunk(mesh.channel(), &alice, &s.id, 0, &data).await?;
    let refuse = "ALTER TABLE files.files ADD CONSTRAINT test_refuses \
                  CHECK (display_name <> 'waiting.bin') NOT VALID";
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get().await?.batch_execute(refuse).await?;
    let refused = complete(mesh.channel(), &alice, &s.id)
        .await
        .expect_err("Files refuses it");
    assert_eq!(refused.code(), Code::Internal, "{refused:?}");
    let placed = setup.stored_objects("users/alice");
    assert_eq!(placed.len(), 1, "placed before registration: {placed:?}");
    // Two hours later (safety age: one hour), the upload still waiting.
    age(&setup, &placed[0], Duration::from_secs(2 * 3600))?;
    let run = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!(run.acted, 0, "{run:?}");
    assert_eq!(setup.stored_objects("users/alice"), placed);

    pool.get()
        .await?
        .batch_execute("ALTER TABLE files.files DROP CONSTRAINT test_refuses")
        .await?;
    let file = complete(mesh.channel(), &alice, &s.id).await?;
    let (_, bytes) =
        stowage_integration_tests::download(mesh.channel(), &alice, &file.id, None).await?;
    assert_eq!(bytes, data);
    mesh.stop().await
}

/// blob_gc looks at `gc_batch` blobs and `gc_batch` files per run and goes on where it stopped,
/// so a large store is covered over several runs; a pass that ends starts over, and a dry run
/// moves nothing. On the memory store, which lists in key order.
#[tokio::test]
async fn gc_covers_a_store_over_several_runs_each_going_on_where_the_last_stopped()
-> anyhow::Result<()> {
    use object_store::{ObjectStoreExt, path::Path};
    let setup = Setup::memory().await?;
    let mesh = Mesh::start_with(&setup, |c| c.lifecycle.gc_batch = 2).await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let mut ids = Vec::new();
    for i in 0..3 {
        let file = upload(
            mesh.channel(),
            &alice,
            &format!("f{i}.bin"),
            &random_bytes(1000),
            &[],
        )
        .await?;
        // Older than the safety age, so the originals are checked.
        sql(
            &setup,
            "UPDATE files.files SET created_at = now() - interval '2 hours' WHERE id = $1",
            &file.id,
        )
        .await?;
        ids.push(file.id);
    }
    for id in &ids {
        wait_processed(mesh.channel(), &alice, id, PATIENCE).await?;
    }
    // The last file in id order loses its blob: only a run that gets that far finds it.
    ids.sort();
    let lost = files(mesh.channel())
        .get_file(authed(
            pb::GetFileRequest {
                file_id: ids[2].clone(),
            },
            &admin,
        ))
        .await?
        .into_inner()
        .file
        .unwrap_or_default();
    mesh.blobs
        .store
        .delete(&Path::from(lost.storage_key.as_str()))
        .await?;
    let cursors = || async {
        let pool = stowage_db::connect(&setup.database_url, 1)?;
        let n: i64 = pool
            .get()
            .await?
            .query_one("SELECT count(*) FROM lifecycle.gc_cursors", &[])
            .await?
            .get(0);
        anyhow::Ok(n)
    };

    // Two blobs and two files, none missing; both ways stop there.
    let first = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!((first.examined, first.acted), (4, 0), "{first:?}");
    assert_eq!(cursors().await?, 2);
    // A dry run goes on from there too (no blob left; the third file, missing), and moves
    // nothing.
    let dry = run_now(&mesh, "blob_gc", true).await?;
    assert_eq!((dry.examined, dry.acted), (1, 1), "{dry:?}");
    assert_eq!(
        dry.report,
        [format!("missing {} of file {}", lost.storage_key, lost.id)]
    );
    assert_eq!(cursors().await?, 2);
    // The real run finds the same, marks the file, and both passes end.
    let second = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!((second.examined, second.acted), (1, 1), "{second:?}");
    assert_eq!(cursors().await?, 0);
    let marked = wait_processed(mesh.channel(), &alice, &lost.id, PATIENCE).await?;
    assert_eq!(marked.status, pb::FileStatus::Failed as i32);
    // The next run starts over.
    let third = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!((third.examined, third.acted), (4, 0), "{third:?}");
    // A saved page Files no longer takes starts a new pass instead of failing every run.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .execute(
            "UPDATE lifecycle.gc_cursors SET position = '2026-01-01T00:00:00+00:00 stale'
             WHERE part = 'blob_gc/originals'",
            &[],
        )
        .await?;
    let fourth = run_now(&mesh, "blob_gc", false).await?;
    assert_eq!((fourth.examined, fourth.failed), (2, 0), "{fourth:?}");
    assert!(fourth.error.is_empty(), "{fourth:?}");
    mesh.stop().await
}

/// Where blob_gc's way over the store's objects stopped (`None`: at the start of a pass).
async fn objects_cursor(pool: &stowage_db::PgPool) -> anyhow::Result<Option<String>> {
    Ok(pool
        .get()
        .await?
        .query_opt(
            "SELECT position FROM lifecycle.gc_cursors WHERE part = 'blob_gc/objects'",
            &[],
        )
        .await?
        .map(|row| row.get(0)))
}

/// A blob_gc run past its time stops after the blob, or page of files, it is at, having
/// looked at one at least, and the next run goes on from there. Here the time is zero: one
/// blob per run, and one page of files (all three), until the blob pass ends.
#[tokio::test]
async fn a_gc_run_out_of_time_stops_and_the_next_goes_on() -> anyhow::Result<()> {
    let setup = Setup::memory().await?;
    let mesh = Mesh::start_with(&setup, |c| c.lifecycle.gc_time = Duration::ZERO).await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let alice = token("alice", &[]);
    let mut keys = Vec::new();
    for i in 0..3 {
        let name = format!("f{i}.bin");
        let file = upload(mesh.channel(), &alice, &name, &random_bytes(1000), &[]).await?;
        // Older than the safety age, so the originals are checked too.
        sql(
            &setup,
            "UPDATE files.files SET created_at = now() - interval '2 hours' WHERE id = $1",
            &file.id,
        )
        .await?;
        wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
        keys.push(stowage_integration_tests::storage_key(mesh.channel(), &file.id).await?);
    }
    keys.sort();
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    for (run, at) in [Some(&keys[0]), Some(&keys[1]), Some(&keys[2]), None]
        .into_iter()
        .enumerate()
    {
        let done = run_now(&mesh, "blob_gc", false).await?;
        let blobs = u64::from(at.is_some());
        assert_eq!(done.examined, blobs + 3, "run {run}: {done:?}");
        assert_eq!((done.acted, done.failed), (0, 0), "run {run}: {done:?}");
        let cursor = objects_cursor(&pool).await?;
        assert_eq!(cursor.as_ref(), at, "run {run}");
    }
    mesh.stop().await
}

/// Two blob_gc runs at once: the one overtaken (its cursor moved by the other while it
/// worked) leaves the cursor where the other put it, whether it meant to start one or move
/// one. The overtaking write is made by hand while the run waits for the cursor table.
#[tokio::test]
async fn an_overtaken_gc_run_leaves_the_cursor_where_the_other_put_it() -> anyhow::Result<()> {
    let setup = Setup::memory().await?;
    let mesh = Mesh::start_with(&setup, |c| c.lifecycle.gc_batch = 2).await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let alice = token("alice", &[]);
    for i in 0..3 {
        let name = format!("f{i}.bin");
        let file = upload(mesh.channel(), &alice, &name, &random_bytes(1000), &[]).await?;
        wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    }
    let pool = stowage_db::connect(&setup.database_url, 3)?;
    // 1. No cursor yet: the run means to start one; 2. a cursor before every key: it means
    // to move it. Each time the other run's position wins.
    for (before, theirs) in [(None, "users/~first"), (Some("users/"), "users/~second")] {
        let mut holder = pool.get().await?;
        if let Some(at) = before {
            holder
                .execute(
                    "INSERT INTO lifecycle.gc_cursors (part, position) VALUES ('blob_gc/objects', $1)
                     ON CONFLICT (part) DO UPDATE SET position = $1",
                    &[&at],
                )
                .await?;
        }
        let tx = holder.transaction().await?;
        // Reads go on; writes to the cursors wait for this transaction.
        tx.execute("LOCK TABLE lifecycle.gc_cursors IN EXCLUSIVE MODE", &[])
            .await?;
        let run = tokio::spawn(run_now_on(mesh.channel(), "blob_gc".into(), false));
        // The run waits to write its cursor.
        stowage_integration_tests::lock_waiters(&pool, "gc_cursors", 1).await?;
        tx.execute(
            "INSERT INTO lifecycle.gc_cursors (part, position) VALUES ('blob_gc/objects', $1)
             ON CONFLICT (part) DO UPDATE SET position = $1",
            &[&theirs],
        )
        .await?;
        tx.commit().await?;
        let done = run.await??;
        assert!(done.error.is_empty(), "{done:?}");
        // Two blobs (gc_batch); the files are too new for the other way.
        assert_eq!(done.examined, 2, "{done:?}");
        assert_eq!(objects_cursor(&pool).await?.as_deref(), Some(theirs));
    }
    // Not overtaken, a run moves it: after the other's position there is nothing, so the
    // pass ends and the next run starts over.
    run_now(&mesh, "blob_gc", false).await?;
    assert_eq!(objects_cursor(&pool).await?, None);
    mesh.stop().await
}

#[tokio::test]
async fn lifecycle_killed_mid_purge_finishes_on_the_next_run_and_deletes_nothing_owned()
-> anyhow::Result<()> {
    use stowage::Role;
    use stowage_testkit::{Processes, channel};
    let mut setup = Setup::new().await?;
    // 305 uploads and 300 deletions by one user as fast as they go: fixtures, not the subject
    // (the default 50 uploads/s per user is what a real client would have to pace to).
    for (variable, value) in [
        ("STOWAGE_RATE_LIMIT__USER__UPLOAD__PER_SECOND", "10000"),
        ("STOWAGE_RATE_LIMIT__USER__UPLOAD__BURST", "10000"),
        ("STOWAGE_RATE_LIMIT__USER__OTHER__PER_SECOND", "10000"),
        ("STOWAGE_RATE_LIMIT__USER__OTHER__BURST", "10000"),
    ] {
        setup.env.push((variable.into(), value.into()));
    }
    let mut processes = Processes::split(&setup).await?;
    lifecycle_schedules_off(
        channel(processes.addr(Role::Lifecycle)),
        &setup.database_url,
    )
    .await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let ingest = channel(processes.addr(Role::Ingest));
    let files_channel = channel(processes.addr(Role::Files));
    let mut live = Vec::new();
    for i in 0..5 {
        let data = random_bytes(3_000 + i);
        let file = upload(ingest.clone(), &alice, &format!("live{i}.bin"), &data, &[]).await?;
        live.push((file, data));
    }
    let mut trashed = Vec::new();
    for i in 0..300 {
        let file = upload(
            ingest.clone(),
            &alice,
            &format!("old{i}.bin"),
            &random_bytes(1_000),
            &[],
        )
        .await?;
        stowage_integration_tests::trash(files_channel.clone(), &alice, &file.id).await?;
        trashed.push(file.id);
    }
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let conn = pool.get().await?;
    conn.execute(
        "UPDATE files.files SET deleted_at = now() - interval '31 days' WHERE deleted_at IS NOT NULL",
        &[],
    )
    .await?;
    let count = || async {
        let n: i64 = pool
            .get()
            .await?
            .query_one("SELECT count(*) FROM files.files", &[])
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    assert_eq!(count().await?, 305);

    // Kill Lifecycle while its purge run is under way.
    let lifecycle = channel(processes.addr(Role::Lifecycle));
    let run = tokio::spawn({
        let admin = admin.clone();
        async move {
            LifecycleClient::new(lifecycle)
                .run_now(authed(
                    pb::RunNowRequest {
                        name: "trash_purge".into(),
                        dry_run: false,
                    },
                    &admin,
                ))
                .await
        }
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while count().await? > 280 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "purge never started"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    processes
        .process(Role::Lifecycle)
        .signal(nix::sys::signal::Signal::SIGKILL)?;
    assert!(run.await?.is_err(), "the run was cut off");
    // A purge Files had already accepted still finishes (in its own task): count once that
    // has settled.
    let mut left = count().await?;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = count().await?;
        if now == left {
            break;
        }
        left = now;
    }
    assert!(
        left > 5,
        "the run finished before the kill ({left} rows left)"
    );

    // The next run finishes the work.
    processes.restart(&setup, Role::Lifecycle).await?;
    let run = LifecycleClient::new(channel(processes.addr(Role::Lifecycle)))
        .run_now(authed(
            pb::RunNowRequest {
                name: "trash_purge".into(),
                dry_run: false,
            },
            &admin,
        ))
        .await?
        .into_inner()
        .run
        .expect("run");
    assert_eq!(run.acted, u64::try_from(left - 5)?, "{run:?}");
    assert_eq!(count().await?, 5);
    // Nothing the user still owns was touched, and usage is exactly what is left.
    let quota = channel(processes.addr(Role::Quota));
    let expected: u64 = live.iter().map(|(f, _)| f.size_bytes).sum();
    assert_eq!(usage(quota, &alice).await?.used_bytes, expected);
    for (file, data) in &live {
        let (_, bytes) =
            stowage_integration_tests::download(files_channel.clone(), &alice, &file.id, None)
                .await?;
        assert_eq!(&bytes, data);
    }
    let stored = setup.stored_objects("users/alice");
    assert_eq!(stored.len(), 5, "{stored:?}");
    Ok(())
}

/// Waits until Lifecycle has consumed `n` events.
async fn events_consumed(conn: &impl stowage_db::GenericClient, n: i64) -> anyhow::Result<()> {
    eventually(
        PATIENCE,
        &format!("{n} events consumed by Lifecycle"),
        || async {
            let consumed: i64 = conn
                .query_one("SELECT count(*) FROM lifecycle.consumed_events", &[])
                .await?
                .get(0);
            Ok(consumed >= n)
        },
    )
    .await
}

async fn set_policy(mesh: &Mesh, change: impl FnOnce(&mut pb::Policy)) -> anyhow::Result<()> {
    let admin = token("root", &["admin"]);
    let mut client = LifecycleClient::new(mesh.channel());
    let mut policy = client
        .get_policy(authed(pb::GetPolicyRequest {}, &admin))
        .await?
        .into_inner()
        .policy
        .expect("policy");
    change(&mut policy);
    client
        .set_policy(authed(
            pb::SetPolicyRequest {
                policy: Some(policy),
            },
            &admin,
        ))
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_thousand_quiet_users_get_one_notice_each_spread_over_the_grace_window()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    set_policy(&mesh, |p| p.notice_grace_hours = 2).await?;
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let conn = pool.get().await?;
    // 1,000 users whose last activity was 400 days ago (inactivity threshold: 365).
    conn.execute(
        "INSERT INTO lifecycle.activity (user_id, last_active_at)
         SELECT 'quiet' || i, now() - interval '400 days' FROM generate_series(1, 1000) i",
        &[],
    )
    .await?;
    let first = run_now(&mesh, "inactivity", false).await?;
    assert_eq!(first.examined, 1000);
    // Due times: spread over the two hours, no minute above its share (1000 / 120) plus 2.
    let per_minute: Vec<i64> = conn
        .query(
            "SELECT count(*) FROM lifecycle.activity
             GROUP BY floor(extract(epoch FROM notice_due_at - (SELECT min(notice_due_at)
                 FROM lifecycle.activity)) / 60)",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(per_minute.len() >= 119, "{} minutes", per_minute.len());
    assert!(
        per_minute.iter().all(|&n| n <= 1000 / 120 + 2),
        "{per_minute:?}"
    );
    // Only the notices already due went out.
    assert!(first.acted < 5, "{first:?}");

    // Three hours later, two runs at once: every user has had exactly one notice.
    conn.execute(
        "UPDATE lifecycle.activity SET notice_due_at = notice_due_at - interval '3 hours'",
        &[],
    )
    .await?;
    let (a, b) = tokio::join!(
        run_now(&mesh, "inactivity", false),
        run_now(&mesh, "inactivity", false)
    );
    assert_eq!(first.acted + a?.acted + b?.acted, 1000);
    let counts: Vec<i64> = conn
        .query(
            "SELECT count(*) FROM lifecycle.history WHERE event = 'notice_sent' GROUP BY user_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(counts.len(), 1000);
    assert!(counts.iter().all(|&n| n == 1));
    // One notice event per user: as many rows as users, none twice.
    let row = conn
        .query_one(
            "SELECT count(*), count(DISTINCT key) FROM lifecycle.outbox
             WHERE topic = 'lifecycle.notice'",
            &[],
        )
        .await?;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1000, 1000));
    assert_eq!(run_now(&mesh, "inactivity", false).await?.acted, 0);

    // Activity ends the cycle: a user who comes back is not quiet any more.
    let back = pb::RecordActivityRequest {
        user_id: "quiet7".into(),
        kind: pb::ActivityKind::Login as i32,
        ..Default::default()
    };
    LifecycleClient::new(mesh.channel())
        .record_activity(authed(back, &token("root", &["admin"])))
        .await?;
    let reset: Option<chrono::DateTime<chrono::Utc>> = conn
        .query_one(
            "SELECT notice_sent_at FROM lifecycle.activity WHERE user_id = 'quiet7'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(reset, None);
    mesh.stop().await
}

/// A user whose worker session is up is not inactive, however long since it came up; once it
/// goes down they are, if quiet long enough. A report seen before (a retry) or older than the
/// state (out of order) does not bring a session that went down back up.
#[tokio::test]
async fn a_user_with_a_session_up_gets_no_inactivity_notice() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let admin = token("root", &["admin"]);
    let mut client = LifecycleClient::new(mesh.channel());
    let days_ago = |days: i64| {
        Some(stowage_runtime::time::timestamp(
            chrono::Utc::now() - chrono::Duration::days(days),
        ))
    };
    let report = |user: &str, kind: pb::ActivityKind, days: i64, key: &str| {
        authed(
            pb::RecordActivityRequest {
                user_id: user.into(),
                kind: kind as i32,
                at: days_ago(days),
                idempotency_key: key.into(),
            },
            &admin,
        )
    };
    use pb::ActivityKind::{Login, SessionDown, SessionUp};
    for (user, kind, days, key) in [
        ("worker", SessionUp, 400, "w1"),
        ("idle", Login, 400, ""),
        ("late", SessionUp, 402, "l1"),
        ("late", SessionDown, 401, "l1"),
        ("late", SessionUp, 402, "l1"), // the first report again
        ("late", SessionUp, 403, "l0"), // older than the down
    ] {
        client
            .record_activity(report(user, kind, days, key))
            .await?;
    }
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let noticed = || async {
        let rows = conn
            .query(
                "SELECT user_id FROM lifecycle.activity WHERE notice_due_at IS NOT NULL
                 ORDER BY user_id",
                &[],
            )
            .await?;
        anyhow::Ok(rows.iter().map(|r| r.get(0)).collect::<Vec<String>>())
    };
    run_now(&mesh, "inactivity", false).await?;
    assert_eq!(noticed().await?, ["idle", "late"]);
    // Down 399 days ago: quiet since, so noticed on the next run.
    client
        .record_activity(report("worker", SessionDown, 399, "w1"))
        .await?;
    run_now(&mesh, "inactivity", false).await?;
    assert_eq!(noticed().await?, ["idle", "late", "worker"]);
    mesh.stop().await
}

/// Sessions reported before their state had a column (Lifecycle's V10): on upgrade each user's
/// latest session report decides, so a session up then stays up, and its user is not noticed.
#[tokio::test]
async fn sessions_reported_before_the_upgrade_keep_their_state() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    stowage_db::migrate(
        &pool,
        stowage_lifecycle::SCHEMA,
        stowage_lifecycle::migrations().set_target(stowage_db::MigrationTarget::Version(9)),
    )
    .await?;
    pool.get()
        .await?
        .batch_execute(
            "INSERT INTO lifecycle.activity (user_id, last_active_at) VALUES
                 ('up', now() - interval '400 days'), ('down', now() - interval '400 days'),
                 ('never', now() - interval '400 days');
             INSERT INTO lifecycle.history (user_id, event, at, dedupe_key) VALUES
                 ('up', 'session_down', now() - interval '402 days', 'a'),
                 ('up', 'session_up', now() - interval '400 days', 'b'),
                 ('down', 'session_up', now() - interval '401 days', 'c'),
                 ('down', 'session_down', now() - interval '400 days', 'c');",
        )
        .await?;
    let mesh = start(&setup).await?;
    let conn = pool.get().await?;
    let up: Vec<String> = conn
        .query(
            "SELECT user_id FROM lifecycle.activity WHERE session_up_at IS NOT NULL",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(up, ["up"]);
    run_now(&mesh, "inactivity", false).await?;
    let noticed: Vec<String> = conn
        .query(
            "SELECT user_id FROM lifecycle.activity WHERE notice_due_at IS NOT NULL
             ORDER BY user_id",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(noticed, ["down", "never"]);
    mesh.stop().await
}

#[tokio::test]
async fn a_burst_of_deletions_costs_one_recheck() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // A recheck runs DEBOUNCE after the last file event of a user's burst: long enough that
    // the 100 deletions' events (relayed, then consumed) never leave such a gap between them.
    const DEBOUNCE: Duration = Duration::from_secs(3);
    let mesh = Mesh::start_with(&setup, |c| c.lifecycle.recheck_debounce = DEBOUNCE).await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let alice = token("alice", &[]);
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            upload(
                mesh.channel(),
                &alice,
                &format!("f{i}.bin"),
                &[i as u8; 100],
                &[],
            )
            .await?
            .id,
        );
    }
    // Let the uploads' own recheck settle.
    let mut settled = sample(
        &scrape(&mesh).await?,
        "stowage_lifecycle_rechecks_total",
        &[],
    )
    .unwrap_or(0.0);
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the uploads' recheck did not settle: {settled} rechecks"
        );
        tokio::time::sleep(DEBOUNCE + Duration::from_millis(500)).await;
        let now = sample(
            &scrape(&mesh).await?,
            "stowage_lifecycle_rechecks_total",
            &[],
        )
        .unwrap_or(0.0);
        if now == settled && now > 0.0 {
            break;
        }
        settled = now;
    }
    // Usage drifted meanwhile; the recheck after the burst repairs it.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .execute(
            "UPDATE quota.accounts SET used_bytes = used_bytes + 999 WHERE user_id = 'alice'",
            &[],
        )
        .await?;
    let deletions = ids.iter().map(|id| {
        let mut client = files(mesh.channel());
        let request = authed(
            pb::DeleteFileRequest {
                file_id: id.clone(),
            },
            &alice,
        );
        async move { client.delete_file(request).await }
    });
    for result in futures::future::join_all(deletions).await {
        result?;
    }
    eventually(PATIENCE, "usage repaired", || async {
        Ok(usage(mesh.channel(), &alice).await?.used_bytes == 10_000)
    })
    .await?;
    // Quiet for longer than the debounce: exactly one more recheck ran.
    tokio::time::sleep(DEBOUNCE + Duration::from_secs(2)).await;
    assert_eq!(
        sample(
            &scrape(&mesh).await?,
            "stowage_lifecycle_rechecks_total",
            &[]
        )
        .unwrap_or(0.0),
        settled + 1.0
    );
    let history = LifecycleClient::new(mesh.channel())
        .user_events(authed(pb::UserEventsRequest::default(), &alice))
        .await?
        .into_inner()
        .events;
    let repaired: Vec<&pb::UserEvent> = history
        .iter()
        .filter(|e| e.event == "drift_repaired")
        .collect();
    assert_eq!(repaired.len(), 1, "{history:?}");
    assert!(
        repaired[0].detail_json.contains("-999"),
        "{}",
        repaired[0].detail_json
    );
    mesh.stop().await
}

/// What an admin does to a user is in that user's history, naming the admin: a limit set
/// (with the one before) and a file purged. A purge by a service (retention) is not, nor are
/// the admin's doings the user's activity.
#[tokio::test]
async fn an_admins_doings_are_in_the_users_history() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let (hal, root) = (token("hal", &[]), token("root", &["admin"]));
    let kept = upload(mesh.channel(), &hal, "kept.bin", &random_bytes(100), &[]).await?;
    let doomed = upload(mesh.channel(), &hal, "doomed.bin", &random_bytes(100), &[]).await?;
    let default_limit = usage(mesh.channel(), &hal).await?.limit_bytes;
    let quota_client = quota(mesh.channel());
    for limit in [5_000, 7_000] {
        quota_client
            .clone()
            .set_limit(authed(
                pb::SetLimitRequest {
                    user_id: "hal".into(),
                    limit_bytes: limit,
                },
                &root,
            ))
            .await?;
    }
    let purge = |file: &pb::File, who: &str| {
        let request = authed(
            pb::PurgeFileRequest {
                file_id: file.id.clone(),
                ..Default::default()
            },
            who,
        );
        let mut client = files(mesh.channel());
        async move { client.purge_file(request).await }
    };
    // The service's first: read before the admin's, from the same stream.
    purge(&kept, &token("lifecycle", &["service"])).await?;
    purge(&doomed, &root).await?;
    let history = || stowage_integration_tests::user_history(mesh.channel(), &hal);
    eventually(PATIENCE, "three admin actions in hal's history", || async {
        let seen = history().await?;
        Ok(seen.len() >= 3 && seen.iter().any(|(e, _)| e == "file_purged_by_admin"))
    })
    .await?;
    let mut seen = history().await?;
    seen.sort_by_key(|(event, detail)| (event.clone(), detail["limit_bytes"].as_u64()));
    assert_eq!(
        seen,
        [
            (
                "file_purged_by_admin".to_owned(),
                serde_json::json!({ "admin": "root", "file_id": doomed.id })
            ),
            (
                "limit_set".to_owned(),
                serde_json::json!({ "admin": "root", "limit_bytes": 5000, "previous_limit_bytes": default_limit })
            ),
            (
                "limit_set".to_owned(),
                serde_json::json!({ "admin": "root", "limit_bytes": 7000, "previous_limit_bytes": 5000 })
            ),
        ]
    );
    mesh.stop().await
}

#[tokio::test]
async fn history_is_deduplicated_and_ordered() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let admin = token("root", &["admin"]);
    let mut client = LifecycleClient::new(mesh.channel());
    let base = chrono::Utc::now() - chrono::Duration::hours(1);
    let report = |user: &str, kind: pb::ActivityKind, minutes: i64, key: &str| {
        authed(
            pb::RecordActivityRequest {
                user_id: user.into(),
                kind: kind as i32,
                at: Some(stowage_runtime::time::timestamp(
                    base + chrono::Duration::minutes(minutes),
                )),
                idempotency_key: key.into(),
            },
            &admin,
        )
    };
    use pb::ActivityKind::{SessionDown, SessionUp};
    for (user, kind, minute, key) in [
        ("alice", SessionUp, 1, "s1"),
        ("alice", SessionUp, 1, "s1"), // the same report again
        ("bob", SessionUp, 2, "b1"),
        ("alice", SessionDown, 3, "s1"),
        ("alice", SessionUp, 5, "s2"),
        ("bob", SessionDown, 4, "b1"),
    ] {
        client
            .record_activity(report(user, kind, minute, key))
            .await?;
    }
    let alice: Vec<(String, i64)> = client
        .user_events(authed(
            pb::UserEventsRequest {
                user_id: "alice".into(),
                ..Default::default()
            },
            &admin,
        ))
        .await?
        .into_inner()
        .events
        .into_iter()
        .map(|e| (e.event, e.at.map_or(0, |t| t.seconds)))
        .collect();
    let at = |m: i64| (base + chrono::Duration::minutes(m)).timestamp();
    assert_eq!(
        alice,
        [
            ("session_up".to_owned(), at(5)),
            ("session_down".to_owned(), at(3)),
            ("session_up".to_owned(), at(1)),
        ]
    );
    // Users read their own history; another user's needs the admin scope.
    let own = client
        .user_events(authed(pb::UserEventsRequest::default(), &token("bob", &[])))
        .await?
        .into_inner()
        .events;
    assert_eq!(own.len(), 2);
    let denied = client
        .user_events(authed(
            pb::UserEventsRequest {
                user_id: "alice".into(),
                ..Default::default()
            },
            &token("bob", &[]),
        ))
        .await
        .map(|_| ());
    assert_eq!(denied.map_err(|s| s.code()), Err(Code::PermissionDenied));

    // The latest event of each user, one page of one at a time.
    let mut latest = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .most_recent_events(authed(
                pb::MostRecentEventsRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                },
                &admin,
            ))
            .await?
            .into_inner();
        latest.extend(page.events.into_iter().map(|e| (e.user_id, e.event)));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(
        latest,
        [
            ("alice".to_owned(), "session_up".to_owned()),
            ("bob".to_owned(), "session_down".to_owned())
        ]
    );
    // (carl below has activity but no history: uploads and downloads are not history events.)
    // A download counts as activity too.
    let carl = token("carl", &[]);
    let file = upload(mesh.channel(), &carl, "c.bin", &random_bytes(100), &[]).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let recent = || async {
        let row = conn
            .query_opt(
                "SELECT last_active_at > now() - interval '1 minute' FROM lifecycle.activity
                 WHERE user_id = 'carl'",
                &[],
            )
            .await?;
        anyhow::Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
    };
    // The upload's file.created seen: late, it would count as activity after the move below.
    events_consumed(&conn, 1).await?;
    assert!(recent().await?, "upload seen as activity");
    conn.execute(
        "UPDATE lifecycle.activity SET last_active_at = now() - interval '10 days'
         WHERE user_id = 'carl'",
        &[],
    )
    .await?;
    stowage_integration_tests::download(mesh.channel(), &carl, &file.id, None).await?;
    eventually(PATIENCE, "download seen as activity", &recent).await?;

    // The live session state is in Redis: alice is up, bob is down.
    let redis = stowage_runtime::redis::connect(&setup.redis_url).await?;
    use fred::interfaces::KeysInterface;
    let ns = setup.namespace();
    let up: Option<String> = redis.get(format!("{ns}:lifecycle:session:alice")).await?;
    let down: Option<String> = redis.get(format!("{ns}:lifecycle:session:bob")).await?;
    assert_eq!((up.as_deref(), down), (Some("up"), None));
    mesh.stop().await
}

/// Registers `ephemeral/s1/shot9.png` for an hour, as a service.
async fn register_shot9(client: &mut LifecycleClient<Channel>) -> anyhow::Result<()> {
    client
        .register_ephemeral(authed(
            pb::RegisterEphemeralRequest {
                storage_key: "ephemeral/s1/shot9.png".into(),
                owner: "s1".into(),
                ttl_seconds: 3600,
            },
            &token("stowage-internal", &["service"]),
        ))
        .await?;
    Ok(())
}

#[tokio::test]
async fn stuck_files_are_processed_again_and_ephemeral_blobs_go_when_done() -> anyhow::Result<()> {
    use object_store::{ObjectStoreExt, PutPayload, path::Path};
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let alice = token("alice", &[]);
    let service = token("stowage-internal", &["service"]);

    // A file whose processing was lost: its job gone, the file still in processing, an hour
    // and a half old (bound: one hour).
    let file = upload(mesh.channel(), &alice, "notes.txt", b"some words", &[]).await?;
    wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.execute("DELETE FROM media.jobs", &[]).await?;
    sql(
        &setup,
        "UPDATE files.files SET status = 'processing', created_at = now() - interval '90 minutes'
         WHERE id = $1",
        &file.id,
    )
    .await?;
    let dry = run_now(&mesh, "stuck_processing", true).await?;
    assert_eq!(dry.report, [format!("reprocess {}", file.id)]);
    let run = run_now(&mesh, "stuck_processing", false).await?;
    assert_eq!(run.acted, 1, "{run:?}");
    let done = wait_processed(mesh.channel(), &alice, &file.id, PATIENCE).await?;
    assert_eq!(done.status, pb::FileStatus::Ready as i32);

    // Ephemeral blobs: acknowledged or expired ones go, others stay; with keep-last 1 the
    // newest done one stays for debugging.
    let mut client = LifecycleClient::new(mesh.channel());
    let keys: Vec<String> = (0..4)
        .map(|i| format!("ephemeral/s1/shot{i}.png"))
        .collect();
    for key in &keys {
        mesh.blobs
            .store
            .put(&Path::from(key.as_str()), PutPayload::from(vec![1u8; 100]))
            .await?;
        client
            .register_ephemeral(authed(
                pb::RegisterEphemeralRequest {
                    storage_key: key.clone(),
                    owner: "s1".into(),
                    ttl_seconds: 3600,
                },
                &service,
            ))
            .await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let acked = client
        .ack_ephemeral(authed(
            pb::AckEphemeralRequest {
                storage_keys: keys[..2].to_vec(),
            },
            &service,
        ))
        .await?
        .into_inner()
        .acknowledged;
    assert_eq!(acked, 2);
    conn.execute(
        "UPDATE lifecycle.ephemeral SET expires_at = now() - interval '1 second'
         WHERE storage_key = $1",
        &[&keys[2]],
    )
    .await?;
    let run = run_now(&mesh, "ephemeral_cleanup", false).await?;
    assert_eq!(run.acted, 3);
    assert_eq!(mesh.stored_objects("ephemeral").await?, [keys[3].clone()]);
    // Dev retention: the newest done blob is kept.
    set_policy(&mesh, |p| p.ephemeral_keep_last = 1).await?;
    mesh.blobs
        .store
        .put(
            &Path::from("ephemeral/s1/shot9.png"),
            PutPayload::from(vec![1u8; 10]),
        )
        .await?;
    register_shot9(&mut client).await?;
    client
        .ack_ephemeral(authed(
            pb::AckEphemeralRequest {
                storage_keys: vec![keys[3].clone(), "ephemeral/s1/shot9.png".into()],
            },
            &service,
        ))
        .await?;
    let long = client
        .ack_ephemeral(authed(
            pb::AckEphemeralRequest {
                storage_keys: vec!["k".repeat(1025)],
            },
            &service,
        ))
        .await
        .expect_err("a key longer than any store key");
    assert_eq!(long.code(), tonic::Code::InvalidArgument);
    assert!(long.message().starts_with("storage_keys"), "{long:?}");
    let run = run_now(&mesh, "ephemeral_cleanup", false).await?;
    assert_eq!(run.acted, 1);
    assert_eq!(
        mesh.stored_objects("ephemeral").await?,
        ["ephemeral/s1/shot9.png"]
    );
    // A key registered again (a new blob under it) lives again, acknowledged or not.
    register_shot9(&mut client).await?;
    set_policy(&mesh, |p| p.ephemeral_keep_last = 0).await?;
    let run = run_now(&mesh, "ephemeral_cleanup", false).await?;
    assert_eq!(run.acted, 0, "{run:?}");
    assert_eq!(
        mesh.stored_objects("ephemeral").await?,
        ["ephemeral/s1/shot9.png"]
    );
    // Keys that are not plain store keys, or that would name a user's files, are refused.
    for key in [
        "/users/alice/image/2026/01/x.jpg",
        "users/alice/x",
        "ephemeral//x",
        "ephemeral/../users/x",
    ] {
        let refused = client
            .register_ephemeral(authed(
                pb::RegisterEphemeralRequest {
                    storage_key: key.into(),
                    owner: "s1".into(),
                    ttl_seconds: 10,
                },
                &service,
            ))
            .await
            .expect_err(key);
        assert_eq!(refused.code(), Code::InvalidArgument, "{key}");
    }
    // Users cannot register ephemeral blobs.
    let denied = client
        .register_ephemeral(authed(
            pb::RegisterEphemeralRequest {
                storage_key: "ephemeral/x".into(),
                owner: "x".into(),
                ttl_seconds: 10,
            },
            &alice,
        ))
        .await
        .map(|_| ());
    assert_eq!(denied.map_err(|s| s.code()), Err(Code::PermissionDenied));
    mesh.stop().await
}

/// Sets the inactivity policy to `action` (grace: one hour), uploads `files` files for `user`,
/// makes her quiet for 400 days, has her notice sent (she is the only quiet user: due at
/// once) and moves it two hours back, past the grace. Returns her token.
async fn noticed_past_the_grace(
    mesh: &Mesh,
    conn: &stowage_db::Connection,
    user: &str,
    files: u64,
    action: pb::InactivityAction,
) -> anyhow::Result<String> {
    set_policy(mesh, |p| {
        p.inactivity_action = action as i32;
        p.notice_grace_hours = 1;
    })
    .await?;
    let bearer = token(user, &[]);
    for i in 0..files {
        upload(
            mesh.channel(),
            &bearer,
            &format!("f{i}.bin"),
            &random_bytes(100),
            &[],
        )
        .await?;
    }
    // Wait until her uploads count as activity (their file.created events: a late one would
    // end the notice cycle), then move her last activity a year back.
    events_consumed(conn, files as i64).await?;
    conn.execute(
        "UPDATE lifecycle.activity SET last_active_at = now() - interval '400 days'
         WHERE user_id = $1",
        &[&user],
    )
    .await?;
    run_now(mesh, "inactivity", false).await?;
    // Her files are as old as her quiet, older than the notice.
    conn.batch_execute(&format!(
        "UPDATE lifecycle.activity SET notice_sent_at = notice_sent_at - interval '2 hours',
             clean_after = clean_after - interval '2 hours'
         WHERE user_id = '{user}';
         UPDATE files.files SET created_at = created_at - interval '400 days'
         WHERE owner_id = '{user}';"
    ))
    .await?;
    Ok(bearer)
}

/// A user comes back after the grace and uploads, and the clean-up runs before the news of
/// her upload reaches Lifecycle: her new file stays (only what she had at the notice goes to
/// trash), and her history says what went.
#[tokio::test]
async fn a_clean_up_racing_a_returning_user_leaves_her_new_files() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let fern = noticed_past_the_grace(&mesh, &conn, "fern", 2, pb::InactivityAction::Trash).await?;
    let state = conn
        .query_one(
            "SELECT last_active_at, notice_sent_at FROM lifecycle.activity WHERE user_id = 'fern'",
            &[],
        )
        .await?;
    let (quiet_since, noticed): (chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>) =
        (state.get(0), state.get(1));
    let back = upload(mesh.channel(), &fern, "back.bin", &random_bytes(100), &[]).await?;
    events_consumed(&conn, 3).await?;
    // As it stood before her upload's event arrived.
    conn.execute(
        "UPDATE lifecycle.activity SET last_active_at = $1, notice_sent_at = $2, cleaned_at = NULL
         WHERE user_id = 'fern'",
        &[&quiet_since, &noticed],
    )
    .await?;
    let run = run_now(&mesh, "inactivity", false).await?;
    assert_eq!(run.acted, 1, "{run:?}");
    let live: Vec<String> = files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &fern))
        .await?
        .into_inner()
        .files
        .into_iter()
        .map(|f| f.id)
        .collect();
    assert_eq!(live, [back.id], "her new file stays");
    let trash = files(mesh.channel())
        .list_trash(authed(pb::ListTrashRequest::default(), &fern))
        .await?
        .into_inner()
        .files;
    assert_eq!(trash.len(), 2);
    let cleaned: serde_json::Value = conn
        .query_one(
            "SELECT detail FROM lifecycle.history WHERE user_id = 'fern' AND event = 'cleaned'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(cleaned["trashed_files"], 2);
    mesh.stop().await
}

#[tokio::test]
async fn with_the_trash_policy_a_user_quiet_past_the_grace_has_files_trashed_once()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let dora = noticed_past_the_grace(&mesh, &conn, "dora", 3, pb::InactivityAction::Trash).await?;
    let (a, b) = tokio::join!(
        run_now(&mesh, "inactivity", false),
        run_now(&mesh, "inactivity", false)
    );
    assert_eq!(a?.acted + b?.acted, 1);
    let live = files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &dora))
        .await?
        .into_inner()
        .files;
    assert!(live.is_empty(), "{live:?}");
    let trash = files(mesh.channel())
        .list_trash(authed(pb::ListTrashRequest::default(), &dora))
        .await?
        .into_inner()
        .files;
    assert_eq!(trash.len(), 3);
    let events: Vec<String> = LifecycleClient::new(mesh.channel())
        .user_events(authed(pb::UserEventsRequest::default(), &dora))
        .await?
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.event)
        .collect();
    assert_eq!(events, ["cleaned", "notice_sent"]);
    // The trash's three file.deleted events reach Lifecycle too; caused by it, not by her,
    // they leave her quiet and cleaned (counted as activity, they ended the cycle and the
    // run that trashed her files recorded nothing).
    events_consumed(&conn, 6).await?;
    let row = conn
        .query_one(
            "SELECT last_active_at < now() - interval '300 days', cleaned_at IS NOT NULL
             FROM lifecycle.activity WHERE user_id = 'dora'",
            &[],
        )
        .await?;
    assert_eq!((row.get::<_, bool>(0), row.get::<_, bool>(1)), (true, true));
    mesh.stop().await
}

/// A user noticed under "notify only" was told nothing would happen to her files: a policy
/// changed to "trash" afterwards does not trash them (a notice sent under it would).
#[tokio::test]
async fn a_user_noticed_under_notify_only_is_not_trashed_when_the_policy_changes()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    let erin =
        noticed_past_the_grace(&mesh, &conn, "erin", 1, pb::InactivityAction::NotifyOnly).await?;
    let notice: serde_json::Value = conn
        .query_one(
            "SELECT detail FROM lifecycle.history WHERE user_id = 'erin' AND event = 'notice_sent'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(notice["action_after_grace"], "notify_only");
    set_policy(&mesh, |p| {
        p.inactivity_action = pb::InactivityAction::Trash as i32;
    })
    .await?;
    let run = run_now(&mesh, "inactivity", false).await?;
    assert_eq!(run.acted, 0, "{run:?}");
    let live = files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &erin))
        .await?
        .into_inner()
        .files;
    assert_eq!(live.len(), 1, "her file stays");
    mesh.stop().await
}

/// A stored policy this version cannot read (a newer release's, or edited by hand) stops the
/// tasks that follow it: they do not run under the defaults, whose trash retention may be
/// shorter than the one set.
#[tokio::test]
async fn an_unreadable_policy_stops_the_tasks_instead_of_the_defaults() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    set_policy(&mesh, |p| p.trash_retention_days = 365).await?;
    pool.get()
        .await?
        .execute(
            "UPDATE lifecycle.policy SET policy = policy || '{\"inactivity_action\": \"shred\"}'",
            &[],
        )
        .await?;
    let mut client = LifecycleClient::new(mesh.channel());
    let admin = token("root", &["admin"]);
    let read = client
        .get_policy(authed(pb::GetPolicyRequest::default(), &admin))
        .await
        .map(drop);
    assert_eq!(read.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    let run = client
        .run_now(authed(
            pb::RunNowRequest {
                name: "trash_purge".into(),
                dry_run: false,
            },
            &admin,
        ))
        .await
        .map(drop);
    assert_eq!(run.err().map(|s| s.code()), Some(Code::FailedPrecondition));
    mesh.stop().await
}

/// A notice follows the policy in force when it is sent: a user marked under a shorter
/// inactivity period (raised meanwhile) gets none; and the grace a notice gave is kept when
/// the grace is shortened afterwards.
#[tokio::test]
async fn notices_follow_the_policy_in_force_and_keep_the_grace_they_gave() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    set_policy(&mesh, |p| {
        p.inactivity_days = 30;
        p.notice_grace_hours = 72;
        p.inactivity_action = pb::InactivityAction::Trash as i32;
    })
    .await?;
    for user in ["amy", "bea"] {
        upload(
            mesh.channel(),
            &token(user, &[]),
            "f.bin",
            &random_bytes(100),
            &[],
        )
        .await?;
    }
    events_consumed(&conn, 2).await?;
    conn.batch_execute(
        "UPDATE lifecycle.activity SET last_active_at = now() - interval '100 days';
         UPDATE files.files SET created_at = created_at - interval '100 days';",
    )
    .await?;
    // Both marked, spread over the grace: amy due at once, bea half-way.
    run_now(&mesh, "inactivity", false).await?;
    let sent = |user: &'static str| {
        let conn = &conn;
        async move {
            let row = conn
                .query_one(
                    "SELECT notice_sent_at IS NOT NULL, notice_due_at IS NOT NULL
                     FROM lifecycle.activity WHERE user_id = $1",
                    &[&user],
                )
                .await?;
            anyhow::Ok((row.get::<_, bool>(0), row.get::<_, bool>(1)))
        }
    };
    assert_eq!(sent("amy").await?, (true, true));
    assert_eq!(sent("bea").await?, (false, true));
    // The period is raised to 400 days before bea's turn comes.
    set_policy(&mesh, |p| p.inactivity_days = 400).await?;
    conn.execute(
        "UPDATE lifecycle.activity SET notice_due_at = now() WHERE user_id = 'bea'",
        &[],
    )
    .await?;
    run_now(&mesh, "inactivity", false).await?;
    assert_eq!(
        sent("bea").await?,
        (false, false),
        "not quiet long enough now"
    );

    // amy was told 72 hours; the grace is cut to one hour, and two have passed since.
    set_policy(&mesh, |p| p.notice_grace_hours = 1).await?;
    conn.execute(
        "UPDATE lifecycle.activity SET notice_sent_at = notice_sent_at - interval '2 hours'
         WHERE user_id = 'amy'",
        &[],
    )
    .await?;
    run_now(&mesh, "inactivity", false).await?;
    let amy = token("amy", &[]);
    let live = files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &amy))
        .await?
        .into_inner()
        .files;
    assert_eq!(live.len(), 1, "her 72 hours are not over");
    // Once they are, her files go.
    conn.execute(
        "UPDATE lifecycle.activity SET clean_after = now() - interval '1 second'
         WHERE user_id = 'amy'",
        &[],
    )
    .await?;
    run_now(&mesh, "inactivity", false).await?;
    let live = files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &amy))
        .await?
        .into_inner()
        .files;
    assert!(live.is_empty(), "{live:?}");
    mesh.stop().await
}

/// A variant charge between its two steps (Quota charged, Files not yet recorded) looks like
/// a drift; the recount leaves it, as it leaves an upload in flight, instead of taking the
/// charge back (the finished step would then have left the user under-charged).
#[tokio::test]
async fn a_variant_charge_in_flight_is_not_repaired_as_a_drift() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = reconciling(&setup, Duration::from_secs(1)).await?;
    let gus = token("gus", &[]);
    let file = upload(mesh.channel(), &gus, "g.bin", &random_bytes(1000), &[]).await?;
    // As SetVariants leaves it mid-step: its target recorded, Quota charged.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .execute(
            "UPDATE files.files SET variant_charge_pending = 200, variant_charge_pending_at = now()
             WHERE id = $1::text::uuid",
            &[&file.id],
        )
        .await?;
    stowage_integration_tests::quota(mesh.channel())
        .charge(authed(
            pb::ChargeRequest {
                user_id: "gus".into(),
                bytes: 200,
                idempotency_key: format!("variants:{}:1", file.id),
                reason: "variants".into(),
            },
            &token("files", &["service"]),
        ))
        .await?;
    let run = run_now(&mesh, "usage_reconcile", false).await?;
    assert_eq!(run.acted, 0, "{run:?}");
    assert_eq!(usage(mesh.channel(), &gus).await?.used_bytes, 1200);
    // A step begun more than an hour ago is stuck (its SetVariants died, none came since):
    // the owner is reconciled again.
    pool.get()
        .await?
        .execute(
            "UPDATE files.files SET variant_charge_pending_at = now() - interval '2 hours'
             WHERE id = $1::text::uuid",
            &[&file.id],
        )
        .await?;
    let run = run_now(&mesh, "usage_reconcile", false).await?;
    assert_eq!(run.acted, 1, "{run:?}");
    assert_eq!(usage(mesh.channel(), &gus).await?.used_bytes, 1000);
    mesh.stop().await
}

/// A run stopped before its end (here its RunNow caller hangs up while it waits out the
/// settle time of a drift) is recorded as stopped, not left running for ever in ListRuns.
#[tokio::test]
async fn a_run_whose_caller_hangs_up_is_recorded_as_stopped() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = reconciling(&setup, Duration::from_secs(5)).await?;
    let hal = token("hal", &[]);
    upload(mesh.channel(), &hal, "h.bin", &random_bytes(100), &[]).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.execute(
        "UPDATE quota.accounts SET used_bytes = used_bytes + 1 WHERE user_id = 'hal'",
        &[],
    )
    .await?;
    let mut request = authed(
        pb::RunNowRequest {
            name: "usage_reconcile".into(),
            dry_run: false,
        },
        &token("root", &["admin"]),
    );
    request.set_timeout(Duration::from_secs(1));
    let hung_up = LifecycleClient::new(mesh.channel()).run_now(request).await;
    let code = hung_up.err().map(|s| s.code());
    assert!(
        matches!(code, Some(Code::Cancelled | Code::DeadlineExceeded)),
        "{code:?}"
    );
    stowage_integration_tests::eventually(Duration::from_secs(10), "the run closed", || async {
        let row = conn
            .query_one(
                "SELECT finished_at IS NOT NULL, coalesce(error, '') FROM lifecycle.runs
                 WHERE name = 'usage_reconcile'",
                &[],
            )
            .await?;
        Ok(row.get::<_, bool>(0) && row.get::<_, String>(1).starts_with("cancelled"))
    })
    .await?;
    mesh.stop().await
}

/// Adds 7 bytes to `user`'s recorded usage, locks Files' table and asks for `user`'s
/// recheck; returns once the recheck is claimed (running, its recount waiting on the lock).
/// The connection returned holds the lock: `ROLLBACK` on it lets the recount go on.
async fn recheck_waiting_on_files(
    setup: &Setup,
    conn: &impl stowage_db::GenericClient,
    user: &str,
) -> anyhow::Result<stowage_db::Connection> {
    conn.execute(
        "UPDATE quota.accounts SET used_bytes = used_bytes + 7 WHERE user_id = $1",
        &[&user],
    )
    .await?;
    let lock = stowage_db::connect(&setup.database_url, 1)?.get().await?;
    lock.batch_execute("BEGIN; LOCK TABLE files.files IN ACCESS EXCLUSIVE MODE")
        .await?;
    conn.execute(
        "INSERT INTO lifecycle.rechecks (user_id, due_at) VALUES ($1, now())",
        &[&user],
    )
    .await?;
    stowage_integration_tests::eventually(PATIENCE, "the recheck claimed", || async {
        Ok(conn
            .query_opt(
                "SELECT 1 FROM lifecycle.rechecks WHERE user_id = $1 AND claim IS NOT NULL",
                &[&user],
            )
            .await?
            .is_some())
    })
    .await?;
    Ok(lock)
}

/// A mesh for the recheck tests, its schedules off: repairs settle after 200 ms, rechecks
/// wait `debounce` after the last request, and calls to other services `peer_timeout`.
async fn recheck_mesh(
    setup: &Setup,
    debounce: Duration,
    peer_timeout: Duration,
) -> anyhow::Result<Mesh> {
    recheck_mesh_trying(setup, debounce, peer_timeout, 6).await
}

/// [`recheck_mesh`] whose rechecks make at most `attempts`.
async fn recheck_mesh_trying(
    setup: &Setup,
    debounce: Duration,
    peer_timeout: Duration,
    attempts: u32,
) -> anyhow::Result<Mesh> {
    let mesh = Mesh::start_with(setup, |c| {
        c.lifecycle.reconcile_settle = Duration::from_millis(200);
        c.lifecycle.recheck_debounce = debounce;
        c.lifecycle.recheck_attempts = attempts;
        c.peers.timeout = Some(peer_timeout);
    })
    .await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    Ok(mesh)
}

/// Rechecks waiting or running.
async fn pending_rechecks(conn: &impl stowage_db::GenericClient) -> anyhow::Result<i64> {
    Ok(conn
        .query_one("SELECT count(*) FROM lifecycle.rechecks", &[])
        .await?
        .get(0))
}

/// Uploads a 1,000-byte file as `user` and waits until its recheck is done: an account with
/// usage and no recheck pending.
async fn uploaded_and_rechecked(
    mesh: &Mesh,
    conn: &impl stowage_db::GenericClient,
    user: &str,
) -> anyhow::Result<()> {
    upload(mesh.channel(), user, "r.bin", &random_bytes(1000), &[]).await?;
    events_consumed(conn, 1).await?;
    stowage_integration_tests::eventually(PATIENCE, "the upload's recheck done", || async {
        Ok(pending_rechecks(conn).await? == 0)
    })
    .await
}

/// Ivy's upload of 1,000 bytes, rechecked; then her usage drifted by 7 bytes and a recheck
/// asked for while Files cannot answer (its table locked by the transaction returned, on
/// `blocker`), which has failed once.
async fn ivy_drifted_with_a_failed_recheck<'a>(
    mesh: &Mesh,
    conn: &impl stowage_db::GenericClient,
    blocker: &'a mut stowage_db::Connection,
) -> anyhow::Result<stowage_db::Transaction<'a>> {
    uploaded_and_rechecked(mesh, conn, &token("ivy", &[])).await?;
    conn.execute(
        "UPDATE quota.accounts SET used_bytes = used_bytes + 7 WHERE user_id = 'ivy'",
        &[],
    )
    .await?;
    let lock = blocker.transaction().await?;
    lock.batch_execute("LOCK TABLE files.files IN ACCESS EXCLUSIVE MODE")
        .await?;
    conn.execute(
        "INSERT INTO lifecycle.rechecks (user_id, due_at) VALUES ('ivy', now())",
        &[],
    )
    .await?;
    stowage_integration_tests::eventually(PATIENCE, "the recheck failed once", || async {
        let n: i64 = conn
            .query_one(
                "SELECT count(*) FROM lifecycle.rechecks WHERE user_id = 'ivy' AND attempts = 1",
                &[],
            )
            .await?
            .get(0);
        Ok(n == 1)
    })
    .await?;
    Ok(lock)
}

/// A recheck whose recount fails (here Files cannot answer in time: its table is locked) is
/// tried again after a backoff, and repairs the drift once Files answers; not left to the
/// next reconcile, hours later.
#[tokio::test]
async fn a_failed_recheck_is_tried_again_and_repairs() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = recheck_mesh(&setup, Duration::from_secs(1), Duration::from_secs(1)).await?;
    let ivy = token("ivy", &[]);
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let conn = pool.get().await?;
    let mut blocker = pool.get().await?;
    let lock = ivy_drifted_with_a_failed_recheck(&mesh, &conn, &mut blocker).await?;
    lock.rollback().await?;
    stowage_integration_tests::eventually(PATIENCE, "the drift repaired", || async {
        Ok(usage(mesh.channel(), &ivy).await?.used_bytes == 1000)
    })
    .await?;
    mesh.stop().await
}

/// A recheck that fails as often as `STOWAGE_LIFECYCLE__RECHECK_ATTEMPTS` allows (here two)
/// is left to the next reconcile: gone while Files still cannot answer, the drift unrepaired.
/// (With six attempts it waits 5 + 10 + 20 + 40 s: the test then fails at its patience.)
#[tokio::test]
async fn a_recheck_out_of_attempts_is_left_to_the_reconcile() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh =
        recheck_mesh_trying(&setup, Duration::from_secs(1), Duration::from_secs(1), 2).await?;
    let ivy = token("ivy", &[]);
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let conn = pool.get().await?;
    let mut blocker = pool.get().await?;
    let lock = ivy_drifted_with_a_failed_recheck(&mesh, &conn, &mut blocker).await?;
    // The second attempt, 5 s later, is its last.
    stowage_integration_tests::eventually(PATIENCE, "the recheck given up", || async {
        Ok(pending_rechecks(&conn).await? == 0)
    })
    .await?;
    lock.rollback().await?;
    assert_eq!(usage(mesh.channel(), &ivy).await?.used_bytes, 1007);
    mesh.stop().await
}

/// Runs are kept 90 days: a task's next run deletes its older ones, and no other task's.
#[tokio::test]
async fn runs_older_than_ninety_days_go() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.batch_execute(
        "INSERT INTO lifecycle.runs (id, name, dry_run, started_at, finished_at) VALUES
             (gen_random_uuid(), 'orphan_uploads', false, now() - interval '100 days', now() - interval '100 days'),
             (gen_random_uuid(), 'orphan_uploads', false, now() - interval '30 days', now() - interval '30 days'),
             (gen_random_uuid(), 'trash_purge', false, now() - interval '100 days', now() - interval '100 days');",
    )
    .await?;
    run_now(&mesh, "orphan_uploads", false).await?;
    let left: Vec<(String, i64)> = conn
        .query(
            "SELECT name, count(*) FROM lifecycle.runs
             WHERE started_at < now() - interval '1 day' GROUP BY name ORDER BY name",
            &[],
        )
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        left,
        [
            ("orphan_uploads".to_owned(), 1),
            ("trash_purge".to_owned(), 1)
        ]
    );
    mesh.stop().await
}

/// After a user's files change, the debounced recheck announces what it measured
/// (`usage.measured`, as seed 000's storage scan publishes each user's size).
#[tokio::test]
async fn a_users_size_is_announced_after_their_files_change() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.lifecycle.recheck_debounce = Duration::from_millis(200);
    })
    .await?;
    let uma = token("uma", &[]);
    upload(mesh.channel(), &uma, "u.bin", &random_bytes(1000), &[]).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    stowage_integration_tests::eventually(PATIENCE, "uma's size announced", || async {
        let rows = conn
            .query(
                "SELECT payload FROM lifecycle.outbox WHERE topic = 'usage.measured' AND key = 'uma'",
                &[],
            )
            .await?;
        Ok(rows.iter().any(|r| {
            let payload: serde_json::Value = r.get(0);
            payload["stored_bytes"] == 1000 && payload["used_bytes"] == 1000
        }))
    })
    .await?;
    mesh.stop().await
}

/// A recheck waiting on its backoff after failures becomes a fresh one when the user's files
/// change again, capped like any other: it runs within 10 s of that change, not at the end of
/// its backoff (here an hour) or of the debounce (here a minute).
#[tokio::test]
async fn a_new_change_brings_a_retried_recheck_under_the_cap_again() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.lifecycle.recheck_debounce = Duration::from_secs(60);
    })
    .await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.execute(
        "INSERT INTO lifecycle.rechecks (user_id, due_at, attempts, first_at)
         VALUES ('rex', now() + interval '1 hour', 3, now() - interval '1 hour')",
        &[],
    )
    .await?;
    upload(
        mesh.channel(),
        &token("rex", &[]),
        "r.bin",
        &random_bytes(100),
        &[],
    )
    .await?;
    // Within 30 s: before the debounce (60 s) or the backoff (an hour) would have run it.
    stowage_integration_tests::eventually(Duration::from_secs(30), "rex's recheck run", || async {
        let n: i64 = conn
            .query_one(
                "SELECT count(*) FROM lifecycle.rechecks WHERE user_id = 'rex'",
                &[],
            )
            .await?
            .get(0);
        Ok(n == 0)
    })
    .await?;
    mesh.stop().await
}

/// History is kept `history_retention_days` (730 by default): `history_prune` deletes older
/// events (a dry run only counts them), and a retention of 0 keeps everything.
#[tokio::test]
async fn history_older_than_its_retention_goes() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.batch_execute(
        "INSERT INTO lifecycle.history (user_id, event, at, dedupe_key) VALUES
             ('hana', 'activity', now() - interval '800 days', 'a'),
             ('hana', 'notice_sent', now() - interval '731 days', 'b'),
             ('hana', 'activity', now() - interval '700 days', 'c'),
             ('ivo', 'activity', now() - interval '1 day', 'd');",
    )
    .await?;
    let keys = || async {
        let rows = conn
            .query(
                "SELECT dedupe_key FROM lifecycle.history WHERE user_id IN ('hana', 'ivo') ORDER BY dedupe_key",
                &[],
            )
            .await?;
        anyhow::Ok(rows.iter().map(|r| r.get(0)).collect::<Vec<String>>())
    };
    set_policy(&mesh, |p| p.history_retention_days = 0).await?;
    assert_eq!(run_now(&mesh, "history_prune", false).await?.acted, 0);
    assert_eq!(keys().await?, ["a", "b", "c", "d"], "0 keeps everything");

    set_policy(&mesh, |p| p.history_retention_days = 730).await?;
    let dry = run_now(&mesh, "history_prune", true).await?;
    assert_eq!(dry.acted, 2);
    assert_eq!(
        keys().await?,
        ["a", "b", "c", "d"],
        "a dry run deletes nothing"
    );
    assert_eq!(run_now(&mesh, "history_prune", false).await?.acted, 2);
    assert_eq!(keys().await?, ["c", "d"]);

    let refused = LifecycleClient::new(mesh.channel())
        .set_policy(authed(
            pb::SetPolicyRequest {
                policy: Some(pb::Policy {
                    history_retention_days: 7,
                    ..stowage_lifecycle::Policy::default().to_proto()
                }),
            },
            &token("root", &["admin"]),
        ))
        .await
        .expect_err("a week is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("policy.history_retention_days"));
    mesh.stop().await
}

/// A recheck is claimed, not deleted, while it runs: one a process claimed and then died with
/// (its lease over) runs again and repairs, and leaves no row behind.
#[tokio::test]
async fn a_recheck_whose_process_died_runs_again_after_its_lease() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = recheck_mesh(&setup, Duration::from_secs(1), Duration::from_secs(30)).await?;
    let jo = token("jo", &[]);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    uploaded_and_rechecked(&mesh, &conn, &jo).await?;
    let rechecks = || pending_rechecks(&conn);
    // While a recheck runs (its recount waits: Files' table is locked), its row stays,
    // claimed: a process dying now would leave it, not lose it.
    let used = || async { anyhow::Ok(usage(mesh.channel(), &jo).await?.used_bytes) };
    let lock = recheck_waiting_on_files(&setup, &conn, "jo").await?;
    lock.batch_execute("ROLLBACK").await?;
    stowage_integration_tests::eventually(PATIENCE, "repaired, row gone", || async {
        Ok(used().await? == 1000 && rechecks().await? == 0)
    })
    .await?;

    // The row a dead process's claim leaves once its lease is over runs again.
    conn.batch_execute(
        "UPDATE quota.accounts SET used_bytes = used_bytes + 7 WHERE user_id = 'jo';
         INSERT INTO lifecycle.rechecks (user_id, due_at, first_at, claim)
         VALUES ('jo', now() - interval '1 second', now() - interval '5 minutes', gen_random_uuid());",
    )
    .await?;
    stowage_integration_tests::eventually(PATIENCE, "repaired again, row gone", || async {
        Ok(used().await? == 1000 && rechecks().await? == 0)
    })
    .await?;
    mesh.stop().await
}

/// A change announced while the user's recheck runs asks for a recheck of its own: the one
/// running, once done, clears only its own claim, so the new request stays and runs after it.
#[tokio::test]
async fn a_recheck_requested_while_one_runs_is_kept_and_runs_after_it() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    // A debounce long enough that the new request waits for the test to bring it forward.
    let mesh = recheck_mesh(&setup, Duration::from_secs(120), Duration::from_secs(30)).await?;
    let jo = token("jo", &[]);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    // The upload's own recheck waits the debounce: brought forward.
    upload(mesh.channel(), &jo, "r.bin", &random_bytes(1000), &[]).await?;
    events_consumed(&conn, 1).await?;
    conn.execute("UPDATE lifecycle.rechecks SET due_at = now()", &[])
        .await?;
    stowage_integration_tests::eventually(PATIENCE, "the upload's recheck done", || async {
        Ok(pending_rechecks(&conn).await? == 0)
    })
    .await?;
    let used = || async { anyhow::Ok(usage(mesh.channel(), &jo).await?.used_bytes) };
    let claim = || async {
        anyhow::Ok(
            conn.query_opt(
                "SELECT claim IS NOT NULL FROM lifecycle.rechecks WHERE user_id = 'jo'",
                &[],
            )
            .await?
            .map(|r| r.get::<_, bool>(0)),
        )
    };
    let lock = recheck_waiting_on_files(&setup, &conn, "jo").await?;
    // Meanwhile Files announces a change of jo's (staged in its outbox, which the lock leaves
    // writable): Lifecycle's consumer asks for a recheck, replacing the running one's claim.
    let payload = serde_json::json!({"owner_id": "jo", "file_id": uuid::Uuid::now_v7()});
    stowage_events::stage(
        &conn,
        "files",
        stowage_events::topics::FILE_RESTORED,
        "jo",
        &payload,
    )
    .await?;
    stowage_integration_tests::eventually(PATIENCE, "the new request recorded", || async {
        Ok(claim().await? == Some(false))
    })
    .await?;
    lock.batch_execute("ROLLBACK").await?;
    // The running recheck repairs and ends; the request made meanwhile is still there.
    stowage_integration_tests::eventually(PATIENCE, "the running recheck's repair", || async {
        Ok(used().await? == 1000)
    })
    .await?;
    assert_eq!(claim().await?, Some(false), "the request made meanwhile");
    // It runs (brought forward) and repairs what changed since.
    conn.batch_execute(
        "UPDATE quota.accounts SET used_bytes = used_bytes + 7 WHERE user_id = 'jo';
         UPDATE lifecycle.rechecks SET due_at = now() WHERE user_id = 'jo';",
    )
    .await?;
    stowage_integration_tests::eventually(PATIENCE, "repaired again, row gone", || async {
        Ok(used().await? == 1000 && pending_rechecks(&conn).await? == 0)
    })
    .await?;
    mesh.stop().await
}

/// UserEvents pages through a user's history newest first, each event once, also when
/// several share one time (they follow their ids).
#[tokio::test]
async fn user_events_pages_through_events_of_the_same_time_once_each() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = start(&setup).await?;
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "INSERT INTO lifecycle.history (user_id, event, at, dedupe_key) VALUES
                 ('pia', 'session_up', '2026-01-01T10:00:00Z', 'a'),
                 ('pia', 'session_up', '2026-01-01T11:00:00Z', 'b'),
                 ('pia', 'session_down', '2026-01-01T11:00:00Z', 'c'),
                 ('pia', 'session_up', '2026-01-01T11:00:00Z', 'd'),
                 ('pia', 'session_down', '2026-01-01T12:00:00Z', 'e'),
                 ('quin', 'session_up', '2026-01-01T11:00:00Z', 'x');",
        )
        .await?;
    let admin = token("root", &["admin"]);
    let mut client = LifecycleClient::new(mesh.channel());
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .user_events(authed(
                pb::UserEventsRequest {
                    user_id: "pia".into(),
                    page_size: 2,
                    page_token: page_token.clone(),
                },
                &admin,
            ))
            .await?
            .into_inner();
        assert!(page.events.len() <= 2);
        seen.extend(
            page.events
                .iter()
                .map(|e| (e.event.clone(), e.at.map_or(0, |t| t.seconds))),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let at = |hour: u32| {
        chrono::NaiveDate::from_ymd_opt(2026, 1, 1)
            .and_then(|d| d.and_hms_opt(hour, 0, 0))
            .map_or(0, |t| t.and_utc().timestamp())
    };
    // Newest first; the three of 11:00 by id, the last inserted first.
    assert_eq!(
        seen,
        [
            ("session_down".to_owned(), at(12)),
            ("session_up".to_owned(), at(11)),
            ("session_down".to_owned(), at(11)),
            ("session_up".to_owned(), at(11)),
            ("session_up".to_owned(), at(10)),
        ]
    );
    mesh.stop().await
}

/// A screenshot stored for a frame that never committed (a process that died between the two,
/// a frame refused and its screenshot not removed then) is removed by the staging clean-up once
/// a day old; one an event names stays.
#[tokio::test]
async fn stray_event_screenshots_go_with_the_staging_cleanup() -> anyhow::Result<()> {
    use object_store::{ObjectStoreExt, PutPayload, path::Path};
    let setup = Setup::new().await?;
    let mesh = crate::streams::half_second_windows(&setup, 0).await?;
    lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let bob = token("bob", &[]);
    let shot = vec![7u8; 4096];
    let mut acked = std::collections::HashMap::new();
    let frame = pb::AppendEventsRequest {
        stream_id: "desk".into(),
        first_seq: 1,
        events: vec![crate::streams::event(1, Some(shot.clone()))],
    };
    // And a stream called "screens", whose sealed batch lives at events/bob/screens/{date}/
    // and its screenshot at events/bob/screens/screens/: under the prefix of a stream whose
    // old name (from before streams were per owner) was "bob", as recorded below.
    let other = pb::AppendEventsRequest {
        stream_id: "screens".into(),
        first_seq: 1,
        events: vec![crate::streams::event(1, Some(shot.clone()))],
    };
    crate::streams::append(mesh.channel(), &bob, vec![frame, other], &mut acked).await;
    assert_eq!(acked.get("desk"), Some(&1));
    assert_eq!(acked.get("screens"), Some(&1));
    crate::streams::batches_sealed(&setup, 2).await?;
    let screens_stream = setup.stored_objects("events/bob/screens");
    assert_eq!(
        screens_stream.len(),
        2,
        "a batch and a screenshot: {screens_stream:?}"
    );
    stowage_db::connect(&setup.database_url, 1)?
        .get()
        .await?
        .execute(
            "INSERT INTO ingest.event_stream_old_names (old_name, stream_id) VALUES ('bob', 'bob/desk')",
            &[],
        )
        .await?;
    let named = setup.stored_objects("events/bob/desk/screens");
    assert_eq!(named.len(), 1, "{named:?}");
    let stray = format!(
        "events/bob/desk/screens/000000000002-{}.bin",
        uuid::Uuid::new_v4().simple()
    );
    mesh.blobs
        .store
        .put(&Path::from(stray.as_str()), PutPayload::from(shot.clone()))
        .await?;
    for key in setup.stored_objects("events/bob") {
        age(&setup, &key, Duration::from_secs(25 * 3600))?;
    }

    let dry = run_now(&mesh, "staging_cleanup", true).await?;
    assert_eq!(dry.report, [format!("staging {stray}")], "{dry:?}");
    let run = run_now(&mesh, "staging_cleanup", false).await?;
    assert_eq!((run.acted, run.failed), (1, 0), "{run:?}");
    assert_eq!(setup.stored_objects("events/bob/desk/screens"), named);
    assert_eq!(setup.stored_objects("events/bob/screens"), screens_stream);
    // The one its event names is still served.
    let served = stowage_integration_tests::ingest(mesh.channel())
        .get_screenshot(authed(
            pb::GetScreenshotRequest {
                storage_key: named[0].clone(),
            },
            &bob,
        ))
        .await?
        .into_inner();
    assert_eq!(served.data, shot);
    mesh.stop().await
}

/// Trashing every file of an owner (the inactivity policy's last step) goes a thousand files
/// per transaction: 2,500 files are all trashed, each announced once, in three transactions.
#[tokio::test]
async fn trashing_all_of_an_owners_files_goes_a_thousand_per_transaction() -> anyhow::Result<()> {
    use futures::StreamExt;
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let service = token("stowage-internal", &["service"]);
    let registered: Vec<anyhow::Result<()>> = futures::stream::iter(0..2500)
        .map(|_| {
            let mut files = stowage_integration_tests::files(mesh.channel());
            let service = service.clone();
            async move {
                let id = uuid::Uuid::new_v4();
                files
                    .register_file(authed(
                        pb::RegisterFileRequest {
                            owner_id: "carol".into(),
                            file_id: id.to_string(),
                            display_name: format!("{id}.txt"),
                            kind: pb::FileKind::Document as i32,
                            mime_type: "text/plain".into(),
                            size_bytes: 1,
                            sha256: "00".repeat(32),
                            storage_key: format!("users/carol/document/2026/12/{id}.txt"),
                            status: pb::FileStatus::Ready as i32,
                            idempotency_key: id.to_string(),
                            ..Default::default()
                        },
                        &service,
                    ))
                    .await?;
                Ok(())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    registered
        .into_iter()
        .collect::<anyhow::Result<Vec<()>>>()?;
    let trashed = stowage_integration_tests::files(mesh.channel())
        .trash_owner_files(authed(
            pb::TrashOwnerFilesRequest {
                owner_id: "carol".into(),
                ..Default::default()
            },
            &service,
        ))
        .await?
        .into_inner()
        .trashed;
    assert_eq!(trashed, 2500);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    // Each transaction stamps its files with its own start time (now()).
    let row = conn
        .query_one(
            "SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(DISTINCT deleted_at)
             FROM files.files WHERE owner_id = 'carol'",
            &[],
        )
        .await?;
    let (left, transactions): (i64, i64) = (row.get(0), row.get(1));
    let events: i64 = conn
        .query_one(
            "SELECT count(DISTINCT key) FROM files.outbox WHERE topic = 'file.deleted'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!((left, events, transactions), (0, 2500, 3));
    mesh.stop().await
}
