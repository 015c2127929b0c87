//! The newcomer's flow, against the real binary: five processes, then one `serve all`.

use stowage::Role;
use stowage_integration_tests::{
    complete, create_session, download, files, put_chunk, random_bytes, sha256, upload, usage,
};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Processes, Setup, authed, channel, token};

async fn run_flow(processes: &Processes, setup: &Setup) -> anyhow::Result<()> {
    let ingest = channel(processes.addr(Role::Ingest));
    let files = channel(processes.addr(Role::Files));
    let quota = channel(processes.addr(Role::Quota));
    let alice = token("alice", &[]);

    let empty = Vec::new();
    let small = random_bytes(1 << 20);
    let large = random_bytes(64 << 20);
    let f0 = upload(ingest.clone(), &alice, "empty.bin", &empty, &["keep"]).await?;
    let f1 = upload(ingest.clone(), &alice, "small.bin", &small, &["keep", "x"]).await?;
    let f2 = upload(ingest.clone(), &alice, "large.bin", &large, &["other"]).await?;
    assert_eq!(
        (f0.size_bytes, f1.size_bytes, f2.size_bytes),
        (0, 1 << 20, 64 << 20)
    );
    assert_eq!(f1.sha256, sha256(&small));
    assert_eq!(setup.stored_objects("users").len(), 3, "one blob per file");

    // Filter (tag "keep") and sort (size, descending) across two pages of one.
    let mut client = stowage_integration_tests::files(files.clone());
    let query = pb::ListFilesRequest {
        any_tags: vec!["keep".into()],
        sort_by: pb::FileSortField::Size as i32,
        direction: pb::SortDirection::Desc as i32,
        page_size: 1,
        ..Default::default()
    };
    let page1 = client
        .list_files(authed(query.clone(), &alice))
        .await?
        .into_inner();
    assert_eq!(
        page1.files.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
        vec![f1.id.clone()]
    );
    assert!(!page1.next_page_token.is_empty());
    let page2 = client
        .list_files(authed(
            pb::ListFilesRequest {
                page_token: page1.next_page_token,
                ..query.clone()
            },
            &alice,
        ))
        .await?
        .into_inner();
    assert_eq!(
        page2.files.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
        vec![f0.id.clone()]
    );
    assert!(
        page2.next_page_token.is_empty(),
        "two matching files, two pages"
    );

    // Byte for byte.
    for (file, data) in [(&f0, &empty), (&f1, &small), (&f2, &large)] {
        let (header, bytes) = download(files.clone(), &alice, &file.id, None).await?;
        assert_eq!(header.total_size, data.len() as u64);
        assert_eq!(
            sha256(&bytes),
            sha256(data),
            "{} differs",
            file.display_name
        );
    }
    // A range.
    let (header, part) = download(
        files.clone(),
        &alice,
        &f2.id,
        Some(pb::ByteRange {
            offset: 1_000_000,
            length: Some(123_457),
        }),
    )
    .await?;
    assert_eq!((header.offset, header.length), (1_000_000, 123_457));
    assert_eq!(part, large[1_000_000..1_123_457]);

    // Usage is exactly the sum.
    let account = usage(quota.clone(), &alice).await?;
    assert_eq!(account.used_bytes, (1 << 20) + (64 << 20));
    assert_eq!(account.reserved_bytes, 0);
    assert_eq!(account.limit_bytes, 10 << 30, "10 GiB default");

    // Delete → trash → restore.
    client
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: f1.id.clone(),
            },
            &alice,
        ))
        .await?;
    let live = client
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert!(
        live.files.iter().all(|f| f.id != f1.id),
        "deleted file left the list"
    );
    let trash = client
        .list_trash(authed(pb::ListTrashRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(
        trash.files.iter().map(|f| f.id.clone()).collect::<Vec<_>>(),
        vec![f1.id.clone()]
    );
    client
        .restore_file(authed(
            pb::RestoreFileRequest {
                file_id: f1.id.clone(),
            },
            &alice,
        ))
        .await?;
    let trash = client
        .list_trash(authed(pb::ListTrashRequest::default(), &alice))
        .await?
        .into_inner();
    assert!(trash.files.is_empty());
    let live = client
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(live.files.len(), 3);
    let (_, again) = download(files, &alice, &f1.id, None).await?;
    assert_eq!(again, small);
    Ok(())
}

#[tokio::test]
async fn five_processes_upload_list_download_trash_restore() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let processes = Processes::split(&setup).await?;
    assert_eq!(processes.processes.len(), 5);
    run_flow(&processes, &setup).await
}

#[tokio::test]
async fn serve_all_upload_list_download_trash_restore() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let processes = Processes::all(&setup).await?;
    assert_eq!(processes.processes.len(), 1);
    run_flow(&processes, &setup).await
}

/// One round of everyday calls through Ingest, Files and Quota: a one-shot upload, a session,
/// listing, renaming, trash and restore. Returns the bytes it stored.
async fn everyday_round(mesh: &Mesh, alice: &str, round: usize) -> anyhow::Result<u64> {
    let data = random_bytes(64 << 10);
    let file = upload(mesh.channel(), alice, &format!("r{round}.bin"), &data, &[]).await?;
    let s = create_session(
        mesh.channel(),
        alice,
        &format!("s{round}.bin"),
        Some(data.len() as u64),
        "",
    )
    .await?;
    put_chunk(mesh.channel(), alice, &s.id, 0, &data).await?;
    let session_file = complete(mesh.channel(), alice, &s.id).await?;
    assert_eq!(session_file.sha256, sha256(&data));
    let mut client = files(mesh.channel());
    let listed = client
        .list_files(authed(pb::ListFilesRequest::default(), alice))
        .await?
        .into_inner();
    assert!(listed.files.iter().any(|f| f.id == file.id));
    client
        .update_file(authed(
            pb::UpdateFileRequest {
                file_id: file.id.clone(),
                display_name: Some(format!("renamed{round}.bin")),
                ..Default::default()
            },
            alice,
        ))
        .await?;
    client
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: file.id.clone(),
            },
            alice,
        ))
        .await?;
    client
        .list_trash(authed(pb::ListTrashRequest::default(), alice))
        .await?;
    let restored = client
        .restore_file(authed(
            pb::RestoreFileRequest {
                file_id: file.id.clone(),
            },
            alice,
        ))
        .await?
        .into_inner()
        .file
        .unwrap_or_default();
    assert_eq!(restored.display_name, format!("renamed{round}.bin"));
    Ok(2 * data.len() as u64)
}

/// A release whose migration adds columns rolls out while this version still serves: its
/// cached statements name their columns, so their result types do not change and every call
/// goes on working (with `*`, each connection that had cached one failed it from then on).
#[tokio::test]
async fn columns_added_by_a_newer_release_break_nothing_here() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let mut stored = 0;
    for round in 0..3 {
        stored += everyday_round(&mesh, &alice, round).await?;
    }
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "ALTER TABLE ingest.uploads ADD COLUMN next_release int;
             ALTER TABLE files.files ADD COLUMN next_release int;
             ALTER TABLE files.variants ADD COLUMN next_release int;
             ALTER TABLE quota.accounts ADD COLUMN next_release int;
             ALTER TABLE quota.reservations ADD COLUMN next_release int;",
        )
        .await?;
    for round in 3..6 {
        stored += everyday_round(&mesh, &alice, round).await?;
    }
    assert_eq!(usage(mesh.channel(), &alice).await?.used_bytes, stored);
    mesh.stop().await
}

/// ListFiles filters by the app that made a file (its package name) and by a part of its
/// name, and pages through what matches.
#[tokio::test]
async fn files_are_listed_by_package_and_name() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    for (name, package) in [
        ("Beach photo.jpg", "com.example.camera"),
        ("beach notes.txt", "com.example.notes"),
        ("Photo of cat.jpg", "com.example.camera"),
        ("untagged.bin", ""),
    ] {
        let session = stowage_integration_tests::ingest(mesh.channel())
            .create_upload(authed(
                pb::CreateUploadRequest {
                    size_bytes: Some(4),
                    metadata: Some(pb::UploadMetadata {
                        display_name: name.into(),
                        package_name: package.into(),
                        ..Default::default()
                    }),
                    idempotency_key: String::new(),
                    ..Default::default()
                },
                &alice,
            ))
            .await?
            .into_inner()
            .session
            .unwrap_or_default();
        put_chunk(mesh.channel(), &alice, &session.id, 0, &random_bytes(4)).await?;
        complete(mesh.channel(), &alice, &session.id).await?;
    }
    let names = |request: pb::ListFilesRequest| {
        let alice = alice.clone();
        let channel = mesh.channel();
        async move {
            let mut names: Vec<String> = files(channel)
                .list_files(authed(request, &alice))
                .await?
                .into_inner()
                .files
                .into_iter()
                .map(|f| f.display_name)
                .collect();
            names.sort();
            anyhow::Ok(names)
        }
    };
    let camera = pb::ListFilesRequest {
        package_name: "com.example.camera".into(),
        ..Default::default()
    };
    assert_eq!(
        names(camera.clone()).await?,
        ["Beach photo.jpg", "Photo of cat.jpg"]
    );
    let beach = pb::ListFilesRequest {
        name_contains: "BEACH".into(),
        ..Default::default()
    };
    assert_eq!(names(beach).await?, ["Beach photo.jpg", "beach notes.txt"]);
    // One per page, the token carrying the filter.
    let first = files(mesh.channel())
        .list_files(authed(
            pb::ListFilesRequest {
                page_size: 1,
                ..camera.clone()
            },
            &alice,
        ))
        .await?
        .into_inner();
    let second = files(mesh.channel())
        .list_files(authed(
            pb::ListFilesRequest {
                page_size: 1,
                page_token: first.next_page_token.clone(),
                ..camera
            },
            &alice,
        ))
        .await?
        .into_inner();
    assert_eq!(first.files.len() + second.files.len(), 2);
    assert_ne!(first.files[0].id, second.files[0].id);
    let refused = files(mesh.channel())
        .list_files(authed(
            pb::ListFilesRequest {
                package_name: "x".repeat(300),
                ..Default::default()
            },
            &alice,
        ))
        .await
        .expect_err("too long");
    assert!(refused.message().contains("package_name"), "{refused:?}");
    mesh.stop().await
}

/// Listing by kind and favourite, sorting by name and by date either way; and tags that two
/// clients add at once both stay (add_tags / remove_tags change the list as it is).
#[tokio::test]
async fn files_are_listed_by_kind_and_favourite_and_tags_add_up() -> anyhow::Result<()> {
    use tonic::Code;
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(4, 4, image::Rgb([200, 10, 10]))
        .write_to(&mut png, image::ImageFormat::Png)?;
    let notes = upload(mesh.channel(), &alice, "b.txt", b"some words", &[]).await?;
    let photo = upload(mesh.channel(), &alice, "a.png", png.get_ref(), &[]).await?;
    let blob = upload(mesh.channel(), &alice, "c.bin", &random_bytes(100), &[]).await?;
    let update = |request: pb::UpdateFileRequest| {
        let (channel, alice) = (mesh.channel(), alice.clone());
        async move {
            files(channel)
                .update_file(authed(request, &alice))
                .await
                .map(|r| r.into_inner().file.unwrap_or_default())
        }
    };
    update(pb::UpdateFileRequest {
        file_id: blob.id.clone(),
        favorite: Some(true),
        ..Default::default()
    })
    .await?;
    let list = |request: pb::ListFilesRequest| {
        let (channel, alice) = (mesh.channel(), alice.clone());
        async move {
            anyhow::Ok(
                files(channel)
                    .list_files(authed(request, &alice))
                    .await?
                    .into_inner()
                    .files
                    .into_iter()
                    .map(|f| f.display_name)
                    .collect::<Vec<_>>(),
            )
        }
    };
    let favorites = list(pb::ListFilesRequest {
        favorite: Some(true),
        ..Default::default()
    });
    assert_eq!(favorites.await?, ["c.bin"]);
    let others = list(pb::ListFilesRequest {
        favorite: Some(false),
        sort_by: pb::FileSortField::Name as i32,
        ..Default::default()
    });
    assert_eq!(others.await?, ["a.png", "b.txt"]);
    let images = list(pb::ListFilesRequest {
        kind: pb::FileKind::Image as i32,
        ..Default::default()
    });
    assert_eq!(images.await?, ["a.png"]);
    let by_name = |direction: pb::SortDirection| pb::ListFilesRequest {
        sort_by: pb::FileSortField::Name as i32,
        direction: direction as i32,
        ..Default::default()
    };
    assert_eq!(
        list(by_name(pb::SortDirection::Asc)).await?,
        ["a.png", "b.txt", "c.bin"]
    );
    assert_eq!(
        list(by_name(pb::SortDirection::Desc)).await?,
        ["c.bin", "b.txt", "a.png"]
    );
    let oldest_first = list(pb::ListFilesRequest {
        sort_by: pb::FileSortField::CreatedAt as i32,
        direction: pb::SortDirection::Asc as i32,
        ..Default::default()
    });
    assert_eq!(oldest_first.await?, ["b.txt", "a.png", "c.bin"]);
    assert!(!photo.id.is_empty());

    // Sixteen clients tag one file at once; every tag stays.
    let adds = (0..16).map(|i| {
        update(pb::UpdateFileRequest {
            file_id: notes.id.clone(),
            add_tags: vec![format!("t{i}"), "shared".into()],
            ..Default::default()
        })
    });
    for added in futures::future::join_all(adds).await {
        added?;
    }
    let removed = update(pb::UpdateFileRequest {
        file_id: notes.id.clone(),
        remove_tags: vec!["t0".into(), "absent".into()],
        ..Default::default()
    })
    .await?;
    let mut tags = removed.tags.clone();
    tags.sort();
    let mut expected: Vec<String> = (1..16).map(|i| format!("t{i}")).collect();
    expected.push("shared".into());
    expected.sort();
    assert_eq!(tags, expected);
    // At most 32 tags on a file, by field; and not with a whole new list.
    let too_many = update(pb::UpdateFileRequest {
        file_id: notes.id.clone(),
        add_tags: (0..20).map(|i| format!("more{i}")).collect(),
        ..Default::default()
    })
    .await
    .expect_err("too many");
    assert_eq!(too_many.code(), Code::InvalidArgument);
    assert!(too_many.message().contains("add_tags"), "{too_many:?}");
    let mixed = update(pb::UpdateFileRequest {
        file_id: notes.id.clone(),
        replace_tags: true,
        tags: vec!["x".into()],
        add_tags: vec!["y".into()],
        ..Default::default()
    })
    .await
    .expect_err("mixed");
    assert_eq!(mixed.code(), Code::InvalidArgument);
    let kept = update(pb::UpdateFileRequest {
        file_id: notes.id.clone(),
        ..Default::default()
    })
    .await?;
    assert_eq!(kept.tags.len(), 16, "nothing changed by the refusals");
    mesh.stop().await
}

/// A form's files in one UploadFiles call: each stored or refused on its own (one over the
/// quota, one without a name), the rest stored byte for byte and charged once; a repeated
/// call with a file's key answers with the file stored under it; a call of no files or of
/// more than ten is refused whole.
#[tokio::test]
async fn several_files_in_one_call_are_each_stored_or_refused() -> anyhow::Result<()> {
    let setup = Setup::new().await?.with_default_limit(10_000);
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let file = |name: &str, data: &[u8], key: &str| pb::UploadFile {
        metadata: Some(pb::UploadMetadata {
            display_name: name.to_owned(),
            tags: vec!["form".to_owned()],
            ..Default::default()
        }),
        data: data.to_vec().into(),
        idempotency_key: key.to_owned(),
    };
    let call = |files: Vec<pb::UploadFile>| {
        let mut ingest = stowage_integration_tests::ingest(mesh.channel());
        let alice = alice.clone();
        async move {
            ingest
                .upload_files(authed(pb::UploadFilesRequest { files }, &alice))
                .await
        }
    };
    let (a, b, big) = (
        b"some words".repeat(300),
        random_bytes(4000),
        random_bytes(11_000),
    );
    let results = call(vec![
        file("a.txt", &a, "form-1-a"),
        file("b.bin", &b, ""),
        file("big.bin", &big, ""),
        file("", b"nameless", ""),
    ])
    .await?
    .into_inner()
    .results;
    assert_eq!(results.len(), 4);
    let stored: Vec<&pb::File> = results[..2]
        .iter()
        .filter_map(|r| r.file.as_ref())
        .collect();
    assert_eq!(
        stored
            .iter()
            .map(|f| (f.display_name.as_str(), f.size_bytes, f.tags.clone()))
            .collect::<Vec<_>>(),
        [
            ("a.txt", 3000, vec!["form".to_owned()]),
            ("b.bin", 4000, vec!["form".to_owned()])
        ]
    );
    assert!(
        results[..2]
            .iter()
            .all(|r| r.code == 0 && r.message.is_empty())
    );
    assert_eq!(
        (
            results[2].file.is_none(),
            tonic::Code::from(results[2].code)
        ),
        (true, tonic::Code::ResourceExhausted),
        "{}",
        results[2].message
    );
    assert_eq!(
        tonic::Code::from(results[3].code),
        tonic::Code::InvalidArgument
    );
    assert!(
        results[3]
            .message
            .starts_with("files[3].metadata.display_name"),
        "{}",
        results[3].message
    );
    for (f, data) in stored.iter().zip([&a, &b]) {
        let (_, bytes) = download(mesh.channel(), &alice, &f.id, None).await?;
        assert!(bytes == *data, "{} differs", f.display_name);
        assert_eq!(f.sha256, sha256(data));
    }
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (7000, 0));

    // Sent again (its answer lost): the same file, charged once.
    let again = call(vec![file("a.txt", &a, "form-1-a")])
        .await?
        .into_inner()
        .results;
    assert_eq!(again[0].file.as_ref().map(|f| &f.id), Some(&stored[0].id));
    for files in [Vec::new(), vec![file("x.bin", b"x", ""); 11]] {
        let refused = call(files).await.expect_err("refused whole");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().starts_with("files:"),
            "{}",
            refused.message()
        );
    }
    let twice = call(vec![file("c.bin", b"c", "k"), file("d.bin", b"d", "k")])
        .await
        .expect_err("one key for two files");
    assert!(
        twice.message().starts_with("files.idempotency_key"),
        "{}",
        twice.message()
    );
    let listed = stowage_integration_tests::listed_files(mesh.channel(), &alice).await?;
    assert_eq!(listed.len(), 2);
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (7000, 0));
    mesh.stop().await
}
