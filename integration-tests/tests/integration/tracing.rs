//! One upload is one trace: the caller's W3C trace context reaches Ingest, Ingest's calls
//! carry it to Quota and Files (separate processes, exporting over OTLP to a collector in the
//! test kit), and the `file.created` event carries it on to its consumers: Media's job that
//! processes the file joins the same trace.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use stowage::Role;
use stowage_events::{Consumer, ConsumerSettings, Event, EventHandler, HandlerError, topics};
use stowage_proto::v1::{self as pb, ingest_client::IngestClient, upload_request::Part};
use stowage_testkit::{OtlpCollector, Processes, RecordedSpan, Setup, authed, channel, token};
use tokio_util::sync::CancellationToken;

/// Keeps the `traceparent` of the `file.created` event of one file.
struct Watch {
    key: String,
    seen: Mutex<Option<Option<String>>>,
}

#[async_trait]
impl EventHandler for Watch {
    async fn handle(
        &self,
        event: &Event,
        _: &stowage_db::Transaction<'_>,
    ) -> Result<(), HandlerError> {
        if event.key == self.key
            && let Ok(mut seen) = self.seen.lock()
        {
            *seen = Some(event.traceparent.clone());
        }
        Ok(())
    }
}

fn ids_of<'a>(spans: &'a [RecordedSpan], service: &str) -> HashSet<&'a str> {
    spans
        .iter()
        .filter(|s| s.service == service)
        .map(|s| s.span_id.as_str())
        .collect()
}

#[tokio::test]
async fn one_upload_is_one_trace_across_processes() -> anyhow::Result<()> {
    let collector = OtlpCollector::start().await?;
    let mut setup = Setup::new().await?;
    setup.env.extend(collector.env());
    let processes = Processes::split(&setup).await?;

    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    let caller_span = &uuid::Uuid::new_v4().simple().to_string()[..16];
    // A picture, so that Media has a job to run for it.
    let mut picture = std::io::Cursor::new(Vec::new());
    image::RgbaImage::from_pixel(4, 3, image::Rgba([200, 30, 30, 255]))
        .write_to(&mut picture, image::ImageFormat::Png)?;
    let picture = picture.into_inner();
    let header = pb::UploadRequest {
        part: Some(Part::Header(pb::UploadHeader {
            size_bytes: picture.len() as u64,
            metadata: Some(pb::UploadMetadata {
                display_name: "traced.png".into(),
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })),
    };
    let data = pb::UploadRequest {
        part: Some(Part::Data(picture.into())),
    };
    let mut request = authed(futures::stream::iter([header, data]), &token("alice", &[]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{caller_span}-01").parse()?,
    );
    let file = IngestClient::new(channel(processes.addr(Role::Ingest)))
        .upload(request)
        .await?
        .into_inner()
        .file
        .expect("file");

    // The event of this file, read by a consumer group of the test's own.
    let pool = stowage_db::connect(&setup.database_url, 2)?;
    stowage_events::migrate(&pool, "probe").await?;
    let watch = Arc::new(Watch {
        key: file.id.clone(),
        seen: Mutex::new(None),
    });
    let redis = stowage_runtime::redis::connect(&setup.redis_url).await?;
    let stop = CancellationToken::new();
    let consumer = Consumer::new(
        &redis,
        pool,
        "probe",
        &format!("trace-probe-{}", uuid::Uuid::new_v4().simple()),
        &[topics::FILE_CREATED],
        Arc::clone(&watch) as Arc<dyn EventHandler>,
        ConsumerSettings {
            block: Duration::from_millis(200),
            namespace: setup.namespace(),
            ..ConsumerSettings::default()
        },
    );
    let consumer_task = tokio::spawn(consumer.run(stop.clone()));

    let deadline = Instant::now() + Duration::from_secs(30);
    let (spans, event_parent) = loop {
        let spans: Vec<RecordedSpan> = collector
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
        let services: HashSet<&str> = spans.iter().map(|s| s.service.as_str()).collect();
        let event = watch.seen.lock().map(|s| s.clone()).unwrap_or_default();
        let media_job = spans
            .iter()
            .any(|s| s.service == "stowage-media" && s.name == "job");
        let set_variants = spans
            .iter()
            .any(|s| s.service == "stowage-files" && s.name.contains("SetVariants"));
        // Each process exports on a timer of its own: a Quota or Files span can arrive before
        // the span it hangs under, which is waited for too.
        let ids: HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
        let parents_here = spans
            .iter()
            .filter(|s| s.service == "stowage-quota" || s.service == "stowage-files")
            .all(|s| ids.contains(s.parent_span_id.as_str()));
        if ["stowage-ingest", "stowage-quota", "stowage-files"]
            .iter()
            .all(|s| services.contains(s))
            && media_job
            && set_variants
            && parents_here
            && let Some(event) = event
        {
            break (spans, event);
        }
        assert!(
            Instant::now() < deadline,
            "trace incomplete after 30 s: services {services:?}, event {event:?}: {spans:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.cancel();
    consumer_task.await?;

    let ingest = ids_of(&spans, "stowage-ingest");
    let files = ids_of(&spans, "stowage-files");
    // Ingest's server span is the child of the caller's span.
    assert!(
        spans
            .iter()
            .any(|s| s.service == "stowage-ingest" && s.parent_span_id == caller_span),
        "no Ingest span under the caller's: {spans:#?}"
    );
    // Quota's and Files' spans hang under spans of the Ingest process; Files' also under the
    // Media process, whose job reads the file and records its variants, and Quota's under
    // Files, which charges those variants.
    let media = ids_of(&spans, "stowage-media");
    for service in ["stowage-quota", "stowage-files"] {
        let roots: Vec<&RecordedSpan> = spans
            .iter()
            .filter(|s| {
                s.service == service && !ids_of(&spans, service).contains(s.parent_span_id.as_str())
            })
            .collect();
        assert!(!roots.is_empty(), "{service}: no spans");
        for span in roots {
            let parent = span.parent_span_id.as_str();
            let from_media = service == "stowage-files" && media.contains(parent);
            let from_files = service == "stowage-quota" && files.contains(parent);
            assert!(
                ingest.contains(parent) || from_media || from_files,
                "{service} span {} has parent {} outside Ingest, Media and Files: {spans:#?}",
                span.name,
                span.parent_span_id
            );
        }
    }
    // Media heard the event in the same trace, and its job's run hangs under the consumer
    // span that enqueued it; the job's call back to Files (SetVariants) is in the trace too.
    let job = spans
        .iter()
        .find(|s| s.service == "stowage-media" && s.name == "job")
        .expect("job span");
    assert!(
        media.contains(job.parent_span_id.as_str()),
        "job span's parent {} is not a Media span: {spans:#?}",
        job.parent_span_id
    );
    assert!(
        spans.iter().any(|s| s.service == "stowage-files"
            && s.name.contains("SetVariants")
            && media.contains(s.parent_span_id.as_str())),
        "no Files.SetVariants span under Media: {spans:#?}"
    );
    // The event carries the context of the Files span that registered the file.
    let event_parent = event_parent.expect("file.created carries a traceparent");
    let parts: Vec<&str> = event_parent.split('-').collect();
    assert_eq!(
        parts.get(1).copied(),
        Some(trace_id.as_str()),
        "{event_parent}"
    );
    assert!(
        parts.get(2).is_some_and(|id| files.contains(id)),
        "event parent {event_parent} is not a Files span"
    );
    // Media's first span in the trace (its consumer's handling of file.created) is the child
    // of that Files span: the hop through Redis keeps the parent link, not only the trace id.
    let media_roots: Vec<&RecordedSpan> = spans
        .iter()
        .filter(|s| s.service == "stowage-media" && !media.contains(s.parent_span_id.as_str()))
        .collect();
    assert!(
        !media_roots.is_empty()
            && media_roots
                .iter()
                .all(|s| parts.get(2) == Some(&s.parent_span_id.as_str())),
        "Media spans not under the event's Files span {event_parent}: {media_roots:#?}"
    );
    Ok(())
}
