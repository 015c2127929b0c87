//! grpc-web over HTTP/1.1, as a browser sends it, with CORS for a configured origin.

use prost::Message;
use stowage_proto::v1 as pb;
use stowage_testkit::{Mesh, Setup, token};

/// One grpc-web data frame around `message`.
fn frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut out = vec![0u8];
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Splits a grpc-web response body into its data message and its trailers.
fn unframe(mut body: &[u8]) -> (Vec<u8>, String) {
    let (mut data, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let flag = body[0];
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let payload = &body[5..5 + len];
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(payload));
        } else {
            data.extend_from_slice(payload);
        }
        body = &body[5 + len..];
    }
    (data, trailers)
}

#[tokio::test]
async fn grpc_web_unary_calls_work_with_cors() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = Mesh::start_with(&setup, |c| {
        c.cors_origins = vec!["https://app.example".into()]
    })
    .await?;
    let url = format!("http://{}/stowage.v1.Quota/GetUsage", mesh.addr);
    let http = reqwest::Client::builder().http1_only().build()?;

    let preflight = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web",
        )
        .send()
        .await?;
    assert!(preflight.status().is_success());
    assert_eq!(
        preflight
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes().to_vec()),
        Some(b"https://app.example".to_vec())
    );
    let foreign = http
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .send()
        .await?;
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    let response = http
        .post(&url)
        .header("origin", "https://app.example")
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {}", token("webuser", &[])))
        .body(frame(&pb::GetUsageRequest::default()))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await?;
    let (data, trailers) = unframe(&body);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let usage = pb::GetUsageResponse::decode(data.as_slice())?;
    let account = usage.account.unwrap_or_default();
    assert_eq!(account.user_id, "webuser");
    assert_eq!(account.limit_bytes, 10 << 30);

    // Without a token the same call is UNAUTHENTICATED (grpc-status 16).
    let response = http
        .post(&url)
        .header("content-type", "application/grpc-web+proto")
        .body(frame(&pb::GetUsageRequest::default()))
        .send()
        .await?;
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_else(String::new);
    let body = response.bytes().await?;
    let (_, trailers) = unframe(&body);
    assert!(
        status == "16" || trailers.contains("grpc-status:16"),
        "status {status:?}, trailers {trailers:?}"
    );
    mesh.stop().await
}

/// Events from a browser: PutEvents over grpc-web stores a frame, drops one sent again, names
/// a refused field as the request holds it, and a consumer gets every event once.
#[tokio::test]
async fn grpc_web_puts_event_frames() -> anyhow::Result<()> {
    let setup = Setup::new().await?;
    let mesh = crate::streams::half_second_windows(&setup, 0).await?;
    let http = reqwest::Client::builder().http1_only().build()?;
    let web = token("webuser", &[]);
    let url = format!("http://{}/stowage.v1.Ingest/PutEvents", mesh.addr);
    let put = |frame: pb::AppendEventsRequest| {
        let request = http
            .post(&url)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
            .header("authorization", format!("Bearer {web}"))
            .body(self::frame(&pb::PutEventsRequest { frame: Some(frame) }));
        async move {
            let response = request.send().await?;
            assert_eq!(response.status(), 200);
            // A refusal comes in the headers alone (trailers-only) or in the trailers.
            let headers: String = ["grpc-status", "grpc-message"]
                .iter()
                .filter_map(|h| {
                    let value = response.headers().get(*h)?.to_str().ok()?;
                    Some(format!("{h}:{value}\r\n"))
                })
                .collect();
            let (data, trailers) = unframe(&response.bytes().await?);
            anyhow::Ok((data, headers + &trailers))
        }
    };
    for ((first, last), durable) in [((1, 3), 3), ((4, 6), 6), ((1, 3), 6)] {
        let (data, trailers) = put(crate::streams::frame("clicks", first, last)).await?;
        assert!(trailers.contains("grpc-status:0"), "{trailers}");
        let answer = pb::PutEventsResponse::decode(data.as_slice())?;
        assert_eq!(answer.durable_seq, durable, "after seqs {first}..={last}");
    }
    let (_, trailers) = put(crate::streams::frame("clicks", 0, 1)).await?;
    assert!(
        trailers.contains("grpc-status:3") && trailers.contains("frame.first_seq"),
        "{trailers}"
    );
    let want = [("clicks".to_owned(), 6)].into();
    let (seqs, _) = crate::streams::drain(mesh.channel(), &web, "web", "", &want).await?;
    assert_eq!(seqs["clicks"], (1..=6).collect::<Vec<u64>>());
    mesh.stop().await
}
