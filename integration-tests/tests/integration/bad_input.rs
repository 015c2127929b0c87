//! Bad input gets a clear status naming the field, and leaves nothing behind.

use stowage_integration_tests::{download, random_bytes, upload, upload_declaring, usage};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::Code;

#[tokio::test]
async fn upload_over_quota_leaves_no_blob_no_reservation_no_row() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(1 << 20);
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    upload(
        mesh.channel(),
        &alice,
        "fits.bin",
        &random_bytes(700_000),
        &[],
    )
    .await?;
    let err = upload(
        mesh.channel(),
        &alice,
        "too-big.bin",
        &random_bytes(500_000),
        &[],
    )
    .await
    .expect_err("over quota");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("quota"),
        "message says why: {}",
        err.message()
    );

    assert_eq!(
        setup.stored_objects("users").len(),
        1,
        "only the first blob"
    );
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (700_000, 0));
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(listed.files.len(), 1);
    mesh.stop().await
}

#[tokio::test]
async fn short_or_long_streams_are_refused_and_cleaned_up() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    // Declares more than it sends (the sniffing buffer is flushed to the store first).
    let short = upload_declaring(
        mesh.channel(),
        &alice,
        "short.bin",
        &random_bytes(3 << 20),
        4 << 20,
        &[],
    )
    .await;
    let status = short.expect_err("short stream");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("header.size_bytes"),
        "{}",
        status.message()
    );
    // Sends more than it declares.
    let long = upload_declaring(
        mesh.channel(),
        &alice,
        "long.bin",
        &random_bytes(2 << 20),
        1 << 20,
        &[],
    )
    .await;
    assert_eq!(long.err().map(|s| s.code()), Some(Code::InvalidArgument));

    assert!(
        setup
            .stored_objects("")
            .iter()
            .all(|p| !p.starts_with("users/")),
        "no blob left: {:?}",
        setup.stored_objects("")
    );
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (0, 0));
    mesh.stop().await
}

#[tokio::test]
async fn empty_user_id_is_invalid_argument() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let service = token("ingest", &["service"]);
    let r = stowage_integration_tests::quota(mesh.channel())
        .reserve(authed(
            pb::ReserveRequest {
                user_id: String::new(),
                bytes: 10,
                ..Default::default()
            },
            &service,
        ))
        .await;
    let status = r.expect_err("empty user id");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("user_id"),
        "{}",
        status.message()
    );
    // A user id that would walk out of its prefix is refused the same way.
    let r = stowage_integration_tests::quota(mesh.channel())
        .reserve(authed(
            pb::ReserveRequest {
                user_id: "../x".into(),
                bytes: 10,
                ..Default::default()
            },
            &service,
        ))
        .await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::InvalidArgument));
    // A token whose subject is empty is not a caller at all.
    let empty_sub = token("", &[]);
    let r = upload(mesh.channel(), &empty_sub, "x", b"x", &[]).await;
    assert_eq!(r.err().map(|s| s.code()), Some(Code::Unauthenticated));
    let stats = stowage_integration_tests::quota(mesh.channel())
        .stats(authed(pb::StatsRequest {}, &token("root", &["admin"])))
        .await?
        .into_inner();
    assert_eq!(
        (stats.account_count, stats.held_reservations),
        (0, 0),
        "nothing was created"
    );
    assert!(setup.stored_objects("").is_empty());
    mesh.stop().await
}

#[tokio::test]
async fn a_path_as_display_name_is_only_a_name() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let file = upload(
        mesh.channel(),
        &alice,
        "../../etc/passwd",
        b"root:x:0:0\n",
        &[],
    )
    .await?;
    assert_eq!(file.display_name, "../../etc/passwd");
    let objects = setup.stored_objects("");
    assert_eq!(objects.len(), 1);
    assert!(
        objects[0].starts_with(&"users/alice/document/".to_string()),
        "{objects:?}"
    );
    assert!(
        objects[0].ends_with(&format!("{}.txt", file.id)),
        "{objects:?}"
    );
    assert!(!objects[0].contains("passwd") && !objects[0].contains(".."));
    // The name round-trips as metadata.
    let (header, bytes) = download(mesh.channel(), &alice, &file.id, None).await?;
    assert_eq!(
        header.file.map(|f| f.display_name),
        Some("../../etc/passwd".to_owned())
    );
    assert_eq!(bytes, b"root:x:0:0\n");
    // An empty or control-character name is refused, naming the field.
    let r = upload(mesh.channel(), &alice, "", b"x", &[]).await;
    let status = r.expect_err("empty name");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("display_name"),
        "{}",
        status.message()
    );
    mesh.stop().await
}

#[tokio::test]
async fn page_tokens_and_ranges_are_checked() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let file = upload(mesh.channel(), &alice, "a.bin", &random_bytes(1000), &["t"]).await?;
    upload(mesh.channel(), &alice, "b.bin", &random_bytes(10), &["t"]).await?;
    let mut files = stowage_integration_tests::files(mesh.channel());
    let page = files
        .list_files(authed(
            pb::ListFilesRequest {
                page_size: 1,
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    // The same token with another filter or sort is refused.
    let other = files
        .list_files(authed(
            pb::ListFilesRequest {
                page_size: 1,
                sort_by: pb::FileSortField::Size as i32,
                page_token: page.next_page_token.clone(),
                ..Default::default()
            },
            &alice,
        ))
        .await;
    let status = other.expect_err("token of another query");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("page_token"),
        "{}",
        status.message()
    );
    let garbage = files
        .list_files(authed(
            pb::ListFilesRequest {
                page_token: "%%%".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await;
    assert_eq!(garbage.err().map(|s| s.code()), Some(Code::InvalidArgument));

    let past_end = download(
        mesh.channel(),
        &alice,
        &file.id,
        Some(pb::ByteRange {
            offset: 1000,
            length: None,
        }),
    )
    .await;
    let status = past_end.expect_err("offset at the end");
    assert_eq!(status.code(), Code::OutOfRange);
    assert!(
        status.message().contains("range.offset"),
        "{}",
        status.message()
    );
    let zero = download(
        mesh.channel(),
        &alice,
        &file.id,
        Some(pb::ByteRange {
            offset: 5,
            length: Some(0),
        }),
    )
    .await;
    let status = zero.expect_err("zero length");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("range.length"),
        "{}",
        status.message()
    );
    let bad_id = files
        .get_file(authed(
            pb::GetFileRequest {
                file_id: "not-a-uuid".into(),
            },
            &alice,
        ))
        .await;
    let status = bad_id.expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("file_id"),
        "{}",
        status.message()
    );
    mesh.stop().await
}

/// A statement PostgreSQL refuses is an internal error (retrying it fails the same way); a
/// database that cannot answer, or gave up for a reason of the moment, is unavailable (a
/// retry may pass).
#[tokio::test]
async fn database_errors_say_whether_a_retry_can_help() -> anyhow::Result<()> {
    use stowage_runtime::status::database_failed;
    let setup = Setup::new().await?;
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    let conn = pool.get().await?;
    let refused = conn
        .query_one("SELECT 1 / 0", &[])
        .await
        .expect_err("division by zero");
    assert_eq!(database_failed("test", &refused).code(), Code::Internal);
    let overflow = conn
        .query_one("SELECT $1::bigint + 1", &[&i64::MAX])
        .await
        .expect_err("out of range");
    assert_eq!(database_failed("test", &overflow).code(), Code::Internal);
    // A statement stopped by its time limit may pass another time.
    conn.batch_execute("SET statement_timeout = '20ms'").await?;
    let slow = conn
        .query_one("SELECT pg_sleep(1)", &[])
        .await
        .expect_err("timed out");
    assert_eq!(
        database_failed("test", &slow).code(),
        Code::Unavailable,
        "{slow:?}"
    );
    conn.batch_execute("RESET statement_timeout").await?;
    // A connection the server ended.
    let pid: i32 = conn.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let other = pool.get().await?;
    other
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await?;
    let gone = conn
        .query_one("SELECT 1", &[])
        .await
        .expect_err("terminated");
    let status = database_failed("test", &gone);
    assert_eq!(status.code(), Code::Unavailable, "{gone:?}");
    assert_eq!(status.message(), "test unavailable");
    Ok(())
}

#[tokio::test]
async fn overlong_labels_are_refused_by_name_through_both_doors() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let long = "x".repeat(10_000);
    let meta = |mime: &str, package: &str| pb::UploadMetadata {
        display_name: "label.bin".into(),
        declared_mime_type: mime.into(),
        package_name: package.into(),
        ..Default::default()
    };
    let ingest = || stowage_integration_tests::ingest(mesh.channel());
    for (metadata, field) in [
        (meta(&long, ""), "metadata.declared_mime_type"),
        (meta("", &long), "metadata.package_name"),
        (meta("text/plain\nx", ""), "metadata.declared_mime_type"),
    ] {
        let refused = ingest()
            .create_upload(authed(
                pb::CreateUploadRequest {
                    size_bytes: Some(10),
                    metadata: Some(metadata.clone()),
                    idempotency_key: String::new(),
                    ..Default::default()
                },
                &alice,
            ))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains(field), "{}", refused.message());

        let header = pb::UploadRequest {
            part: Some(pb::upload_request::Part::Header(pb::UploadHeader {
                size_bytes: 1,
                metadata: Some(metadata),
                idempotency_key: String::new(),
            })),
        };
        let data = pb::UploadRequest {
            part: Some(pb::upload_request::Part::Data(vec![1u8].into())),
        };
        let refused = ingest()
            .upload(authed(tokio_stream::iter(vec![header, data]), &alice))
            .await
            .expect_err("refused");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(
            refused.message().contains(&format!("header.{field}")),
            "{}",
            refused.message()
        );
    }
    // Nothing held, nothing stored.
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (0, 0));
    assert!(setup.stored_objects("").is_empty());
    mesh.stop().await
}

/// A registration whose file id is one file's and whose idempotency key is another's is
/// neither a retry nor new: ALREADY_EXISTS, every time (it was UNAVAILABLE, which invites
/// retries forever).
#[tokio::test]
async fn a_registration_naming_two_files_already_exists() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let service = token("ingest", &["service"]);
    let files = || stowage_integration_tests::files(mesh.channel());
    let request = |id: &str, key: &str, blob: &str| pb::RegisterFileRequest {
        owner_id: "alice".into(),
        file_id: id.into(),
        display_name: "f.txt".into(),
        kind: pb::FileKind::Document as i32,
        mime_type: "text/plain".into(),
        size_bytes: 1,
        sha256: "00".repeat(32),
        storage_key: format!("users/alice/document/2026/11/{blob}.txt"),
        status: pb::FileStatus::Ready as i32,
        idempotency_key: key.into(),
        ..Default::default()
    };
    let (first, second) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    for (id, key) in [(&first, "key-1"), (&second, "key-2")] {
        files()
            .register_file(authed(request(id, key, id), &service))
            .await?;
    }
    // A retry of the first, as it was: the same file.
    let retried = files()
        .register_file(authed(request(&first, "key-1", &first), &service))
        .await?
        .into_inner()
        .file
        .unwrap_or_default();
    assert_eq!(retried.id, first);
    for _ in 0..2 {
        let mixed = files()
            .register_file(authed(request(&first, "key-2", "third"), &service))
            .await
            .expect_err("names two files");
        assert_eq!(mixed.code(), Code::AlreadyExists, "{mixed:?}");
        assert!(mixed.message().starts_with("file_id:"), "{mixed:?}");
    }
    // Each conflict names what is another file's: the key, or the blob.
    let fresh = uuid::Uuid::now_v7().to_string();
    for (request, field) in [
        (request(&fresh, "key-2", &fresh), "idempotency_key"),
        (request(&fresh, "key-9", &second), "storage_key"),
    ] {
        let taken = files()
            .register_file(authed(request, &service))
            .await
            .expect_err("another file's");
        assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
        assert!(taken.message().starts_with(field), "{field}: {taken:?}");
    }
    // Fields a registrant may get wrong are named, and nothing is registered.
    let third = uuid::Uuid::now_v7().to_string();
    let bad = [
        (
            "kind",
            pb::RegisterFileRequest {
                kind: 99,
                ..request(&third, "key-3", &third)
            },
        ),
        (
            "status",
            pb::RegisterFileRequest {
                status: 99,
                ..request(&third, "key-3", &third)
            },
        ),
        (
            "mime_type",
            pb::RegisterFileRequest {
                mime_type: "text/plain\r\nx-evil: 1".into(),
                ..request(&third, "key-3", &third)
            },
        ),
        (
            "package_name",
            pb::RegisterFileRequest {
                package_name: "p".repeat(10_000),
                ..request(&third, "key-3", &third)
            },
        ),
    ];
    for (field, request) in bad {
        let status = files()
            .register_file(authed(request, &service))
            .await
            .expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
    let kept = files()
        .get_file(authed(
            pb::GetFileRequest { file_id: third },
            &token("alice", &[]),
        ))
        .await
        .map(drop);
    assert_eq!(kept.err().map(|s| s.code()), Some(Code::NotFound));
    mesh.stop().await
}

/// Lists, names and keys from outside have bounds, checked before any work: each refusal is
/// INVALID_ARGUMENT naming its field, and nothing moves.
#[tokio::test]
async fn outside_lists_names_and_keys_are_bounded_by_field() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let media = token("media", &["service"]);
    let admin = token("root", &["admin"]);
    let file = upload(mesh.channel(), &alice, "a.bin", &random_bytes(1000), &[]).await?;
    let refused = |result: Result<(), tonic::Status>, field: &str| {
        let status = result.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().contains(field),
            "{field}: {}",
            status.message()
        );
    };
    let files = || stowage_integration_tests::files(mesh.channel());
    let ingest = || stowage_integration_tests::ingest(mesh.channel());

    // 200,000 tags: refused at once, not compared pairwise.
    let any_tags: Vec<String> = (0..200_000).map(|i| format!("t{i}")).collect();
    let listed = files()
        .list_files(authed(
            pb::ListFilesRequest {
                any_tags,
                ..Default::default()
            },
            &alice,
        ))
        .await
        .map(drop);
    refused(listed, "any_tags");

    let variant = |file_id: &str, name: &str| pb::GetDownloadUrlRequest {
        file_id: file_id.to_owned(),
        variant: name.to_owned(),
        ..Default::default()
    };
    let url = files()
        .get_download_url(authed(variant(&file.id, &"../x".repeat(1000)), &alice))
        .await
        .map(drop);
    refused(url, "variant");

    let ack = ingest()
        .ack_batch(authed(
            pb::AckBatchRequest {
                consumer_group: String::new(),
                batch_id: uuid::Uuid::now_v7().to_string(),
            },
            &alice,
        ))
        .await
        .map(drop);
    refused(ack, "consumer_group");
    let subscribed = ingest()
        .subscribe_batches(authed(
            pb::SubscribeBatchesRequest {
                consumer_group: "g".into(),
                stream_ids: (0..101).map(|i| format!("s{i}")).collect(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .map(drop);
    refused(subscribed, "stream_ids");

    // Variants: too many, or a size no file can have; nothing recorded, nothing charged.
    let one = |size: u64| pb::Variant {
        name: "v".into(),
        mime_type: "image/webp".into(),
        size_bytes: size,
        storage_key: format!("users/alice/variants/2026/12/{}_v.webp", file.id),
        ..Default::default()
    };
    let set = |variants| stowage_integration_tests::set_variants(&file.id, variants, &media);
    let many = (0..33)
        .map(|i| pb::Variant {
            name: format!("v{i}"),
            ..one(10)
        })
        .collect();
    refused(files().set_variants(set(many)).await.map(drop), "variants");
    refused(
        files()
            .set_variants(set(vec![one(u64::MAX)]))
            .await
            .map(drop),
        "variants.size_bytes",
    );
    // A download sends size_bytes as the length: inline bytes of another length, or
    // neither inline bytes nor a key, would serve a body its header does not describe.
    let short_inline = pb::Variant {
        size_bytes: 20,
        ..stowage_integration_tests::inline_variant("thumb", 10, 1)
    };
    refused(
        files()
            .set_variants(set(vec![short_inline]))
            .await
            .map(drop),
        "variants.size_bytes",
    );
    // Inline bytes go out with every listing of the file: a placeholder, not a picture.
    refused(
        files()
            .set_variants(set(vec![stowage_integration_tests::inline_variant(
                "thumb", 1025, 1,
            )]))
            .await
            .map(drop),
        "variants.inline_data",
    );
    let nothing = pb::Variant {
        storage_key: String::new(),
        ..one(10)
    };
    refused(
        files().set_variants(set(vec![nothing])).await.map(drop),
        "variants.storage_key",
    );
    let stored = files()
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file.id.clone(),
            },
            &alice,
        ))
        .await?
        .into_inner()
        .file
        .map(|f| f.variants.len());
    assert_eq!(stored, Some(0));
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 1000);

    let charged = stowage_integration_tests::quota(mesh.channel())
        .charge(authed(
            pb::ChargeRequest {
                user_id: "alice".into(),
                bytes: 1,
                idempotency_key: "k".repeat(201),
                reason: "test".into(),
            },
            &media,
        ))
        .await
        .map(drop);
    refused(charged, "idempotency_key");
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 1000);

    let mut lifecycle = stowage_proto::v1::lifecycle_client::LifecycleClient::new(mesh.channel());
    let mut policy = lifecycle
        .get_policy(authed(pb::GetPolicyRequest::default(), &admin))
        .await?
        .into_inner()
        .policy
        .unwrap_or_default();
    policy.stuck_processing_minutes = 0;
    let set_policy = lifecycle
        .set_policy(authed(
            pb::SetPolicyRequest {
                policy: Some(policy),
            },
            &admin,
        ))
        .await
        .map(drop);
    refused(set_policy, "stuck_processing_minutes");

    // The privileged listings too: an owner id no account can have, a key no store takes.
    let usage_of = files()
        .usage_by_owner(authed(
            pb::UsageByOwnerRequest {
                owner_id: "o".repeat(129),
                ..Default::default()
            },
            &media,
        ))
        .await
        .map(drop);
    refused(usage_of, "owner_id");
    let long_key = vec!["k".to_owned(), "k".repeat(1025)];
    let found = files()
        .find_keys(authed(
            pb::FindKeysRequest {
                keys: long_key.clone(),
            },
            &media,
        ))
        .await
        .map(drop);
    refused(found, "keys");
    let in_use = ingest()
        .find_upload_keys(authed(pb::FindUploadKeysRequest { keys: long_key }, &media))
        .await
        .map(drop);
    refused(in_use, "keys");
    mesh.stop().await
}

/// A local-disk store keeps `STOWAGE_INGEST__MIN_FREE` free: an upload that would leave less
/// is refused before anything is held or written, through every door (here the store keeps
/// more than any disk has).
#[tokio::test]
async fn an_upload_the_disk_has_no_room_for_is_refused_before_anything_is_held()
-> anyhow::Result<()> {
    use stowage_integration_tests::{create_session, put_chunk};
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.min_free = stowage_runtime::config::ByteSize::b(1 << 60);
    })
    .await?;
    let alice = token("alice", &[]);
    let full = |status: tonic::Status| {
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(
            status.message().contains("free space"),
            "{}",
            status.message()
        );
    };
    full(
        upload(mesh.channel(), &alice, "a.bin", &random_bytes(10), &[])
            .await
            .expect_err("one-shot"),
    );
    full(
        create_session(mesh.channel(), &alice, "b.bin", Some(10), "")
            .await
            .expect_err("session"),
    );
    // Of unknown length: refused at its first bytes.
    let open = create_session(mesh.channel(), &alice, "c.bin", None, "").await?;
    full(
        put_chunk(mesh.channel(), &alice, &open.id, 0, &random_bytes(10))
            .await
            .expect_err("chunk"),
    );
    let tus = reqwest::Client::new()
        .post(format!("http://{}/tus", mesh.addr))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .header("authorization", format!("Bearer {alice}"))
        .send()
        .await?;
    assert_eq!(tus.status(), 507);
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (0, 0));
    assert!(setup.stored_objects("users").is_empty());
    // Operators see why: the health detail says the store is short of room.
    stowage_integration_tests::eventually(
        stowage_integration_tests::PATIENCE,
        "the store reported short of room",
        || async {
            let detail: serde_json::Value = reqwest::get(format!("http://{}/healthz", mesh.addr))
                .await?
                .json()
                .await?;
            let said = detail["checks"]["store_space"].as_str().unwrap_or_default();
            Ok(detail["status"] == "degraded"
                && said.starts_with("degraded")
                && said.contains("uploads are refused"))
        },
    )
    .await?;
    mesh.stop().await
}

/// With `STOWAGE_INGEST__ALLOWED_TYPES`, content of another type (sniffed from its first
/// bytes, whatever its name says) is refused through every door, naming the field that
/// carried it; a session whose first bytes are refused ends, its hold given back; nothing is
/// stored. Content of a type taken uploads as before.
#[tokio::test]
async fn content_of_a_type_not_taken_is_refused_through_every_door() -> anyhow::Result<()> {
    use stowage_integration_tests::{create_session, get_session, put_chunk, write_chunks};
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.ingest.allowed_types = vec!["image/*".into(), "application/pdf".into()];
    })
    .await?;
    let alice = token("alice", &[]);
    let refused = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status
                .message()
                .starts_with(&format!("{field}: the content is text/plain")),
            "{status:?}"
        );
    };
    let words = b"plain words, named as a picture".to_vec();
    refused(
        upload(mesh.channel(), &alice, "a.png", &words, &[])
            .await
            .expect_err("one-shot"),
        "data",
    );
    for door in ["PutChunk", "WriteChunks"] {
        let s = create_session(
            mesh.channel(),
            &alice,
            "b.png",
            Some(words.len() as u64),
            "",
        )
        .await?;
        let written = match door {
            "PutChunk" => put_chunk(mesh.channel(), &alice, &s.id, 0, &words).await,
            _ => write_chunks(mesh.channel(), &alice, &s.id, vec![(0, words.clone())]).await,
        };
        refused(written.expect_err(door), "chunk.data");
        let ended = get_session(mesh.channel(), &alice, &s.id).await?;
        assert_eq!(ended.state, pb::UploadState::Aborted as i32, "{door}");
    }
    let tus = reqwest::Client::new()
        .post(format!("http://{}/tus", mesh.addr))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", words.len().to_string())
        .header("content-type", "application/offset+octet-stream")
        .header("authorization", format!("Bearer {alice}"))
        .body(words.clone())
        .send()
        .await?;
    assert_eq!(tus.status(), 415);
    assert!(tus.text().await?.contains("text/plain"));
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (0, 0));
    assert!(setup.stored_objects("users").is_empty());

    // A first chunk too short to tell the type is refused as such; the session stays open.
    let s = create_session(mesh.channel(), &alice, "d.png", Some(20_000), "").await?;
    let short = put_chunk(mesh.channel(), &alice, &s.id, 0, &random_bytes(100))
        .await
        .expect_err("too short to tell");
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    assert!(
        short
            .message()
            .starts_with("chunk.data: a first chunk carries at least 8192 bytes"),
        "{short:?}"
    );
    let open = get_session(mesh.channel(), &alice, &s.id).await?;
    assert_eq!((open.state, open.offset), (pb::UploadState::Open as i32, 0));
    // Through tus, a bad request (not a body too large).
    let short = reqwest::Client::new()
        .patch(format!("http://{}/tus/{}", mesh.addr, s.id))
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .header("authorization", format!("Bearer {alice}"))
        .body(random_bytes(100))
        .send()
        .await?;
    assert_eq!(short.status(), 400);
    assert!(short.text().await?.contains("at least 8192 bytes"));
    stowage_integration_tests::ingest(mesh.channel())
        .abort_upload(authed(
            pb::AbortUploadRequest {
                upload_id: s.id.clone(),
            },
            &alice,
        ))
        .await?;

    // A picture is taken; in a batch, the file refused is named by its place.
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(4, 4).write_to(&mut png, image::ImageFormat::Png)?;
    let file = upload(mesh.channel(), &alice, "c.png", png.get_ref(), &[]).await?;
    assert_eq!(file.mime_type, "image/png");
    let batch = [("e.png", words.clone()), ("f.png", png.get_ref().clone())].map(|(name, data)| {
        pb::UploadFile {
            metadata: Some(pb::UploadMetadata {
                display_name: name.into(),
                ..Default::default()
            }),
            data: data.into(),
            idempotency_key: String::new(),
        }
    });
    let results = stowage_integration_tests::ingest(mesh.channel())
        .upload_files(authed(
            pb::UploadFilesRequest {
                files: batch.to_vec(),
            },
            &alice,
        ))
        .await?
        .into_inner()
        .results;
    assert_eq!(results[0].code, Code::InvalidArgument as i32, "{results:?}");
    assert!(
        results[0]
            .message
            .starts_with("files[0].data: the content is text/plain"),
        "{results:?}"
    );
    assert!(results[1].file.is_some(), "{results:?}");
    mesh.stop().await
}

/// Fields found unchecked by a review of every handler: each refused by name (before, a NUL
/// reached PostgreSQL and came back INTERNAL, an age of 10^13 s panicked a sweep, a login in
/// 1970 made its user inactive at once), and nothing recorded for them.
#[tokio::test]
async fn control_characters_ages_and_names_from_outside_are_refused_by_field() -> anyhow::Result<()>
{
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let admin = token("root", &["admin"]);
    let service = token("ingest", &["service"]);
    let refused = |result: Result<(), tonic::Status>, field: &str| {
        let status = result.expect_err(field);
        assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
        assert!(
            status.message().starts_with(field),
            "{field}: {}",
            status.message()
        );
        assert!(status.message().len() < 200, "{field}: echoed whole");
    };
    let ingest = || stowage_integration_tests::ingest(mesh.channel());
    let files = || stowage_integration_tests::files(mesh.channel());
    let lifecycle = || pb::lifecycle_client::LifecycleClient::new(mesh.channel());

    let created = ingest()
        .create_upload(authed(
            pb::CreateUploadRequest {
                size_bytes: Some(10),
                metadata: Some(pb::UploadMetadata {
                    display_name: "a.txt".into(),
                    ..Default::default()
                }),
                idempotency_key: "retry\0me".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .map(drop);
    refused(created, "idempotency_key");
    assert_eq!(usage(mesh.channel(), &alice).await?.reserved_bytes, 0);

    let listed = files()
        .list_files(authed(
            pb::ListFilesRequest {
                name_contains: "a\0".into(),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .map(drop);
    refused(listed, "name_contains");

    let charged = stowage_integration_tests::quota(mesh.channel())
        .charge(authed(
            pb::ChargeRequest {
                user_id: "alice".into(),
                bytes: 10,
                idempotency_key: "charge-1".into(),
                reason: "thumbnails\0".into(),
            },
            &service,
        ))
        .await
        .map(drop);
    refused(charged, "reason");
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 0);

    // A key of a charge is not a recount's: refused, not answered "no drift".
    let mut quota = stowage_integration_tests::quota(mesh.channel());
    quota
        .charge(authed(
            pb::ChargeRequest {
                user_id: "alice".into(),
                bytes: 10,
                idempotency_key: "charge-2".into(),
                reason: "thumbnails".into(),
            },
            &service,
        ))
        .await?;
    let reconciled = quota
        .reconcile(authed(
            pb::ReconcileRequest {
                user_id: "alice".into(),
                actual_bytes: 0,
                idempotency_key: "charge-2".into(),
                expected_used_bytes: None,
            },
            &service,
        ))
        .await
        .map(drop);
    refused(reconciled, "idempotency_key");
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, 10);

    // Sizes whose sums PostgreSQL could not hold, and dimensions past what is stored.
    let file =
        stowage_integration_tests::upload(mesh.channel(), &alice, "a.bin", b"abc", &[]).await?;
    let media = token("media", &["service"]);
    let variants = |variant: pb::Variant, width: u32| pb::SetVariantsRequest {
        file_id: file.id.clone(),
        variants: vec![variant],
        width,
        ..Default::default()
    };
    let huge = pb::Variant {
        name: "thumb".into(),
        mime_type: "image/webp".into(),
        size_bytes: 1 << 62,
        storage_key: format!("users/alice/variants/2026/12/{}_thumb.webp", file.id),
        ..Default::default()
    };
    let set = files()
        .set_variants(authed(variants(huge.clone(), 0), &media))
        .await
        .map(drop);
    refused(set, "variants.size_bytes");
    let fine = pb::Variant {
        size_bytes: 10,
        ..huge
    };
    let set = files()
        .set_variants(authed(variants(fine, 3_000_000_000), &media))
        .await
        .map(drop);
    refused(set, "width");
    let stored = files()
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file.id.clone(),
            },
            &alice,
        ))
        .await?
        .into_inner()
        .file
        .unwrap_or_default();
    assert!(stored.variants.is_empty(), "{stored:?}");

    let swept = ingest()
        .sweep_staging(authed(
            pb::SweepStagingRequest {
                max_age_seconds: 10_000_000_000_000,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .map(drop);
    refused(swept, "max_age_seconds");
    let swept = ingest()
        .sweep_uploads(authed(
            pb::SweepUploadsRequest {
                idle_seconds: u64::MAX,
                ..Default::default()
            },
            &admin,
        ))
        .await
        .map(drop);
    refused(swept, "idle_seconds");

    // A time left at zero (1970).
    let long_ago = prost_types::Timestamp::default();
    let recorded = lifecycle()
        .record_activity(authed(
            pb::RecordActivityRequest {
                user_id: "zed".into(),
                kind: pb::ActivityKind::Login as i32,
                at: Some(long_ago),
                ..Default::default()
            },
            &service,
        ))
        .await
        .map(drop);
    refused(recorded, "at");
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let active = pool
        .get()
        .await?
        .query_opt(
            "SELECT 1 FROM lifecycle.activity WHERE user_id = 'zed'",
            &[],
        )
        .await?;
    assert!(active.is_none(), "zed's activity recorded");

    let ran = lifecycle()
        .run_now(authed(
            pb::RunNowRequest {
                name: "x".repeat(1 << 20),
                ..Default::default()
            },
            &admin,
        ))
        .await
        .map(drop);
    refused(ran, "name");

    // A frame that skips seqs, sent alone: the field is named as the request holds it.
    let gap = ingest()
        .put_events(authed(
            pb::PutEventsRequest {
                frame: Some(crate::streams::frame("desk", 5, 5)),
            },
            &alice,
        ))
        .await
        .expect_err("a gap");
    assert_eq!(gap.code(), Code::FailedPrecondition, "{gap:?}");
    assert!(
        gap.message().starts_with("frame.first_seq: expected 1"),
        "{gap:?}"
    );
    assert_eq!(
        gap.metadata().get("expected-seq").map(|v| v.as_bytes()),
        Some(b"1".as_slice())
    );

    let trash = files()
        .list_expired_trash(authed(
            pb::ListExpiredTrashRequest {
                deleted_before: Some(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
                ..Default::default()
            },
            &service,
        ))
        .await
        .map(drop);
    let status = trash.expect_err("no such time");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert_eq!(status.message(), "deleted_before: not a valid time");
    mesh.stop().await
}
