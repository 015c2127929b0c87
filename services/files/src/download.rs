//! Reading stored bytes: byte ranges for gRPC Download and signed HTTP URLs served by the
//! same process (Range, ETag, Content-Type, Content-Disposition).

use std::{ops::Range, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt, stream::BoxStream};
use object_store::{GetOptions, GetRange, ObjectStore, path::Path as ObjectPath};
use stowage_runtime::signing::SigningKeys;
use uuid::Uuid;

use crate::{
    catalog::{Catalog, Viewer},
    error::{Error, Result},
    model::FileRecord,
};

/// What a variant's name must be.
pub(crate) const VARIANT_NAME_RULE: &str = "must be 1..=64 of [A-Za-z0-9_]";

/// Whether `name` can name a variant (see [`VARIANT_NAME_RULE`]).
pub(crate) fn variant_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The object a download reads: the original or one variant.
#[derive(Clone, Debug)]
pub struct Target {
    /// Key in the store (empty for inline variants).
    pub key: String,
    /// Inline bytes of tiny variants.
    pub inline: Option<Bytes>,
    /// Total size.
    pub size: u64,
    /// MIME type.
    pub mime_type: String,
    /// Strong validator.
    pub etag: String,
    /// When these bytes were stored (`Last-Modified`), where known.
    pub modified: Option<chrono::DateTime<chrono::Utc>>,
}

/// Picks the original (`variant` empty) or the named variant of `file`. While a scanner is
/// configured (`hold_unscanned`), nothing of a file still in processing is served: it may
/// turn out infected.
pub fn target(file: &FileRecord, variant: &str, hold_unscanned: bool) -> Result<Target> {
    if hold_unscanned && file.status == crate::model::FileStatus::Processing {
        return Err(Error::FailedPrecondition(
            "file is being scanned; try again in a moment",
        ));
    }
    if variant.is_empty() {
        return Ok(Target {
            key: file.storage_key.clone(),
            inline: None,
            size: file.size_bytes,
            mime_type: file.mime_type.clone(),
            etag: format!("\"{}\"", file.sha256),
            // A file's bytes never change after its upload.
            modified: Some(file.created_at),
        });
    }
    if !variant_name_ok(variant) {
        return Err(Error::invalid("variant", VARIANT_NAME_RULE));
    }
    let v = file
        .variants
        .iter()
        .find(|v| v.name == variant)
        .ok_or_else(|| Error::VariantNotFound(variant.to_owned()))?;
    Ok(Target {
        key: v.storage_key.clone(),
        inline: v.inline_data.clone().map(Bytes::from),
        size: v.size_bytes,
        mime_type: v.mime_type.clone(),
        // The time the variant was recorded: one rebuilt with other bytes of the same size
        // gets another tag, so caches and If-Range see the change.
        etag: format!(
            "\"{}-{}-{}-{}\"",
            file.id,
            v.name,
            v.size_bytes,
            v.written_at.map_or(0, |at| at.timestamp_micros())
        ),
        modified: v.written_at,
    })
}

/// `at` as an HTTP date (RFC 9110, 5.6.7: IMF-fixdate).
fn http_date(at: chrono::DateTime<chrono::Utc>) -> String {
    at.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}

/// Resolves a requested `offset` / `length` against an object of `size` bytes.
///
/// A length running past the end is cut at the end (as HTTP does); an offset past the end is
/// OUT_OF_RANGE; a zero length is refused.
pub fn resolve_range(size: u64, offset: u64, length: Option<u64>) -> Result<Range<u64>> {
    if offset > size || (offset == size && size > 0) {
        return Err(Error::RangeNotSatisfiable { offset, size });
    }
    match length {
        Some(0) => Err(Error::invalid(
            "range.length",
            "must be above zero; leave it unset to read to the end",
        )),
        Some(len) => Ok(offset..offset.saturating_add(len).min(size)),
        None => Ok(offset..size),
    }
}

/// Streams `range` of `target` in chunks of at most `chunk` bytes.
pub async fn read(
    store: Arc<dyn ObjectStore>,
    target: &Target,
    range: Range<u64>,
    chunk: usize,
) -> Result<BoxStream<'static, Result<Bytes>>> {
    if range.is_empty() {
        return Ok(futures::stream::empty().boxed());
    }
    if let Some(inline) = &target.inline {
        let start = usize::try_from(range.start)
            .unwrap_or(usize::MAX)
            .min(inline.len());
        let end = usize::try_from(range.end)
            .unwrap_or(usize::MAX)
            .min(inline.len());
        let bytes = inline.slice(start..end);
        return Ok(futures::stream::once(async move { Ok(bytes) }).boxed());
    }
    let options = GetOptions {
        range: Some(GetRange::Bounded(range)),
        ..GetOptions::default()
    };
    let result = store
        .get_opts(&ObjectPath::from(target.key.as_str()), options)
        .await?;
    Ok(rechunk(result.into_stream().map_err(Error::from), chunk).boxed())
}

/// Splits large buffers so no message exceeds `chunk` bytes.
fn rechunk(
    stream: impl Stream<Item = Result<Bytes>> + Send + 'static,
    chunk: usize,
) -> impl Stream<Item = Result<Bytes>> + Send + 'static {
    stream.flat_map(move |item| {
        let pieces: Vec<Result<Bytes>> = match item {
            Ok(mut bytes) => {
                let mut out = Vec::with_capacity(bytes.len() / chunk + 1);
                while bytes.len() > chunk {
                    out.push(Ok(bytes.split_to(chunk)));
                }
                if !bytes.is_empty() {
                    out.push(Ok(bytes));
                }
                out
            }
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(pieces)
    })
}

/// Signs and checks download URLs.
#[derive(Clone)]
pub struct UrlSigner {
    keys: SigningKeys,
    base: String,
}

impl UrlSigner {
    /// Signs with `keys`; URLs start with `base` (e.g. `https://files.example.com`).
    pub fn new(keys: SigningKeys, base: String) -> Self {
        Self { keys, base }
    }

    /// What a URL's signature covers.
    fn message(file_id: &Uuid, variant: &str, expires: i64, attachment: bool) -> String {
        format!("{file_id}\n{variant}\n{expires}\n{}", u8::from(attachment))
    }

    /// A URL valid until `expires` (unix seconds).
    pub fn sign(&self, file_id: &Uuid, variant: &str, expires: i64, attachment: bool) -> String {
        let sig = self
            .keys
            .sign(&Self::message(file_id, variant, expires, attachment));
        let mut url = format!("{}/v1/blobs/{file_id}?exp={expires}&sig={sig}", self.base);
        if !variant.is_empty() {
            url.push_str(&format!(
                "&variant={}",
                percent_encoding::utf8_percent_encode(variant, percent_encoding::NON_ALPHANUMERIC)
            ));
        }
        if attachment {
            url.push_str("&dl=1");
        }
        url
    }

    fn verify(&self, file_id: &Uuid, query: &SignedQuery) -> bool {
        let attachment = query.dl.as_deref() == Some("1");
        let variant = query.variant.as_deref().unwrap_or("");
        self.keys.verify(
            &Self::message(file_id, variant, query.exp, attachment),
            &query.sig,
        )
    }
}

#[derive(serde::Deserialize)]
struct SignedQuery {
    exp: i64,
    sig: String,
    variant: Option<String>,
    dl: Option<String>,
}

#[derive(Clone)]
struct HttpState {
    catalog: Catalog,
    store: Arc<dyn ObjectStore>,
    signer: UrlSigner,
}

/// HTTP routes that serve signed URLs: `GET|HEAD /v1/blobs/{file_id}`.
pub fn routes(catalog: Catalog, store: Arc<dyn ObjectStore>, signer: UrlSigner) -> Router {
    Router::new()
        .route("/v1/blobs/{file_id}", get(serve_signed))
        .with_state(HttpState {
            catalog,
            store,
            signer,
        })
}

fn plain(status: StatusCode, message: &'static str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

/// Types a browser would render as active content; always sent as attachments.
fn is_active_content(mime: &str) -> bool {
    let m = mime.to_ascii_lowercase();
    m.contains("html") || m.contains("svg") || m.contains("xml") || m.contains("javascript")
}

/// The one range of `target` a request asks for (RFC 9110 §14): `None` to send it whole, as
/// for a method other than GET, an `If-Range` that does not name the current bytes (a date, as
/// no `Last-Modified` is sent, or another or weak entity tag), a header this server does not
/// understand or will not serve (another unit, several ranges); `Err` when the one range asked
/// for lies past the end (416).
fn requested_range(
    method: &axum::http::Method,
    headers: &HeaderMap,
    target: &Target,
) -> Result<Option<Range<u64>>, ()> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return Ok(None);
    };
    if method != axum::http::Method::GET {
        return Ok(None);
    }
    if let Some(validator) = headers.get(header::IF_RANGE)
        && validator.to_str().ok().map(str::trim) != Some(target.etag.as_str())
    {
        return Ok(None);
    }
    match http_range_header::parse_range_header(value).and_then(|r| r.validate(target.size)) {
        Ok(ranges) => match ranges.as_slice() {
            [one] => Ok(Some(*one.start()..one.end() + 1)),
            _ => Ok(None),
        },
        Err(http_range_header::RangeUnsatisfiableError::Unsatisfiable) => Err(()),
        Err(_) => Ok(None),
    }
}

/// Browsers keep a download but ask again before each use (a 304 while its bytes are the
/// same): a link that expired, or a file trashed or quarantined since, is not served from
/// their cache.
const CACHE_CONTROL: &str = "private, no-cache";

/// The name a download is saved under: the file's own, or for a variant the file's name
/// without its extension, the variant's name and the extension of the variant's type
/// (`clip_poster_jpeg.jpg` for the poster of `clip.mov`, not `clip.mov`).
fn download_name(display_name: &str, variant: &str, mime_type: &str) -> String {
    if variant.is_empty() {
        return display_name.to_owned();
    }
    let stem = display_name
        .rsplit_once('.')
        .filter(|(stem, _)| !stem.is_empty())
        .map_or(display_name, |(stem, _)| stem);
    let extension = match mime_type {
        "image/jpeg" => Some("jpg"),
        "image/webp" => Some("webp"),
        "image/png" => Some("png"),
        "image/gif" => Some("gif"),
        "image/avif" => Some("avif"),
        "video/mp4" => Some("mp4"),
        "video/webm" => Some("webm"),
        "audio/mpeg" => Some("mp3"),
        _ => None,
    };
    match extension {
        Some(ext) => format!("{stem}_{variant}.{ext}"),
        None => format!("{stem}_{variant}"),
    }
}

/// `Content-Disposition` with `name`: in UTF-8 (RFC 8187) for clients that read it, and
/// before it a plain ASCII form for those that do not (RFC 6266, 4.3), with what it cannot
/// carry replaced by `_` (and `%`, which some browsers would decode there), and without
/// bidirectional controls ([`stowage_runtime::validate::is_bidi_control`]).
fn content_disposition(attachment: bool, name: &str) -> String {
    let name = stowage_runtime::validate::without_bidi_controls(name);
    let ascii: String = name
        .chars()
        .map(|c| match c {
            ' ' | '!' | '#' | '$' | '&'..='[' | ']'..='~' => c,
            _ => '_',
        })
        .collect();
    format!(
        "{}; filename=\"{ascii}\"; filename*=UTF-8''{}",
        if attachment { "attachment" } else { "inline" },
        percent_encoding::utf8_percent_encode(&name, percent_encoding::NON_ALPHANUMERIC)
    )
}

async fn serve_signed(
    method: axum::http::Method,
    State(state): State<HttpState>,
    Path(file_id): Path<String>,
    Query(query): Query<SignedQuery>,
    headers: HeaderMap,
) -> Response {
    let Ok(file_id) = Uuid::parse_str(&file_id) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if !state.signer.verify(&file_id, &query) {
        return plain(StatusCode::FORBIDDEN, "bad signature\n");
    }
    if query.exp < chrono::Utc::now().timestamp() {
        return plain(StatusCode::FORBIDDEN, "link expired\n");
    }
    let file = match state.catalog.get(file_id, Viewer::Privileged).await {
        Ok(f) if f.deleted_at.is_none() && f.status != crate::model::FileStatus::Quarantined => f,
        Ok(_) | Err(Error::NotFound) => return plain(StatusCode::NOT_FOUND, "not found\n"),
        Err(e) => {
            tracing::error!(error = %e, "signed download lookup failed");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "unavailable\n");
        }
    };
    let variant = query.variant.as_deref().unwrap_or("");
    let target = match target(&file, variant, state.catalog.holds_unscanned()) {
        Ok(t) => t,
        Err(Error::FailedPrecondition(why)) => return plain(StatusCode::CONFLICT, why),
        Err(_) => return plain(StatusCode::NOT_FOUND, "not found\n"),
    };
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            // Weak comparison (RFC 9110, 13.1.2): a proxy that weakened the tag still
            // gets its 304.
            v.split(',')
                .map(str::trim)
                .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == target.etag)
        })
    {
        // The headers a 200 would have that say how to cache it (RFC 9110, 15.4.5).
        return (
            StatusCode::NOT_MODIFIED,
            [
                (header::ETAG, target.etag.clone()),
                (header::CACHE_CONTROL, CACHE_CONTROL.to_owned()),
            ],
        )
            .into_response();
    }
    let (status, range) = match requested_range(&method, &headers, &target) {
        Ok(Some(range)) => (StatusCode::PARTIAL_CONTENT, range),
        Ok(None) => (StatusCode::OK, 0..target.size),
        Err(()) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", target.size))],
            )
                .into_response();
        }
    };
    let attachment = query.dl.as_deref() == Some("1")
        || (variant.is_empty() && is_active_content(&target.mime_type));
    let disposition = content_disposition(
        attachment,
        &download_name(&file.display_name, variant, &target.mime_type),
    );
    // A type that cannot be a header value (a service registered it unchecked) is served as
    // bytes, not as an error.
    let content_type = header::HeaderValue::from_str(&target.mime_type)
        .unwrap_or(header::HeaderValue::from_static("application/octet-stream"));
    let mut response = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, range.end - range.start)
        .header(header::ETAG, &target.etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_DISPOSITION, disposition)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::CONTENT_SECURITY_POLICY, "sandbox")
        .header(header::CACHE_CONTROL, CACHE_CONTROL);
    if let Some(modified) = target.modified {
        response = response.header(header::LAST_MODIFIED, http_date(modified));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        response = response.header(
            header::CONTENT_RANGE,
            format!("bytes {}-{}/{}", range.start, range.end - 1, target.size),
        );
    }
    // A HEAD (a link preview, a client sizing the file) reads nothing and is no download.
    if method == axum::http::Method::HEAD {
        return response
            .body(Body::empty())
            .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"));
    }
    let body = match read(Arc::clone(&state.store), &target, range, 256 * 1024).await {
        Ok(stream) => Body::from_stream(stream.map_err(|e| std::io::Error::other(e.to_string()))),
        Err(e) => {
            tracing::error!(error = %e, "signed download read failed");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "unavailable\n");
        }
    };
    // Counted as the owner's activity when bytes go out, not for a HEAD or a 304.
    state.catalog.note_download(&file).await;
    response
        .body(body)
        .unwrap_or_else(|_| plain(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n"))
}

/// Seconds to add for a requested URL lifetime within `max`; unasked, one hour, or `max` when
/// that is shorter.
pub fn url_ttl(requested_seconds: u32, max: Duration) -> Result<Duration> {
    let ttl = if requested_seconds == 0 {
        Duration::from_secs(3600).min(max)
    } else {
        Duration::from_secs(u64::from(requested_seconds))
    };
    if ttl > max {
        return Err(Error::invalid(
            "expires_in_seconds",
            format!("must be at most {}", max.as_secs()),
        ));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_written_as_http_asks() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-05T01:02:03.456Z")
            .expect("date")
            .with_timezone(&chrono::Utc);
        assert_eq!(super::http_date(at), "Sat, 05 Dec 2026 01:02:03 GMT");
    }

    #[test]
    fn a_variant_is_saved_under_a_name_of_its_own_type() {
        assert_eq!(download_name("clip.mov", "", "video/quicktime"), "clip.mov");
        assert_eq!(
            download_name("clip.mov", "poster_jpeg", "image/jpeg"),
            "clip_poster_jpeg.jpg"
        );
        assert_eq!(
            download_name("notes", "preview", "application/x-unknown"),
            "notes_preview"
        );
        assert_eq!(
            download_name(".env", "thumb", "image/webp"),
            ".env_thumb.webp"
        );
    }

    #[test]
    fn the_disposition_has_an_ascii_name_and_the_exact_one() {
        assert_eq!(
            content_disposition(true, "Résumé \"final\".pdf"),
            "attachment; filename=\"R_sum_ _final_.pdf\"; filename*=UTF-8''R%C3%A9sum%C3%A9%20%22final%22%2Epdf"
        );
        assert!(content_disposition(false, "a\\b").starts_with("inline; filename=\"a_b\""));
        assert!(
            content_disposition(false, "100%.txt").starts_with("inline; filename=\"100_.txt\"")
        );
        assert_eq!(
            content_disposition(true, "invoice\u{202E}fdp.exe"),
            "attachment; filename=\"invoicefdp.exe\"; filename*=UTF-8''invoicefdp%2Eexe"
        );
    }

    #[test]
    fn an_unasked_url_lifetime_is_an_hour_within_the_maximum() {
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(url_ttl(0, day).unwrap(), Duration::from_secs(3600));
        let quarter = Duration::from_secs(900);
        assert_eq!(url_ttl(0, quarter).unwrap(), quarter);
        assert_eq!(url_ttl(600, quarter).unwrap(), Duration::from_secs(600));
        assert!(url_ttl(901, quarter).is_err());
    }

    #[test]
    fn ranges_are_cut_at_the_end_and_refused_past_it() {
        assert_eq!(resolve_range(100, 10, Some(20)).unwrap(), 10..30);
        assert_eq!(resolve_range(100, 90, Some(20)).unwrap(), 90..100);
        assert_eq!(resolve_range(100, 0, None).unwrap(), 0..100);
        assert_eq!(resolve_range(0, 0, None).unwrap(), 0..0);
        assert!(matches!(
            resolve_range(100, 100, None),
            Err(Error::RangeNotSatisfiable { .. })
        ));
        assert!(matches!(
            resolve_range(100, 5, Some(0)),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn signatures_bind_file_variant_and_expiry() {
        let signer = UrlSigner::new(SigningKeys::new(b"k", None), "http://x".into());
        let id = Uuid::now_v7();
        let sig_of = |url: String| {
            let after = url.split("sig=").nth(1).unwrap().to_owned();
            after.split('&').next().unwrap().to_owned()
        };
        let query = |exp: i64, sig: &str, variant: Option<&str>, dl: Option<&str>| SignedQuery {
            exp,
            sig: sig.to_owned(),
            variant: variant.map(str::to_owned),
            dl: dl.map(str::to_owned),
        };
        let sig = sig_of(signer.sign(&id, "", 100, false));
        assert!(signer.verify(&id, &query(100, &sig, None, None)));
        // Not past its expiry, nor for another file, a variant of this one, or as an
        // attachment.
        assert!(!signer.verify(&id, &query(101, &sig, None, None)));
        assert!(!signer.verify(&Uuid::now_v7(), &query(100, &sig, None, None)));
        assert!(!signer.verify(&id, &query(100, &sig, Some("thumb_256_webp"), None)));
        assert!(!signer.verify(&id, &query(100, &sig, None, Some("1"))));
        // A variant's own link, and an attachment's, are good for them alone.
        let thumb = sig_of(signer.sign(&id, "thumb_256_webp", 100, false));
        assert!(signer.verify(&id, &query(100, &thumb, Some("thumb_256_webp"), None)));
        assert!(!signer.verify(&id, &query(100, &thumb, None, None)));
        assert!(!signer.verify(&id, &query(100, &thumb, Some("preview_webp"), None)));
        let attachment = sig_of(signer.sign(&id, "", 100, true));
        assert!(signer.verify(&id, &query(100, &attachment, None, Some("1"))));
        assert!(!signer.verify(&id, &query(100, &attachment, None, None)));
    }
}
