//! Reservations never overrun a limit, and commits count once.

use futures::future::join_all;
use stowage_integration_tests::usage;
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
    if let Ok(r) = &again {
        assert!(granted.contains(&r.get_ref().reservation.clone().unwrap_or_default().id));
    }
    let stats = quota
        .stats(authed(pb::StatsRequest {}, &admin))
        .await?
        .into_inner();
    assert_eq!(stats.total_used_bytes, 37_000);
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
    mesh.stop().await
}
