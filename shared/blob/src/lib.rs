//! Builds the object store every service writes to from one URL, and the key layout they
//! share; [`plan`] says what Media makes of a stored file (Ingest reads it too, to register
//! files Media has nothing to do for as ready).
//!
//! | URL | store |
//! |---|---|
//! | `file:///var/lib/stowage` | local disk under that directory (created if missing); writes flushed to the disk before they return |
//! | `memory://` | in-process memory (tests, throwaway dev) |
//! | `s3://bucket[/prefix]` | S3 or an S3-compatible server; credentials, region and endpoint from the standard `AWS_*` variables |
//! | `az://container[/prefix]` | Azure Blob Storage; account, credentials and endpoint from the standard `AZURE_*` variables (`AZURE_STORAGE_USE_EMULATOR=true` for Azurite) |

use std::{path::PathBuf, sync::Arc};

pub use object_store::{ObjectStore, multipart::MultipartStore, path::Path as ObjectPath};
use object_store::{
    aws::AmazonS3Builder, azure::MicrosoftAzureBuilder, local::LocalFileSystem, memory::InMemory,
    prefix::PrefixStore,
};

pub mod keys;
pub mod plan;

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
    /// The same store's native multipart API, where it has one (S3, Azure, memory). `None` for
    /// local disk and for prefixed cloud stores: their uploads stage part objects instead.
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

/// The bucket (or container) a cloud store's URL names as its host.
fn bucket_of<'a>(parsed: &'a url::Url, url: &str) -> Result<&'a str, BlobError> {
    parsed
        .host_str()
        .filter(|b| !b.is_empty())
        .ok_or_else(|| BlobError::Url(format!("{url:?} names no bucket")))
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
                // Created for the owner and its group only (750): other users of the machine
                // cannot reach any blob, whatever mode the store gives the files below.
                {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o750)
                        .create(&root)
                        .map_err(|source| BlobError::Io {
                            path: root.clone(),
                            source,
                        })?;
                }
                // Every write (put, multipart completion, copy, rename) returns only once the
                // file and the directory entries leading to it are on the disk, as S3 promises:
                // callers record a key in PostgreSQL right after writing it.
                let store = LocalFileSystem::new_with_prefix(&root)?
                    .with_automatic_cleanup(true)
                    .with_fsync(true);
                Ok(Self {
                    store: Arc::new(store),
                    local_root: Some(root),
                    multipart: None,
                    url: url.to_owned(),
                })
            }
            "s3" => {
                let s3 = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket_of(&parsed, url)?)
                    .build()?;
                Ok(Self::cloud(Arc::new(s3), &parsed, url))
            }
            "az" => {
                let azure = MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket_of(&parsed, url)?)
                    .build()?;
                Ok(Self::cloud(Arc::new(azure), &parsed, url))
            }
            other => Err(BlobError::Url(format!(
                "unsupported scheme {other:?} in {url:?} (use file://, memory://, s3:// or az://)"
            ))),
        }
    }

    /// A cloud store under the URL's path as a key prefix, if it has one. Only an unprefixed
    /// store offers its multipart API: a multipart upload's key is not passed through the
    /// prefix, so prefixed stores stage part objects as local disk does.
    fn cloud<S>(store: Arc<S>, parsed: &url::Url, url: &str) -> Self
    where
        S: ObjectStore + MultipartStore,
    {
        let prefix = parsed.path().trim_matches('/');
        let (store, multipart): (Arc<dyn ObjectStore>, Option<Arc<dyn MultipartStore>>) =
            if prefix.is_empty() {
                (Arc::clone(&store) as Arc<dyn ObjectStore>, Some(store))
            } else {
                (Arc::new(PrefixStore::new(store, prefix)), None)
            };
        Self {
            store,
            local_root: None,
            multipart,
            url: url.to_owned(),
        }
    }

    /// Free bytes of the filesystem holding a local store; `None` for remote stores.
    pub fn available_bytes(&self) -> Option<u64> {
        free_bytes(self.local_root.as_ref()?)
    }

    /// Free and total bytes of the filesystem holding a local store; `None` for remote
    /// stores (their providers report their own).
    pub fn space(&self) -> Option<Space> {
        space(self.local_root.as_ref()?)
    }
}

/// Room on a filesystem, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Space {
    /// Free for unprivileged writers.
    pub available: u64,
    /// The whole filesystem.
    pub total: u64,
}

/// Free bytes (for unprivileged writers) of the filesystem holding `path`.
pub fn free_bytes(path: &std::path::Path) -> Option<u64> {
    space(path).map(|s| s.available)
}

/// Free and total bytes of the filesystem holding `path`.
pub fn space(path: &std::path::Path) -> Option<Space> {
    let stat = nix::sys::statvfs::statvfs(path).ok()?;
    Some(Space {
        available: stat.blocks_available().saturating_mul(stat.fragment_size()),
        total: stat.blocks().saturating_mul(stat.fragment_size()),
    })
}

/// A file a local-disk write keeps until it is complete: `{name}#{digits}` (the name the store
/// gives its own and that Ingest's durable writes use).
/// The store's own rule, exactly (the first `#` counts), so nothing it lists is taken for one.
pub fn is_temporary(file_name: &str) -> bool {
    matches!(file_name.split_once('#'), Some((_, suffix)) if !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

/// Temporary files under a local store's `root` last written before `before`: a write that
/// never finished (a crash between writing and renaming) leaves one, and the store's listings
/// never show them, so nothing else would find them. Paths relative to `root`, sorted.
pub fn local_temporaries(
    root: &std::path::Path,
    before: std::time::SystemTime,
) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            // Removed meanwhile (a staging directory cleaned up).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file()
                && is_temporary(&entry.file_name().to_string_lossy())
                && entry.metadata()?.modified()? < before
                && let Ok(relative) = entry.path().strip_prefix(root)
            {
                found.push(relative.to_string_lossy().into_owned());
            }
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_root_it_creates_is_closed_to_other_users() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data").join("blobs");
        let url = url::Url::from_file_path(&root).unwrap();
        Blobs::from_url(url.as_str()).unwrap();
        for created in [&root, &dir.path().join("data")] {
            let mode = std::fs::metadata(created).unwrap().permissions().mode();
            assert_eq!(mode & 0o007, 0, "{}: {mode:o}", created.display());
        }
    }

    #[test]
    fn temporaries_are_named_as_the_store_names_them() {
        assert!(is_temporary("photo.jpg#123"));
        assert!(!is_temporary("photo.jpg"));
        assert!(!is_temporary("photo.jpg#"));
        assert!(!is_temporary("photo#1.jpg"));
        // The store lists this one (its first suffix is not all digits): never taken.
        assert!(!is_temporary("a#b#123"));
    }

    #[test]
    fn only_old_temporaries_are_found_at_any_depth() -> std::io::Result<()> {
        let root = tempfile::tempdir()?;
        let deep = root.path().join("users/ann/2026/01");
        std::fs::create_dir_all(&deep)?;
        for name in ["old.bin#42", "young.bin#43", "kept.bin"] {
            std::fs::write(deep.join(name), b"x")?;
        }
        let hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        for name in ["old.bin#42", "kept.bin"] {
            std::fs::File::options()
                .write(true)
                .open(deep.join(name))?
                .set_modified(hour_ago)?;
        }
        let before = std::time::SystemTime::now() - std::time::Duration::from_secs(60);
        assert_eq!(
            local_temporaries(root.path(), before)?,
            ["users/ann/2026/01/old.bin#42"]
        );
        Ok(())
    }
}
