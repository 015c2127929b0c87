//! The layer wired as `server.rs` wires services (inside the auth interceptor, under
//! grpc-web), served on 127.0.0.1 and called by a real gRPC client and a raw HTTP/1.1 client.

mod common;

use std::{
    convert::Infallible,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use axum::routing::get;
use fred::prelude::KeysInterface;
use futures::future::BoxFuture;
use http::uri::PathAndQuery;
use stowage_local::LocalRedis;
use stowage_ratelimit::{
    Class, Limiter, RateLimitLayer, Rule, Subject, classify_grpc_path, classify_http, client_ip,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Code, Status,
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder, interceptor::InterceptedService},
    transport::{Channel, Server},
};
use tonic_prost::ProstCodec;
use tower::{Layer, Service, ServiceExt};

/// What the test's auth interceptor attaches, as the real one attaches `Identity`.
#[derive(Clone)]
struct Caller(String);

/// Stands for a Stowage service: answers every unary call with an empty message.
#[derive(Clone)]
struct Files;

impl NamedService for Files {
    const NAME: &'static str = "stowage.v1.Files";
}

impl Service<http::Request<Body>> for Files {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<http::Response<Body>, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            let reply = tower::service_fn(|_: tonic::Request<()>| async {
                Ok::<_, Status>(tonic::Response::new(()))
            });
            let mut grpc = tonic::server::Grpc::new(ProstCodec::<(), ()>::default());
            Ok(grpc.unary(reply, request).await)
        })
    }
}

/// Who a gRPC call counts against: the authenticated caller and its address.
fn grpc_subjects(parts: &http::request::Parts) -> Option<(Class, Vec<Subject>)> {
    let mut subjects = Vec::new();
    if let Some(caller) = parts.extensions.get::<Caller>() {
        subjects.push(Subject::User(caller.0.clone()));
    }
    subjects.extend(client_ip(parts, 0).map(Subject::Ip));
    Some((classify_grpc_path(parts.uri.path()), subjects))
}

/// Who a plain HTTP request counts against: its address.
fn http_subjects(parts: &http::request::Parts) -> Option<(Class, Vec<Subject>)> {
    let class = classify_http(&parts.method, parts.uri.path(), "/tus")?;
    Some((class, vec![Subject::Ip(client_ip(parts, 0)?)]))
}

/// Serves `Files` and a signed-download route the way `GrpcServer` assembles them.
async fn serve(limiter: &Limiter) -> SocketAddr {
    let interceptor = |mut request: tonic::Request<()>| {
        let user = request
            .metadata()
            .get("x-test-user")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| Status::unauthenticated("no user"))?;
        request.extensions_mut().insert(Caller(user));
        Ok(request)
    };
    let grpc_limit = RateLimitLayer::new(limiter.clone(), grpc_subjects);
    let mut routes = RoutesBuilder::default();
    routes.add_service(
        tonic_web::GrpcWebLayer::new().layer(InterceptedService::new(
            grpc_limit.layer(Files),
            interceptor,
        )),
    );
    let http = axum::Router::new()
        .route("/v1/blobs/{id}", get(|| async { "file bytes" }))
        .layer(RateLimitLayer::new(limiter.clone(), http_subjects));
    let router = routes.routes().prepare().into_axum_router().merge(http);

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local address");
    tokio::spawn(
        Server::builder()
            .accept_http1(true)
            .add_routes(Routes::from(router))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    addr
}

async fn grpc_call(
    channel: &Channel,
    user: &str,
    path: &'static str,
) -> Result<tonic::Response<()>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.expect("channel ready");
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("x-test-user", user.parse().expect("ascii user name"));
    grpc.unary(
        request,
        PathAndQuery::from_static(path),
        ProstCodec::<(), ()>::default(),
    )
    .await
}

/// A bare HTTP/1.1 GET: the status code and the `Retry-After` header.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, Option<String>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("read response");
    let mut lines = response.lines();
    let status = lines
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let retry_after = lines
        .take_while(|line| !line.is_empty())
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))
        .map(|(_, value)| value.trim().to_owned());
    (status, retry_after)
}

#[tokio::test]
async fn over_the_limit_grpc_gets_resource_exhausted_and_http_gets_429_with_retry_after() {
    let redis = common::redis().await;
    let client = common::client(&redis.url).await;
    // Users: 3 calls, then one per 10 s. Addresses: 2 calls, then one per 10 s; but the
    // gRPC calls below never exhaust the address first.
    let mut limits = common::limits(Rule::new(0.1, 3), Rule::new(0.1, 10), true);
    limits.ip.download = Rule::new(0.1, 2);
    let limiter = Limiter::with_prefix(client.clone(), limits, common::prefix());
    let addr = serve(&limiter).await;
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    for _ in 0..3 {
        grpc_call(&channel, "alice", "/stowage.v1.Files/ListFiles")
            .await
            .expect("calls within the burst reach the service");
    }
    let status = grpc_call(&channel, "alice", "/stowage.v1.Files/ListFiles")
        .await
        .expect_err("the fourth list call is over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("list"), "{}", status.message());
    let retry_after: u64 = status
        .metadata()
        .get("retry-after")
        .expect("retry-after metadata")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=10).contains(&retry_after), "retry-after {retry_after}");
    // Another class and another user are untouched.
    grpc_call(&channel, "alice", "/stowage.v1.Files/GetFile")
        .await
        .expect("GetFile has its own bucket");
    grpc_call(&channel, "bob", "/stowage.v1.Files/ListFiles")
        .await
        .expect("bob has his own bucket");
    // The classifier saw the interceptor's identity and the peer address.
    let touched: i64 = client
        .exists(vec![
            limiter.key(Class::List, &Subject::User("alice".into())),
            limiter.key(Class::List, &Subject::Ip(IpAddr::V4(Ipv4Addr::LOCALHOST))),
        ])
        .await
        .unwrap();
    assert_eq!(touched, 2);

    assert_eq!(http_get(addr, "/v1/blobs/f1").await, (200, None));
    assert_eq!(http_get(addr, "/v1/blobs/f1").await, (200, None));
    let (status, retry_after) = http_get(addr, "/v1/blobs/f1").await;
    assert_eq!(status, 429);
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=10).contains(&retry_after), "Retry-After {retry_after}");
}

/// A service that only says it was reached.
fn reached() -> impl Service<
    http::Request<Body>,
    Response = http::Response<Body>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|_: http::Request<Body>| async {
        let mut response = http::Response::new(Body::empty());
        response
            .headers_mut()
            .insert("x-reached", http::HeaderValue::from_static("yes"));
        Ok::<_, Infallible>(response)
    })
}

fn request(path: &str, content_type: &str) -> http::Request<Body> {
    http::Request::post(path)
        .header("content-type", content_type)
        .body(Body::empty())
        .expect("request")
}

#[tokio::test]
async fn fail_closed_without_redis_answers_unavailable_and_503() {
    let redis = LocalRedis::start().await.unwrap();
    let client = common::client(&redis.url()).await;
    let limiter = Limiter::with_prefix(
        client,
        common::limits(Rule::new(1.0, 10), Rule::new(1.0, 10), false),
        common::prefix(),
    );
    redis.stop().await;
    let mut service = RateLimitLayer::new(limiter, |parts| {
        // Health checks are not limited.
        if parts.uri.path().starts_with("/grpc.health.v1.Health/") {
            return None;
        }
        Some((
            classify_grpc_path(parts.uri.path()),
            vec![Subject::User("carol".into())],
        ))
    })
    .layer(reached());

    let grpc = request("/stowage.v1.Files/GetFile", "application/grpc");
    let response = service.ready().await.unwrap().call(grpc).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["grpc-status"], "14");
    assert!(response.headers().get("x-reached").is_none());

    let plain = request("/v1/blobs/x", "application/octet-stream");
    let response = service.ready().await.unwrap().call(plain).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    assert!(response.headers().get("x-reached").is_none());
    assert!(response.headers().get("tus-resumable").is_none());

    // A tus request's refusal names the protocol's version, as tus asks of every response.
    let mut tus = request("/tus", "application/offset+octet-stream");
    tus.headers_mut()
        .insert("tus-resumable", http::HeaderValue::from_static("1.0.0"));
    let response = service.ready().await.unwrap().call(tus).await.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["tus-resumable"], "1.0.0");

    // What the classifier leaves out never waits for Redis.
    let health = request("/grpc.health.v1.Health/Check", "application/grpc");
    let response = service.ready().await.unwrap().call(health).await.unwrap();
    assert_eq!(response.headers()["x-reached"], "yes");
}

#[tokio::test]
async fn a_disabled_layer_lets_everything_through() {
    let mut service = RateLimitLayer::disabled().layer(reached());
    for _ in 0..3 {
        let call = request("/stowage.v1.Files/ListFiles", "application/grpc");
        let response = service.ready().await.unwrap().call(call).await.unwrap();
        assert_eq!(response.headers()["x-reached"], "yes");
    }
}
