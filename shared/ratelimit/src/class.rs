//! Classes of calls that share a limit, and which of our RPCs and HTTP routes fall in each.

use std::fmt;

use http::Method;

/// A class of calls that share one limit per subject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Calls that send bytes or events in (uploads, chunks, event appends).
    Upload,
    /// Calls that send file bytes out or hand out URLs to them.
    Download,
    /// Listings and history queries.
    List,
    /// Calls that need the admin scope.
    Admin,
    /// Everything else (`GetFile`, `GetUsage`, internal calls, ...).
    Other,
}

impl Class {
    /// Every class, in a fixed order.
    pub const ALL: [Class; 5] = [
        Class::Upload,
        Class::Download,
        Class::List,
        Class::Admin,
        Class::Other,
    ];

    /// Lowercase name, used in Redis keys, metric labels and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Upload => "upload",
            Class::Download => "download",
            Class::List => "list",
            Class::Admin => "admin",
            Class::Other => "other",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of a gRPC call from its path (`/stowage.v1.Files/ListFiles`). Unknown services and
/// methods are [`Class::Other`].
///
/// The table follows `proto/stowage/v1/*.proto`; a new RPC lands in `Other` until it is added
/// here.
pub fn classify_grpc_path(path: &str) -> Class {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return Class::Other;
    };
    match (service, method) {
        (
            "stowage.v1.Ingest",
            "Upload" | "UploadFiles" | "CreateUpload" | "WriteChunks" | "PutChunk"
                | "CompleteUpload"
            | "AppendEvents" | "PutEvents",
        ) => Class::Upload,
        ("stowage.v1.Files", "Download" | "GetDownloadUrl")
        | ("stowage.v1.Ingest", "GetScreenshot") => Class::Download,
        ("stowage.v1.Files", "ListFiles" | "ListTrash")
        | ("stowage.v1.Lifecycle", "MostRecentEvents" | "UserEvents") => Class::List,
        ("stowage.v1.Files", "StorageStats")
        | ("stowage.v1.Quota", "SetLimit" | "ListAccounts" | "Stats")
        // Every Media RPC and Lifecycle's schedules, runs and policies need the admin scope.
        | ("stowage.v1.Media", _)
        | (
            "stowage.v1.Lifecycle",
            "ListSchedules" | "RunNow" | "ListRuns" | "GetPolicy" | "SetPolicy",
        ) => Class::Admin,
        _ => Class::Other,
    }
}

/// The class of a plain HTTP request to one of our routes, or `None` when it is not limited
/// (CORS preflight, unknown routes).
///
/// `tus_path` is where the tus endpoint lives (`STOWAGE_INGEST__TUS_PATH`, default `/tus`):
/// creating an upload (`POST`) and sending bytes (`PATCH`) are [`Class::Upload`], asking for the
/// offset (`HEAD`) or terminating (`DELETE`) are [`Class::Other`]. Signed downloads
/// (`GET`/`HEAD /v1/blobs/{id}`) are [`Class::Download`].
pub fn classify_http(method: &Method, path: &str, tus_path: &str) -> Option<Class> {
    if *method == Method::OPTIONS {
        return None;
    }
    let tus_path = tus_path.trim_end_matches('/');
    let under_tus = path
        .strip_prefix(tus_path)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'));
    if under_tus {
        return Some(match *method {
            Method::POST | Method::PATCH => Class::Upload,
            _ => Class::Other,
        });
    }
    if path.starts_with("/v1/blobs/") && (*method == Method::GET || *method == Method::HEAD) {
        return Some(Class::Download);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_fall_in_their_class() {
        let cases = [
            ("/stowage.v1.Ingest/WriteChunks", Class::Upload),
            ("/stowage.v1.Ingest/PutChunk", Class::Upload),
            ("/stowage.v1.Ingest/AppendEvents", Class::Upload),
            ("/stowage.v1.Ingest/PutEvents", Class::Upload),
            ("/stowage.v1.Ingest/GetUpload", Class::Other),
            ("/stowage.v1.Files/Download", Class::Download),
            ("/stowage.v1.Files/GetDownloadUrl", Class::Download),
            ("/stowage.v1.Ingest/GetScreenshot", Class::Download),
            ("/stowage.v1.Files/ListFiles", Class::List),
            ("/stowage.v1.Files/GetFile", Class::Other),
            ("/stowage.v1.Files/StorageStats", Class::Admin),
            ("/stowage.v1.Quota/GetUsage", Class::Other),
            ("/stowage.v1.Quota/ListAccounts", Class::Admin),
            ("/stowage.v1.Media/GetJob", Class::Admin),
            ("/stowage.v1.Lifecycle/RunNow", Class::Admin),
            ("/stowage.v1.Lifecycle/UserEvents", Class::List),
            ("/grpc.health.v1.Health/Check", Class::Other),
            ("/", Class::Other),
            ("", Class::Other),
        ];
        for (path, class) in cases {
            assert_eq!(classify_grpc_path(path), class, "{path}");
        }
    }

    #[test]
    fn http_routes_fall_in_their_class() {
        let cases = [
            (Method::POST, "/tus", Some(Class::Upload)),
            (Method::POST, "/tus/", Some(Class::Upload)),
            (Method::PATCH, "/tus/abc", Some(Class::Upload)),
            (Method::HEAD, "/tus/abc", Some(Class::Other)),
            (Method::OPTIONS, "/tus/abc", None),
            (Method::PATCH, "/tusx/abc", None),
            (Method::GET, "/v1/blobs/f1", Some(Class::Download)),
            (Method::POST, "/v1/blobs/f1", None),
            (Method::GET, "/metrics", None),
        ];
        for (method, path, class) in cases {
            assert_eq!(
                classify_http(&method, path, "/tus/"),
                class,
                "{method} {path}"
            );
        }
    }
}
