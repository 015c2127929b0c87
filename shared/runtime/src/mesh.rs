//! Calls between services. Each dependency is a small trait with two implementations: an
//! in-process one that calls the other service's handler directly (`serve all`, `dev`,
//! tests) and a gRPC one that calls it over the network (`serve <one>`, Kubernetes). Both
//! carry a deadline and the internal service identity.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use stowage_proto::v1::{
    ChargeRequest, ChargeResponse, CommitRequest, CommitResponse, DebitRequest, DebitResponse,
    ExpireReservationsRequest, ExpireReservationsResponse, FindKeysRequest, FindKeysResponse,
    FindUploadKeysRequest, FindUploadKeysResponse, GetFileRequest, GetFileResponse,
    GetUsageRequest, GetUsageResponse, ListAccountsRequest, ListAccountsResponse,
    ListExpiredTrashRequest, ListExpiredTrashResponse, ListOriginalsRequest, ListOriginalsResponse,
    PurgeFileRequest, PurgeFileResponse, ReconcileRequest, ReconcileResponse, RegisterFileRequest,
    RegisterFileResponse, ReleaseRequest, ReleaseResponse, ReprocessRequest, ReprocessResponse,
    ReserveRequest, ReserveResponse, ResizeRequest, ResizeResponse, SetVariantsRequest,
    SetVariantsResponse, SweepStagingRequest, SweepStagingResponse, SweepUploadsRequest,
    SweepUploadsResponse, TrashOwnerFilesRequest, TrashOwnerFilesResponse, UsageByOwnerRequest,
    UsageByOwnerResponse, files_client::FilesClient, files_server::Files as FilesRpc,
    ingest_client::IngestClient, ingest_server::Ingest as IngestRpc, media_client::MediaClient,
    media_server::Media as MediaRpc, quota_client::QuotaClient, quota_server::Quota as QuotaRpc,
};
use tonic::{
    Request, Response, Status,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

use crate::auth::{Identity, Minter, SERVICE_SUBJECT};

/// How a process proves it is a Stowage service when it calls another one over gRPC.
#[derive(Clone)]
pub enum ServiceAuth {
    /// Mint short-lived HS256 service tokens with the shared secret.
    Mint(Minter),
    /// Present a fixed token (`STOWAGE_SERVICE_TOKEN`, JWKS deployments).
    Static(String),
    /// Present the token a file holds, read again when it changes
    /// (`STOWAGE_SERVICE_TOKEN_FILE`).
    File(Arc<TokenFile>),
}

impl ServiceAuth {
    fn token(&self) -> String {
        match self {
            Self::Mint(minter) => {
                minter.mint(SERVICE_SUBJECT, &["service"], Duration::from_secs(300))
            }
            Self::Static(token) => token.clone(),
            Self::File(file) => file.token(),
        }
    }

    fn request<T>(&self, message: T, timeout: Duration) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        let value = MetadataValue::try_from(format!("Bearer {}", self.token()))
            .map_err(|_| Status::internal("service token is not a valid header value"))?;
        request.metadata_mut().insert("authorization", value);
        request.set_timeout(timeout);
        inject_trace_context(request.metadata_mut());
        Ok(request)
    }
}

/// A token kept in a file that something outside renews (a Kubernetes Secret mounted as a
/// volume is updated in place): a task looks at the file every [`TokenFile::LOOK_EVERY`], off
/// the runtime's threads, and reads it again when its modification time changed. A read that
/// fails keeps the token before.
pub struct TokenFile {
    path: std::path::PathBuf,
    held: std::sync::RwLock<HeldToken>,
}

struct HeldToken {
    token: String,
    modified: Option<std::time::SystemTime>,
}

impl TokenFile {
    /// How often the file is looked at.
    pub const LOOK_EVERY: Duration = Duration::from_secs(10);

    /// The token in `path`, read now, and looked at again every `every` (at least a second
    /// in use; tests may go lower) by a task of the current runtime for as long as the
    /// returned value lives. Refused outside a Tokio runtime, and for a zero `every`.
    pub fn watch(path: &std::path::Path, every: Duration) -> std::io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        if every.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "a token file is looked at every so often, not without pause",
            ));
        }
        let modified = std::fs::metadata(path)?.modified().ok();
        let token = read_token(path)?;
        let file = Arc::new(Self {
            path: path.to_path_buf(),
            held: std::sync::RwLock::new(HeldToken { token, modified }),
        });
        let watched = Arc::downgrade(&file);
        // Ends within `every` of the last holder's drop.
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(file) = watched.upgrade() else {
                    return;
                };
                let _ = tokio::task::spawn_blocking(move || file.look()).await;
            }
        });
        Ok(file)
    }

    /// The token as last read.
    pub fn token(&self) -> String {
        self.held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .token
            .clone()
    }

    /// Reads the file again if it changed since it was last read.
    fn look(&self) {
        let modified = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| m.modified().ok());
        let before = self
            .held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .modified;
        if modified == before {
            return;
        }
        match read_token(&self.path) {
            Ok(token) => {
                tracing::info!(path = %self.path.display(), "service token read again");
                *self
                    .held
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) =
                    HeldToken { token, modified };
            }
            Err(error) => tracing::warn!(
                path = %self.path.display(), %error,
                "service token file not read; the token before is used"
            ),
        }
    }
}

fn read_token(path: &std::path::Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim().to_owned();
    if token.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    Ok(token)
}

/// Carries the current span's W3C trace context to the callee, which continues the trace.
fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    let mut headers = http::HeaderMap::new();
    stowage_telemetry::inject_headers(&mut headers);
    for (name, value) in &headers {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::AsciiMetadataKey::from_bytes(name.as_str().as_bytes()),
            value.to_str().map(MetadataValue::try_from),
        ) && let Ok(value) = value
        {
            metadata.insert(key, value);
        }
    }
}

/// A lazily connected channel to `url` (`http://host:port`).
pub fn channel(url: &str, timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .connect_lazy())
}

fn local_request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .extensions_mut()
        .insert(Identity::internal_service());
    request
}

async fn with_deadline<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(timeout, call).await {
        Ok(result) => result.map(Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(
            "call to another service timed out",
        )),
    }
}

macro_rules! peer {
    (
        $(#[$doc:meta])* trait $api:ident;
        local $local:ident: $server:ident;
        remote $remote:ident: $client:ident;
        { $( $(#[$mdoc:meta])* fn $method:ident($req:ty) -> $resp:ty; )* }
    ) => {
        $(#[$doc])*
        #[async_trait]
        pub trait $api: Send + Sync + 'static {
            $( $(#[$mdoc])* async fn $method(&self, request: $req) -> Result<$resp, Status>; )*
        }

        /// In-process implementation: calls the service's handler directly.
        pub struct $local<S> {
            service: Arc<S>,
            timeout: Duration,
        }

        impl<S> $local<S> {
            /// Calls `service` with the internal identity and `timeout` per call.
            pub fn new(service: Arc<S>, timeout: Duration) -> Self {
                Self { service, timeout }
            }
        }

        #[async_trait]
        impl<S: $server> $api for $local<S> {
            $(
                async fn $method(&self, request: $req) -> Result<$resp, Status> {
                    with_deadline(self.timeout, self.service.$method(local_request(request))).await
                }
            )*
        }

        /// gRPC implementation: calls the service over the network.
        #[derive(Clone)]
        pub struct $remote {
            client: $client<Channel>,
            auth: ServiceAuth,
            timeout: Duration,
        }

        impl $remote {
            /// Calls the service behind `channel`, authenticating with `auth`.
            pub fn new(channel: Channel, auth: ServiceAuth, timeout: Duration) -> Self {
                Self { client: $client::new(channel), auth, timeout }
            }
        }

        #[async_trait]
        impl $api for $remote {
            $(
                async fn $method(&self, request: $req) -> Result<$resp, Status> {
                    let request = self.auth.request(request, self.timeout)?;
                    with_deadline(self.timeout, self.client.clone().$method(request)).await
                }
            )*
        }
    };
}

peer! {
    /// What other services need from Quota.
    trait QuotaApi;
    local LocalQuota: QuotaRpc;
    remote GrpcQuota: QuotaClient;
    {
        /// Holds bytes for an upload.
        fn reserve(ReserveRequest) -> ReserveResponse;
        /// Sets the bytes a held reservation holds.
        fn resize(ResizeRequest) -> ResizeResponse;
        /// Turns a reservation into usage.
        fn commit(CommitRequest) -> CommitResponse;
        /// Gives a reservation back.
        fn release(ReleaseRequest) -> ReleaseResponse;
        /// Lowers usage after bytes are removed for good.
        fn debit(DebitRequest) -> DebitResponse;
        /// Raises usage by derived bytes (variants).
        fn charge(ChargeRequest) -> ChargeResponse;
        /// Reads an account.
        fn get_usage(GetUsageRequest) -> GetUsageResponse;
        /// Pages through accounts.
        fn list_accounts(ListAccountsRequest) -> ListAccountsResponse;
        /// Sets a user's usage to a recount.
        fn reconcile(ReconcileRequest) -> ReconcileResponse;
        /// Gives back the bytes of expired reservations.
        fn expire_reservations(ExpireReservationsRequest) -> ExpireReservationsResponse;
    }
}

peer! {
    /// What other services need from Files.
    trait FilesApi;
    local LocalFiles: FilesRpc;
    remote GrpcFiles: FilesClient;
    {
        /// Records a stored blob as a file.
        fn register_file(RegisterFileRequest) -> RegisterFileResponse;
        /// Reads a file's metadata.
        fn get_file(GetFileRequest) -> GetFileResponse;
        /// Records a file's variants, media metadata and status.
        fn set_variants(SetVariantsRequest) -> SetVariantsResponse;
        /// Files in trash since before a time, all users.
        fn list_expired_trash(ListExpiredTrashRequest) -> ListExpiredTrashResponse;
        /// Removes a file for good.
        fn purge_file(PurgeFileRequest) -> PurgeFileResponse;
        /// What each owner stores.
        fn usage_by_owner(UsageByOwnerRequest) -> UsageByOwnerResponse;
        /// Which store keys files reference.
        fn find_keys(FindKeysRequest) -> FindKeysResponse;
        /// Every file's original key.
        fn list_originals(ListOriginalsRequest) -> ListOriginalsResponse;
        /// Moves every live file of an owner to trash.
        fn trash_owner_files(TrashOwnerFilesRequest) -> TrashOwnerFilesResponse;
    }
}

peer! {
    /// What other services need from Media.
    trait MediaApi;
    local LocalMedia: MediaRpc;
    remote GrpcMedia: MediaClient;
    {
        /// Runs a file's processing again.
        fn reprocess(ReprocessRequest) -> ReprocessResponse;
    }
}

peer! {
    /// What other services need from Ingest.
    trait IngestApi;
    local LocalIngest: IngestRpc;
    remote GrpcIngest: IngestClient;
    {
        /// Ends abandoned uploads.
        fn sweep_uploads(SweepUploadsRequest) -> SweepUploadsResponse;
        /// Removes stale staging data.
        fn sweep_staging(SweepStagingRequest) -> SweepStagingResponse;
        /// Which keys unfinished uploads name.
        fn find_upload_keys(FindUploadKeysRequest) -> FindUploadKeysResponse;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A renewed token is presented once the file changes; an emptied or vanished file
    /// leaves the token before in use; a file that is no token is refused at once.
    #[tokio::test]
    async fn a_token_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("token");
        let write = |text: &str, at_secs: u64| {
            std::fs::write(&path, text).expect("write");
            let at = std::time::UNIX_EPOCH + Duration::from_secs(at_secs);
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(at))
                .expect("mtime");
        };
        // Until the file's token is `want`, or panics after 5 s.
        async fn presents(file: &TokenFile, want: &str) {
            for _ in 0..500 {
                if file.token() == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("presents {:?}, not {want:?}", file.token());
        }
        write("first\n", 1_000);
        let file = TokenFile::watch(&path, Duration::from_millis(10)).expect("opens");
        assert_eq!(file.token(), "first");
        write("second", 2_000);
        presents(&file, "second").await;
        write("  ", 3_000);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(file.token(), "second", "an empty file is not a token");
        std::fs::remove_file(&path).expect("remove");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(file.token(), "second");
        write("third", 4_000);
        presents(&file, "third").await;
        // Looked at only so often.
        let slow = TokenFile::watch(&path, Duration::from_secs(3600)).expect("opens");
        write("fourth", 5_000);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(slow.token(), "third");
        write("", 6_000);
        assert!(TokenFile::watch(&path, Duration::from_secs(1)).is_err());
        write("fifth", 7_000);
        assert!(TokenFile::watch(&path, Duration::ZERO).is_err());
    }
}
