//! A tower layer that checks each call against the limiter before the service sees it: gRPC
//! calls over the limit end in RESOURCE_EXHAUSTED, plain HTTP requests in 429, both with
//! `retry-after`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header, request::Parts};
use tonic::{
    Status, metadata::MetadataValue, server::NamedService, transport::server::TcpConnectInfo,
};
use tower::{Layer, Service};

use crate::{Class, Decision, Limiter, Subject};

/// Says which class a request belongs to and whose buckets it takes from; `None` leaves the
/// request unlimited. It sees the request head after authentication, so it can read the
/// caller's identity from the extensions.
pub type Classifier = Arc<dyn Fn(&Parts) -> Option<(Class, Vec<Subject>)> + Send + Sync>;

/// Wraps a service (a tonic service, or axum routes) in [`RateLimitService`].
#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Option<Limiter>,
    classify: Classifier,
}

impl RateLimitLayer {
    /// A layer that checks the requests `classify` picks against `limiter`.
    pub fn new<F>(limiter: Limiter, classify: F) -> Self
    where
        F: Fn(&Parts) -> Option<(Class, Vec<Subject>)> + Send + Sync + 'static,
    {
        Self {
            limiter: Some(limiter),
            classify: Arc::new(classify),
        }
    }

    /// A layer that lets every request through, for a process without Redis: services keep
    /// one type whether they are limited or not.
    pub fn disabled() -> Self {
        Self {
            limiter: None,
            classify: Arc::new(|_| None),
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            limiter: self.limiter.clone(),
            classify: self.classify.clone(),
        }
    }
}

/// A service that lets a request reach `S` only when the limiter allows it.
///
/// It keeps `S`'s request, response and error types, and its gRPC service name, so it fits
/// wherever `S` did (inside `InterceptedService`, in `Routes`, as an axum layer).
#[derive(Clone)]
pub struct RateLimitService<S> {
    inner: S,
    limiter: Option<Limiter>,
    classify: Classifier,
}

impl<S: NamedService> NamedService for RateLimitService<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B, ResBody> Service<Request<B>> for RateLimitService<S>
where
    S: Service<Request<B>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<ResBody>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(limiter) = self.limiter.as_ref().filter(|l| l.limits().enabled) else {
            return Box::pin(self.inner.call(request));
        };
        let limiter = limiter.clone();
        let (parts, body) = request.into_parts();
        let target = (self.classify)(&parts);
        let request = Request::from_parts(parts, body);
        let Some((class, subjects)) = target else {
            return Box::pin(self.inner.call(request));
        };
        // The clone is not ready yet; keep the one `poll_ready` readied for this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let grpc = is_grpc(request.headers());
        let tus = request.headers().contains_key(TUS_RESUMABLE);
        Box::pin(async move {
            let mut refused = match limiter.check(class, &subjects).await {
                Decision::Allowed => return inner.call(request).await,
                Decision::Limited { retry_after } => limited(grpc, class, retry_after),
                Decision::Unavailable => unavailable(grpc),
            };
            if tus {
                // tus 1.0 asks for its version on every response but OPTIONS'.
                refused
                    .headers_mut()
                    .insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
            }
            Ok(refused)
        })
    }
}

/// Header of tus 1.0 requests and responses, and the version Stowage speaks.
const TUS_RESUMABLE: &str = "tus-resumable";
const TUS_VERSION: &str = "1.0.0";

/// gRPC and grpc-web (`application/grpc`, `application/grpc+proto`, `application/grpc-web…`).
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"))
}

/// Whole seconds, rounded up, at least 1: `Retry-After` has no fractions and 0 invites a
/// client to retry at once.
fn retry_after_secs(retry_after: Duration) -> u64 {
    let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    millis.div_ceil(1000).max(1)
}

fn limited<B: Default>(grpc: bool, class: Class, retry_after: Duration) -> Response<B> {
    let secs = retry_after_secs(retry_after);
    if grpc {
        let mut status = Status::resource_exhausted(format!(
            "rate limit exceeded for {class}; retry after {secs} s"
        ));
        let metadata = status.metadata_mut();
        metadata.insert("retry-after", MetadataValue::from(secs));
        // Read by gRPC clients whose retry policy covers RESOURCE_EXHAUSTED.
        let millis = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
        metadata.insert("grpc-retry-pushback-ms", MetadataValue::from(millis));
        status.into_http()
    } else {
        plain(StatusCode::TOO_MANY_REQUESTS, secs)
    }
}

fn unavailable<B: Default>(grpc: bool) -> Response<B> {
    if grpc {
        let mut status = Status::unavailable("rate limiter unavailable; retry later");
        status
            .metadata_mut()
            .insert("retry-after", MetadataValue::from(1u64));
        status.into_http()
    } else {
        plain(StatusCode::SERVICE_UNAVAILABLE, 1)
    }
}

fn plain<B: Default>(code: StatusCode, retry_after_secs: u64) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

/// The client's address: the TCP peer tonic's server recorded, or, behind `trusted_proxies`
/// reverse proxies that each append the address they saw to `X-Forwarded-For`, the entry the
/// outermost of them appended. Entries further left are the client's own claims and are
/// ignored. `None` when the request did not come through tonic's server.
pub fn client_ip(parts: &Parts, trusted_proxies: usize) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .map(|addr| addr.ip());
    if trusted_proxies == 0 {
        return peer;
    }
    let forwarded: Vec<&str> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .collect();
    // The peer is the innermost proxy; each proxy before it appended one entry.
    let Some(index) = forwarded.len().checked_sub(trusted_proxies) else {
        // Fewer entries than proxies: the request bypassed them (an in-cluster caller).
        return peer;
    };
    let entry = forwarded[index];
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
        .or(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(forwarded: &[&str]) -> Parts {
        let mut builder = Request::builder().uri("/x");
        for value in forwarded {
            builder = builder.header("x-forwarded-for", *value);
        }
        builder.body(()).unwrap().into_parts().0
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1000)), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
    }

    #[test]
    fn forwarded_for_is_read_only_as_far_as_the_proxies_are_trusted() {
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        // Client forged the first entry; one proxy (the peer) appended the real address.
        let one = parts(&["10.9.9.9, 203.0.113.7"]);
        assert_eq!(client_ip(&one, 1), Some(client));
        assert_eq!(client_ip(&one, 0), None);
        // Two proxies: the outer one appended the client, the inner one the outer proxy.
        let two = parts(&["10.9.9.9", "203.0.113.7:4711, 10.0.0.2"]);
        assert_eq!(client_ip(&two, 2), Some(client));
        // Fewer entries than proxies: fall back to the peer.
        assert_eq!(client_ip(&parts(&[]), 1), None);
    }

    #[test]
    fn grpc_and_grpc_web_are_told_from_plain_http() {
        let headers = |value: &'static str| {
            let mut map = HeaderMap::new();
            map.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
            map
        };
        assert!(is_grpc(&headers("application/grpc")));
        assert!(is_grpc(&headers("application/grpc-web-text")));
        assert!(!is_grpc(&headers("application/offset+octet-stream")));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
