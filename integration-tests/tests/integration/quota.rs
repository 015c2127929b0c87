//! Reservations never overrun a limit, and commits count once.

use futures::{StreamExt, future::join_all};
use stowage_integration_tests::{
    inline_variant, random_bytes, set_variants, upload_with_key, usage,
};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::Code;

#[tokio::test]
async fn parallel_reservations_stop_exactly_at_the_limit() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let service = token("ingest", &["service"]);
    let admin = token("root", &["admin"]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    quota
        .set_limit(authed(
            pb::SetLimitRequest {
                user_id: "bob".into(),
                limit_bytes: 37 * 1000 + 999,
            },
            &admin,
        ))
        .await?;

    let calls = (0..100).map(|i| {
        let mut q = quota.clone();
        let service = service.clone();
        async move {
            q.reserve(authed(
                pb::ReserveRequest {
                    user_id: "bob".into(),
                    bytes: 1000,
                    ttl_seconds: 600,
                    idempotency_key: format!("r{i}"),
                },
                &service,
            ))
            .await
        }
    });
    let results = join_all(calls).await;
    let granted: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().ok())
        .filter_map(|r| r.get_ref().reservation.as_ref().map(|x| x.id.clone()))
        .collect();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    assert_eq!(granted.len(), 37, "exactly 37 of 100 fit");
    assert_eq!(refused, 63, "the rest are RESOURCE_EXHAUSTED");

    for id in &granted {
        quota
            .commit(authed(
                pb::CommitRequest {
                    reservation_id: id.clone(),
                    bytes: 1000,
                },
                &service,
            ))
            .await?;
    }
    // A retried commit (same reservation) does not count twice.
    quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: granted[0].clone(),
                bytes: 1000,
            },
            &service,
        ))
        .await?;
    let account = usage(mesh.channel(), &token("bob", &[])).await?;
    assert_eq!(account.used_bytes, 37_000);
    assert_eq!(account.reserved_bytes, 0);

    // A retried reserve with a used key returns the same reservation, holding nothing more.
    let again = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "bob".into(),
                bytes: 1000,
                ttl_seconds: 600,
                idempotency_key: "r0".into(),
            },
            &service,
        ))
        .await;
    let again = again?.into_inner().reservation.unwrap_or_default();
    assert_eq!(
        again.id, granted[0],
        "a full account still answers a retried key with its first reservation"
    );
    // The key used again for another amount is refused, naming the field.
    let other = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "bob".into(),
                bytes: 999,
                ttl_seconds: 600,
                idempotency_key: "r0".into(),
            },
            &service,
        ))
        .await
        .expect_err("another amount under a used key");
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert!(
        other.message().starts_with("idempotency_key:") && other.message().contains("1000"),
        "{other:?}"
    );
    // As many bytes as a size can say: refused as too many, like any other.
    let huge = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "bob".into(),
                bytes: i64::MAX as u64,
                ttl_seconds: 600,
                idempotency_key: String::new(),
            },
            &service,
        ))
        .await
        .expect_err("past the limit");
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    let stats = quota
        .stats(authed(pb::StatsRequest {}, &admin))
        .await?
        .into_inner();
    assert_eq!(stats.total_used_bytes, 37_000);
    // Two "unlimited" accounts (limits as large as a limit can be) still add up.
    for user in ["carol", "dave"] {
        quota
            .set_limit(authed(
                pb::SetLimitRequest {
                    user_id: user.into(),
                    limit_bytes: i64::MAX as u64,
                },
                &admin,
            ))
            .await?;
    }
    let stats = quota
        .stats(authed(pb::StatsRequest {}, &admin))
        .await?
        .into_inner();
    assert_eq!(
        (stats.total_used_bytes, stats.total_limit_bytes),
        (37_000, i64::MAX as u64),
        "limits saturate"
    );
    assert_eq!(stats.accounts_above_80_percent, 1);
    let above = quota
        .list_accounts(authed(
            pb::ListAccountsRequest {
                min_used_percent: 80.0,
                ..Default::default()
            },
            &admin,
        ))
        .await?
        .into_inner();
    assert_eq!(
        above
            .accounts
            .iter()
            .map(|a| a.user_id.as_str())
            .collect::<Vec<_>>(),
        vec!["bob"]
    );
    // A limit of 0 is full: counted so by Stats, listed so from 80 % and at 100 %, shown at
    // 100 %; not above it.
    quota
        .set_limit(authed(
            pb::SetLimitRequest {
                user_id: "erin".into(),
                limit_bytes: 0,
            },
            &admin,
        ))
        .await?;
    let stats = quota
        .stats(authed(pb::StatsRequest {}, &admin))
        .await?
        .into_inner();
    assert_eq!(stats.accounts_above_80_percent, 2);
    for (percent, listed) in [
        (80.0, vec!["bob", "erin"]),
        (100.0, vec!["erin"]),
        (101.0, vec![]),
    ] {
        let above = quota
            .list_accounts(authed(
                pb::ListAccountsRequest {
                    min_used_percent: percent,
                    ..Default::default()
                },
                &admin,
            ))
            .await?
            .into_inner();
        let users: Vec<(&str, f64)> = above
            .accounts
            .iter()
            .map(|a| (a.user_id.as_str(), a.used_percent))
            .collect();
        assert_eq!(
            users.iter().map(|(u, _)| *u).collect::<Vec<_>>(),
            listed,
            "{percent}: {users:?}"
        );
    }
    mesh.stop().await
}

#[tokio::test]
async fn release_gives_bytes_back_and_debit_counts_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(10_000);
    let mesh = Mesh::start(&setup).await?;
    let service = token("svc", &["service"]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    let r = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "carol".into(),
                bytes: 8000,
                ..Default::default()
            },
            &service,
        ))
        .await?
        .into_inner();
    let id = r.reservation.map(|r| r.id).unwrap_or_default();
    let full = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "carol".into(),
                bytes: 3000,
                ..Default::default()
            },
            &service,
        ))
        .await;
    assert_eq!(full.err().map(|s| s.code()), Some(Code::ResourceExhausted));
    quota
        .release(authed(
            pb::ReleaseRequest {
                reservation_id: id.clone(),
            },
            &service,
        ))
        .await?;
    quota
        .release(authed(
            pb::ReleaseRequest {
                reservation_id: id.clone(),
            },
            &service,
        ))
        .await?;
    let commit_released = quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: id,
                bytes: 10,
            },
            &service,
        ))
        .await;
    assert_eq!(
        commit_released.err().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    let account = usage(mesh.channel(), &token("carol", &[])).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (0, 0));

    let r = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "carol".into(),
                bytes: 5000,
                ..Default::default()
            },
            &service,
        ))
        .await?
        .into_inner();
    quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: r.reservation.map(|r| r.id).unwrap_or_default(),
                bytes: 5000,
            },
            &service,
        ))
        .await?;
    for _ in 0..2 {
        quota
            .debit(authed(
                pb::DebitRequest {
                    user_id: "carol".into(),
                    bytes: 2000,
                    idempotency_key: "purge:x".into(),
                    reason: "test".into(),
                },
                &service,
            ))
            .await?;
    }
    let account = usage(mesh.channel(), &token("carol", &[])).await?;
    assert_eq!(account.used_bytes, 3000, "one debit of 2000, not two");
    // The key again for another amount, or for a charge, is refused and moves nothing.
    let other = quota
        .debit(authed(
            pb::DebitRequest {
                user_id: "carol".into(),
                bytes: 2500,
                idempotency_key: "purge:x".into(),
                reason: "test".into(),
            },
            &service,
        ))
        .await
        .expect_err("another amount under a used key");
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert!(other.message().starts_with("idempotency_key:"), "{other:?}");
    let other = quota
        .charge(authed(
            pb::ChargeRequest {
                user_id: "carol".into(),
                bytes: 2000,
                idempotency_key: "purge:x".into(),
                reason: "test".into(),
            },
            &service,
        ))
        .await
        .expect_err("a charge under a debit's key");
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert!(other.message().contains("debit"), "{other:?}");
    let account = usage(mesh.channel(), &token("carol", &[])).await?;
    assert_eq!(account.used_bytes, 3000, "neither moved the usage");

    // Keys are per user: the same key for another user is another movement.
    for user in ["carol", "dan"] {
        for _ in 0..2 {
            quota
                .charge(authed(
                    pb::ChargeRequest {
                        user_id: user.into(),
                        bytes: 700,
                        idempotency_key: "variants:same".into(),
                        reason: "test".into(),
                    },
                    &service,
                ))
                .await?;
        }
    }
    let carol = usage(mesh.channel(), &token("carol", &[])).await?;
    let dan = usage(mesh.channel(), &token("dan", &[])).await?;
    assert_eq!(
        (carol.used_bytes, dan.used_bytes),
        (3700, 700),
        "one charge each, under one key"
    );
    mesh.stop().await
}

/// The notices staged for `user` in Quota's outbox: (threshold percent, used bytes).
async fn notices(database_url: &str, user: &str) -> anyhow::Result<Vec<(i64, i64)>> {
    let pool = stowage_db::connect(database_url, 1)?;
    let conn = pool.get().await?;
    let rows = conn
        .query(
            "SELECT (payload->>'threshold_percent')::bigint, (payload->>'used_bytes')::bigint
             FROM quota.outbox WHERE topic = 'quota.threshold_crossed' AND key = $1 ORDER BY id",
            &[&user],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

#[tokio::test]
async fn crossing_80_90_and_100_percent_is_announced_once_each() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(10_000);
    let mesh = Mesh::start(&setup).await?;
    let service = token("svc", &["service"]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    let mut commit = async |bytes: u64| -> anyhow::Result<()> {
        let r = quota
            .reserve(authed(
                pb::ReserveRequest {
                    user_id: "dana".into(),
                    bytes,
                    ..Default::default()
                },
                &service,
            ))
            .await?
            .into_inner();
        let id = r.reservation.map(|r| r.id).unwrap_or_default();
        for _ in 0..2 {
            // The second commit is a retry: it must not announce anything again.
            quota
                .commit(authed(
                    pb::CommitRequest {
                        reservation_id: id.clone(),
                        bytes,
                    },
                    &service,
                ))
                .await?;
        }
        Ok(())
    };
    commit(7_999).await?;
    assert_eq!(notices(&setup.database_url, "dana").await?, vec![]);
    commit(1).await?;
    commit(500).await?;
    assert_eq!(
        notices(&setup.database_url, "dana").await?,
        vec![(80, 8_000)]
    );
    // 8,500 -> 9,900 passes 90 only.
    commit(1_400).await?;
    // A charge (variants) takes usage to the limit: 100.
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    for _ in 0..2 {
        quota
            .charge(authed(
                pb::ChargeRequest {
                    user_id: "dana".into(),
                    bytes: 100,
                    idempotency_key: "variants:f:1".into(),
                    reason: "test".into(),
                },
                &service,
            ))
            .await?;
    }
    // A debit never announces.
    quota
        .debit(authed(
            pb::DebitRequest {
                user_id: "dana".into(),
                bytes: 5_000,
                idempotency_key: "purge:f".into(),
                reason: "test".into(),
            },
            &service,
        ))
        .await?;
    assert_eq!(
        notices(&setup.database_url, "dana").await?,
        vec![(80, 8_000), (90, 9_900), (100, 10_000)]
    );
    // Jumping past two thresholds at once announces the highest only.
    commit(4_900).await?;
    assert_eq!(
        notices(&setup.database_url, "dana").await?.last(),
        Some(&(90, 9_900)),
        "back to 9,900 from 5,000: 80 and 90 crossed, 90 announced"
    );
    assert_eq!(notices(&setup.database_url, "dana").await?.len(), 4);
    mesh.stop().await
}

#[tokio::test]
async fn a_retried_upload_is_one_file_and_one_charge_even_when_it_filled_the_quota()
-> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(100_000);
    let mesh = Mesh::start(&setup).await?;
    let erin = token("erin", &[]);
    let data = random_bytes(60_000);
    let up = |key: &'static str, declared: u64| {
        let (channel, erin, data) = (mesh.channel(), erin.clone(), data.clone());
        async move { upload_with_key(channel, &erin, "a.bin", &data, declared, &[], key).await }
    };
    let first = up("k1", 60_000).await?;
    // The retry finds the quota too full for a second copy, and gets the first file.
    let again = up("k1", 60_000).await?;
    assert_eq!(again.id, first.id);
    let account = usage(mesh.channel(), &erin).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (60_000, 0));

    // Over the quota: refused before any byte is kept, and nothing is held.
    let refused = up("k2", 60_000).await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(Code::ResourceExhausted)
    );
    // A stream longer than its header says is refused within its first bytes, before
    // anything is held or recorded: its key stays free.
    let long = up("k3", 30_000).await;
    assert_eq!(long.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let account = usage(mesh.channel(), &erin).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (60_000, 0));
    let upload = |key: &'static str, data: &[u8], declared: u64| {
        let (channel, erin, data) = (mesh.channel(), erin.clone(), data.to_vec());
        async move { upload_with_key(channel, &erin, "b.bin", &data, declared, &[], key).await }
    };
    // One shorter than it says fails at its end, gives its hold back, and burns its key.
    let short = upload("k4", &data[..20_000], 30_000).await;
    assert_eq!(short.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let reused = upload("k4", &data[..30_000], 30_000).await;
    assert_eq!(reused.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let account = usage(mesh.channel(), &erin).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (60_000, 0));
    upload("k3", &data[..30_000], 30_000).await?;
    let account = usage(mesh.channel(), &erin).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (90_000, 0));
    // One that ends within its first bytes, short of its header, is refused as early.
    let short = upload("k5", &data[..5_000], 6_000).await;
    assert_eq!(short.err().map(|s| s.code()), Some(Code::InvalidArgument));
    upload("k5", &data[..6_000], 6_000).await?;
    let account = usage(mesh.channel(), &erin).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (96_000, 0));
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(stowage_testkit::authed(
            pb::ListFilesRequest::default(),
            &erin,
        ))
        .await?
        .into_inner();
    assert_eq!(listed.files.len(), 3);
    mesh.stop().await
}

#[tokio::test]
async fn an_upload_that_died_between_its_file_and_its_charge_is_charged_once_by_the_sweeper()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.sweep_interval = std::time::Duration::from_millis(300);
    })
    .await?;
    let fay = token("fay", &[]);
    let data = random_bytes(50_000);
    let file = upload_with_key(mesh.channel(), &fay, "f.bin", &data, 50_000, &[], "").await?;
    // The state a process leaves when it dies after Files registered the file and before
    // Quota committed the hold: row `receiving` (last touched long ago), hold not committed.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.batch_execute(&format!(
        "UPDATE ingest.uploads SET state = 'receiving', updated_at = now() - interval '2 days'
             WHERE file_id = '{id}';
         UPDATE quota.reservations SET state = 'held', committed_bytes = NULL
             WHERE id = (SELECT reservation_id FROM ingest.uploads WHERE file_id = '{id}');
         DELETE FROM quota.ledger WHERE user_id = 'fay';
         UPDATE quota.accounts SET used_bytes = 0, reserved_bytes = 50000 WHERE user_id = 'fay';",
        id = file.id
    ))
    .await?;
    let state = || async {
        let row = conn
            .query_one(
                "SELECT state FROM ingest.uploads WHERE file_id::text = $1",
                &[&file.id],
            )
            .await?;
        anyhow::Ok(row.get::<_, String>(0))
    };
    stowage_integration_tests::eventually(std::time::Duration::from_secs(20), "swept", || async {
        Ok(state().await? != "receiving")
    })
    .await?;
    assert_eq!(
        state().await?,
        "completed",
        "the file exists: never marked failed"
    );
    let account = usage(mesh.channel(), &fay).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (50_000, 0));
    let (_, bytes) =
        stowage_integration_tests::download(mesh.channel(), &fay, &file.id, None).await?;
    assert_eq!(bytes, data, "the bytes are kept");
    mesh.stop().await
}

/// A hold resized in place: growing checks the growth alone against the limit, a refusal
/// leaves it as it was, shrinking always fits, and only a held reservation can change.
#[tokio::test]
async fn a_hold_resized_in_place_counts_its_bytes_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(4000);
    let mesh = Mesh::start(&setup).await?;
    let service = token("svc", &["service"]);
    let gil = token("gil", &[]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    let reserving = quota.clone();
    let hold = |bytes: u64| {
        let mut quota = reserving.clone();
        let request = authed(
            pb::ReserveRequest {
                user_id: "gil".into(),
                bytes,
                ttl_seconds: 600,
                idempotency_key: String::new(),
            },
            &service,
        );
        async move {
            let held = quota.reserve(request).await?.into_inner().reservation;
            anyhow::Ok(held.unwrap_or_default())
        }
    };
    let held = hold(1000).await?;
    let resize = |bytes: u64| pb::ResizeRequest {
        reservation_id: held.id.clone(),
        bytes,
        ttl_seconds: 600,
        fallback_bytes: 0,
    };
    // 3,000 of 4,000 fits only if the 1,000 already held are not counted again.
    let grown = quota
        .resize(authed(resize(3000), &service))
        .await?
        .into_inner();
    assert_eq!(grown.reservation.map(|r| r.bytes), Some(3000));
    assert_eq!(usage(mesh.channel(), &gil).await?.reserved_bytes, 3000);
    // Past the limit, by one byte or by as many as a size can say.
    for bytes in [4001, i64::MAX as u64] {
        let refused = quota
            .resize(authed(resize(bytes), &service))
            .await
            .expect_err("past the limit");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    assert_eq!(usage(mesh.channel(), &gil).await?.reserved_bytes, 3000);
    // A retry of a resize holds nothing more; shrinking always fits.
    quota.resize(authed(resize(3000), &service)).await?;
    assert_eq!(usage(mesh.channel(), &gil).await?.reserved_bytes, 3000);
    quota.resize(authed(resize(2000), &service)).await?;
    assert_eq!(usage(mesh.channel(), &gil).await?.reserved_bytes, 2000);

    // With a fallback, a growth that does not fit holds the fallback instead: beside another
    // hold of 500, 2,000 cannot grow to 6,000 (3,500 at most), so it holds 2,500.
    let other = hold(500).await?;
    let or_else = |bytes: u64, fallback_bytes: u64| pb::ResizeRequest {
        fallback_bytes,
        ..resize(bytes)
    };
    let fell_back = quota
        .resize(authed(or_else(6000, 2500), &service))
        .await?
        .into_inner();
    assert_eq!(fell_back.reservation.map(|r| r.bytes), Some(2500));
    assert_eq!(fell_back.account.map(|a| a.reserved_bytes), Some(3000));
    let asked = quota
        .resize(authed(or_else(3500, 2000), &service))
        .await?
        .into_inner();
    assert_eq!(asked.reservation.map(|r| r.bytes), Some(3500));
    let neither = quota
        .resize(authed(or_else(6000, 3600), &service))
        .await
        .expect_err("neither fits");
    assert_eq!(neither.code(), Code::ResourceExhausted);
    let above = quota
        .resize(authed(or_else(1000, 2000), &service))
        .await
        .expect_err("a fallback above the size");
    assert_eq!(above.code(), Code::InvalidArgument);
    assert!(
        above.message().contains("fallback_bytes"),
        "{}",
        above.message()
    );
    assert_eq!(usage(mesh.channel(), &gil).await?.reserved_bytes, 4000);
    quota
        .release(authed(
            pb::ReleaseRequest {
                reservation_id: other.id,
            },
            &service,
        ))
        .await?;
    quota.resize(authed(resize(2000), &service)).await?;
    assert_eq!(usage(mesh.channel(), &gil).await?.reserved_bytes, 2000);

    let user = quota
        .resize(authed(resize(2000), &gil))
        .await
        .expect_err("services only");
    assert_eq!(user.code(), Code::PermissionDenied);
    let bad = quota
        .resize(authed(
            pb::ResizeRequest {
                reservation_id: "nope".into(),
                ..resize(1)
            },
            &service,
        ))
        .await
        .expect_err("not an id");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("reservation_id"),
        "{}",
        bad.message()
    );

    let huge = quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: held.id.clone(),
                bytes: i64::MAX as u64,
            },
            &service,
        ))
        .await
        .expect_err("past the limit");
    assert_eq!(huge.code(), Code::ResourceExhausted, "{huge:?}");
    quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: held.id.clone(),
                bytes: 2000,
            },
            &service,
        ))
        .await?;
    let committed = quota
        .resize(authed(resize(2500), &service))
        .await
        .expect_err("no longer held");
    assert_eq!(committed.code(), Code::FailedPrecondition);
    let account = usage(mesh.channel(), &gil).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (2000, 0));
    mesh.stop().await
}

/// A hold that lapsed while its upload was completing is still charged when the upload
/// commits, even past the limit (its bytes are stored: refusing would leave them free, or
/// lose them); once, however often the commit is repeated.
#[tokio::test]
async fn an_expired_hold_is_charged_at_commit_even_past_the_limit() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(1000);
    let mesh = Mesh::start(&setup).await?;
    let service = token("ingest", &["service"]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    let reserve = |bytes: u64, ttl_seconds: u32| pb::ReserveRequest {
        user_id: "fay".into(),
        bytes,
        ttl_seconds,
        idempotency_key: String::new(),
    };
    let lapsing = quota
        .reserve(authed(reserve(600, 1), &service))
        .await?
        .into_inner()
        .reservation
        .unwrap_or_default();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let expired = quota
        .expire_reservations(authed(pb::ExpireReservationsRequest::default(), &service))
        .await?
        .into_inner();
    // Lifecycle's own schedule may have expired it first.
    assert!(
        expired.reservation_ids.is_empty() || expired.reservation_ids == vec![lapsing.id.clone()],
        "{expired:?}"
    );
    let fay = token("fay", &[]);
    assert_eq!(usage(mesh.channel(), &fay).await?.reserved_bytes, 0);
    // Its bytes are free again, and another upload holds most of them.
    quota.reserve(authed(reserve(700, 600), &service)).await?;
    // More than it held is not charged past the limit.
    let more = quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: lapsing.id.clone(),
                bytes: 601,
            },
            &service,
        ))
        .await
        .expect_err("more than the lapsed hold, past the limit");
    assert_eq!(more.code(), Code::ResourceExhausted, "{more:?}");
    for _ in 0..2 {
        quota
            .commit(authed(
                pb::CommitRequest {
                    reservation_id: lapsing.id.clone(),
                    bytes: 600,
                },
                &service,
            ))
            .await?;
    }
    let account = usage(mesh.channel(), &fay).await?;
    assert_eq!(
        (
            account.used_bytes,
            account.reserved_bytes,
            account.limit_bytes
        ),
        (600, 700, 1000)
    );
    // Over the limit: nothing more fits until files go.
    let refused = quota
        .reserve(authed(reserve(1, 600), &service))
        .await
        .expect_err("over the limit");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    mesh.stop().await
}

/// A hold released after it lapsed (Ingest's sweep ending a session after Quota's expired
/// its hold) is released: no longer lapsed (usage repair waits on lapsed bytes), and no
/// commit takes it afterwards. The bytes were given back once, by the expiry.
#[tokio::test]
async fn a_lapsed_hold_released_afterwards_is_no_longer_lapsed() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(1000);
    let mesh = Mesh::start(&setup).await?;
    let service = token("ingest", &["service"]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    let lapsing = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "gus".into(),
                bytes: 600,
                ttl_seconds: 1,
                idempotency_key: String::new(),
            },
            &service,
        ))
        .await?
        .into_inner()
        .reservation
        .unwrap_or_default();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    quota
        .expire_reservations(authed(pb::ExpireReservationsRequest::default(), &service))
        .await?;
    let gus = token("gus", &[]);
    let before = quota
        .get_usage(authed(pb::GetUsageRequest::default(), &gus))
        .await?
        .into_inner();
    assert_eq!(before.lapsed_bytes, 600);
    for _ in 0..2 {
        let released = quota
            .release(authed(
                pb::ReleaseRequest {
                    reservation_id: lapsing.id.clone(),
                },
                &service,
            ))
            .await?
            .into_inner()
            .reservation
            .unwrap_or_default();
        assert_eq!(released.state(), pb::ReservationState::Released);
    }
    let after = quota
        .get_usage(authed(pb::GetUsageRequest::default(), &gus))
        .await?
        .into_inner();
    let account = after.account.unwrap_or_default();
    assert_eq!(
        (
            after.lapsed_bytes,
            account.used_bytes,
            account.reserved_bytes
        ),
        (0, 0, 0)
    );
    let late = quota
        .commit(authed(
            pb::CommitRequest {
                reservation_id: lapsing.id.clone(),
                bytes: 600,
            },
            &service,
        ))
        .await
        .expect_err("a released hold is not committed");
    assert_eq!(late.code(), Code::FailedPrecondition, "{late:?}");
    assert_eq!(usage(mesh.channel(), &gus).await?.used_bytes, 0);
    mesh.stop().await
}

/// A mesh where Erin has uploaded one file of 1,000 bytes.
async fn erin_with_a_file(setup: &Setup) -> anyhow::Result<(Mesh, pb::File)> {
    let mesh = Mesh::start(setup).await?;
    let file = stowage_integration_tests::upload(
        mesh.channel(),
        &token("erin", &[]),
        "data.bin",
        &random_bytes(1000),
        &[],
    )
    .await?;
    Ok((mesh, file))
}

/// Many SetVariants for one file at once (Media replicas racing, retries): the owner is charged
/// exactly the variants the file ends with, once, and the purge gives back exactly that.
#[tokio::test]
async fn variants_set_at_once_are_charged_exactly_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let (mesh, file) = erin_with_a_file(&setup).await?;
    let erin = token("erin", &[]);
    let media = token("media", &["service"]);
    let files = stowage_integration_tests::files(mesh.channel());
    // Each call adds its own variant; one in four replaces `shared` with its own size.
    let calls = (0..24usize).map(|i| {
        let mut files = files.clone();
        let mut variants = vec![inline_variant(&format!("v{i}"), 10 + i, 7)];
        if i % 4 == 0 {
            variants.push(inline_variant("shared", 100 + i, 8));
        }
        let request = set_variants(&file.id, variants, &media);
        async move { files.set_variants(request).await }
    });
    for answer in join_all(calls).await {
        answer?;
    }
    let stored = files
        .clone()
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file.id.clone(),
            },
            &erin,
        ))
        .await?
        .into_inner()
        .file
        .ok_or_else(|| anyhow::anyhow!("no file"))?;
    let variant_bytes: u64 = stored.variants.iter().map(|v| v.size_bytes).sum();
    assert_eq!(stored.variants.len(), 25);
    assert_eq!(
        usage(mesh.channel(), &erin).await?.used_bytes,
        1000 + variant_bytes
    );

    // A variant rebuilt back and forth between two sizes moves the charge every time, though
    // the totals repeat.
    let others = variant_bytes
        - stored
            .variants
            .iter()
            .find(|v| v.name == "shared")
            .map_or(0, |v| v.size_bytes);
    for size in [100usize, 120, 100, 120] {
        let shared = vec![inline_variant("shared", size, 9)];
        files
            .clone()
            .set_variants(set_variants(&file.id, shared, &media))
            .await?;
        assert_eq!(
            usage(mesh.channel(), &erin).await?.used_bytes,
            1000 + others + size as u64,
            "shared at {size}"
        );
    }

    // Deleted and purged, the owner gets back everything the file cost.
    let mut files = files.clone();
    files
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: file.id.clone(),
            },
            &erin,
        ))
        .await?;
    files
        .purge_file(authed(
            pb::PurgeFileRequest {
                file_id: file.id.clone(),
                ..Default::default()
            },
            &erin,
        ))
        .await?;
    assert_eq!(usage(mesh.channel(), &erin).await?.used_bytes, 0);
    mesh.stop().await
}

/// A SetVariants whose caller gave up while Quota was stalled leaves its charge step recorded;
/// the next SetVariants (with other variants meanwhile) finishes that step with the same key
/// before its own, so usage ends exact whether or not the stalled charge went through.
#[tokio::test]
async fn a_variant_charge_cut_off_midway_is_finished_once() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let (mesh, file) = erin_with_a_file(&setup).await?;
    let erin = token("erin", &[]);
    let media = token("media", &["service"]);
    let variant = |name: &str, size: usize| inline_variant(name, size, 1);
    let set = |variants: Vec<pb::Variant>| set_variants(&file.id, variants, &media);
    let files = stowage_integration_tests::files(mesh.channel());

    // Quota's accounts are locked: the charge of the first SetVariants waits, its caller
    // gives up.
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let mut blocker = pool.get().await?;
    let blocking = blocker.transaction().await?;
    blocking
        .batch_execute("LOCK TABLE quota.accounts IN SHARE MODE")
        .await?;
    let mut request = set(vec![variant("small", 100)]);
    request.set_timeout(std::time::Duration::from_millis(500));
    let gave_up = files.clone().set_variants(request).await;
    assert!(gave_up.is_err(), "Quota is stalled: {gave_up:?}");
    blocking.rollback().await?;
    drop(blocker);

    // Another variant is added: the owner pays for both, once.
    files
        .clone()
        .set_variants(set(vec![variant("large", 50)]))
        .await?;
    assert_eq!(usage(mesh.channel(), &erin).await?.used_bytes, 1000 + 150);
    mesh.stop().await
}

/// More lapsed holds than one batch (1,000) are all expired, their bytes given back to each
/// account; the answer lists at most 1,000 of them and counts them all.
#[tokio::test]
async fn lapsed_holds_past_one_batch_are_all_expired() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(1 << 30);
    let mesh = Mesh::start(&setup).await?;
    // Lifecycle's reservations_expire would take some of the holds below before the calls do.
    stowage_integration_tests::lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let service = token("svc", &["service"]);
    let users = ["ida", "jon", "kai"];
    let holds = (0..1001).map(|i| {
        let mut quota = stowage_integration_tests::quota(mesh.channel());
        let request = authed(
            pb::ReserveRequest {
                user_id: users[i % 3].into(),
                bytes: 10,
                ttl_seconds: 600,
                idempotency_key: String::new(),
            },
            &service,
        );
        async move { quota.reserve(request).await }
    });
    for held in futures::stream::iter(holds)
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await
    {
        held?;
    }
    let admin = token("root", &["admin"]);
    let held = || {
        let mut quota = stowage_integration_tests::quota(mesh.channel());
        let request = authed(pb::StatsRequest {}, &admin);
        async move {
            let stats = quota.stats(request).await?.into_inner();
            anyhow::Ok((stats.held_reservations, stats.total_reserved_bytes))
        }
    };
    assert_eq!(held().await?, (1001, 10_010));
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.execute(
        "UPDATE quota.reservations SET expires_at = now() - interval '1 second'",
        &[],
    )
    .await?;
    // Lapsed, not yet given back: no longer held in the figures.
    assert_eq!(held().await?, (0, 0));
    // A dry run lists the first 1,000 and counts them all, expiring none.
    let listed = stowage_integration_tests::quota(mesh.channel())
        .expire_reservations(authed(
            pb::ExpireReservationsRequest { dry_run: true },
            &service,
        ))
        .await?
        .into_inner();
    assert_eq!((listed.reservation_ids.len(), listed.count), (1000, 1001));
    let expired = stowage_integration_tests::quota(mesh.channel())
        .expire_reservations(authed(pb::ExpireReservationsRequest::default(), &service))
        .await?
        .into_inner();
    assert_eq!((expired.reservation_ids.len(), expired.count), (1000, 1001));
    let left: i64 = conn
        .query_one(
            "SELECT count(*) FROM quota.reservations WHERE state <> 'expired'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(left, 0);
    for user in users {
        let account = usage(mesh.channel(), &token(user, &[])).await?;
        assert_eq!(
            (account.used_bytes, account.reserved_bytes),
            (0, 0),
            "{user}"
        );
    }
    mesh.stop().await
}

/// Sweeps that run at once (every Quota replica has one, and Lifecycle schedules another)
/// take disjoint holds but share accounts: each lapsed hold is expired by one of them, none
/// fails on the other's locks, and every account gets back exactly what it held. (The
/// accounts are locked in user order; the order the join happened to take them in before
/// was the same in every sweep here, so this does not show a deadlock without that.)
#[tokio::test]
async fn sweeps_at_once_expire_every_hold_once_without_deadlock() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(1 << 30);
    let mesh = Mesh::start(&setup).await?;
    // Only the six sweeps below expire holds (not Lifecycle's reservations_expire).
    stowage_integration_tests::lifecycle_schedules_off(mesh.channel(), &setup.database_url).await?;
    let service = token("svc", &["service"]);
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    // Batches of 1,000 in expiry order that alternate between holds of 600 users and holds
    // of 7 of them: concurrent sweeps then meet on accounts, sets of different sizes.
    conn.batch_execute(
        "INSERT INTO quota.accounts (user_id, limit_bytes, used_bytes, reserved_bytes)
         SELECT 'u' || lpad(n::text, 3, '0'), 1 << 30, 0, 0 FROM generate_series(0, 599) AS n;
         INSERT INTO quota.reservations (id, user_id, bytes, state, expires_at)
         SELECT gen_random_uuid(),
                'u' || lpad((CASE WHEN (i / 1000) % 2 = 0 THEN i % 600 ELSE (i * 37) % 7 END)::text, 3, '0'),
                10, 'held', now() - interval '3 hours' + make_interval(secs => i)
         FROM generate_series(0, 7999) AS i;
         UPDATE quota.accounts a SET reserved_bytes = h.bytes
         FROM (SELECT user_id, sum(bytes) AS bytes FROM quota.reservations GROUP BY user_id) h
         WHERE a.user_id = h.user_id;",
    )
    .await?;
    let sweeps = (0..6).map(|_| {
        let mut quota = stowage_integration_tests::quota(mesh.channel());
        let request = authed(pb::ExpireReservationsRequest::default(), &service);
        async move { quota.expire_reservations(request).await }
    });
    let mut expired = 0;
    for sweep in join_all(sweeps).await {
        expired += sweep?.into_inner().count;
    }
    let row = conn
        .query_one(
            "SELECT (SELECT count(*) FROM quota.reservations WHERE state = 'held'),
                    (SELECT count(*) FROM quota.accounts WHERE reserved_bytes <> 0)",
            &[],
        )
        .await?;
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 0));
    // Each hold expired by exactly one of them.
    assert_eq!(expired, 8000);
    mesh.stop().await
}

/// Reading the usage of a user who never stored anything answers as for a new account (the
/// default limit, nothing used) and creates no account: reads do not write.
#[tokio::test]
async fn reading_an_unused_account_creates_nothing() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(5_000_000);
    let mesh = Mesh::start(&setup).await?;
    let account = usage(mesh.channel(), &token("newcomer", &[])).await?;
    assert_eq!(
        (
            account.limit_bytes,
            account.used_bytes,
            account.reserved_bytes
        ),
        (5_000_000, 0, 0)
    );
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let rows: i64 = pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM quota.accounts WHERE user_id = 'newcomer'",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(rows, 0);
    mesh.stop().await
}
