//! tus 1.0: a client nobody here wrote (tus-js-client on node) uploads, is cut off, resumes;
//! and the protocol's answers to bad requests, checked with plain HTTP.

use reqwest::Method;
use stowage_integration_tests::{random_bytes, sha256, usage};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};

/// Runs `node {script} {args}` in the js directory, with `STOWAGE_TOKEN` set to `token` when
/// given; its output, once it succeeded.
async fn node(
    script: &str,
    args: &[&std::ffi::OsStr],
    token: Option<&str>,
) -> anyhow::Result<String> {
    let env: Vec<(&str, &str)> = token.map(|t| ("STOWAGE_TOKEN", t)).into_iter().collect();
    stowage_integration_tests::node(script, args, &env, std::time::Duration::from_secs(600)).await
}

#[tokio::test]
async fn tus_js_client_uploads_and_resumes_after_a_cut() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    // Large enough that sending it takes longer than tus-js-client's 100 ms between progress
    // reports, when the script cuts the request off (at ~1.6 GB/s at most here).
    let data = random_bytes(160 << 20);
    // Removed with the test, whatever its outcome (160 MiB each run otherwise).
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("clip.bin");
    std::fs::write(&path, &data)?;
    let endpoint = format!("http://{}/tus/", mesh.addr);
    let out = node(
        "tus-upload.mjs",
        &[
            endpoint.as_ref(),
            path.as_ref(),
            "holiday clip.mp4".as_ref(),
            "trip,2026".as_ref(),
        ],
        Some(&alice),
    )
    .await?;
    let report = parse_report(&out)?;
    assert!(
        report.offset_after_cut > 0 && report.offset_after_cut < data.len() as u64,
        "cut at {}",
        report.offset_after_cut
    );

    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(
            pb::ListFilesRequest {
                any_tags: vec!["trip".into()],
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner();
    // One file for the resumed upload, plus one per attempt that finished before its cut.
    let uploads = 1 + report.uncut;
    assert_eq!(listed.files.len() as u64, uploads);
    for file in &listed.files {
        assert_eq!(file.display_name, "holiday clip.mp4");
        assert_eq!(file.tags, vec!["trip", "2026"]);
        assert_eq!(file.size_bytes, data.len() as u64);
        assert_eq!(file.sha256, sha256(&data));
    }
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (uploads * data.len() as u64, 0)
    );
    mesh.stop().await
}

#[tokio::test]
async fn tus_refuses_bad_requests_with_the_protocol_codes() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = format!("Bearer {}", token("alice", &[]));
    let http = reqwest::Client::new();
    let base = format!("http://{}/tus", mesh.addr);

    let options = http.request(reqwest::Method::OPTIONS, &base).send().await?;
    assert_eq!(options.status(), 204);
    assert!(
        options.headers()["tus-extension"]
            .to_str()?
            .contains("creation-defer-length")
    );

    let anonymous = http
        .post(&base)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .send()
        .await?;
    assert_eq!(anonymous.status(), 401);
    let old = http
        .post(&base)
        .header("tus-resumable", "0.2.0")
        .header("authorization", &alice)
        .send()
        .await?;
    assert_eq!(old.status(), 412);
    // A method the collection does not take: refused, as a tus response still.
    let get = tus(&http, Method::GET, &base, &alice).send().await?;
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["tus-resumable"], "1.0.0");

    let created = tus(&http, Method::POST, &base, &alice)
        .header("upload-length", "100")
        .header("upload-metadata", "filename bm90ZXMudHh0")
        .send()
        .await?;
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str()?.to_owned();
    let url = format!("http://{}{location}", mesh.addr);
    let patch = |offset: &str, body: Vec<u8>| {
        tus(&http, Method::PATCH, &url, &alice)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset)
            .body(body)
    };
    let data = random_bytes(100);
    assert_eq!(patch("0", data[..40].to_vec()).send().await?.status(), 204);
    let wrong = patch("10", data[10..20].to_vec()).send().await?;
    assert_eq!(wrong.status(), 409);
    assert_eq!(wrong.headers()["upload-offset"].to_str()?, "40");
    let too_long = patch("40", random_bytes(61)).send().await?;
    assert_eq!(too_long.status(), 413);
    let bad_sum = patch("40", data[40..60].to_vec())
        .header("upload-checksum", "sha1 AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .send()
        .await?;
    assert_eq!(bad_sum.status(), 460);
    // A checksummed body (held whole until verified) is refused before it is read: at the
    // wrong offset, for someone else's upload.
    let early = patch("10", data[10..20].to_vec())
        .header(
            "upload-checksum",
            format!("sha1 {}", base64_of(&sha1_of(&data[10..20]))),
        )
        .send()
        .await?;
    assert_eq!(early.status(), 409);
    assert_eq!(early.headers()["upload-offset"].to_str()?, "40");
    let bob = format!("Bearer {}", token("bob", &[]));
    let theirs = tus(&http, Method::PATCH, &url, &bob)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "40")
        .header("upload-checksum", "sha1 AAAAAAAAAAAAAAAAAAAAAAAAAAA=")
        .body(data[40..60].to_vec())
        .send()
        .await?;
    assert_eq!(theirs.status(), 404);
    let head = tus(&http, Method::HEAD, &url, &alice).send().await?;
    assert_eq!(
        head.headers()["upload-offset"].to_str()?,
        "40",
        "still at its last good offset"
    );
    assert_eq!(head.headers()["upload-length"].to_str()?, "100");
    assert_eq!(
        head.headers()["upload-metadata"].to_str()?,
        "filename bm90ZXMudHh0",
        "as created"
    );

    let good = base64_of(&sha1_of(&data[40..]));
    let last = patch("40", data[40..].to_vec())
        .header("upload-checksum", format!("sha1 {good}"))
        .send()
        .await?;
    assert_eq!(last.status(), 204);
    assert_eq!(last.headers()["upload-offset"].to_str()?, "100");
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(
            pb::ListFilesRequest::default(),
            &token("alice", &[]),
        ))
        .await?
        .into_inner();
    assert_eq!(
        listed
            .files
            .iter()
            .map(|f| f.display_name.as_str())
            .collect::<Vec<_>>(),
        vec!["notes.txt"]
    );
    assert_eq!(listed.files[0].sha256, sha256(&data));
    // Complete, it stays there past its expiry: its client finds it done, not gone.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let id = location.rsplit('/').next().unwrap_or_default();
    pool.get()
        .await?
        .execute(
            "UPDATE ingest.uploads SET expires_at = now() - interval '1 day' WHERE id = $1::text::uuid",
            &[&id],
        )
        .await?;
    let done = tus(&http, Method::HEAD, &url, &alice).send().await?;
    assert_eq!(done.status(), 200);
    assert_eq!(done.headers()["upload-offset"].to_str()?, "100");
    assert!(
        !done.headers().contains_key("upload-expires"),
        "a finished upload has nothing left to expire"
    );

    // Creation: one length header, not both; each metadata key once.
    let both = tus(&http, Method::POST, &base, &alice)
        .header("upload-length", "10")
        .header("upload-defer-length", "1")
        .send()
        .await?;
    assert_eq!(both.status(), 400);
    let twice = tus(&http, Method::POST, &base, &alice)
        .header("upload-length", "10")
        .header("upload-metadata", "filename YS50eHQ=,filename Yi50eHQ=")
        .send()
        .await?;
    assert_eq!(twice.status(), 400);
    assert!(twice.text().await?.contains("twice"));
    let long_name = tus(&http, Method::POST, &base, &alice)
        .header("upload-length", "10")
        .header(
            "upload-metadata",
            format!("filename {}", base64_of("n".repeat(300).as_bytes())),
        )
        .send()
        .await?;
    assert_eq!(long_name.status(), 400);
    let said = long_name.text().await?;
    assert!(said.starts_with("Upload-Metadata filename:"), "{said}");

    // Termination.
    let doomed = tus(&http, Method::POST, &base, &alice)
        .header("upload-defer-length", "1")
        .send()
        .await?;
    let doomed_url = format!(
        "http://{}{}",
        mesh.addr,
        doomed.headers()["location"].to_str()?
    );
    // A PATCH without bytes is checked as one with bytes; a deferred length above the limit
    // is too large.
    let empty = |offset: &str| {
        tus(&http, Method::PATCH, &doomed_url, &alice)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset)
    };
    let empty_wrong = empty("5").send().await?;
    assert_eq!(empty_wrong.status(), 409);
    assert_eq!(empty_wrong.headers()["upload-offset"].to_str()?, "0");
    // Named as the client sent it, not as the gRPC field.
    assert_eq!(
        empty_wrong.text().await?.trim_end(),
        "Upload-Offset: expected 0, got 5"
    );
    // An offset with no room for the bytes after it is as wrong as any other.
    let past_any = empty(&u64::MAX.to_string())
        .body(b"abc".to_vec())
        .send()
        .await?;
    assert_eq!(past_any.status(), 409);
    assert_eq!(past_any.headers()["upload-offset"].to_str()?, "0");
    let huge = empty("0")
        .header("upload-length", (1u64 << 60).to_string())
        .send()
        .await?;
    assert_eq!(huge.status(), 413);
    // Clients that cannot send PATCH or DELETE say which they mean.
    let overridden = tus(&http, Method::POST, &doomed_url, &alice)
        .header("x-http-method-override", "PATCH")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(b"abc".to_vec())
        .send()
        .await?;
    assert_eq!(overridden.status(), 204);
    assert_eq!(overridden.headers()["upload-offset"].to_str()?, "3");
    let deleted = tus(&http, Method::POST, &doomed_url, &alice)
        .header("x-http-method-override", "DELETE")
        .send()
        .await?;
    assert_eq!(deleted.status(), 204);
    let gone = tus(&http, Method::HEAD, &doomed_url, &alice).send().await?;
    assert_eq!(gone.status(), 410);
    // Terminated, it stays gone: a second DELETE and a PATCH without bytes say so.
    let again = tus(&http, Method::DELETE, &doomed_url, &alice)
        .send()
        .await?;
    assert_eq!(again.status(), 410);
    assert_eq!(empty("3").send().await?.status(), 410);
    // DELETEs racing on one upload: all wait on its row, held here; when it is let go, one
    // terminates the upload and no other says it did.
    let raced = tus(&http, Method::POST, &base, &alice)
        .header("upload-length", "10")
        .send()
        .await?;
    let raced_path = raced.headers()["location"].to_str()?.to_owned();
    let raced_url = format!("http://{}{raced_path}", mesh.addr);
    let raced_id = raced_path.rsplit('/').next().unwrap_or_default();
    let mut blocker = pool.get().await?;
    let row = blocker.transaction().await?;
    row.execute(
        "SELECT 1 FROM ingest.uploads WHERE id = $1::text::uuid FOR UPDATE",
        &[&raced_id],
    )
    .await?;
    let deletes: Vec<_> = (0..4)
        .map(|_| tokio::spawn(tus(&http, Method::DELETE, &raced_url, &alice).send()))
        .collect();
    // The four DELETEs wait on the row.
    let watcher = stowage_db::connect(&setup.database_url, 1)?;
    stowage_integration_tests::lock_waiters(&watcher, "ingest.uploads", 4).await?;
    row.commit().await?;
    let mut statuses = Vec::new();
    for delete in deletes {
        statuses.push(delete.await??.status().as_u16());
    }
    // A loser that found the winner still holding the upload's writer lock is told it is
    // busy (423, worth a retry), the others that it is gone.
    statuses.sort();
    assert_eq!(statuses[0], 204, "one DELETE terminates it: {statuses:?}");
    assert!(
        statuses[1..].iter().all(|s| matches!(s, 410 | 423)),
        "the others find it gone or busy: {statuses:?}"
    );
    let gone = tus(&http, Method::DELETE, &raced_url, &alice)
        .send()
        .await?;
    assert_eq!(gone.status(), 410);
    // A finished upload cannot be terminated: its file stays.
    let finished = tus(&http, Method::DELETE, &url, &alice).send().await?;
    assert_eq!(finished.status(), 409);
    let still = tus(&http, Method::HEAD, &url, &alice).send().await?;
    assert_eq!(still.status(), 200);
    mesh.stop().await
}

#[tokio::test]
async fn a_database_refusal_answers_500_and_loses_nothing() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let bearer = format!("Bearer {alice}");
    let http = reqwest::Client::new();
    let base = format!("http://{}/tus", mesh.addr);
    let create = |name: &str, length: usize| {
        let name = base64_of(name.as_bytes());
        tus(&http, Method::POST, &base, &bearer)
            .header("upload-length", length.to_string())
            .header("upload-metadata", format!("filename {name}"))
    };
    let created = create("kept.bin", 100).send().await?;
    assert_eq!(created.status(), 201);
    let url = format!(
        "http://{}{}",
        mesh.addr,
        created.headers()["location"].to_str()?
    );
    let patch = |offset: usize, body: &[u8]| {
        tus(&http, Method::PATCH, &url, &bearer)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string())
            .body(body.to_vec())
    };
    let data = random_bytes(100);
    assert_eq!(patch(0, &data[..40]).send().await?.status(), 204);

    // The database now refuses what the two requests below would write: a statement that
    // fails the same way every time, which no retry can pass.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let conn = pool.get().await?;
    conn.batch_execute(
        "ALTER TABLE ingest.uploads ADD CONSTRAINT test_refuses CHECK \
         (received_bytes <= 40 AND display_name <> 'refused.bin') NOT VALID",
    )
    .await?;
    let refused = create("refused.bin", 10).send().await?;
    assert_eq!(refused.status(), 500);
    assert_eq!(refused.text().await?.trim_end(), "internal error");
    let refused = patch(40, &data[40..70]).send().await?;
    assert_eq!(refused.status(), 500);
    let held = usage(mesh.channel(), &alice).await?;
    assert_eq!(
        (held.used_bytes, held.reserved_bytes),
        (0, 100),
        "the refused creation holds nothing"
    );

    conn.batch_execute("ALTER TABLE ingest.uploads DROP CONSTRAINT test_refuses")
        .await?;
    let head = tus(&http, Method::HEAD, &url, &bearer).send().await?;
    assert_eq!(
        head.headers()["upload-offset"].to_str()?,
        "40",
        "the refused chunk left the last good offset"
    );
    assert_eq!(patch(40, &data[40..]).send().await?.status(), 204);
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(listed.files.len(), 1);
    assert_eq!(listed.files[0].display_name, "kept.bin");
    assert_eq!(listed.files[0].sha256, sha256(&data));
    let held = usage(mesh.channel(), &alice).await?;
    assert_eq!((held.used_bytes, held.reserved_bytes), (100, 0));
    mesh.stop().await
}

/// A tus 1.0 request to `url` from the holder of `bearer` (an `Authorization` value).
fn tus(http: &reqwest::Client, method: Method, url: &str, bearer: &str) -> reqwest::RequestBuilder {
    http.request(method, url)
        .header("tus-resumable", "1.0.0")
        .header("authorization", bearer)
}

fn sha1_of(data: &[u8]) -> Vec<u8> {
    use sha1::Digest;
    sha1::Sha1::digest(data).to_vec()
}

/// The one JSON line the node script prints.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    offset_after_cut: u64,
    uncut: u64,
}

fn parse_report(text: &str) -> anyhow::Result<Report> {
    let line = text.lines().last().unwrap_or_default();
    Ok(serde_json::from_str(line)?)
}

/// A creation that carries the whole file, whose completion fails (here Files refuses it):
/// the client still learns the upload's URL and that nothing is left to send, so it does not
/// send the file again as a second upload; the completion, retried, makes one file. The same
/// for the creation of an empty file.
#[tokio::test]
async fn a_creation_with_the_whole_file_whose_completion_fails_is_not_lost() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let bearer = format!("Bearer {alice}");
    let http = reqwest::Client::new();
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "ALTER TABLE files.files ADD CONSTRAINT test_refuses \
             CHECK (display_name NOT IN ('whole.bin', 'empty.bin')) NOT VALID",
        )
        .await?;
    let data = random_bytes(1000);
    let created = tus(
        &http,
        Method::POST,
        &format!("http://{}/tus", mesh.addr),
        &bearer,
    )
    .header("upload-length", "1000")
    .header("upload-metadata", "filename d2hvbGUuYmlu")
    .header("content-type", "application/offset+octet-stream")
    .body(data.clone())
    .send()
    .await?;
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["upload-offset"].to_str()?, "1000");
    let location = created.headers()["location"].to_str()?.to_owned();
    let id = location.rsplit('/').next().unwrap_or_default().to_owned();
    // The same for an empty file, complete as soon as it is created.
    let empty = tus(
        &http,
        Method::POST,
        &format!("http://{}/tus", mesh.addr),
        &bearer,
    )
    .header("upload-length", "0")
    .header("upload-metadata", "filename ZW1wdHkuYmlu")
    .send()
    .await?;
    assert_eq!(empty.status(), 201);
    let empty_location = empty.headers()["location"].to_str()?.to_owned();
    let empty_id = empty_location.rsplit('/').next().unwrap_or_default();

    pool.get()
        .await?
        .batch_execute("ALTER TABLE files.files DROP CONSTRAINT test_refuses")
        .await?;
    let file = stowage_integration_tests::complete(mesh.channel(), &alice, &id).await?;
    assert_eq!(file.sha256, sha256(&data));
    let nothing = stowage_integration_tests::complete(mesh.channel(), &alice, empty_id).await?;
    assert_eq!(nothing.size_bytes, 0);
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner();
    assert_eq!(listed.files.len(), 2);
    let held = usage(mesh.channel(), &alice).await?;
    assert_eq!((held.used_bytes, held.reserved_bytes), (1000, 0));
    mesh.stop().await
}

/// The request that carried the last byte failed before the completion began (here the
/// database refused the move to `completing`): the client, which takes an offset equal to the
/// length for a finished upload, asks HEAD on its next try, and HEAD completes it.
#[tokio::test]
async fn an_upload_whose_last_request_failed_before_completing_completes_on_head()
-> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let bearer = format!("Bearer {alice}");
    let http = reqwest::Client::new();
    let created = tus(
        &http,
        Method::POST,
        &format!("http://{}/tus", mesh.addr),
        &bearer,
    )
    .header("upload-length", "1000")
    .header("upload-metadata", "filename bGFzdC5iaW4=")
    .send()
    .await?;
    assert_eq!(created.status(), 201);
    let url = format!(
        "http://{}{}",
        mesh.addr,
        created.headers()["location"].to_str()?
    );
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    pool.get()
        .await?
        .batch_execute(
            "ALTER TABLE ingest.uploads ADD CONSTRAINT test_refuses \
             CHECK (state <> 'completing') NOT VALID",
        )
        .await?;
    let data = random_bytes(1000);
    let last = tus(&http, Method::PATCH, &url, &bearer)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(data.clone())
        .send()
        .await?;
    assert_eq!(last.status(), 500, "{:?}", last.text().await);
    let files = || stowage_integration_tests::listed_files(mesh.channel(), &alice);
    assert!(files().await?.is_empty(), "not completed yet");

    pool.get()
        .await?
        .batch_execute("ALTER TABLE ingest.uploads DROP CONSTRAINT test_refuses")
        .await?;
    let head = tus(&http, Method::HEAD, &url, &bearer).send().await?;
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["upload-offset"].to_str()?, "1000");
    let listed = files().await?;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].display_name.as_str(), listed[0].sha256.as_str()),
        ("last.bin", sha256(&data).as_str())
    );
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!((account.used_bytes, account.reserved_bytes), (1000, 0));
    mesh.stop().await
}

/// An app's backend (a service) creates a session for its user with an upload link; a client
/// with no token (tus-js-client given the link as `uploadUrl`) uploads through it, and the
/// file is the user's. The link opens that session only, until it expires, as signed.
#[tokio::test]
async fn an_upload_link_lets_a_client_without_a_token_upload_one_file() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let (app, alice) = (token("app", &["service"]), token("alice", &[]));
    let data = random_bytes(3 << 20);
    let create = |owner: &str, link_seconds: u32, who: &str| {
        let mut ingest = stowage_integration_tests::ingest(mesh.channel());
        let request = authed(
            pb::CreateUploadRequest {
                size_bytes: Some(data.len() as u64),
                metadata: Some(pb::UploadMetadata {
                    display_name: "from a link.bin".into(),
                    ..Default::default()
                }),
                user_id: owner.into(),
                link_seconds,
                ..Default::default()
            },
            who,
        );
        async move { ingest.create_upload(request).await.map(|r| r.into_inner()) }
    };
    let created = create("alice", 600, &app).await?;
    let session = created.session.expect("a session");
    let link = created.upload_url;
    assert!(
        link.starts_with(&format!("http://{}/tus/{}?", mesh.addr, session.id)),
        "{link}"
    );

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("photo.bin");
    std::fs::write(&path, &data)?;
    // No token: the link is all it has.
    node("tus-link.mjs", &[link.as_ref(), path.as_ref()], None).await?;
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), &alice))
        .await?
        .into_inner()
        .files;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].display_name.as_str(),
            listed[0].size_bytes,
            listed[0].sha256.clone()
        ),
        ("from a link.bin", data.len() as u64, sha256(&data))
    );
    let account = usage(mesh.channel(), &alice).await?;
    assert_eq!(
        (account.used_bytes, account.reserved_bytes),
        (data.len() as u64, 0)
    );

    // The link opens its own session only, as signed, and only until it expires.
    let http = reqwest::Client::new();
    let head = |url: String| {
        let http = http.clone();
        async move {
            anyhow::Ok(
                http.head(url)
                    .header("tus-resumable", "1.0.0")
                    .send()
                    .await?
                    .status()
                    .as_u16(),
            )
        }
    };
    let other = create("alice", 600, &app).await?;
    let other_id = other.session.expect("a session").id;
    assert_eq!(head(other.upload_url.clone()).await?, 200);
    assert_eq!(
        head(link.replace(&session.id, &other_id)).await?,
        403,
        "another session"
    );
    assert_eq!(
        head(other.upload_url.replace("owner=alice", "owner=bob")).await?,
        403
    );
    let last = other.upload_url.len() - 1;
    let flipped = if other.upload_url.ends_with('0') {
        "1"
    } else {
        "0"
    };
    assert_eq!(
        head(format!("{}{flipped}", &other.upload_url[..last])).await?,
        403,
        "a changed signature"
    );
    let brief = create("alice", 2, &app).await?;
    assert_eq!(head(brief.upload_url.clone()).await?, 200, "fresh");
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    assert_eq!(head(brief.upload_url).await?, 403, "expired");
    // A link is no token elsewhere: creating a session with its query is refused, and a
    // download link's signature does not open an upload.
    let query = link
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    let created = http
        .post(format!("http://{}/tus?{query}", mesh.addr))
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .send()
        .await?
        .status()
        .as_u16();
    assert_eq!(created, 401);
    let download = stowage_integration_tests::files(mesh.channel())
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: listed[0].id.clone(),
                expires_in_seconds: 600,
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner()
        .url;
    let download_query = download
        .split_once('?')
        .map(|(_, q)| q.to_owned())
        .unwrap_or_default();
    let signed_for_files = format!(
        "http://{}/tus/{other_id}?owner=alice&{download_query}",
        mesh.addr
    );
    assert_eq!(
        head(signed_for_files).await?,
        403,
        "a download link's signature"
    );
    // A token wins over a link: another user's token on a valid link is refused.
    let bob = token("bob", &[]);
    let with_token = http
        .head(other.upload_url.clone())
        .header("tus-resumable", "1.0.0")
        .bearer_auth(&bob)
        .send()
        .await?
        .status()
        .as_u16();
    assert_eq!(with_token, 404, "bob's own view: no such upload");

    // Only a service or admin creates for another user (naming oneself is fine); links last
    // at most a day.
    let refused = create("bob", 600, &alice).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(create("alice", 0, &alice).await?.upload_url.is_empty());
    let refused = create("alice", 86_401, &app).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("link_seconds"), "{refused}");
    mesh.stop().await
}

/// Checksummed bodies are held whole before they are verified, in a room of 256 MiB of which
/// one user takes at most 64: a user whose four 64 MiB bodies stall (enough to fill the whole
/// room) waits on their own share, and another user's checksummed body still goes through.
#[tokio::test]
async fn one_users_stalled_bodies_leave_room_for_the_others() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let (hog, fair) = (
        format!("Bearer {}", token("hog", &[])),
        format!("Bearer {}", token("fair", &[])),
    );
    let http = reqwest::Client::new();
    let base = format!("http://{}/tus", mesh.addr);
    let create = |who: &str, size: usize| {
        let request =
            tus(&http, Method::POST, &base, who).header("upload-length", size.to_string());
        let addr = mesh.addr;
        async move {
            let created = request.send().await?;
            anyhow::ensure!(created.status() == 201, "{}", created.status());
            Ok(format!(
                "http://{addr}{}",
                created.headers()["location"].to_str()?
            ))
        }
    };
    let big = 64 << 20;
    // Four bodies of 64 MiB (the most one checksummed PATCH may hold) that send 1 KiB and
    // stall: their senders are kept until the end.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let url = create(&hog, big).await?;
        let (sender, body) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
        sender.send(Ok(vec![0u8; 1024])).await?;
        let request = tus(&http, Method::PATCH, &url, &hog)
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", "0")
            .header(
                "upload-checksum",
                format!("sha1 {}", base64_of(&sha1_of(b"x"))),
            )
            .header("content-length", big.to_string())
            .body(reqwest::Body::wrap_stream(
                tokio_stream::wrappers::ReceiverStream::new(body),
            ));
        stalled.push((sender, tokio::spawn(request.send())));
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let data = random_bytes(1 << 20);
    let url = create(&fair, data.len()).await?;
    let sent = tus(&http, Method::PATCH, &url, &fair)
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .header(
            "upload-checksum",
            format!("sha1 {}", base64_of(&sha1_of(&data))),
        )
        .body(data.clone())
        .timeout(std::time::Duration::from_secs(10))
        .send()
        .await?;
    assert_eq!(sent.status(), 204, "fair's body found room");
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(
            pb::ListFilesRequest::default(),
            &fair["Bearer ".len()..],
        ))
        .await?
        .into_inner()
        .files;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].sha256, sha256(&data));
    for (sender, request) in stalled {
        drop(sender);
        request.abort();
    }
    mesh.stop().await
}

fn base64_of(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}
