//! A runaway client is slowed down without hurting others, and a Redis outage does not take
//! the service down with it.

use std::time::{Duration, Instant};

use futures::future::join_all;
use stowage_local::LocalRedis;
use stowage_proto::v1 as pb;
use stowage_ratelimit::Rule;
use stowage_testkit::{Mesh, Setup, authed, token};
use tonic::Code;

async fn list(mesh: &Mesh, token: &str) -> Result<(), tonic::Status> {
    stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), token))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_burst_over_the_limit_is_refused_with_retry_after_and_others_are_unaffected()
-> anyhow::Result<()> {
    let redis = LocalRedis::start().await?;
    let setup = Setup::new().await?;
    let url = redis.url();
    let mesh = Mesh::start_with(&setup, |c| {
        c.redis_url = Some(url);
        c.rate_limit.user.list = Rule::new(0.5, 50);
    })
    .await?;
    let alice = token("alice", &[]);
    let results = join_all((0..200).map(|_| list(&mesh, &alice))).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        (50..=52).contains(&ok),
        "{ok} of 200 calls passed a burst of 50"
    );
    for refused in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        let retry_after: u64 = refused
            .metadata()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .expect("retry-after in the metadata");
        assert!((1..=3).contains(&retry_after), "retry-after {retry_after}");
    }
    // Another user, and another class for the same user, still pass.
    list(&mesh, &token("bob", &[])).await?;
    stowage_integration_tests::usage(mesh.channel(), &alice).await?;

    // Redis gone: calls pass (fail-open) and the health detail says the limiter is degraded.
    redis.stop().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for _ in 0..5 {
            list(&mesh, &alice).await?;
        }
        let detail: serde_json::Value = reqwest::get(format!("http://{}/healthz", mesh.addr))
            .await?
            .json()
            .await?;
        if detail["checks"]["rate_limiter"]
            .as_str()
            .is_some_and(|s| s.starts_with("degraded"))
        {
            assert_eq!(detail["status"], "degraded", "{detail}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "limiter not reported degraded: {detail}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = reqwest::get(format!("http://{}/metrics", mesh.addr))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("stowage_rate_limiter_degraded 1"),
        "degraded gauge not set"
    );
    mesh.stop().await
}

#[tokio::test]
async fn meshes_sharing_a_redis_keep_their_own_buckets() -> anyhow::Result<()> {
    use fred::interfaces::ClientLike;
    let redis = LocalRedis::start().await?;
    let (first, second) = (Setup::new().await?, Setup::new().await?);
    let start = |setup| {
        let url = redis.url();
        Mesh::start_with(setup, |c| {
            c.redis_url = Some(url);
            c.rate_limit.user.list = Rule::new(0.01, 3);
        })
    };
    let (a, b) = (start(&first).await?, start(&second).await?);
    let alice = token("alice", &[]);
    for mesh in [&a, &b] {
        // Each mesh's alice has her whole burst, whatever she did on the other.
        for call in 0..3 {
            list(mesh, &alice)
                .await
                .map_err(|e| anyhow::anyhow!("call {call} within the burst: {e:?}"))?;
        }
        let refused = list(mesh, &alice).await.expect_err("past the burst");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    let client = stowage_runtime::redis::connect(&redis.url()).await?;
    let keys: Vec<String> = client.custom(fred::cmd!("KEYS"), vec!["*"]).await?;
    for setup in [&first, &second] {
        let prefix = format!("{}:rl:", setup.namespace());
        assert!(
            keys.iter().any(|k| k.starts_with(&prefix)),
            "no bucket under {prefix}: {keys:?}"
        );
    }
    assert!(
        !keys.iter().any(|k| k.starts_with("stowage:rl:")),
        "a bucket outside the meshes' namespaces: {keys:?}"
    );
    a.stop().await?;
    b.stop().await
}
