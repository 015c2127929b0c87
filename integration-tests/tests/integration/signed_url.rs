//! Signed download URLs served over plain HTTP by the Files process.

use stowage_integration_tests::{random_bytes, upload};
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, authed, token};

#[tokio::test]
async fn signed_urls_serve_ranges_etags_and_expire() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let data = random_bytes(300_000);
    let file = upload(mesh.channel(), &alice, "report 2026.pdf.bin", &data, &[]).await?;
    let url = stowage_integration_tests::files(mesh.channel())
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: file.id.clone(),
                expires_in_seconds: 60,
                attachment: true,
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner()
        .url;
    assert!(
        url.starts_with(&format!("http://{}/v1/blobs/{}", mesh.addr, file.id)),
        "{url}"
    );

    let http = reqwest::Client::new();
    // A HEAD (a link preview) says the size and reads nothing: no download for the owner's
    // activity either.
    let downloads = || async {
        let n: i64 = stowage_db::connect(&setup.database_url, 1)?
            .get()
            .await?
            .query_one(
                "SELECT count(*) FROM files.outbox WHERE topic = 'file.downloaded'",
                &[],
            )
            .await?
            .get(0);
        anyhow::Ok(n)
    };
    let head = http.head(&url).send().await?;
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        data.len().to_string().as_str()
    );
    assert_eq!(downloads().await?, 0);
    let full = http.get(&url).send().await?;
    assert_eq!(full.status(), 200);
    assert_eq!(downloads().await?, 1);
    let etag = full
        .headers()
        .get("etag")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    assert_eq!(
        etag.as_deref(),
        Some(format!("\"{}\"", file.sha256).as_str())
    );
    let disposition = full
        .headers()
        .get("content-disposition")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    assert!(
        disposition.starts_with(
            "attachment; filename=\"report 2026.pdf.bin\"; filename*=UTF-8''report%202026"
        ),
        "{disposition}"
    );
    assert_eq!(
        full.headers()
            .get("content-type")
            .map(|v| v.as_bytes().to_vec()),
        Some(b"application/octet-stream".to_vec())
    );
    // When the bytes were stored, to the second, as an HTTP date.
    let created = file.created_at.as_ref().map_or(0, |t| t.seconds);
    let modified = chrono::DateTime::from_timestamp(created, 0)
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string());
    assert_eq!(
        full.headers()["last-modified"].to_str().ok(),
        modified.as_deref()
    );
    assert_eq!(full.bytes().await?.as_ref(), data.as_slice());

    let part = http
        .get(&url)
        .header("range", "bytes=100-199")
        .send()
        .await?;
    assert_eq!(part.status(), 206);
    assert_eq!(
        part.headers()
            .get("content-range")
            .map(|v| v.as_bytes().to_vec()),
        Some(b"bytes 100-199/300000".to_vec())
    );
    assert_eq!(part.bytes().await?.as_ref(), &data[100..200]);

    let suffix = http.get(&url).header("range", "bytes=-10").send().await?;
    assert_eq!(suffix.status(), 206);
    assert_eq!(suffix.bytes().await?.as_ref(), &data[data.len() - 10..]);

    let unsatisfiable = http
        .get(&url)
        .header("range", "bytes=400000-")
        .send()
        .await?;
    assert_eq!(unsatisfiable.status(), 416);

    // What is not one range of these bytes is ignored, and the file sent whole (RFC 9110
    // §14.2): several ranges, another unit, a HEAD, an If-Range naming other bytes or a date.
    let etag_value = etag.clone().unwrap_or_default();
    let cases: [(reqwest::Method, &str, Option<&str>); 5] = [
        (reqwest::Method::GET, "bytes=0-0,-1", None),
        (reqwest::Method::GET, "items=0-5", None),
        (reqwest::Method::HEAD, "bytes=100-199", None),
        (reqwest::Method::GET, "bytes=100-199", Some("\"other\"")),
        (
            reqwest::Method::GET,
            "bytes=100-199",
            Some("Wed, 21 Oct 2015 07:28:00 GMT"),
        ),
    ];
    for (method, range, if_range) in cases {
        let mut request = http.request(method.clone(), &url).header("range", range);
        if let Some(validator) = if_range {
            request = request.header("if-range", validator);
        }
        let whole = request.send().await?;
        assert_eq!(whole.status(), 200, "{method} {range} {if_range:?}");
        assert!(whole.headers().get("content-range").is_none());
        if method == reqwest::Method::GET {
            assert_eq!(whole.bytes().await?.len(), data.len());
        }
    }
    // An If-Range naming the current bytes: the range.
    let resumed = http
        .get(&url)
        .header("range", "bytes=100-199")
        .header("if-range", &etag_value)
        .send()
        .await?;
    assert_eq!(resumed.status(), 206);
    assert_eq!(resumed.bytes().await?.as_ref(), &data[100..200]);

    let cached = http
        .get(&url)
        .header("if-none-match", etag.clone().unwrap_or_default())
        .send()
        .await?;
    assert_eq!(cached.status(), 304);
    // Kept by the browser, but asked about again before each use (a trashed file or an
    // expired link is not served from its cache); the 304 says so as the 200 did.
    assert_eq!(cached.headers()["cache-control"], "private, no-cache");
    // As a proxy that compressed the body asks again: the tag weakened, still the same.
    let weakened = http
        .get(&url)
        .header(
            "if-none-match",
            format!("\"other\", W/{}", etag.unwrap_or_default()),
        )
        .send()
        .await?;
    assert_eq!(weakened.status(), 304);

    let tampered = url.replace(&file.id, &uuid::Uuid::now_v7().to_string());
    assert_eq!(http.get(&tampered).send().await?.status(), 403);
    let longer = url.replace("exp=", "exp=9");
    assert_eq!(http.get(&longer).send().await?.status(), 403);

    // An expired link: asking for more than the maximum lifetime is refused outright…
    let too_long = stowage_integration_tests::files(mesh.channel())
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: file.id.clone(),
                expires_in_seconds: 8 * 24 * 3600,
                ..Default::default()
            },
            &alice,
        ))
        .await;
    assert_eq!(
        too_long.err().map(|s| s.code()),
        Some(tonic::Code::InvalidArgument)
    );
    // …and a one-second link stops working.
    let short = stowage_integration_tests::files(mesh.channel())
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: file.id.clone(),
                expires_in_seconds: 1,
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner()
        .url;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(http.get(&short).send().await?.status(), 403);

    // Trashed files stop being served.
    stowage_integration_tests::files(mesh.channel())
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: file.id.clone(),
            },
            &alice,
        ))
        .await?;
    assert_eq!(http.get(&url).send().await?.status(), 404);
    mesh.stop().await
}

/// A variant rebuilt with other bytes of the same size gets another entity tag: a cache that
/// asks with the old one gets the new bytes, not 304.
#[tokio::test]
async fn a_rebuilt_variant_has_a_new_entity_tag() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let media = token("media", &["service"]);
    let file = upload(mesh.channel(), &alice, "pic.bin", &random_bytes(1000), &[]).await?;
    let files = || stowage_integration_tests::files(mesh.channel());
    // Four bytes each time, other bytes the second.
    let set = |fill: u8| {
        let tiny = vec![stowage_integration_tests::inline_variant("tiny", 4, fill)];
        stowage_integration_tests::set_variants(&file.id, tiny, &media)
    };
    files().set_variants(set(b'a')).await?;
    let url = files()
        .get_download_url(authed(
            pb::GetDownloadUrlRequest {
                file_id: file.id.clone(),
                variant: "tiny".into(),
                expires_in_seconds: 60,
                ..Default::default()
            },
            &alice,
        ))
        .await?
        .into_inner()
        .url;
    let http = reqwest::Client::new();
    let first = http.get(&url).send().await?;
    let etag = first.headers()["etag"].to_str()?.to_owned();
    // Saved under a name of its own type, not the original's.
    assert!(
        first.headers()["content-disposition"]
            .to_str()?
            .contains("filename=\"pic_tiny.webp\""),
        "{:?}",
        first.headers()["content-disposition"]
    );
    assert_eq!(first.bytes().await?.as_ref(), b"aaaa");
    files().set_variants(set(b'w')).await?;
    let again = http.get(&url).header("if-none-match", &etag).send().await?;
    assert_eq!(again.status(), 200);
    assert_ne!(again.headers()["etag"].to_str()?, etag);
    assert_eq!(again.bytes().await?.as_ref(), b"wwww");
    // A page of files (and of trash) carries each one's variants: a gallery needs no GetFile
    // per file for its thumbnails.
    let shown = |files: &[pb::File]| -> Vec<(String, Vec<u8>)> {
        files
            .iter()
            .flat_map(|f| &f.variants)
            .map(|v| (v.name.clone(), v.inline_data.clone()))
            .collect()
    };
    let listed = stowage_integration_tests::listed_files(mesh.channel(), &alice).await?;
    assert_eq!(shown(&listed), [("tiny".to_owned(), b"wwww".to_vec())]);
    files()
        .delete_file(authed(
            pb::DeleteFileRequest {
                file_id: file.id.clone(),
            },
            &alice,
        ))
        .await?;
    let trash = files()
        .list_trash(authed(pb::ListTrashRequest::default(), &alice))
        .await?
        .into_inner()
        .files;
    assert_eq!(shown(&trash), [("tiny".to_owned(), b"wwww".to_vec())]);
    mesh.stop().await
}

/// Rotating the URL signing key: while the replaced key is set as the previous one, links it
/// signed are still served, and new links use the new key; once it is dropped, its links are
/// refused.
#[tokio::test]
async fn links_signed_with_the_previous_key_pass_while_it_is_kept() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let (old_key, new_key) = ("o".repeat(32), "n".repeat(32));
    let alice = token("alice", &[]);
    let data = random_bytes(1000);
    let keys = |current: &str, previous: Option<&str>| {
        let (current, previous) = (current.to_owned(), previous.map(str::to_owned));
        move |config: &mut stowage_runtime::Config| {
            config.url_signing_key = Some(current);
            config.url_signing_key_previous = previous;
        }
    };
    let link = |mesh: &Mesh, file_id: String| {
        let mut files = stowage_integration_tests::files(mesh.channel());
        let alice = alice.clone();
        async move {
            let request = pb::GetDownloadUrlRequest {
                file_id,
                expires_in_seconds: 600,
                ..Default::default()
            };
            anyhow::Ok(
                files
                    .get_download_url(authed(request, &alice))
                    .await?
                    .into_inner()
                    .url,
            )
        }
    };
    let http = reqwest::Client::new();
    let status = |url: String| {
        let http = http.clone();
        async move { anyhow::Ok(http.get(url).send().await?.status().as_u16()) }
    };

    let before = Mesh::start_with(&setup, keys(&old_key, None)).await?;
    let file = upload(before.channel(), &alice, "a.bin", &data, &[]).await?;
    let old_link = link(&before, file.id.clone()).await?;
    assert_eq!(status(old_link.clone()).await?, 200);
    before.stop().await?;

    // Rotated: the new key signs, the old one still checks. The links differ, each passes.
    let rotating = Mesh::start_with(&setup, keys(&new_key, Some(&old_key))).await?;
    let old_link = old_link.replace(&origin(&old_link), &format!("http://{}", rotating.addr));
    let new_link = link(&rotating, file.id.clone()).await?;
    assert_ne!(signature(&old_link), signature(&new_link));
    assert_eq!(status(old_link.clone()).await?, 200);
    assert_eq!(status(new_link.clone()).await?, 200);
    rotating.stop().await?;

    // The old key dropped: its links are refused, the new ones still pass.
    let after = Mesh::start_with(&setup, keys(&new_key, None)).await?;
    let moved = |url: &str| url.replace(&origin(url), &format!("http://{}", after.addr));
    assert_eq!(status(moved(&old_link)).await?, 403);
    assert_eq!(status(moved(&new_link)).await?, 200);
    after.stop().await
}

/// `http://host:port` of a signed URL.
fn origin(url: &str) -> String {
    let path = url.find("/v1/blobs/").expect("a signed URL");
    url[..path].to_owned()
}

/// The `sig` parameter of a signed URL.
fn signature(url: &str) -> &str {
    url.split(['?', '&'])
        .find_map(|p| p.strip_prefix("sig="))
        .expect("a signature")
}
