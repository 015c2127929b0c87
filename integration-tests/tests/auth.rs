//! Identity: other users' files do not exist for you; bad tokens and missing scopes are refused.

use std::time::Duration;

use stowage_integration_tests::{download, random_bytes, upload};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::Code;

#[tokio::test]
async fn another_users_file_is_not_found() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let (alice, bob) = (token("alice", &[]), token("bob", &[]));
    let file = upload(
        mesh.channel(),
        &alice,
        "secret.txt",
        &random_bytes(4096),
        &[],
    )
    .await?;
    let mut files = stowage_integration_tests::files(mesh.channel());

    let get = files
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file.id.clone(),
            },
            &bob,
        ))
        .await;
    assert_eq!(get.err().map(|s| s.code()), Some(Code::NotFound));
    let dl = download(mesh.channel(), &bob, &file.id, None).await;
    assert_eq!(dl.err().map(|s| s.code()), Some(Code::NotFound));
    let del = files
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: file.id.clone(),
            },
            &bob,
        ))
        .await;
    assert_eq!(del.err().map(|s| s.code()), Some(Code::NotFound));
    let url = files
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: file.id.clone(),
                ..Default::default()
            },
            &bob,
        ))
        .await;
    assert_eq!(url.err().map(|s| s.code()), Some(Code::NotFound));
    let listed = files
        .list_files(authed(pb::ListFilesRequest::default(), &bob))
        .await?
        .into_inner();
    assert!(listed.files.is_empty(), "bob sees none of alice's files");

    // Still there, untouched, for alice.
    let mine = files
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file.id.clone(),
            },
            &alice,
        ))
        .await?;
    assert!(
        mine.into_inner()
            .file
            .is_some_and(|f| f.deleted_at.is_none())
    );
    mesh.stop().await
}

#[tokio::test]
async fn bad_tokens_are_unauthenticated_and_missing_scopes_denied() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let mut files = stowage_integration_tests::files(mesh.channel());
    let list = |t: &str| authed(pb::ListFilesRequest::default(), t);

    let forged = stowage_testkit::minter_with("another-secret-that-is-long").mint(
        "alice",
        &[],
        Duration::from_secs(3600),
    );
    for bad in [forged.as_str(), "not-a-jwt", ""] {
        let r = files.list_files(list(bad)).await;
        assert_eq!(
            r.err().map(|s| s.code()),
            Some(Code::Unauthenticated),
            "token {bad:?}"
        );
    }
    let no_header = files.list_files(pb::ListFilesRequest::default()).await;
    assert_eq!(
        no_header.err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );

    let user = token("alice", &[]);
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    let r = quota.stats(authed(pb::StatsRequest {}, &user)).await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    let r = quota
        .set_limit(authed(
            pb::SetLimitRequest {
                user_id: "alice".into(),
                limit_bytes: 1 << 40,
            },
            &user,
        ))
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    let r = quota
        .list_accounts(authed(pb::ListAccountsRequest::default(), &user))
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    let r = quota
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "alice".into(),
                bytes: 1,
                ..Default::default()
            },
            &user,
        ))
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    let r = files
        .storage_stats(authed(pb::StorageStatsRequest { all_users: true }, &user))
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::PermissionDenied));
    let r = quota
        .stats(authed(pb::StatsRequest {}, &token("root", &["admin"])))
        .await;
    assert!(r.is_ok(), "admins may");
    mesh.stop().await
}

#[tokio::test]
async fn expired_tokens_are_unauthenticated() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let mut files = stowage_integration_tests::files(mesh.channel());
    // Expired a minute ago: beyond the 30 s leeway for clock skew.
    let expired = stowage_testkit::expired_token("alice", Duration::from_secs(60));
    let r = files
        .list_files(authed(pb::ListFilesRequest::default(), &expired))
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::Unauthenticated));
    mesh.stop().await
}
