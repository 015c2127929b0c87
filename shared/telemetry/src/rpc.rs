//! A tower layer around everything a server answers (gRPC, grpc-web and plain HTTP): one span
//! per call, child of the caller's W3C trace context, and the per-call metrics
//! `stowage_rpc_requests_total{service,method,code}`, `stowage_rpc_duration_seconds` and
//! `stowage_rpc_{received,sent}_bytes_total`.
//!
//! A gRPC call's outcome may only be known at the end of its response stream (in trailers),
//! so the metrics are recorded when the response body ends or is dropped.

use std::{
    collections::HashSet,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use opentelemetry::trace::TraceContextExt;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::propagation::set_parent_from_headers;

/// Adds a span and metrics to every call; see the module docs.
#[derive(Clone, Debug)]
pub struct RpcTelemetryLayer {
    known: Arc<HashSet<String>>,
}

impl RpcTelemetryLayer {
    /// Labels gRPC calls with their service and method when they are among `known`
    /// (`package.Service/Method`), and any other call as `unknown`: a caller inventing paths
    /// must not invent metric series, which are kept for the life of the process.
    pub fn new(known: impl IntoIterator<Item = String>) -> Self {
        Self {
            known: Arc::new(known.into_iter().collect()),
        }
    }
}

impl<S> Layer<S> for RpcTelemetryLayer {
    type Service = RpcTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcTelemetry {
            inner,
            known: Arc::clone(&self.known),
        }
    }
}

/// The service made by [`RpcTelemetryLayer`].
#[derive(Clone, Debug)]
pub struct RpcTelemetry<S> {
    inner: S,
    known: Arc<HashSet<String>>,
}

/// HTTP verbs named in labels; any other (an extension method) is `OTHER`.
const VERBS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Labels of a call: the gRPC service and method, or `http` and the verb and first path
/// segment (never ids, so the label set stays small).
#[derive(Clone, Debug)]
struct CallName {
    service: String,
    method: String,
    grpc: bool,
}

impl CallName {
    /// The name of `request`: a gRPC method among `known`, or `unknown`; for plain HTTP the
    /// verb and first path segment (a path no route serves is renamed once that is known, see
    /// [`CallName::unrouted`]).
    fn of(request: &Request<Body>, known: &HashSet<String>) -> Self {
        let grpc = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let path = request.uri().path().trim_start_matches('/');
        if grpc {
            return match path.split_once('/') {
                Some((service, method)) if known.contains(path) => Self {
                    service: service.to_owned(),
                    method: method.to_owned(),
                    grpc,
                },
                _ => Self {
                    service: "unknown".to_owned(),
                    method: "unknown".to_owned(),
                    grpc,
                },
            };
        }
        let first = path.split('/').next().unwrap_or("");
        Self {
            service: "http".to_owned(),
            method: format!("{} /{first}", verb(request.method())),
            grpc: false,
        }
    }

    /// The name of a plain HTTP call no route served: its verb and `/other`.
    fn unrouted(&mut self) {
        let verb = self.method.split(' ').next().unwrap_or("OTHER").to_owned();
        self.method = format!("{verb} /other");
    }
}

fn verb(method: &http::Method) -> &'static str {
    VERBS
        .into_iter()
        .find(|v| *v == method.as_str())
        .unwrap_or("OTHER")
}

impl<S> Service<Request<Body>> for RpcTelemetry<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let mut name = CallName::of(&request, &self.known);
        let span = tracing::info_span!(
            "rpc",
            otel.name = %format!("{}/{}", name.service, name.method),
            otel.kind = "server",
            rpc.service = %name.service,
            rpc.method = %name.method,
            trace_id = Empty,
        );
        set_parent_from_headers(&span, request.headers());
        let trace_id = span.context().span().span_context().trace_id();
        if trace_id != opentelemetry::trace::TraceId::INVALID {
            span.record("trace_id", tracing::field::display(trace_id));
        }
        let started = Instant::now();
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(
            parts,
            Body::new(Counted {
                inner: body,
                outcome: None,
            }),
        );
        // Swap in the clone that was driven to readiness, as tower asks.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(
            async move {
                let response = inner.call(request).await?;
                let http_status = response.status();
                // No route: the gRPC router's UNIMPLEMENTED answer to any path it does not
                // know (a route's own 404 keeps its name).
                if !name.grpc && grpc_code(response.headers()) == Some("UNIMPLEMENTED") {
                    name.unrouted();
                }
                let (parts, body) = response.into_parts();
                let mut outcome = Outcome {
                    name,
                    started,
                    code: None,
                    sent: 0,
                };
                if outcome.name.grpc {
                    outcome.code = grpc_code(&parts.headers).map(str::to_owned);
                } else {
                    outcome.code = Some(http_status.as_u16().to_string());
                }
                if !http_status.is_success() && outcome.name.grpc && outcome.code.is_none() {
                    outcome.code = Some("UNKNOWN".to_owned());
                }
                Ok(Response::from_parts(
                    parts,
                    Body::new(Counted {
                        inner: body,
                        outcome: Some(outcome),
                    }),
                ))
            }
            .instrument(span),
        )
    }
}

fn grpc_code(headers: &HeaderMap) -> Option<&'static str> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(code).description_name())
}

trait CodeName {
    fn description_name(self) -> &'static str;
}

impl CodeName for tonic::Code {
    /// The canonical upper-case name (`OK`, `NOT_FOUND`, ...), as dashboards expect.
    fn description_name(self) -> &'static str {
        use tonic::Code::*;
        match self {
            Ok => "OK",
            Cancelled => "CANCELLED",
            Unknown => "UNKNOWN",
            InvalidArgument => "INVALID_ARGUMENT",
            DeadlineExceeded => "DEADLINE_EXCEEDED",
            NotFound => "NOT_FOUND",
            AlreadyExists => "ALREADY_EXISTS",
            PermissionDenied => "PERMISSION_DENIED",
            ResourceExhausted => "RESOURCE_EXHAUSTED",
            FailedPrecondition => "FAILED_PRECONDITION",
            Aborted => "ABORTED",
            OutOfRange => "OUT_OF_RANGE",
            Unimplemented => "UNIMPLEMENTED",
            Internal => "INTERNAL",
            Unavailable => "UNAVAILABLE",
            DataLoss => "DATA_LOSS",
            Unauthenticated => "UNAUTHENTICATED",
        }
    }
}

/// What is known of a call while its response streams; recorded once, when the body ends or
/// is dropped.
struct Outcome {
    name: CallName,
    started: Instant,
    code: Option<String>,
    sent: u64,
}

impl Drop for Outcome {
    fn drop(&mut self) {
        // A gRPC response without a status by the time it is dropped was cut off.
        let code = self
            .code
            .take()
            .unwrap_or_else(|| if self.name.grpc { "CANCELLED" } else { "0" }.to_owned());
        let labels = [
            ("service", self.name.service.clone()),
            ("method", self.name.method.clone()),
        ];
        metrics::counter!("stowage_rpc_requests_total", "service" => labels[0].1.clone(), "method" => labels[1].1.clone(), "code" => code).increment(1);
        metrics::histogram!("stowage_rpc_duration_seconds", &labels)
            .record(self.started.elapsed().as_secs_f64());
        metrics::counter!("stowage_rpc_sent_bytes_total", &labels).increment(self.sent);
    }
}

pin_project_lite::pin_project! {
    /// A body that counts its bytes: received ones for requests (no outcome), sent ones and the
    /// trailers' status for responses.
    struct Counted {
        #[pin]
        inner: Body,
        outcome: Option<Outcome>,
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match (&frame, this.outcome.as_mut()) {
            (Some(Ok(frame)), Some(outcome)) => {
                if let Some(data) = frame.data_ref() {
                    outcome.sent += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(code) = grpc_code(trailers)
                {
                    outcome.code = Some(code.to_owned());
                }
            }
            (Some(Ok(frame)), None) => {
                if let Some(data) = frame.data_ref() {
                    metrics::counter!("stowage_rpc_received_bytes_total")
                        .increment(data.len() as u64);
                }
            }
            (None, Some(outcome)) if outcome.code.is_none() && outcome.name.grpc => {
                // Ended without trailers: only a trailers-only status could have said more.
                outcome.code = Some("OK".to_owned());
            }
            _ => {}
        }
        if frame.is_none() {
            // Record now rather than when the connection lets go of the body.
            drop(this.outcome.take());
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
