//! tus 1.0 over HTTP on the gRPC port: core protocol plus creation, creation-with-upload,
//! creation-defer-length, termination, expiration and checksum (sha1, sha256). It is a third
//! door onto [`Sessions`]; authentication is the same bearer token as gRPC, or on one
//! session's URL, the signed link CreateUpload handed out (see [`crate::links`]).

use std::{collections::HashMap, sync::Arc};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{any, post},
};
use base64::{Engine, engine::general_purpose::STANDARD};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use stowage_proto::v1 as pb;
use stowage_runtime::{Identity, Verifier, auth::bearer, status::database_code};
use uuid::Uuid;

use crate::{
    error::Error,
    links::{LinkQuery, UploadLinks},
    sessions::{Checksum, ChunkIn, Meta, Session, Sessions},
};

mod room;

const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str =
    "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum";

#[derive(Clone)]
struct Tus {
    sessions: Sessions,
    verifier: Verifier,
    /// Signed links to one session, taken instead of a token on its URL.
    links: Option<UploadLinks>,
    base: String,
    /// KiB of PATCH bodies held in memory at once: checksummed ones whole (verified before
    /// anything is kept; such a body waits for room, slowing its client), others a chunk each
    /// (or a small piece when there is no room).
    held: Arc<room::Room>,
}

/// Most KiB of PATCH bodies held in memory at once, across all requests.
const HELD_KIB: usize = 256 << 10;
/// Most of it one user holds at once: four users' stalled bodies fill it, not one user's.
const USER_HELD_KIB: usize = HELD_KIB / 4;
/// How long a checksummed PATCH body waits for room before it is told to retry.
const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The tus routes under `base` (e.g. `/tus`); a session's URL also opens to the signed links
/// of `links`.
pub fn routes(
    sessions: Sessions,
    verifier: Verifier,
    links: Option<UploadLinks>,
    base: &str,
) -> Router {
    let base = base.trim_end_matches('/').to_owned();
    Router::new()
        .route(&base, post(create).options(options))
        .route(&format!("{base}/"), post(create).options(options))
        .route(&format!("{base}/{{id}}"), any(resource))
        // Every response names the version, as tus asks: ours and the router's own (a method
        // the collection does not take).
        .layer(axum::middleware::map_response(with_tus_version))
        .with_state(Tus {
            sessions,
            verifier,
            links,
            base,
            held: Arc::new(room::Room::new(HELD_KIB, USER_HELD_KIB)),
        })
}

async fn with_tus_version(mut response: Response) -> Response {
    response
        .headers_mut()
        .entry("tus-resumable")
        .or_insert(HeaderValue::from_static(TUS_VERSION));
    response
}

/// A response of the tus endpoint (`Tus-Resumable` is added to every one by the router's
/// layer, [`with_tus_version`]).
fn tus_response(status: StatusCode) -> axum::http::response::Builder {
    Response::builder()
        .status(status)
        .header(header::CACHE_CONTROL, "no-store")
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    tus_response(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(message.into() + "\n"))
        .unwrap_or_else(|_| status.into_response())
}

fn error_response(error: Error) -> Response {
    let status = match &error {
        Error::InvalidArgument { field, .. } if field.starts_with("chunk.data") => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        Error::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
        Error::TypeNotAllowed { .. } => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::FirstChunkTooShort { .. } => StatusCode::BAD_REQUEST,
        Error::WrongOffset { .. } => StatusCode::CONFLICT,
        Error::ChecksumMismatch => StatusCode::from_u16(460).unwrap_or(StatusCode::BAD_REQUEST),
        Error::SessionNotFound => StatusCode::NOT_FOUND,
        Error::SessionState(s) if matches!(s.as_str(), "expired" | "aborted" | "failed") => {
            StatusCode::GONE
        }
        Error::SessionState(_) | Error::Incomplete { .. } | Error::InProgress => {
            StatusCode::CONFLICT
        }
        Error::Busy => StatusCode::LOCKED,
        Error::TooManySubscriptions(_) | Error::TooManyOwnSubscriptions(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::TooManyOpenUploads(_) => StatusCode::TOO_MANY_REQUESTS,
        Error::StoreFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
        Error::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        Error::Peer(s) if s.code() == tonic::Code::ResourceExhausted => {
            StatusCode::PAYLOAD_TOO_LARGE
        }
        Error::Peer(s) if s.code() == tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        // The session's hold is gone (released or expired): retrying cannot help.
        Error::Peer(s)
            if matches!(
                s.code(),
                tonic::Code::FailedPrecondition | tonic::Code::NotFound
            ) =>
        {
            StatusCode::GONE
        }
        Error::Stream(_) => StatusCode::BAD_REQUEST,
        // Refused by a database, ours or a peer's: the same request would fail again.
        Error::Peer(s) if s.code() == tonic::Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        Error::Db(e) if database_code(e) == tonic::Code::Internal => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        Error::Pool(e) if database_code(e) == tonic::Code::Internal => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
        Error::Peer(_) | Error::Db(_) | Error::Pool(_) | Error::Store(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Error::Internal(_) | Error::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
        // Event-stream errors; tus never produces them.
        Error::NotFound => StatusCode::NOT_FOUND,
        Error::SeqGap { .. } => StatusCode::CONFLICT,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let message = match &error {
        Error::Peer(s) => s.message().to_owned(),
        // Said in the log, not to the client: the text names keys and inner states.
        Error::Db(_)
        | Error::Pool(_)
        | Error::Store(_)
        | Error::Internal(_)
        | Error::Corrupt(_) => {
            tracing::error!(%error, "tus request failed");
            match status {
                StatusCode::INTERNAL_SERVER_ERROR => "internal error".to_owned(),
                _ => "temporarily unavailable".to_owned(),
            }
        }
        other => in_tus_terms(other),
    };
    let mut response = refuse(status, message);
    if let Error::WrongOffset { expected, .. } = error
        && let Ok(v) = HeaderValue::from_str(&expected.to_string())
    {
        response.headers_mut().insert("upload-offset", v);
    }
    response
}

/// `error`'s message with what a tus client sent named as it sent it (headers, metadata keys,
/// the body), not as the gRPC fields the shared implementation checks.
fn in_tus_terms(error: &Error) -> String {
    match error {
        Error::InvalidArgument { field, reason } => {
            let named = match *field {
                "size_bytes" | "chunk.size_bytes" => "Upload-Length",
                "chunk.offset" => "Upload-Offset",
                "chunk.data" => "the request body",
                "metadata.display_name" => "Upload-Metadata filename",
                "metadata.declared_mime_type" => "Upload-Metadata filetype",
                "metadata.tags" => "Upload-Metadata tags",
                "metadata.expected_sha256" => "Upload-Metadata sha256",
                "metadata.package_name" => "Upload-Metadata package",
                other => other,
            };
            format!("{named}: {reason}")
        }
        Error::WrongOffset { expected, got } => {
            format!("Upload-Offset: expected {expected}, got {got}")
        }
        Error::TypeNotAllowed { .. } | Error::FirstChunkTooShort { .. } => {
            let (_, reason) = error.content_refusal().unwrap_or_default();
            format!("the request body: {reason}")
        }
        Error::Busy => {
            "another request is writing this upload; ask HEAD for its offset and retry".into()
        }
        other => other.to_string(),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn authenticate(tus: &Tus, headers: &HeaderMap) -> Result<Identity, Box<Response>> {
    let token = header_str(headers, "authorization").and_then(bearer);
    match token.map(|t| tus.verifier.verify(t)) {
        Some(Ok(identity)) => Ok(identity),
        _ => Err(Box::new(
            tus_response(StatusCode::UNAUTHORIZED)
                .header(header::WWW_AUTHENTICATE, "Bearer")
                .body(Body::from("missing or invalid bearer token\n"))
                .unwrap_or_else(|_| StatusCode::UNAUTHORIZED.into_response()),
        )),
    }
}

fn check_version(headers: &HeaderMap) -> Result<(), Box<Response>> {
    match header_str(headers, "tus-resumable") {
        Some(TUS_VERSION) => Ok(()),
        _ => Err(Box::new(
            tus_response(StatusCode::PRECONDITION_FAILED)
                .header("tus-version", TUS_VERSION)
                .body(Body::empty())
                .unwrap_or_else(|_| StatusCode::PRECONDITION_FAILED.into_response()),
        )),
    }
}

async fn options(State(tus): State<Tus>) -> Response {
    tus_response(StatusCode::NO_CONTENT)
        .header("tus-version", TUS_VERSION)
        .header("tus-extension", EXTENSIONS)
        .header(
            "tus-max-size",
            tus.sessions.settings().max_file_size.to_string(),
        )
        .header("tus-checksum-algorithm", "sha1,sha256")
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::NO_CONTENT.into_response())
}

/// Longest `Upload-Metadata` accepted, kept with the session.
const MAX_METADATA_LEN: usize = 4096;

/// Parses `Upload-Metadata`: comma-separated `key base64value` pairs, each key once.
fn parse_metadata(value: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, encoded) = pair.split_once(' ').unwrap_or((pair, ""));
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("Upload-Metadata: {key:?} is not a key"));
        }
        let decoded = STANDARD
            .decode(encoded.trim())
            .map_err(|_| format!("Upload-Metadata: value of {key:?} is not base64"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| format!("Upload-Metadata: value of {key:?} is not UTF-8"))?;
        if out.insert(key.to_owned(), text).is_some() {
            return Err(format!("Upload-Metadata: {key:?} is given twice"));
        }
    }
    Ok(out)
}

fn meta_from(map: &HashMap<String, String>) -> pb::UploadMetadata {
    let pick = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| map.get(*k))
            .cloned()
            .unwrap_or_default()
    };
    let name = pick(&["filename", "name"]);
    pb::UploadMetadata {
        display_name: if name.is_empty() {
            "untitled".into()
        } else {
            name
        },
        declared_mime_type: pick(&["filetype", "type"]),
        declared_kind: 0,
        tags: pick(&["tags"])
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        expected_sha256: pick(&["sha256"]),
        package_name: pick(&["package"]),
    }
}

/// `Upload-Expires` of a session still open (a finished one has nothing left to expire).
fn expires(session: &Session) -> Option<String> {
    session
        .expires_at
        .filter(|_| session.state == "open")
        .map(|at| at.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
}

/// A session whose every byte arrived but whose completion did not run (the request that
/// carried the last byte failed or was cut off before it began) completes now: a tus client
/// takes an offset equal to the length for a finished upload and never sends anything again.
async fn finish_received(tus: &Tus, caller: &Identity, session: Session) -> Result<Session, Error> {
    if session.state == "open" && !session.is_expired() && session.size == Some(session.offset) {
        tus.sessions
            .complete_to_end(session.id, &caller.user_id)
            .await?;
        return tus.sessions.get(session.id, &caller.user_id).await;
    }
    Ok(session)
}

/// Refuses a PATCH that sent no bytes to a session that cannot take them, or at another
/// offset than its own, as one with bytes would be.
fn check_patch(session: &Session, offset: u64) -> Result<(), Error> {
    if session.is_gone() {
        let state = if session.state == "open" {
            "expired"
        } else {
            &session.state
        };
        return Err(Error::SessionState(state.to_owned()));
    }
    if session.offset != offset {
        return Err(Error::WrongOffset {
            expected: session.offset,
            got: offset,
        });
    }
    Ok(())
}

async fn create(State(tus): State<Tus>, headers: HeaderMap, body: Body) -> Response {
    if let Err(r) = check_version(&headers) {
        return *r;
    }
    let caller = match authenticate(&tus, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let size = match (
        header_str(&headers, "upload-length"),
        header_str(&headers, "upload-defer-length"),
    ) {
        (Some(_), Some(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Upload-Length and Upload-Defer-Length: give one, not both",
            );
        }
        (Some(v), None) => match v.parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => return refuse(StatusCode::BAD_REQUEST, "Upload-Length: not a number"),
        },
        (None, Some("1")) => None,
        _ => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Upload-Length or Upload-Defer-Length: 1 is required",
            );
        }
    };
    if size.is_some_and(|s| s > tus.sessions.settings().max_file_size) {
        return refuse(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Upload-Length: above Tus-Max-Size",
        );
    }
    if headers.contains_key("upload-metadata") && header_str(&headers, "upload-metadata").is_none()
    {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Metadata: only visible ASCII (values are base64)",
        );
    }
    let raw_metadata = header_str(&headers, "upload-metadata").unwrap_or_default();
    if raw_metadata.len() > MAX_METADATA_LEN {
        return refuse(
            StatusCode::BAD_REQUEST,
            "Upload-Metadata: longer than 4096 bytes",
        );
    }
    let map = match header_str(&headers, "upload-metadata")
        .map(parse_metadata)
        .transpose()
    {
        Ok(m) => m.unwrap_or_default(),
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    let mut meta = match Meta::from_proto(meta_from(&map), "metadata") {
        Ok(m) => m,
        Err(e) => return error_response(e),
    };
    meta.tus_metadata = raw_metadata.to_owned();
    let mut session = match tus.sessions.create(&caller.user_id, size, meta, None).await {
        Ok(s) => s,
        Err(e) => return error_response(e),
    };
    let has_body = header_str(&headers, "content-type") == Some("application/offset+octet-stream");
    let written = if has_body {
        write_body(&tus, &caller, session.id, 0, None, &headers, body).await
    } else if session.size == Some(0) {
        // An empty file is complete as soon as it exists.
        tus.sessions
            .complete_to_end(session.id, &caller.user_id)
            .await
            .map(|_| session.clone())
    } else {
        Ok(session.clone())
    };
    match written {
        Ok(s) => session = s,
        Err(e) => match after_failed_creation(&tus, &caller, session.id).await {
            Some(s) => session = s,
            None => return error_response(e),
        },
    }
    let mut response = tus_response(StatusCode::CREATED)
        .header(header::LOCATION, format!("{}/{}", tus.base, session.id))
        .header("upload-offset", session.offset.to_string());
    if let Some(at) = expires(&session) {
        response = response.header("upload-expires", at);
    }
    response
        .body(Body::empty())
        .unwrap_or_else(|_| StatusCode::CREATED.into_response())
}

/// What is left of upload `id` whose creation request failed after it was created. The
/// client never learns its URL from an error: it is aborted, not left holding quota (`None`).
/// Unless every byte arrived and the completion began, which cannot be undone (a retry or the
/// sweeper finishes it): then the session, so that the client learns the URL and that nothing
/// is left to send, rather than send the file again as another one.
async fn after_failed_creation(tus: &Tus, caller: &Identity, id: Uuid) -> Option<Session> {
    if tus.sessions.abort(id, &caller.user_id).await.is_ok() {
        return None;
    }
    tus.sessions
        .get(id, &caller.user_id)
        .await
        .ok()
        .filter(|s| matches!(s.state.as_str(), "completing" | "registered" | "completed"))
}

async fn resource(
    State(tus): State<Tus>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    method: axum::http::Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // Clients that cannot send PATCH or DELETE (some proxies, old browsers) POST with the
    // method they mean in X-HTTP-Method-Override, which tus servers must honour.
    let method = match header_str(&headers, "x-http-method-override") {
        Some(meant) if method == axum::http::Method::POST => {
            match axum::http::Method::from_bytes(meant.trim().to_ascii_uppercase().as_bytes()) {
                Ok(m) => m,
                Err(_) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "X-HTTP-Method-Override: not a method",
                    );
                }
            }
        }
        _ => method,
    };
    if method == axum::http::Method::OPTIONS {
        return options(State(tus)).await;
    }
    if let Err(r) = check_version(&headers) {
        return *r;
    }
    let Ok(id) = Uuid::parse_str(&id) else {
        return refuse(StatusCode::NOT_FOUND, "no such upload");
    };
    let link = uri
        .query()
        .and_then(|_| Query::<LinkQuery>::try_from_uri(&uri).ok());
    let caller = match (&link, &tus.links) {
        // No token: the URL is a link CreateUpload signed for this session.
        (Some(Query(link)), Some(links)) if !headers.contains_key(header::AUTHORIZATION) => {
            match links.check(&id, link, chrono::Utc::now().timestamp()) {
                Some(owner) => Identity {
                    user_id: owner,
                    admin: false,
                    service: false,
                },
                None => return refuse(StatusCode::FORBIDDEN, "invalid or expired upload link"),
            }
        }
        _ => match authenticate(&tus, &headers) {
            Ok(c) => c,
            Err(r) => return *r,
        },
    };
    match method.as_str() {
        "HEAD" => match tus.sessions.get(id, &caller.user_id).await {
            // Gone: ended, or still open past its expiry. One completing or completed is
            // there whatever the time, so its client does not send it again.
            Ok(s) if s.is_gone() => refuse(StatusCode::GONE, "upload expired"),
            Ok(s) => {
                let s = match finish_received(&tus, &caller, s).await {
                    Ok(s) => s,
                    Err(e) => return error_response(e),
                };
                let mut r =
                    tus_response(StatusCode::OK).header("upload-offset", s.offset.to_string());
                if !s.meta.tus_metadata.is_empty() {
                    r = r.header("upload-metadata", &s.meta.tus_metadata);
                }
                r = match s.size {
                    Some(size) => r.header("upload-length", size.to_string()),
                    None => r.header("upload-defer-length", "1"),
                };
                if let Some(at) = expires(&s) {
                    r = r.header("upload-expires", at);
                }
                r.body(Body::empty())
                    .unwrap_or_else(|_| StatusCode::OK.into_response())
            }
            Err(e) => error_response(e),
        },
        "PATCH" => {
            if header_str(&headers, "content-type") != Some("application/offset+octet-stream") {
                return refuse(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Content-Type must be application/offset+octet-stream",
                );
            }
            let Some(offset) =
                header_str(&headers, "upload-offset").and_then(|v| v.parse::<u64>().ok())
            else {
                return refuse(StatusCode::BAD_REQUEST, "Upload-Offset: required");
            };
            let length = match header_str(&headers, "upload-length")
                .map(str::parse::<u64>)
                .transpose()
            {
                Ok(l) => l,
                Err(_) => return refuse(StatusCode::BAD_REQUEST, "Upload-Length: not a number"),
            };
            if length.is_some_and(|l| l > tus.sessions.settings().max_file_size) {
                return refuse(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Upload-Length: above Tus-Max-Size",
                );
            }
            match write_body(&tus, &caller, id, offset, length, &headers, body).await {
                Ok(s) => {
                    let mut r = tus_response(StatusCode::NO_CONTENT)
                        .header("upload-offset", s.offset.to_string());
                    if let Some(at) = expires(&s) {
                        r = r.header("upload-expires", at);
                    }
                    r.body(Body::empty())
                        .unwrap_or_else(|_| StatusCode::NO_CONTENT.into_response())
                }
                Err(e) => error_response(e),
            }
        }
        // Terminated before, by a concurrent DELETE, or ended otherwise: gone (410), as for any
        // later request; completed: 409.
        "DELETE" => match tus.sessions.terminate(id, &caller.user_id).await {
            Ok(_) => tus_response(StatusCode::NO_CONTENT)
                .body(Body::empty())
                .unwrap_or_else(|_| StatusCode::NO_CONTENT.into_response()),
            Err(e) => error_response(e),
        },
        _ => refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "use HEAD, PATCH, DELETE or OPTIONS",
        ),
    }
}

fn parse_checksum(headers: &HeaderMap) -> Result<Option<Checksum>, Error> {
    let Some(value) = header_str(headers, "upload-checksum") else {
        return Ok(None);
    };
    let (alg, encoded) = value
        .split_once(' ')
        .ok_or_else(|| Error::invalid("Upload-Checksum", "expected `<algorithm> <base64>`"))?;
    let digest = STANDARD
        .decode(encoded.trim())
        .map_err(|_| Error::invalid("Upload-Checksum", "digest is not base64"))?;
    match alg {
        "sha256" => Ok(Some(Checksum::Sha256(digest))),
        "sha1" => Ok(Some(Checksum::Sha1(digest))),
        _ => Err(Error::invalid(
            "Upload-Checksum",
            "supported algorithms: sha1, sha256",
        )),
    }
}

/// Bytes a PATCH body without checksum holds before they are written when there is no room
/// for a whole chunk at once.
const SMALL_PIECE: usize = 256 << 10;

/// How long a PATCH body may send nothing before it is taken as cut off.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a PATCH body may pause before its session is let go (a fast client's packets come
/// far closer; a slow one then holds no database connection while it sends).
const PAUSE_AFTER: std::time::Duration = std::time::Duration::from_millis(10);

/// Writes a request body at `offset`. With a checksum the body is one chunk (verified before
/// anything is kept); without one it is cut into chunks of the session's chunk size, so a
/// request cut off midway keeps what arrived. Completes the upload when its last byte lands.
async fn write_body(
    tus: &Tus,
    caller: &Identity,
    id: Uuid,
    offset: u64,
    length: Option<u64>,
    headers: &HeaderMap,
    body: Body,
) -> Result<Session, Error> {
    let checksum = parse_checksum(headers)?;
    let settings = tus.sessions.settings().clone();
    if checksum.is_some() {
        // The body is held whole before it is verified: not for someone else's session, a
        // closed or expired one, or the wrong offset.
        let session = tus.sessions.get(id, &caller.user_id).await?;
        check_patch(&session, offset)?;
        if session.state != "open" {
            return Err(Error::SessionState(session.state));
        }
    }
    // Room for what the body holds in memory, taken at once: a request holding part of its
    // room while it waits for more could wait on others doing the same, for ever.
    let declared = header_str(headers, "content-length").and_then(|v| v.parse::<usize>().ok());
    let (piece, held) = if checksum.is_some() {
        // All of it, until verified. A request that finds no room in time (its user's share,
        // then the process's) is told to come back.
        let bytes = declared
            .unwrap_or(settings.max_chunk)
            .min(settings.max_chunk);
        match tus
            .held
            .take(&caller.user_id, bytes.div_ceil(1024), HELD_WAIT)
            .await
        {
            Some(permit) => (settings.max_chunk, Some(permit)),
            None => {
                return Err(Error::Unavailable(
                    "too many checksummed bodies held at once; retry".into(),
                ));
            }
        }
    } else {
        // A chunk's worth, written as it fills; without room at once, the body goes to disk
        // in small pieces instead, never waiting and holding little.
        let chunk = settings.chunk_size_hint as usize;
        let bytes = declared.unwrap_or(chunk).min(chunk);
        match tus
            .held
            .take(
                &caller.user_id,
                bytes.div_ceil(1024),
                std::time::Duration::ZERO,
            )
            .await
        {
            Some(permit) => (chunk, Some(permit)),
            None => (SMALL_PIECE.min(chunk), None),
        }
    };
    let mut stream = body.into_data_stream();
    let mut buf = BytesMut::new();
    let mut at = offset;
    let mut cut_off = None;
    // As WriteChunks: the session is held while the body keeps coming, and let go (what was
    // staged recorded) whenever the client sends nothing for a moment, and after an error.
    let mut writer = tus.sessions.chunk_stream(id, &caller.user_id);
    let written: Result<(), Error> = async {
        loop {
            let next = match tokio::time::timeout(PAUSE_AFTER, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    writer.pause().await?;
                    // A body that stops for good is cut off (what arrived is kept), so it
                    // holds its room and connection no longer.
                    tokio::time::timeout(BODY_IDLE, stream.next())
                        .await
                        .unwrap_or_else(|_| Some(Err(axum::Error::new("the body stalled"))))
                }
            };
            let done = match next {
                None => true,
                Some(Ok(bytes)) => {
                    buf.extend_from_slice(&bytes);
                    if checksum.is_some() && buf.len() > settings.max_chunk {
                        return Err(Error::invalid(
                            "chunk.data",
                            format!(
                                "a checksummed PATCH may carry at most {} bytes",
                                settings.max_chunk
                            ),
                        ));
                    }
                    false
                }
                Some(Err(e)) => {
                    cut_off = Some(e.to_string());
                    true
                }
            };
            // A checksummed body is verified whole: nothing of it is kept if it was cut off.
            if checksum.is_some() {
                if !done {
                    continue;
                }
                if cut_off.is_some() {
                    return Ok(());
                }
            }
            while buf.len() >= piece || (done && !buf.is_empty()) {
                let take = buf.len().min(piece);
                let data: Bytes = buf.split_to(take).freeze();
                let len = data.len() as u64;
                writer
                    .write(ChunkIn {
                        offset: at,
                        data,
                        checksum: checksum.clone(),
                        size: length,
                    })
                    .await?;
                at += len;
            }
            if done {
                return Ok(());
            }
        }
    }
    .await;
    drop(held);
    let recorded = writer.settle(written).await?;
    if let Some(why) = cut_off {
        tracing::info!(upload_id = %id, offset = at, why, "tus body cut off; kept what arrived");
    }
    let session = match (recorded, length) {
        (Some(s), _) => s,
        // No bytes, but a deferred length given (a stream that ended on a chunk boundary).
        (None, Some(size)) => {
            tus.sessions
                .write_chunk(
                    id,
                    &caller.user_id,
                    ChunkIn {
                        offset: at,
                        data: Bytes::new(),
                        checksum: None,
                        size: Some(size),
                    },
                )
                .await?
        }
        (None, None) => {
            let session = tus.sessions.get(id, &caller.user_id).await?;
            check_patch(&session, offset)?;
            session
        }
    };
    finish_received(tus, caller, session).await
}
