//! What an operator sees: configuration errors that name the variable, readiness that follows
//! the dependencies.

use std::time::{Duration, Instant};

use stowage_local::LocalRedis;
use stowage_testkit::{Mesh, Setup, binary, channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn serve_with(vars: &[(&str, &str)]) -> anyhow::Result<(bool, String)> {
    let out = tokio::process::Command::new(binary()?)
        .args(["serve", "all"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("STOWAGE_AUTH__HS256_SECRET", "0123456789abcdef0123")
        .envs(vars.iter().copied())
        .output()
        .await?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn bad_configuration_exits_non_zero_naming_the_variable() -> anyhow::Result<()> {
    for (var, value) in [
        ("STOWAGE_QUOTA__DEFAULT_LIMIT", "banana"),
        ("STOWAGE_ADDR", "not-an-address"),
        ("STOWAGE_AUTH__HS256_SECRET", "short"),
        ("STOWAGE_INGEST__PART_SIZE", "1KiB"),
        ("STOWAGE_PUBLIC_URL", "ftp://x"),
        ("STOWAGE_BLOB_URL", "ftp://bucket"),
        // Not a token: every call between services would be refused.
        ("STOWAGE_SERVICE_TOKEN", "dev-service-token-change-me"),
    ] {
        let (ok, stderr) = serve_with(&[(var, value)]).await?;
        assert!(!ok, "{var}={value} must stop the process");
        assert!(
            stderr.contains(var),
            "{var}={value}: message does not name it: {stderr}"
        );
    }
    Ok(())
}

/// `stowage migrate` needs the database and nothing else (the Kubernetes migration job has no
/// auth settings): it applies every service's migrations.
#[tokio::test]
async fn migrate_needs_only_the_database() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let out = tokio::process::Command::new(binary()?)
        .arg("migrate")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &setup.database_url)
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    let schemas: i64 = pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM information_schema.schemata
             WHERE schema_name IN ('ingest', 'files', 'quota', 'media', 'lifecycle')",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(schemas, 5);
    Ok(())
}

/// A provider's keys without an audience: its tokens for other applications would pass.
#[tokio::test]
async fn keys_of_an_identity_provider_need_an_audience() -> anyhow::Result<()> {
    let (ok, stderr) = serve_with(&[
        ("STOWAGE_AUTH__JWKS_URL", "http://127.0.0.1:1/jwks.json"),
        (
            "STOWAGE_URL_SIGNING_KEY",
            "0123456789abcdef0123456789abcdef",
        ),
    ])
    .await?;
    assert!(!ok);
    assert!(stderr.contains("STOWAGE_AUTH__AUDIENCE"), "{stderr}");
    Ok(())
}

/// The key of signed URLs is all that stands between a file id and its bytes: a short one
/// (or an empty one, as a blank variable gives) is refused at start, by name.
#[tokio::test]
async fn a_short_url_signing_key_is_refused() -> anyhow::Result<()> {
    for key in ["", "changeme"] {
        let (ok, stderr) = serve_with(&[("STOWAGE_URL_SIGNING_KEY", key)]).await?;
        assert!(!ok);
        assert!(
            stderr.contains("STOWAGE_URL_SIGNING_KEY") && stderr.contains("32 bytes"),
            "{key:?}: {stderr}"
        );
    }
    Ok(())
}

/// A shell set up for the CLI (`STOWAGE_ENDPOINT`, `STOWAGE_TOKEN`) can start a server: those
/// are not server settings. (It then stops at the unreachable database, which it names.)
#[tokio::test]
async fn the_cli_variables_are_not_server_settings() -> anyhow::Result<()> {
    let (ok, stderr) = serve_with(&[
        ("STOWAGE_ENDPOINT", "http://127.0.0.1:50051"),
        ("STOWAGE_TOKEN", "a-token"),
    ])
    .await?;
    assert!(!ok);
    assert!(
        stderr.contains("DATABASE_URL") && !stderr.contains("ENDPOINT"),
        "{stderr}"
    );
    Ok(())
}

async fn status(addr: std::net::SocketAddr) -> Option<i32> {
    HealthClient::new(channel(addr))
        .check(HealthCheckRequest {
            service: "stowage.v1.Files".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner().status)
}

async fn health_detail(addr: std::net::SocketAddr) -> serde_json::Value {
    reqwest::get(format!("http://{addr}/healthz"))
        .await
        .expect("GET /healthz")
        .json()
        .await
        .expect("JSON health detail")
}

/// A process started while Redis is not up yet serves without it, and uses it once it comes
/// (the first connection is retried like a lost one).
#[tokio::test]
async fn redis_that_comes_up_after_the_process_is_used() -> anyhow::Result<()> {
    let port = stowage_local::free_port()?;
    let setup = Setup::new().await?;
    let url = format!("redis://127.0.0.1:{port}");
    let mesh = Mesh::start_with(&setup, |c| c.redis_url = Some(url)).await?;
    let detail = health_detail(mesh.addr).await;
    assert_eq!(detail["status"], "degraded", "{detail}");
    let redis = LocalRedis::start_on(port).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let detail = health_detail(mesh.addr).await;
        if detail["checks"]["redis"] == "up" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Redis still not used 30 s after it came up: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And used: an upload's file.created reaches the stream (it waited in the outbox).
    let alice = stowage_testkit::token("alice", &[]);
    stowage_integration_tests::upload(mesh.channel(), &alice, "a.txt", b"hello", &[]).await?;
    let client = stowage_runtime::redis::connect(&redis.url()).await?;
    let stream =
        stowage_events::stream_key(&setup.namespace(), stowage_events::topics::FILE_CREATED);
    stowage_integration_tests::eventually(Duration::from_secs(30), "file.created in Redis", || {
        let (client, stream) = (client.clone(), stream.clone());
        async move {
            use fred::interfaces::StreamsInterface;
            let published: u64 = client.xlen(stream.as_str()).await?;
            Ok(published >= 1)
        }
    })
    .await?;
    mesh.stop().await?;
    redis.stop().await;
    Ok(())
}

/// Redis only carries what can be rebuilt: without it the services keep serving and say
/// they are degraded; PostgreSQL stays required.
#[tokio::test]
async fn redis_down_degrades_but_keeps_serving() -> anyhow::Result<()> {
    let redis = LocalRedis::start().await?;
    let setup = Setup::new().await?;
    let url = redis.url();
    let mesh = Mesh::start_with(&setup, |c| c.redis_url = Some(url)).await?;
    assert_eq!(status(mesh.addr).await, Some(ServingStatus::Serving as i32));
    redis.stop().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let detail = health_detail(mesh.addr).await;
        if detail["status"] == "degraded" {
            assert!(
                detail["checks"]["redis"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("down")),
                "{detail}"
            );
            assert_eq!(detail["checks"]["postgres"], "up", "{detail}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/healthz does not report Redis down 20 s after it stopped: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        status(mesh.addr).await,
        Some(ServingStatus::Serving as i32),
        "still serving without Redis"
    );
    let token = stowage_testkit::token("alice", &[]);
    let listed = stowage_integration_tests::files(mesh.channel())
        .list_files(stowage_testkit::authed(
            stowage_proto::v1::ListFilesRequest::default(),
            &token,
        ))
        .await;
    assert!(listed.is_ok(), "a call without Redis: {listed:?}");
    mesh.stop().await
}
