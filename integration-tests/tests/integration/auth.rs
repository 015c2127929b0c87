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
        .storage_stats(authed(
            pb::StorageStatsRequest {
                all_users: true,
                ..Default::default()
            },
            &user,
        ))
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

/// An ES256 key of an identity provider, with its public half as a JWK.
struct ProviderKey {
    encoding: jsonwebtoken::EncodingKey,
    jwk: serde_json::Value,
    kid: String,
}

impl ProviderKey {
    fn new(kid: &str) -> anyhow::Result<Self> {
        use base64::Engine;
        let pair = rcgen::KeyPair::generate()?;
        // Uncompressed point: 0x04, then x and y.
        let point = pair.public_key_raw();
        anyhow::ensure!(point.len() == 65 && point[0] == 4, "not a P-256 point");
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        Ok(Self {
            encoding: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())?,
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..]),
            }),
            kid: kid.to_owned(),
        })
    }

    fn token(&self, user: &str, audience: &str) -> anyhow::Result<String> {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let now = jsonwebtoken::get_current_timestamp();
        let claims = serde_json::json!({
            "sub": user, "aud": audience, "iss": "https://idp.test", "iat": now, "exp": now + 600,
        });
        Ok(jsonwebtoken::encode(&header, &claims, &self.encoding)?)
    }
}

/// Serves `body` (read at each request) as JSON on a local port: the provider's key set.
async fn serve_jwks(
    body: std::sync::Arc<std::sync::Mutex<String>>,
) -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = body.lock().map(|b| b.clone()).unwrap_or_default();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok(addr)
}

/// Production identity: ES256 tokens checked against the provider's JWKS, audience and
/// issuer required. When the provider rotates its keys, a token signed with the new key is
/// accepted moments later (the set is fetched again on an unknown key id), not after the
/// ten-minute refresh.
#[tokio::test]
async fn provider_tokens_verify_against_its_key_set_and_a_new_key_is_taken_up() -> anyhow::Result<()>
{
    let (old, new) = (ProviderKey::new("k1")?, ProviderKey::new("k2")?);
    let body = std::sync::Arc::new(std::sync::Mutex::new(
        serde_json::json!({ "keys": [old.jwk] }).to_string(),
    ));
    let jwks = serve_jwks(std::sync::Arc::clone(&body)).await?;
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.auth.jwks_url = Some(format!("http://{jwks}/jwks.json"));
        c.auth.audience = Some("stowage".into());
        c.auth.issuer = Some("https://idp.test".into());
        c.url_signing_key = Some("an-url-signing-key-of-32-bytes-at-least".into());
    })
    .await?;
    let usage = |token: String| {
        let channel = mesh.channel();
        async move { stowage_integration_tests::usage(channel, &token).await }
    };
    assert!(usage(old.token("ada", "stowage")?).await.is_ok());
    let elsewhere = usage(old.token("ada", "another-app")?).await;
    assert_eq!(
        elsewhere.err().map(|s| s.code()),
        Some(Code::Unauthenticated)
    );
    // Signed by a key the service has not seen and the provider does not publish: refused.
    let stranger = ProviderKey::new("k1")?;
    let forged = usage(stranger.token("ada", "stowage")?).await;
    assert_eq!(forged.err().map(|s| s.code()), Some(Code::Unauthenticated));

    // The provider rotates: k2 is published beside k1.
    *body.lock().map_err(|_| anyhow::anyhow!("poisoned"))? =
        serde_json::json!({ "keys": [old.jwk, new.jwk] }).to_string();
    let rotated = new.token("ada", "stowage")?;
    stowage_integration_tests::eventually(
        Duration::from_secs(10),
        "a token of the new key accepted",
        || {
            let attempt = usage(rotated.clone());
            async move { Ok(attempt.await.is_ok()) }
        },
    )
    .await?;
    mesh.stop().await
}

/// Services in processes of their own present the token STOWAGE_SERVICE_TOKEN_FILE holds, and
/// the one it holds next once the file changes (a renewed token, for tokens that expire): a
/// token without the service scope written there makes Ingest's calls to Quota refused, the
/// service token written back makes them work again, without a restart.
#[tokio::test]
async fn services_present_the_token_their_file_holds_now() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("service-token");
    let write = |token: &str, at_secs: u64| -> anyhow::Result<()> {
        std::fs::write(&path, token)?;
        std::fs::File::options()
            .write(true)
            .open(&path)?
            .set_modified(std::time::UNIX_EPOCH + Duration::from_secs(at_secs))?;
        Ok(())
    };
    write(&token("stowage-svc", &["service"]), 1_000)?;
    let mut setup = Setup::new().await?;
    setup.env.push((
        "STOWAGE_SERVICE_TOKEN_FILE".into(),
        path.display().to_string(),
    ));
    let processes = stowage_testkit::Processes::split(&setup).await?;
    let ingest = stowage_testkit::channel(processes.addr(stowage::Role::Ingest));
    let alice = token("alice", &[]);
    upload(ingest.clone(), &alice, "a.txt", b"first", &[]).await?;

    write(&token("stowage-svc", &[]), 2_000)?;
    stowage_integration_tests::eventually(Duration::from_secs(30), "calls refused", || async {
        let refused = upload(ingest.clone(), &alice, "b.txt", b"second", &[]).await;
        Ok(
            matches!(refused, Err(s) if s.code() == Code::PermissionDenied
                && s.message().contains("service scope")),
        )
    })
    .await?;
    write(&token("stowage-svc", &["service"]), 3_000)?;
    stowage_integration_tests::eventually(Duration::from_secs(30), "calls taken again", || async {
        Ok(upload(ingest.clone(), &alice, "c.txt", b"third", &[])
            .await
            .is_ok())
    })
    .await?;
    Ok(())
}
