//! One listener for everything a process serves: the Stowage gRPC services (behind auth),
//! grpc.health.v1, reflection, grpc-web with CORS, and plain HTTP routes (signed downloads).

use std::{convert::Infallible, time::Duration};

use http::{HeaderName, HeaderValue, Method};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder, interceptor::InterceptedService},
    transport::{Server, server::TcpConnectInfo},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tonic_web::GrpcWebLayer;
use tower::{Layer, Service};
use tower_http::cors::{AllowOrigin, CorsLayer};

use stowage_ratelimit::{
    Limiter, RateLimitLayer, Subject, classify_grpc_path, classify_http, client_ip,
};

use crate::{auth::Verifier, config::ConnectionsConfig, tasks::Background};

/// Errors of serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Reflection could not be built from the descriptor sets.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A CORS origin is not a valid header value.
    #[error("STOWAGE_CORS_ORIGINS: invalid origin {0:?}")]
    Cors(String),
}

/// Longest wait for one dependency's answer to a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// What a readiness probe depends on.
#[derive(Clone)]
pub enum Dependency {
    /// A PostgreSQL pool.
    Postgres(deadpool_postgres::Pool),
    /// A Redis client.
    Redis(fred::clients::Client),
}

impl Dependency {
    /// Answers within [`CHECK_TIMEOUT`]: a dependency that stopped answering (packets dropped
    /// after a failover) is down, not a probe that hangs on the last state.
    async fn check(&self) -> Result<(), String> {
        let check = async {
            match self {
                Self::Postgres(pool) => stowage_db_ping(pool).await,
                Self::Redis(client) => crate::redis::ping(client).await.map_err(|e| e.to_string()),
            }
        };
        tokio::time::timeout(CHECK_TIMEOUT, check)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {CHECK_TIMEOUT:?}")))
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "postgres",
            Self::Redis(_) => "redis",
        }
    }

    /// Whether the services cannot serve without it.
    fn required(&self) -> bool {
        match self {
            Self::Postgres(_) => true,
            Self::Redis(_) => false,
        }
    }
}

/// A part that can be degraded without stopping the service (e.g. a rate limiter failing
/// open): `check` returns why, or `None` when all is well.
pub struct DegradedProbe {
    /// Name shown in `/healthz`.
    pub name: &'static str,
    /// The check.
    pub check: Box<dyn Fn() -> Option<String> + Send + Sync>,
}

/// `GET /metrics` in the Prometheus text format.
pub fn metrics_routes() -> axum::Router {
    stowage_telemetry::install_recorder();
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                stowage_telemetry::render_metrics(),
            )
        }),
    )
}

/// `GET /metrics` on the port that serves the API (no `STOWAGE_METRICS_ADDR`): for this
/// machine alone (loopback, no proxy headers). The series name users (their consumer groups),
/// the store's capacity and free space, what fails and how often; others get 403 saying how
/// to scrape from elsewhere.
pub fn public_metrics_routes() -> axum::Router {
    stowage_telemetry::install_recorder();
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(
            |connect: Option<axum::Extension<TcpConnectInfo>>, headers: http::HeaderMap| async move {
                use axum::response::IntoResponse;
                if !from_this_machine(connect.as_ref().map(|c| &c.0), &headers) {
                    return (
                        http::StatusCode::FORBIDDEN,
                        "metrics are served on this port to this machine only; set \
                         STOWAGE_METRICS_ADDR to scrape them from elsewhere\n",
                    )
                        .into_response();
                }
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    stowage_telemetry::render_metrics(),
                )
                    .into_response()
            },
        ),
    )
}

/// Whether a request to the API's port comes from this machine itself and not through a
/// proxy (which may be on this machine too): what operators read (metrics, the detail of
/// `/healthz`) is shown there only to such callers. A proxy that says nothing of itself (a
/// TCP forwarder) cannot be told apart: `STOWAGE_METRICS_ADDR` is the way behind one.
fn from_this_machine(connect: Option<&TcpConnectInfo>, headers: &http::HeaderMap) -> bool {
    // `::ffff:127.0.0.1` on a dual-stack listener is loopback too.
    let loopback = connect
        .and_then(TcpConnectInfo::remote_addr)
        .is_some_and(|addr| addr.ip().to_canonical().is_loopback());
    let proxied = [
        "x-forwarded-for",
        "forwarded",
        "x-real-ip",
        "via",
        "x-forwarded-host",
    ]
    .iter()
    .any(|name| headers.contains_key(*name));
    loopback && !proxied
}

/// Serves [`metrics_routes`] alone on `listener` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, metrics_routes())
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn stowage_db_ping(pool: &deadpool_postgres::Pool) -> Result<(), String> {
    let conn = pool.get().await.map_err(|e| e.to_string())?;
    conn.simple_query("SELECT 1")
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Collects services and routes, then serves them on one listener.
pub struct GrpcServer {
    routes: RoutesBuilder,
    http: axum::Router,
    names: Vec<&'static str>,
    health: HealthReporter,
    verifier: Verifier,
    cors_origins: Vec<String>,
    grace: Duration,
    grpc_limit: RateLimitLayer,
    http_limit: RateLimitLayer,
    connections: ConnectionsConfig,
}

/// Every gRPC method a Stowage process may serve (`package.Service/Method`), from the
/// descriptors it is built with: the metric labels of calls.
fn grpc_methods() -> Vec<String> {
    use prost::Message;
    let reflection = [
        "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    [
        stowage_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ]
    .into_iter()
    .filter_map(|bytes| prost_types::FileDescriptorSet::decode(bytes).ok())
    .flat_map(|set| set.file)
    .flat_map(|file| {
        let package = file.package().to_owned();
        file.service.into_iter().flat_map(move |service| {
            let prefix = format!("{package}.{}", service.name());
            service
                .method
                .into_iter()
                .map(move |m| format!("{prefix}/{}", m.name()))
        })
    })
    .chain(reflection.map(str::to_owned))
    .collect()
}

impl GrpcServer {
    /// A server that authenticates Stowage calls with `verifier`.
    pub fn new(verifier: Verifier, cors_origins: Vec<String>, grace: Duration) -> Self {
        let (health, health_service) = tonic_health::server::health_reporter();
        let mut routes = RoutesBuilder::default();
        // grpc-web is enabled per gRPC service, not for the whole server: it answers 400 to any
        // HTTP/1 request that is not grpc-web, which would break the plain HTTP routes.
        routes.add_service(GrpcWebLayer::new().layer(health_service));
        Self {
            routes,
            http: axum::Router::new(),
            names: Vec::new(),
            health,
            verifier,
            cors_origins,
            grace,
            grpc_limit: RateLimitLayer::disabled(),
            http_limit: RateLimitLayer::disabled(),
            connections: ConnectionsConfig::default(),
        }
    }

    /// Connections taken at once and HTTP/2 windows.
    pub fn with_connections(&mut self, connections: ConnectionsConfig) -> &mut Self {
        self.connections = connections;
        self
    }

    /// The health reporter, to mark services serving or not.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Limits calls with `limiter`: gRPC calls per user and per client IP (after
    /// authentication; calls between services are not limited), plain HTTP routes per client
    /// IP. Call before adding services and routes.
    pub fn limit_rate(&mut self, limiter: Limiter, tus_path: &str) -> &mut Self {
        let trusted = limiter.limits().trusted_proxies;
        self.grpc_limit = RateLimitLayer::new(limiter.clone(), move |parts| {
            let identity = parts.extensions.get::<crate::Identity>()?;
            if identity.service {
                return None;
            }
            let mut subjects = vec![Subject::User(identity.user_id.clone())];
            subjects.extend(client_ip(parts, trusted).map(Subject::Ip));
            Some((classify_grpc_path(parts.uri.path()), subjects))
        });
        let tus_path = tus_path.to_owned();
        self.http_limit = RateLimitLayer::new(limiter, move |parts| {
            let class = classify_http(&parts.method, parts.uri.path(), &tus_path)?;
            Some((
                class,
                client_ip(parts, trusted)
                    .map(Subject::Ip)
                    .into_iter()
                    .collect(),
            ))
        });
        self
    }

    /// Adds a Stowage service behind the auth interceptor.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes
            .add_service(GrpcWebLayer::new().layer(InterceptedService::new(
                self.grpc_limit.layer(service),
                self.verifier.interceptor(),
            )));
        self
    }

    /// Adds plain HTTP routes (they do their own authentication).
    pub fn merge_http(&mut self, router: axum::Router) -> &mut Self {
        self.http = std::mem::take(&mut self.http).merge(router.layer(self.http_limit.clone()));
        self
    }

    /// Names of the Stowage services added so far.
    pub fn service_names(&self) -> &[&'static str] {
        &self.names
    }

    /// Keeps each service's health status in step with its dependencies and serves the
    /// detail at `GET /healthz` (JSON). PostgreSQL is required: while it does not answer the
    /// services are NOT_SERVING. Redis and the `degraded` probes only degrade: the services
    /// keep serving (Redis holds nothing that cannot be rebuilt) and `/healthz` says what is
    /// missing, as does the `stowage_dependency_up` gauge.
    pub fn watch_readiness(
        &mut self,
        background: &Background,
        dependencies: Vec<Dependency>,
        degraded: Vec<DegradedProbe>,
    ) {
        let health = self.health.clone();
        let names = self.names.clone();
        let shutdown = background.shutdown().clone();
        let detail = std::sync::Arc::new(std::sync::RwLock::new(serde_json::json!({
            "status": "starting"
        })));
        let shown = std::sync::Arc::clone(&detail);
        // The status for anyone (load balancers, uptime checks); the checks' detail (errors
        // of the database and Redis, whether rate limits are off, free space) for this
        // machine only.
        let show = move |connect: Option<axum::Extension<TcpConnectInfo>>,
                         headers: http::HeaderMap| {
            let shown = std::sync::Arc::clone(&shown);
            async move {
                let mut body = shown.read().map(|d| d.clone()).unwrap_or_default();
                let code = if body["status"] == "not_serving" || body["status"] == "starting" {
                    http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    http::StatusCode::OK
                };
                if !from_this_machine(connect.as_ref().map(|c| &c.0), &headers) {
                    body = serde_json::json!({ "status": body["status"] });
                }
                (code, axum::Json(body))
            }
        };
        // `/health` too, where load balancers and uptime checks look by default.
        self.http = std::mem::take(&mut self.http)
            .route("/healthz", axum::routing::get(show.clone()))
            .route("/health", axum::routing::get(show));
        background.spawn("readiness", async move {
            let mut last: Option<bool> = None;
            let mut last_problems: Vec<String> = Vec::new();
            loop {
                let mut ready = !shutdown.is_cancelled();
                let mut checks = serde_json::Map::new();
                let mut problems = Vec::new();
                for dependency in &dependencies {
                    let result = dependency.check().await;
                    metrics::gauge!("stowage_dependency_up", "dependency" => dependency.name())
                        .set(if result.is_ok() { 1.0 } else { 0.0 });
                    let state = match result {
                        Ok(()) => "up".to_owned(),
                        Err(error) => {
                            if dependency.required() {
                                ready = false;
                            }
                            problems.push(format!("{}: {error}", dependency.name()));
                            format!("down: {error}")
                        }
                    };
                    checks.insert(dependency.name().to_owned(), state.into());
                }
                for probe in &degraded {
                    let state = match (probe.check)() {
                        None => "ok".to_owned(),
                        Some(why) => {
                            problems.push(format!("{}: {why}", probe.name));
                            format!("degraded: {why}")
                        }
                    };
                    checks.insert(probe.name.to_owned(), state.into());
                }
                let status = match (ready, problems.is_empty()) {
                    (false, _) => "not_serving",
                    (true, true) => "serving",
                    (true, false) => "degraded",
                };
                if let Ok(mut d) = detail.write() {
                    *d = serde_json::json!({ "status": status, "checks": checks });
                }
                if problems != last_problems {
                    for problem in problems.iter().filter(|p| !last_problems.contains(p)) {
                        tracing::warn!(problem, "dependency check failed");
                    }
                    last_problems = problems;
                }
                if last != Some(ready) {
                    let status = if ready {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    for name in &names {
                        health.set_service_status(name, status).await;
                    }
                    last = Some(ready);
                }
                let healthy = ready && last_problems.is_empty();
                tokio::select! {
                    () = shutdown.cancelled() => {
                        for name in &names {
                            health.set_service_status(name, ServingStatus::NotServing).await;
                        }
                        return;
                    }
                    () = tokio::time::sleep(Duration::from_secs(if healthy { 5 } else { 1 })) => {}
                }
            }
        });
    }

    /// Serves until `shutdown`, then lets in-flight calls finish for at most the grace period.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServerError> {
        let mut reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(stowage_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1.ServerReflection");
        for name in &self.names {
            reflection = reflection.with_service_name(*name);
        }
        let mut reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(stowage_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name("grpc.health.v1.Health")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for name in &self.names {
            reflection_alpha = reflection_alpha.with_service_name(*name);
        }
        self.routes
            .add_service(GrpcWebLayer::new().layer(reflection.build_v1()?));
        self.routes
            .add_service(GrpcWebLayer::new().layer(reflection_alpha.build_v1alpha()?));

        let router = self
            .routes
            .routes()
            .prepare()
            .into_axum_router()
            .merge(self.http);
        let routes = Routes::from(router);
        let cors = cors_layer(&self.cors_origins)?;

        let builder = Server::builder()
            .accept_http1(true)
            .tcp_nodelay(true)
            .initial_stream_window_size(window(self.connections.stream_window))
            .initial_connection_window_size(window(self.connections.connection_window))
            .max_frame_size(MAX_FRAME)
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)));
        let drain = shutdown.clone();
        let server = builder
            .layer(tower::util::option_layer(cors))
            .layer(stowage_telemetry::RpcTelemetryLayer::new(grpc_methods()))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                crate::incoming::limited(
                    listener,
                    self.connections.max,
                    self.connections.per_address,
                ),
                async move {
                    drain.cancelled().await;
                },
            );
        let grace = self.grace;
        tokio::pin!(server);
        tokio::select! {
            result = &mut server => Ok(result?),
            () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(grace = ?grace, "in-flight calls did not finish in time, closing");
                Ok(())
            }
        }
    }
}

/// An HTTP/2 window setting (validated to fit with the configuration).
fn window(size: crate::config::ByteSize) -> u32 {
    u32::try_from(size.as_u64()).unwrap_or(u32::MAX >> 1)
}

/// Largest HTTP/2 frame a client may send (the default is 16 KiB): fewer frames per chunk.
const MAX_FRAME: u32 = 1 << 20;

fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, ServerError> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| ServerError::Cors(o.clone())))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    let header = HeaderName::from_static;
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([
                Method::GET,
                Method::POST,
                Method::PATCH,
                Method::HEAD,
                Method::DELETE,
                Method::OPTIONS,
            ])
            .allow_headers([
                header("authorization"),
                header("content-type"),
                header("x-grpc-web"),
                header("x-user-agent"),
                header("grpc-timeout"),
                header("range"),
                header("tus-resumable"),
                header("upload-length"),
                header("upload-offset"),
                header("upload-metadata"),
                header("upload-checksum"),
                header("upload-defer-length"),
                header("x-http-method-override"),
            ])
            .expose_headers([
                header("grpc-status"),
                header("grpc-message"),
                header("grpc-status-details-bin"),
                header("content-range"),
                header("etag"),
                header("location"),
                header("upload-offset"),
                header("upload-length"),
                header("upload-metadata"),
                header("upload-defer-length"),
                header("upload-expires"),
                header("tus-resumable"),
                header("tus-version"),
                header("tus-extension"),
                header("tus-max-size"),
                header("tus-checksum-algorithm"),
                header("retry-after"),
                header("content-disposition"),
            ])
            .max_age(Duration::from_secs(3600)),
    ))
}
