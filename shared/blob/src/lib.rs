//! Builds the object store every service writes to from one URL, and the key layout they
//! share.
//!
//! | URL | store |
//! |---|---|
//! | `file:///var/lib/stowage` | local disk under that directory (created if missing) |
//! | `memory://` | in-process memory (tests, throwaway dev) |
//! | `s3://bucket[/prefix]` | S3 or an S3-compatible server; credentials, region and endpoint from the standard `AWS_*` variables |

use std::{path::PathBuf, sync::Arc};

pub use object_store::{ObjectStore, multipart::MultipartStore, path::Path as ObjectPath};
use object_store::{
    aws::AmazonS3Builder, local::LocalFileSystem, memory::InMemory, prefix::PrefixStore,
};

pub mod keys;

/// Errors when building a store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The URL is not valid or its scheme is not supported.
    #[error("STOWAGE_BLOB_URL: {0}")]
    Url(String),
    /// The store could not be set up.
    #[error("STOWAGE_BLOB_URL: {0}")]
    Store(#[from] object_store::Error),
    /// The local directory could not be created.
    #[error("STOWAGE_BLOB_URL: cannot create {path}: {source}")]
    Io {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// An object store together with what we know about where it lives.
#[derive(Clone)]
pub struct Blobs {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// Root directory when the store is on local disk (for free-space figures).
    pub local_root: Option<PathBuf>,
    /// The same store's native multipart API, where it has one (S3, memory). `None` for local
    /// disk and for prefixed S3 stores: their uploads stage part objects instead.
    pub multipart: Option<Arc<dyn MultipartStore>>,
    /// The URL the store was built from, for logs.
    pub url: String,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blobs")
            .field("url", &self.url)
            .field("native_multipart", &self.multipart.is_some())
            .finish()
    }
}

impl Blobs {
    /// Builds the store named by `url`.
    pub fn from_url(url: &str) -> Result<Self, BlobError> {
        let parsed = url::Url::parse(url).map_err(|e| BlobError::Url(format!("{url:?}: {e}")))?;
        match parsed.scheme() {
            "memory" => {
                let memory = Arc::new(InMemory::new());
                Ok(Self {
                    store: Arc::clone(&memory) as Arc<dyn ObjectStore>,
                    local_root: None,
                    multipart: Some(memory),
                    url: url.to_owned(),
                })
            }
            "file" => {
                let root = parsed.to_file_path().map_err(|()| {
                    BlobError::Url(format!("{url:?} is not an absolute file path"))
                })?;
                std::fs::create_dir_all(&root).map_err(|source| BlobError::Io {
                    path: root.clone(),
                    source,
                })?;
                let store = LocalFileSystem::new_with_prefix(&root)?.with_automatic_cleanup(true);
                Ok(Self {
                    store: Arc::new(store),
                    local_root: Some(root),
                    multipart: None,
                    url: url.to_owned(),
                })
            }
            "s3" => {
                let bucket = parsed
                    .host_str()
                    .filter(|b| !b.is_empty())
                    .ok_or_else(|| BlobError::Url(format!("{url:?} names no bucket")))?;
                let s3 = Arc::new(
                    AmazonS3Builder::from_env()
                        .with_bucket_name(bucket)
                        .build()?,
                );
                let prefix = parsed.path().trim_matches('/');
                let (store, multipart): (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>) =
                    if prefix.is_empty() {
                        (Arc::clone(&s3) as Arc<dyn ObjectStore>, Some(s3))
                    } else {
                        (Arc::new(PrefixStore::new(Arc::clone(&s3), prefix)), None)
                    };
                Ok(Self {
                    store,
                    local_root: None,
                    multipart,
                    url: url.to_owned(),
                })
            }
            other => Err(BlobError::Url(format!(
                "unsupported scheme {other:?} in {url:?} (use file://, memory:// or s3://)"
            ))),
        }
    }

    /// Free bytes of the filesystem holding a local store; `None` for remote stores.
    pub fn available_bytes(&self) -> Option<u64> {
        let root = self.local_root.as_ref()?;
        let stat = nix::sys::statvfs::statvfs(root).ok()?;
        Some(stat.blocks_available().saturating_mul(stat.fragment_size()))
    }
}
