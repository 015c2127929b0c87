//! What Prometheus scrapes from a process: per-call counts, latency and bytes, and the event
//! relay's progress, Media's consumer and job queue (processed, failed, dead), Lifecycle's
//! clean-up runs, moving as work is done.

use std::time::{Duration, Instant};

use stowage_integration_tests::{download, eventually, random_bytes, sample, scrape, upload};
use stowage_proto::v1::{self as pb, lifecycle_client::LifecycleClient};
use stowage_testkit::{Mesh, Setup, authed, token};

#[tokio::test]
async fn metrics_move_when_work_is_done() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let alice = token("alice", &[]);
    let list = || async {
        stowage_integration_tests::files(mesh.channel())
            .list_files(authed(pb::ListFilesRequest::default(), &alice))
            .await
    };
    list().await?;
    let ok = ["method=\"ListFiles\"", "code=\"OK\""];
    let before = sample(&scrape(&mesh).await?, "stowage_rpc_requests_total", &ok).unwrap_or(0.0);
    list().await?;
    list().await?;
    let text = scrape(&mesh).await?;
    assert_eq!(
        sample(&text, "stowage_rpc_requests_total", &ok),
        Some(before + 2.0),
        "ListFiles count"
    );
    assert!(
        sample(
            &text,
            "stowage_rpc_duration_seconds_count",
            &["method=\"ListFiles\""]
        )
        .is_some_and(|n| n >= before + 2.0),
        "latency histogram"
    );
    // A refused call is counted under its status code.
    let denied = stowage_integration_tests::files(mesh.channel())
        .list_files(authed(pb::ListFilesRequest::default(), "garbage"))
        .await;
    assert!(denied.is_err());
    let text = scrape(&mesh).await?;
    assert!(
        sample(
            &text,
            "stowage_rpc_requests_total",
            &["method=\"ListFiles\"", "code=\"UNAUTHENTICATED\""]
        )
        .is_some(),
        "status code label"
    );

    // The health detail answers at /health too, as at /healthz.
    for path in ["healthz", "health"] {
        let detail: serde_json::Value = reqwest::get(format!("http://{}/{path}", mesh.addr))
            .await?
            .json()
            .await?;
        assert_eq!(detail["status"], "serving", "/{path}: {detail}");
    }

    // Room on the local-disk store, as the filesystem reports it.
    let (available, capacity) = (
        sample(&text, "stowage_store_available_bytes", &[]),
        sample(&text, "stowage_store_capacity_bytes", &[]),
    );
    let blob_dir = setup.blob_dir.as_ref().expect("a local store").path();
    let space = stowage_blob::space(blob_dir).expect("statvfs");
    assert_eq!(capacity, Some(space.total as f64));
    assert!(
        available.is_some_and(|a| a > 0.0 && a <= space.total as f64),
        "{available:?} of {capacity:?}"
    );

    // An upload: bytes in, a file.created published by the outbox relay, lag back to 0.
    let received = sample(&text, "stowage_rpc_received_bytes_total", &[]).unwrap_or(0.0);
    // A picture of noise (over 300 KB), so Media has work to do with it.
    let noise = image::RgbaImage::from_raw(250, 300, random_bytes(250 * 300 * 4))
        .expect("a buffer of the image's size");
    let mut picture = std::io::Cursor::new(Vec::new());
    noise.write_to(&mut picture, image::ImageFormat::Png)?;
    upload(mesh.channel(), &alice, "a.png", picture.get_ref(), &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&mesh).await?;
        let published = sample(
            &text,
            "stowage_events_published_total",
            &["topic=\"file.created\""],
        );
        let pending = sample(&text, "stowage_outbox_pending", &["schema=\"files\""]);
        if published.is_some_and(|n| n >= 1.0) && pending == Some(0.0) {
            assert!(
                sample(&text, "stowage_rpc_received_bytes_total", &[])
                    .is_some_and(|n| n >= received + 300_000.0),
                "bytes in"
            );
            assert!(sample(&text, "stowage_outbox_lag_seconds", &["schema=\"files\""]).is_some());
            assert!(
                sample(&text, "stowage_dependency_up", &["dependency=\"postgres\""]) == Some(1.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "file.created not published: {published:?} {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Media consumed the event and ran the job: consumer lag, jobs processed, queue depth.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = scrape(&mesh).await?;
        let media = ["queue=\"media\"", "kind=\"media.process\""];
        let processed = sample(&text, "stowage_jobs_processed_total", &media);
        let consumed = sample(
            &text,
            "stowage_events_consumed_total",
            &["group=\"media\"", "topic=\"file.created\""],
        );
        // Workers refresh the depth gauges every few seconds.
        let depth = sample(
            &text,
            "stowage_queue_depth",
            &["queue=\"media\"", "state=\"succeeded\""],
        );
        if processed.is_some_and(|n| n >= 1.0)
            && consumed.is_some_and(|n| n >= 1.0)
            && depth.is_some_and(|n| n >= 1.0)
        {
            assert!(
                sample(&text, "stowage_events_consumer_lag", &["group=\"media\""]).is_some(),
                "consumer lag"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Media did not process: {processed:?} {consumed:?} {depth:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Bytes out: a download's bytes are counted as sent.
    let text = scrape(&mesh).await?;
    let downloads = ["method=\"Download\""];
    let sent = sample(&text, "stowage_rpc_sent_bytes_total", &downloads).unwrap_or(0.0);
    let file = upload(mesh.channel(), &alice, "b.bin", &random_bytes(200_000), &[]).await?;
    download(mesh.channel(), &alice, &file.id, None).await?;
    let text = scrape(&mesh).await?;
    assert!(
        sample(&text, "stowage_rpc_sent_bytes_total", &downloads)
            .is_some_and(|n| n >= sent + 200_000.0),
        "bytes out"
    );

    // A file Media cannot read fails its job for good: a failed attempt, a dead letter, and
    // the queue's dead state counts it.
    upload(
        mesh.channel(),
        &alice,
        "bad.jpg",
        &random_bytes(50_000),
        &[],
    )
    .await?;
    let media = ["queue=\"media\"", "kind=\"media.process\""];
    eventually(
        Duration::from_secs(20),
        "a dead media job counted",
        || async {
            let text = scrape(&mesh).await?;
            Ok(
                sample(&text, "stowage_jobs_failed_total", &media).is_some_and(|n| n >= 1.0)
                    && sample(&text, "stowage_jobs_dead_total", &media).is_some_and(|n| n >= 1.0)
                    && sample(
                        &text,
                        "stowage_queue_depth",
                        &["queue=\"media\"", "state=\"dead\""],
                    )
                    .is_some_and(|n| n >= 1.0),
            )
        },
    )
    .await?;

    // A clean-up run is counted per task and outcome.
    let runs = ["task=\"orphan_uploads\"", "outcome=\"ok\""];
    let before = sample(&scrape(&mesh).await?, "stowage_cleanup_runs_total", &runs).unwrap_or(0.0);
    LifecycleClient::new(mesh.channel())
        .run_now(authed(
            pb::RunNowRequest {
                name: "orphan_uploads".into(),
                dry_run: false,
            },
            &token("root", &["admin"]),
        ))
        .await?;
    let text = scrape(&mesh).await?;
    // At least one more: the schedule may have run it too meanwhile.
    assert!(
        sample(&text, "stowage_cleanup_runs_total", &runs).is_some_and(|n| n >= before + 1.0),
        "clean-up runs"
    );
    // Every metric the shipped alerts and dashboard use is one this process exports (a
    // renamed metric would leave an alert that never fires), but for those that appear only
    // with trouble.
    let only_with_trouble = [
        // Set by a usage reconciliation run.
        "stowage_usage_drift_bytes",
        "stowage_usage_reconciled_timestamp_seconds",
        // Counted when the virus scanner does not answer.
        "stowage_media_scan_unavailable_total",
        // Counted when new signatures find a file that scanned clean (media_scan's re-scans).
        "stowage_media_rescans_found_total",
        // Counted when a consumer cannot read its streams.
        "stowage_events_read_failures_total",
    ];
    let shipped = ["alerts.yaml", "dashboard.json"]
        .map(|f| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../k8s/monitoring")
                .join(f)
        })
        .map(std::fs::read_to_string);
    for file in shipped {
        let file = file?;
        // Prometheus sets `job` (the scrape job) on every series and renames a `job` of ours:
        // an expression that groups or selects by it never means one of our labels.
        for job in ["by (job", "job)", "{job=", ", job", "{{job}}", "labels.job"] {
            assert!(
                !file.contains(job),
                "k8s/monitoring uses the label job ({job})"
            );
        }
        let mut rest = file.as_str();
        while let Some(at) = rest.find("stowage_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            let name = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(&name);
            if only_with_trouble.contains(&name) || name == "stowage_dashboard" {
                continue;
            }
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} is used by k8s/monitoring but not exported"
            );
        }
    }
    mesh.stop().await
}

/// The bytes stored and held over every account are gauges, read by Quota's process when it
/// starts and every minute after.
#[tokio::test]
async fn bytes_stored_and_held_are_gauges() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let (alice, bob) = (token("alice", &[]), token("bob", &[]));
    upload(mesh.channel(), &alice, "a.bin", &random_bytes(70_000), &[]).await?;
    upload(mesh.channel(), &bob, "b.bin", &random_bytes(30_000), &[]).await?;
    stowage_integration_tests::create_session(mesh.channel(), &bob, "c.bin", Some(5_000), "")
        .await?;
    mesh.stop().await?;
    // A process started now reads them at once.
    let mesh = Mesh::start(&setup).await?;
    eventually(Duration::from_secs(30), "usage gauges", || async {
        let text = scrape(&mesh).await?;
        Ok(
            sample(&text, "stowage_stored_bytes", &[]) == Some(100_000.0)
                && sample(&text, "stowage_reserved_bytes", &[]) == Some(5_000.0)
                && sample(&text, "stowage_quota_accounts", &[]) == Some(2.0),
        )
    })
    .await?;
    mesh.stop().await
}

/// Made-up paths do not make metric series (kept for the life of the process): a gRPC call to
/// no method is `unknown`, an HTTP request no route serves is `/other`, an invented verb is
/// `OTHER`.
#[tokio::test]
async fn invented_paths_make_no_new_series() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let http = reqwest::Client::new();
    for i in 0..3 {
        http.post(format!("http://{}/stowage.v1.Files/Invented{i}", mesh.addr))
            .header("content-type", "application/grpc")
            .send()
            .await?;
        http.get(format!("http://{}/invented-{i}/x", mesh.addr))
            .send()
            .await?;
        http.request(
            reqwest::Method::from_bytes(format!("INVENT{i}").as_bytes())?,
            format!("http://{}/healthz", mesh.addr),
        )
        .send()
        .await?;
    }
    let text = scrape(&mesh).await?;
    assert!(!text.contains("Invented"), "{text}");
    assert!(!text.contains("invented-"), "{text}");
    assert!(!text.contains("INVENT"), "{text}");
    assert!(
        sample(&text, "stowage_rpc_requests_total", &["method=\"unknown\""])
            .is_some_and(|n| n >= 3.0)
    );
    assert!(
        sample(
            &text,
            "stowage_rpc_requests_total",
            &["method=\"GET /other\""]
        )
        .is_some_and(|n| n >= 3.0)
    );
    mesh.stop().await
}

/// On the API's port, what operators read is for this machine alone: through a proxy (or
/// from elsewhere) `/metrics` is refused, saying how to scrape it, and `/healthz` shows its
/// status without the checks' detail (database errors, whether rate limits are off).
#[tokio::test]
async fn metrics_and_health_detail_stay_on_this_machine() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start(&setup).await?;
    let client = reqwest::Client::new();
    let url = |path: &str| format!("http://{}{path}", mesh.addr);

    let local = client.get(url("/metrics")).send().await?;
    assert_eq!(local.status(), 200);
    assert!(local.text().await?.contains("stowage_rpc_requests_total"));
    for (header, value) in [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
    ] {
        let proxied = client
            .get(url("/metrics"))
            .header(header, value)
            .send()
            .await?;
        assert_eq!(proxied.status(), 403, "{header}");
        assert!(proxied.text().await?.contains("STOWAGE_METRICS_ADDR"));
    }

    let health: serde_json::Value = client.get(url("/healthz")).send().await?.json().await?;
    assert!(
        health["checks"].as_object().is_some_and(|c| !c.is_empty()),
        "{health}"
    );
    let proxied = client
        .get(url("/healthz"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await?;
    assert_eq!(proxied.status(), 200);
    let proxied: serde_json::Value = proxied.json().await?;
    assert_eq!(
        proxied
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>()),
        Some(vec!["status".to_owned()]),
        "{proxied}"
    );
    assert!(proxied["status"].is_string());
    mesh.stop().await
}
