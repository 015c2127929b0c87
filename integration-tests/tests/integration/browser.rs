//! Stowage's browser paths in a real headless Chromium, which js/browser.mjs drives from pages
//! this test serves: grpc-web through the TypeScript client (clients/ts, its browser bundle)
//! and tus-js-client's browser build (with a token, and through an upload link without one),
//! signed URLs fetched with a range, at an allowed origin; and a page at another origin that
//! the browser must not let through. What the pages report is checked against what the
//! services stored. And the client's ES module build, as a Node program imports it.

use std::path::{Path, PathBuf};

use serde_json::Value;
use stowage_integration_tests::{download, files, js_dir, node, sha256, storage_key, usage};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The bytes the page makes with `pattern(len, seed)` (browser-page.html).
fn pattern(len: usize, seed: u32) -> Vec<u8> {
    let shift = seed.wrapping_mul(0x9e37_79b9);
    (0..len)
        .map(|i| {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            (i.wrapping_add(shift).wrapping_mul(0x9e37_79b1) >> 24) as u8
        })
        .collect()
}

/// The Chromium to drive: `STOWAGE_CHROMIUM`, else the first of Debian's builds on the PATH
/// (scripts/setup installs chromium-headless-shell).
fn chromium() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("STOWAGE_CHROMIUM") {
        return Ok(path.into());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["chromium-headless-shell", "chromium"] {
        for dir in std::env::split_paths(&path) {
            if dir.join(name).is_file() {
                return Ok(dir.join(name));
            }
        }
    }
    anyhow::bail!("no Chromium on the PATH: scripts/setup installs chromium-headless-shell")
}

/// Serves the test page, Stowage's browser bundle and tus-js-client's at a new origin, which
/// it returns (`http://127.0.0.1:{port}`).
async fn serve_page() -> anyhow::Result<String> {
    let read = |path: PathBuf| -> anyhow::Result<String> {
        std::fs::read_to_string(&path).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e} (scripts/test builds clients/ts and installs js/node_modules)",
                path.display()
            )
        })
    };
    let js = js_dir();
    let page = read(js.join("browser-page.html"))?;
    let stowage = read(repo().join("clients/ts/dist/stowage.browser.js"))?;
    let tus = read(js.join("node_modules/tus-js-client/dist/tus.min.js"))?;
    let script = |body: String| {
        move || async move { ([(http::header::CONTENT_TYPE, "text/javascript")], body) }
    };
    let app = axum::Router::new()
        .route(
            "/",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        .route("/stowage.js", axum::routing::get(script(stowage)))
        .route("/tus.js", axum::routing::get(script(tus)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(origin)
}

/// `report[path...]` as text ("" when absent).
fn text<'a>(report: &'a Value, path: &[&str]) -> &'a str {
    path.iter()
        .fold(report, |v, k| &v[*k])
        .as_str()
        .unwrap_or_default()
}

/// `report[path...]` as a number (`u64::MAX` when absent).
fn number(report: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(report, |v, k| &v[*k])
        .as_u64()
        .unwrap_or(u64::MAX)
}

#[tokio::test]
async fn a_browser_uploads_and_downloads_through_grpc_web_tus_links_and_signed_urls()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let origin = serve_page().await?;
    let foreign = serve_page().await?;
    let mesh = Mesh::start_with(&setup, |c| c.cors_origins = vec![origin.clone()]).await?;
    let alice = token("alice", &[]);
    let config = serde_json::json!({
        "page": format!("{origin}/"),
        "foreign": format!("{foreign}/"),
        "api": format!("http://{}", mesh.addr),
        "token": alice,
        "chromium": chromium()?,
    });
    let config = config.to_string();
    let out = node(
        "browser.mjs",
        &[config.as_ref()],
        &[],
        std::time::Duration::from_secs(180),
    )
    .await?;
    let report: Value = serde_json::from_str(&out)?;
    let ch = mesh.channel();

    // 1. grpc-web, PutChunk by PutChunk: the bytes the page made, under the name and tags it
    // gave, with progress after each of the three chunks.
    let first = pattern(9 * 1024 * 1024 + 123, 1);
    let size = first.len() as u64;
    let file_id = text(&report, &["grpcWeb", "fileId"]);
    let file = files(ch.clone())
        .get_file(authed(
            pb::GetFileRequest {
                file_id: file_id.into(),
            },
            &alice,
        ))
        .await?
        .into_inner()
        .file
        .ok_or_else(|| anyhow::anyhow!("no file"))?;
    assert_eq!(
        (
            file.display_name.as_str(),
            file.size_bytes,
            file.tags.clone()
        ),
        (
            "browser notes.bin",
            size,
            vec!["browser".into(), "grpc-web".into()]
        ),
        "{report}"
    );
    assert_eq!(file.sha256, sha256(&first));
    assert_eq!(text(&report, &["grpcWeb", "sha256"]), file.sha256);
    assert_eq!(number(&report, &["grpcWeb", "sent"]), size);
    assert_eq!(
        report["grpcWeb"]["progress"],
        serde_json::json!([4 << 20, 8 << 20, size]),
    );
    let (_, stored) = download(ch.clone(), &alice, file_id, None).await?;
    assert!(stored == first, "stored bytes differ from the page's");

    // 2. Four chunks, the second's answer lost and the third's first request failed: five
    // PutChunk requests (the third sent again, the second not), the file byte-exact. The
    // chunk whose answer was lost is not counted as sent by the call's figure.
    let lost = pattern(4 * 1024 * 1024, 5);
    assert_eq!(number(&report, &["lost", "putChunks"]), 5, "{report}");
    assert_eq!(number(&report, &["lost", "sent"]), 3 << 20);
    let (_, stored) =
        download(ch.clone(), &alice, text(&report, &["lost", "fileId"]), None).await?;
    assert!(
        stored == lost,
        "the file whose answer was lost differs from the page's"
    );

    // 2b. A byte of a chunk changed on the way: refused against the SHA-256 the client sent
    // with it, nothing recorded.
    let corrupted = &report["corrupted"];
    assert!(
        ["DataLoss", "InvalidArgument"].contains(&text(corrupted, &["code"])),
        "{corrupted}"
    );
    assert!(
        text(corrupted, &["message"]).contains("sha256"),
        "{corrupted}"
    );
    assert_eq!(number(corrupted, &["offset"]), 0);

    // 3. Resumed after a reload: the second page sent only what the first had not, in the
    // session the first one opened.
    let second = pattern(6 * 1024 * 1024, 2);
    assert_eq!(
        number(&report, &["resumed", "offsetBefore"]),
        2 << 20,
        "{report}"
    );
    assert_eq!(number(&report, &["resumed", "sent"]), 4 << 20);
    let (_, stored) = download(
        ch.clone(),
        &alice,
        text(&report, &["resumed", "fileId"]),
        None,
    )
    .await?;
    assert!(stored == second, "the resumed file differs from the page's");
    let resumed = stowage_integration_tests::get_session(
        ch.clone(),
        &alice,
        text(&report, &["resumed", "sessionId"]),
    )
    .await?;
    assert_eq!(resumed.file_id, text(&report, &["resumed", "fileId"]));

    // 4. Refusals reach the page with their code, and the field or offset they are about.
    let refusals = &report["refusals"];
    assert_eq!(
        text(refusals, &["wrongOffset", "code"]),
        "FailedPrecondition"
    );
    assert!(
        text(refusals, &["wrongOffset", "message"]).contains("offset"),
        "{refusals}"
    );
    assert_eq!(text(refusals, &["noName", "code"]), "InvalidArgument");
    assert!(
        text(refusals, &["noName", "message"]).contains("display_name"),
        "{refusals}"
    );
    assert_eq!(text(refusals, &["noToken", "code"]), "Unauthenticated");
    assert_eq!(text(refusals, &["abort", "code"]), "ok");
    // Resuming the aborted session started a new one, which stored the file.
    let renewed = &refusals["renewed"];
    assert_ne!(text(renewed, &["sessionId"]), text(renewed, &["aborted"]));
    let (_, stored) = download(ch.clone(), &alice, text(renewed, &["fileId"]), None).await?;
    assert!(
        stored == pattern(10, 6),
        "the renewed upload differs from the page's"
    );

    // 5. The first file back through the server stream: whole, and bytes 1000..6000.
    assert_eq!(number(&report, &["download", "size"]), size);
    assert_eq!(text(&report, &["download", "sha256"]), sha256(&first));
    assert_eq!(number(&report, &["download", "rangeSize"]), 5000);
    assert_eq!(
        text(&report, &["download", "rangeSha256"]),
        sha256(&first[1000..6000])
    );

    // 6. tus-js-client in the browser: cut after its first PATCH, resumed from the fingerprint
    // it kept; the resumed upload sent only the rest, and the file carries its metadata.
    let third = pattern(5 * 1024 * 1024, 3);
    assert_eq!(
        number(&report, &["tus", "acceptedBeforeCut"]),
        1 << 20,
        "{report}"
    );
    assert_eq!(number(&report, &["tus", "sentAfterResume"]), 4 << 20);
    let listed = files(ch.clone())
        .list_files(authed(
            pb::ListFilesRequest {
                any_tags: vec!["tus".into()],
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner()
        .files;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        (listed[0].display_name.as_str(), listed[0].size_bytes),
        ("tus clip.bin", third.len() as u64)
    );
    let (_, stored) = download(ch.clone(), &alice, &listed[0].id, None).await?;
    assert!(stored == third, "the tus upload differs from the page's");

    // 7. Through an upload link, without a token: the file is alice's, as the link said.
    let fourth = pattern(3 * 1024 * 1024, 4);
    assert_eq!(text(&report, &["link", "state"]), "COMPLETED", "{report}");
    let (header, stored) =
        download(ch.clone(), &alice, text(&report, &["link", "fileId"]), None).await?;
    let linked = header.file.unwrap_or_default();
    assert_eq!(
        (
            linked.display_name.as_str(),
            linked.tags,
            linked.owner_id.as_str()
        ),
        ("linked.bin", vec!["link".to_owned()], "alice")
    );
    assert!(
        stored == fourth,
        "the linked upload differs from the page's"
    );

    // 8. A signed URL fetched from the page with a Range header: the browser let it read the
    // partial answer and its Content-Range.
    assert_eq!(number(&report, &["signed", "status"]), 206, "{report}");
    assert_eq!(
        text(&report, &["signed", "contentRange"]),
        format!("bytes 100-199/{size}")
    );
    assert_eq!(
        text(&report, &["signed", "sha256"]),
        sha256(&first[100..200])
    );

    // 8b. Two files in one UploadFiles call: both stored, byte for byte.
    let mut form_bytes = 0;
    for (i, (len, seed)) in [(3000, 5), (5000, 6)].into_iter().enumerate() {
        let result = &report["form"][i];
        assert_eq!(result["code"].as_u64(), Some(0), "{report}");
        let file_id = result["fileId"].as_str().unwrap_or_default();
        let (_, stored) = download(ch.clone(), &alice, file_id, None).await?;
        assert!(stored == pattern(len, seed), "form file {i} differs");
        form_bytes += len as u64;
    }

    // 9. The page at another origin was stopped by the browser (its preflight found no
    // permission), so nothing reached Ingest: alice holds exactly the eight files.
    assert_eq!(text(&report, &["foreign", "code"]), "Unknown", "{report}");
    assert!(
        text(&report, &["foreign", "message"]).contains("Failed to fetch"),
        "{report}"
    );
    let account = usage(ch.clone(), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (
            size + lost.len() as u64
                + second.len() as u64
                + 10
                + third.len() as u64
                + fourth.len() as u64
                + form_bytes,
            0
        )
    );
    Ok(())
}

/// The client's ES module build, as a Node program imports it: uploads in chunks with
/// progress, reads the usage, downloads a range.
#[tokio::test]
async fn the_typescript_client_works_from_node() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let bob = token("bob", &[]);
    let data = pattern(5 * 1024 * 1024 + 7, 7);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("data.bin");
    std::fs::write(&path, &data)?;
    let api = format!("http://{}", mesh.addr);
    // The client's build comes from scripts/test (npm run build in clients/ts).
    let out = node(
        "ts-client-node.mjs",
        &[api.as_ref(), path.as_ref()],
        &[("STOWAGE_TOKEN", &bob)],
        std::time::Duration::from_secs(60),
    )
    .await?;
    let report: Value = serde_json::from_str(&out)?;
    let size = data.len() as u64;
    assert_eq!(
        report["progress"],
        serde_json::json!([2 << 20, 4 << 20, size]),
        "{report}"
    );
    assert_eq!(number(&report, &["usedBytes"]), size);
    let range = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        text(&report, &["range"]),
    )?;
    assert!(range == data[10..110], "the range differs");
    let (header, stored) = download(mesh.channel(), &bob, text(&report, &["fileId"]), None).await?;
    assert!(
        stored == data,
        "the stored file differs from what node sent"
    );
    let file = header.file.unwrap_or_default();
    assert_eq!(
        (file.display_name.as_str(), file.tags),
        ("from node.bin", vec!["node".to_owned()])
    );
    assert_eq!(number(&report, &["wholeBytes"]), size);
    // A digest the bytes do not have: the upload is refused at completion.
    assert_eq!(text(&report, &["refused"]), "InvalidArgument", "{report}");
    // Another file of the same name and size, resumed with its own digest: a new session,
    // the file stored is that one, and the first session is aborted (its hold given back).
    assert_ne!(
        text(&report, &["edited", "sessionId"]),
        text(&report, &["edited", "firstId"])
    );
    assert_eq!(
        text(&report, &["edited", "sha256"]),
        text(&report, &["edited", "expected"])
    );
    assert_eq!(
        number(&report, &["edited", "firstState"]),
        pb::UploadState::Aborted as u64,
        "{report}"
    );
    // Three seconds without network after the first chunk, then on to the end.
    assert_eq!(
        text(&report, &["outage", "sha256"]),
        text(&report, &["outage", "expected"])
    );
    // Asked to slow down once: the chunk is sent again after the wait (three chunks, four
    // PutChunk requests).
    assert_eq!(
        text(&report, &["slowed", "sha256"]),
        text(&report, &["slowed", "expected"])
    );
    assert_eq!(number(&report, &["slowed", "putChunks"]), 4, "{report}");

    // The stored bytes changed behind Files' back (same length): a whole download says so.
    let blob_dir = setup.blob_dir.as_ref().expect("a local store").path();
    std::fs::write(
        blob_dir.join(storage_key(mesh.channel(), &file.id).await?),
        pattern(data.len(), 8),
    )?;
    let out = node(
        "ts-client-node.mjs",
        &[api.as_ref(), "--download".as_ref(), file.id.as_ref()],
        &[("STOWAGE_TOKEN", &bob)],
        std::time::Duration::from_secs(60),
    )
    .await?;
    let report: Value = serde_json::from_str(&out)?;
    assert_eq!(text(&report, &["outcome"]), "DataLoss", "{report}");
    Ok(())
}
