//! The mesh on a Redis Cluster of three masters (DESIGN: Redis Cluster, which fred speaks):
//! events reach their consumers, rate limits hold, and a namespace's event streams live in
//! one slot, so a consumer's one read over all its topics is taken.

use std::time::Duration;

use stowage_integration_tests::{download, eventually, upload, wait_processed};
use stowage_proto::v1 as pb;
use stowage_ratelimit::Rule;
use stowage_testkit::{LocalRedisCluster, Mesh, Setup, token};
use tonic::Code;

/// What `redis-cli` prints for `args` sent to the node on `port`, a line each.
async fn redis_cli(port: u16, args: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "redis-cli {args:?} on {port}");
    Ok(String::from_utf8(out.stdout)?
        .lines()
        .map(str::to_owned)
        .collect())
}

#[tokio::test]
async fn the_mesh_runs_on_a_redis_cluster() -> anyhow::Result<()> {
    let cluster = LocalRedisCluster::start().await?;
    let setup = Setup::new().await?;
    let url = cluster.url();
    let mesh = Mesh::start_with(&setup, |c| {
        c.redis_url = Some(url);
        c.rate_limit.user.download = Rule::new(0.01, 2);
    })
    .await?;
    let alice = token("alice", &[]);

    // Media hears of an image only through the file.created event on the cluster's streams.
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(640, 480, image::Rgb([200, 30, 30]))
        .write_to(&mut png, image::ImageFormat::Png)?;
    let file = upload(mesh.channel(), &alice, "red.png", png.get_ref(), &[]).await?;
    let file = wait_processed(mesh.channel(), &alice, &file.id, Duration::from_secs(60)).await?;
    assert_eq!(
        file.status,
        pb::FileStatus::Ready as i32,
        "{}",
        file.status_reason
    );
    assert!(
        file.variants.iter().any(|v| v.name == "thumb_256_webp"),
        "{:?}",
        file.variants
    );
    // Lifecycle's consumer, on the same streams, counts the upload as alice's activity.
    let pool = stowage_db::connect(&setup.database_url, 1)?;
    eventually(Duration::from_secs(30), "alice's activity recorded", || {
        let pool = pool.clone();
        async move {
            let row = pool
                .get()
                .await?
                .query_opt(
                    "SELECT 1 FROM lifecycle.activity WHERE user_id = 'alice'",
                    &[],
                )
                .await?;
            Ok(row.is_some())
        }
    })
    .await?;

    // The streams and their epoch keys share one slot (so one node).
    let pattern = format!("*{}*:events:*", setup.namespace());
    let mut slots = std::collections::BTreeMap::new();
    for port in cluster.ports() {
        for key in redis_cli(*port, &["--scan", "--pattern", &pattern]).await? {
            let slot = redis_cli(*port, &["CLUSTER", "KEYSLOT", &key]).await?;
            slots.insert(key, (slot, *port));
        }
    }
    assert!(slots.len() >= 3, "streams of several topics: {slots:?}");
    let first = slots.values().next().cloned();
    assert!(
        slots.values().all(|s| Some(s) == first.as_ref()),
        "event keys in several slots: {slots:?}"
    );

    // Rate limits live in the cluster too: bob's third download in a row waits.
    let bob = token("bob", &[]);
    for _ in 0..2 {
        let refused = download(mesh.channel(), &bob, &file.id, None)
            .await
            .expect_err("not bob's file");
        assert_eq!(refused.code(), Code::NotFound, "{refused:?}");
    }
    let limited = download(mesh.channel(), &bob, &file.id, None)
        .await
        .expect_err("third download");
    assert_eq!(limited.code(), Code::ResourceExhausted, "{limited:?}");
    mesh.stop().await
}
