//! Where a session's bytes wait until completion.
//!
//! Stores with a native multipart API (S3, memory) receive each chunk as a part of a multipart
//! upload at the final key. Those APIs refuse parts below a minimum size (5 MiB on S3) except
//! the last one, while tus and grpc-web clients may send any chunk size: a chunk too small to be
//! a part is kept as a staging object and merged into the next part. A local-disk store writes
//! each chunk in place into one staging file (`staging/{upload_id}/data`), recorded by the
//! session's offset alone, and completion renames it. Other stores without a multipart API keep
//! every chunk as a part object under `staging/{upload_id}/`, and completion streams them into
//! the final key.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::TryStreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart, multipart::MultipartStore,
    path::Path as ObjectPath,
};
use stowage_blob::{Blobs, keys};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Smallest native part that is not the last one (the S3 minimum).
pub const MIN_NATIVE_PART: usize = 5 * 1024 * 1024;

/// A staged part as recorded in `ingest.upload_parts`.
#[derive(Clone, Debug)]
pub struct Part {
    /// Order of the part (0-based). Native parts use it as their part index.
    pub number: i32,
    /// Offset of its first byte in the file.
    pub start: u64,
    /// Its size.
    pub size: u64,
    /// The store's id of a native part; empty for part objects and pending bytes.
    pub part_id: String,
    /// Bytes kept aside until they can be merged into a native part.
    pub pending: bool,
}

/// What writing a chunk changed, for the caller to record in the same transaction.
#[derive(Debug, Default)]
pub struct Staged {
    /// Pending parts now merged into `part` (their rows go).
    pub merged: Vec<i32>,
    /// The new part row.
    pub part: Option<Part>,
}

/// The upload being staged and where it will land.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// Upload id.
    pub upload: Uuid,
    /// Final key.
    pub key: &'a ObjectPath,
    /// Native multipart upload id, when the store has one.
    pub multipart_id: Option<&'a str>,
}

/// Staging over the process's object store.
#[derive(Clone)]
pub struct Staging {
    store: Arc<dyn ObjectStore>,
    multipart: Option<Arc<dyn MultipartStore>>,
    /// Root of a local-disk store: chunks are written in place into one staging file per
    /// upload (`staging/{upload_id}/data`) at their offsets, and completion is a rename, so
    /// the bytes are written once.
    local_root: Option<std::path::PathBuf>,
}

fn part_object(upload: Uuid, number: i32) -> ObjectPath {
    keys::staging_part(&upload.to_string(), u32::try_from(number).unwrap_or(0))
}

impl Staging {
    /// Staging for `blobs`.
    pub fn new(blobs: &Blobs) -> Self {
        Self {
            store: Arc::clone(&blobs.store),
            multipart: blobs.multipart.clone(),
            local_root: blobs.local_root.clone(),
        }
    }

    /// Refuses `bytes` more where the store would keep less than `keep` free (see
    /// `check_store_room`).
    pub fn check_room(&self, bytes: u64, keep: u64) -> Result<()> {
        check_store_room(self.local_root.as_deref(), bytes, keep)
    }

    /// Whether chunks go to a native multipart upload.
    pub fn is_native(&self) -> bool {
        self.multipart.is_some()
    }

    /// Whether staged chunks are recorded as parts (`ingest.upload_parts`). A local-disk
    /// store keeps none: its chunks go in place into one file, and completion needs only the
    /// size.
    pub fn keeps_parts(&self) -> bool {
        self.local_root.is_none()
    }

    /// Starts a native multipart upload at `key`; `None` for part-object staging.
    pub async fn begin(&self, key: &ObjectPath) -> Result<Option<String>> {
        match &self.multipart {
            Some(mp) => Ok(Some(mp.create_multipart(key).await?)),
            None => Ok(None),
        }
    }

    /// Stages `data` starting at `start`, given the parts staged so far. `last` says whether
    /// the chunk ends the file (then pending bytes are flushed with it).
    pub async fn write(
        &self,
        target: Target<'_>,
        parts: &[Part],
        start: u64,
        data: Bytes,
        last: bool,
    ) -> Result<Staged> {
        let Target {
            upload,
            key,
            multipart_id,
        } = target;
        let next = parts.iter().map(|p| p.number + 1).max().unwrap_or(0);
        if let Some(root) = &self.local_root {
            let path = local_data(root, upload);
            blocking(move || write_at(&path, start, &data)).await?;
            return Ok(Staged::default());
        }
        let (Some(mp), Some(id)) = (&self.multipart, multipart_id) else {
            return self.put_part_object(upload, next, start, data, false).await;
        };
        let pending: Vec<&Part> = parts.iter().filter(|p| p.pending).collect();
        let pending_size: u64 = pending.iter().map(|p| p.size).sum();
        if !last && (pending_size + data.len() as u64) < MIN_NATIVE_PART as u64 {
            return self.put_part_object(upload, next, start, data, true).await;
        }
        // Merge what was held back (under one minimum part, so bounded) with this chunk.
        let (payload, first_start) = if pending.is_empty() {
            (PutPayload::from(data), start)
        } else {
            let mut buf = BytesMut::with_capacity(pending_size as usize + data.len());
            self.read_pending(upload, &pending, &mut buf).await?;
            buf.extend_from_slice(&data);
            (PutPayload::from(buf.freeze()), pending[0].start)
        };
        let size = payload.content_length() as u64;
        let native_index = parts.iter().filter(|p| !p.pending).count();
        let part_id = mp
            .put_part(key, &id.to_owned(), native_index, payload)
            .await?;
        Ok(Staged {
            merged: pending.iter().map(|p| p.number).collect(),
            part: Some(Part {
                number: next,
                start: first_start,
                size,
                part_id: part_id.content_id,
                pending: false,
            }),
        })
    }

    /// Keeps `data` as the part object `number`: a part of its own on stores without
    /// multipart, or bytes held back (`pending`) until a native part can take them.
    async fn put_part_object(
        &self,
        upload: Uuid,
        number: i32,
        start: u64,
        data: Bytes,
        pending: bool,
    ) -> Result<Staged> {
        let size = data.len() as u64;
        self.store
            .put(&part_object(upload, number), PutPayload::from(data))
            .await?;
        Ok(Staged {
            merged: Vec::new(),
            part: Some(Part {
                number,
                start,
                size,
                part_id: String::new(),
                pending,
            }),
        })
    }

    /// Places the staged bytes at `key`. Safe to call again after a crash: a completed
    /// native upload or an already written key is detected by its size.
    pub async fn compose(
        &self,
        upload: Uuid,
        key: &ObjectPath,
        multipart_id: Option<&str>,
        parts: &[Part],
        size: u64,
    ) -> Result<()> {
        if let Ok(meta) = self.store.head(key).await
            && meta.size == size
            && multipart_id.is_none()
        {
            return Ok(());
        }
        if let Some(root) = &self.local_root {
            let (from, to) = (local_data(root, upload), root.join(key.as_ref()));
            return blocking(move || place_local(&from, &to, size)).await;
        }
        match (&self.multipart, multipart_id) {
            (Some(mp), Some(id)) => {
                match self
                    .complete_native(mp.as_ref(), upload, key, id, parts)
                    .await
                {
                    Ok(()) => Ok(()),
                    // Completed by an earlier attempt that crashed before recording it: the
                    // native upload is gone, so its last part or its completion is refused, and
                    // the object is in place.
                    Err(e) => match self.store.head(key).await {
                        Ok(meta) if meta.size == size => Ok(()),
                        _ => Err(e),
                    },
                }
            }
            _ => {
                let upload_to = self.store.put_multipart(key).await?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload_to, 8 << 20);
                let mut ordered: Vec<&Part> = parts.iter().collect();
                ordered.sort_by_key(|p| p.number);
                for p in ordered {
                    let mut stream = self
                        .store
                        .get(&part_object(upload, p.number))
                        .await?
                        .into_stream();
                    while let Some(bytes) = stream.try_next().await? {
                        writer.wait_for_capacity(4).await?;
                        writer.put(bytes);
                    }
                }
                writer.finish().await?;
                Ok(())
            }
        }
    }

    /// Appends the bytes held back in `pending` (under one minimum part in all) to `buf`.
    async fn read_pending(
        &self,
        upload: Uuid,
        pending: &[&Part],
        buf: &mut BytesMut,
    ) -> Result<()> {
        for p in pending {
            let held = self.store.get(&part_object(upload, p.number)).await?;
            buf.extend_from_slice(&held.bytes().await?);
        }
        Ok(())
    }

    /// Completes native upload `id` at `key` from its parts; held-back bytes (or, for an empty
    /// file, nothing) become its last part.
    async fn complete_native(
        &self,
        mp: &dyn MultipartStore,
        upload: Uuid,
        key: &ObjectPath,
        id: &str,
        parts: &[Part],
    ) -> Result<()> {
        let id = id.to_owned();
        let mut ids: Vec<object_store::multipart::PartId> = parts
            .iter()
            .filter(|p| !p.pending)
            .map(|p| object_store::multipart::PartId {
                content_id: p.part_id.clone(),
            })
            .collect();
        let pending: Vec<&Part> = parts.iter().filter(|p| p.pending).collect();
        if !pending.is_empty() || ids.is_empty() {
            let mut buf = BytesMut::new();
            self.read_pending(upload, &pending, &mut buf).await?;
            let part = mp
                .put_part(key, &id, ids.len(), PutPayload::from(buf.freeze()))
                .await?;
            ids.push(part);
        }
        mp.complete_multipart(key, &id, ids).await?;
        Ok(())
    }

    /// Removes everything staged for `upload` (part objects, pending bytes, native upload).
    pub async fn discard_all(
        &self,
        upload: Uuid,
        key: Option<&ObjectPath>,
        multipart_id: Option<&str>,
        parts: &[Part],
    ) {
        if let Some(root) = &self.local_root {
            let dir = root.join("staging").join(upload.to_string());
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
            return;
        }
        self.discard(upload, key, multipart_id, parts).await;
    }

    /// Removes part objects and pending bytes (and the native upload, when `key` is given).
    pub async fn discard(
        &self,
        upload: Uuid,
        key: Option<&ObjectPath>,
        multipart_id: Option<&str>,
        parts: &[Part],
    ) {
        if let (Some(mp), Some(key), Some(id)) = (&self.multipart, key, multipart_id)
            && let Err(e) = mp.abort_multipart(key, &id.to_owned()).await
        {
            tracing::debug!(%upload, error = %e, "abort of native multipart failed (maybe completed)");
        }
        for p in parts
            .iter()
            .filter(|p| p.pending || self.multipart.is_none())
        {
            if let Err(e) = self.store.delete(&part_object(upload, p.number)).await {
                tracing::warn!(%upload, error = %e, "staging delete failed; the staging sweep will retry");
            }
        }
    }
}

/// Refuses `bytes` more on a local-disk store (at `root`) that would leave it less than `keep`
/// free. Nothing to check on other stores, or with `keep` 0.
pub(crate) fn check_store_room(
    root: Option<&std::path::Path>,
    bytes: u64,
    keep: u64,
) -> Result<()> {
    let Some(free) = root.filter(|_| keep > 0).and_then(stowage_blob::free_bytes) else {
        return Ok(());
    };
    if free < bytes.saturating_add(keep) {
        tracing::warn!(
            free,
            needed = bytes,
            keep,
            "upload refused: the store would keep less free space than STOWAGE_INGEST__MIN_FREE"
        );
        return Err(Error::StoreFull { needed: bytes });
    }
    Ok(())
}

fn local_data(root: &std::path::Path, upload: Uuid) -> std::path::PathBuf {
    root.join("staging").join(upload.to_string()).join("data")
}

/// Writes `data` at `offset` of the staging file and flushes it to the disk: the caller
/// records the new offset next, and an offset the server acknowledged must survive a power cut,
/// not only a crash of the process. Bytes past the committed offset left by a crashed writer are
/// overwritten by the retry, or cut off at placement.
fn write_at(path: &std::path::Path, offset: u64, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        create_dirs_durably(dir)?;
    }
    write_file_at(path, offset, data)?;
    if offset == 0 {
        // The first chunk created the file: its directory entry must be on disk too.
        sync_parent(path)?;
    }
    Ok(())
}

/// Writes `data` at `offset` of the file at `path` (created when missing), the aligned part
/// past the page cache, and flushes the file's data.
fn write_file_at(path: &std::path::Path, offset: u64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_error)?;
    let direct = write_direct(&file, offset, data).map_err(io_error)?;
    file.write_all_at(&data[direct..], offset + direct as u64)
        .map_err(io_error)?;
    file.sync_data().map_err(io_error)
}

/// Block size direct writes are aligned to (in memory, in the file and in length): a multiple of
/// every logical block size in use.
const DIRECT_ALIGN: usize = 4096;
/// Largest piece copied into the aligned buffer and written at a time. On this project's
/// machine 1 MiB wrote faster than 512 KiB or 8 MiB (upload-bench's direct write of 1 GiB:
/// 1,970 MB/s against 1,576 and 1,240; WriteChunks 914 MB/s against 875 and 530).
const DIRECT_PIECE: usize = 1 << 20;

/// Writes the longest aligned prefix of `data` at `offset` of `file` with `O_DIRECT`, past the
/// page cache, and returns its length (0 when `offset` is not aligned or the file system refuses
/// direct I/O: the caller writes the rest through the page cache, on the same descriptor).
/// Every chunk is flushed before it is acknowledged, so the page cache would only add a copy
/// into freshly allocated pages, which on this project's machine costs more than the disk (dd,
/// 1 GiB in 8 MiB blocks each flushed: 201 MB/s through the cache, 766 MB/s direct).
fn write_direct(file: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<usize> {
    let len = data.len() / DIRECT_ALIGN * DIRECT_ALIGN;
    if !offset.is_multiple_of(DIRECT_ALIGN as u64) || len == 0 {
        return Ok(0);
    }
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(file, FcntlArg::F_GETFL)?);
        if let Err(errno) = fcntl(file, FcntlArg::F_SETFL(flags | OFlag::O_DIRECT)) {
            return if no_direct_io(errno) {
                Ok(0)
            } else {
                Err(errno.into())
            };
        }
        let written = write_aligned(file, offset, &data[..len]);
        fcntl(file, FcntlArg::F_SETFL(flags))?;
        written
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Ok(0)
    }
}

/// Writes `data` (aligned in length) at the aligned `offset` of a file open with `O_DIRECT`,
/// through an aligned buffer; 0 if the first write is refused (blocks larger than
/// [`DIRECT_ALIGN`]), before anything was written.
#[cfg(target_os = "linux")]
fn write_aligned(file: &std::fs::File, offset: u64, data: &[u8]) -> std::io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let piece = data.len().min(DIRECT_PIECE);
    let mut buffer = vec![0u8; piece + DIRECT_ALIGN];
    let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
    let aligned = &mut buffer[start..start + piece];
    for (i, part) in data.chunks(piece).enumerate() {
        let aligned = &mut aligned[..part.len()];
        aligned.copy_from_slice(part);
        match file.write_all_at(aligned, offset + (i * piece) as u64) {
            Ok(()) => {}
            Err(e)
                if i == 0
                    && e.raw_os_error()
                        .is_some_and(|code| no_direct_io(nix::errno::Errno::from_raw(code))) =>
            {
                return Ok(0);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(data.len())
}

/// Whether `errno` says direct I/O is not possible here (rather than that the write failed).
#[cfg(target_os = "linux")]
fn no_direct_io(errno: nix::errno::Errno) -> bool {
    matches!(
        errno,
        nix::errno::Errno::EINVAL | nix::errno::Errno::EOPNOTSUPP
    )
}

/// Writes `data` as the object `key` of the local-disk store under `root`, as the store would
/// (a temporary file renamed into place, so no reader sees half an object), but past the page
/// cache where it can and flushed, file and directory, before it returns.
pub(crate) async fn put_local(root: &std::path::Path, key: &ObjectPath, data: Bytes) -> Result<()> {
    let path = root.join(key.as_ref());
    blocking(move || {
        // Named as the store names its own partial writes (`name#digits`): listings skip it.
        let mut name = path.file_name().unwrap_or_default().to_owned();
        name.push(format!("#{}", Uuid::new_v4().as_u128()));
        let temporary = path.with_file_name(name);
        if let Some(dir) = path.parent() {
            create_dirs_durably(dir)?;
        }
        let placed = write_file_at(&temporary, 0, &data).and_then(|()| {
            std::fs::rename(&temporary, &path).map_err(io_error)?;
            sync_parent(&path)
        });
        if placed.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        placed
    })
    .await
}

/// Runs file system work off the async threads.
async fn blocking(work: impl FnOnce() -> Result<()> + Send + 'static) -> Result<()> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Error::Internal("local file system work panicked"))?
}

/// Creates `dir` and its missing ancestors, each one's entry flushed in its parent (a new
/// directory must outlive a power cut as much as the file in it). A directory that exists is
/// taken as flushed by whoever created it.
fn create_dirs_durably(dir: &std::path::Path) -> Result<()> {
    let missing: Vec<&std::path::Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io_error)?;
    for created in missing.iter().rev() {
        if let Some(parent) = created.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// Flushes the directory entry of `path` (a file created or renamed there) to the disk.
fn sync_parent(path: &std::path::Path) -> Result<()> {
    match path.parent() {
        Some(dir) => sync_dir(dir),
        None => Ok(()),
    }
}

/// Flushes a directory's entries (a file created or renamed in it) to the disk.
fn sync_dir(dir: &std::path::Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error)
}

/// Moves the staging file to its final key, cut to `size` (an empty file if nothing came).
fn place_local(from: &std::path::Path, to: &std::path::Path, size: u64) -> Result<()> {
    if let Some(dir) = to.parent() {
        create_dirs_durably(dir)?;
    }
    if !from.exists() {
        if to.exists() {
            // Renamed by an earlier attempt, which may have stopped before flushing the name.
            return sync_parent(to);
        }
        write_at(from, 0, &[])?;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(from)
        .map_err(io_error)?;
    file.set_len(size).map_err(io_error)?;
    file.sync_all().map_err(io_error)?;
    std::fs::rename(from, to).map_err(io_error)?;
    // The file is registered next: its new name must outlive a power cut.
    sync_parent(to)?;
    if let Some(dir) = from.parent() {
        let _ = std::fs::remove_dir(dir);
    }
    Ok(())
}

fn io_error(e: std::io::Error) -> Error {
    Error::Store(object_store::Error::Generic {
        store: "LocalFileSystem",
        source: Box::new(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks at aligned and unaligned offsets, of aligned and odd lengths, a rewrite of an
    /// acknowledged range (a retry after a crash) and one larger than a direct piece: the staging
    /// file holds exactly the bytes sent, whichever way each part was written.
    #[test]
    fn direct_and_buffered_writes_make_one_byte_exact_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staging").join("data");
        let data: Vec<u8> = (0..3 * DIRECT_PIECE + 12_345)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let cuts = [
            0,
            DIRECT_ALIGN,           // aligned, one block
            3 * DIRECT_ALIGN + 100, // aligned start, odd length: direct then buffered
            5 * DIRECT_ALIGN,       // unaligned start: buffered
            DIRECT_PIECE + DIRECT_ALIGN,
            data.len(), // aligned start, over a piece long, odd tail
        ];
        for pair in cuts.windows(2) {
            write_at(&path, pair[0] as u64, &data[pair[0]..pair[1]]).unwrap();
        }
        // The retry of an acknowledged chunk writes the same bytes again.
        write_at(&path, DIRECT_ALIGN as u64, &data[DIRECT_ALIGN..cuts[2]]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(write_direct(&file, 1, &data[..DIRECT_ALIGN]).unwrap(), 0);
        // Where the file system has direct I/O (ext4, XFS, tmpfs since Linux 6.6), the aligned
        // prefix goes past the page cache; where it has not, nothing is written that way.
        let direct_io = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                .open(&path)
                .is_ok()
        };
        let expected = if direct_io { DIRECT_ALIGN } else { 0 };
        assert_eq!(
            write_direct(&file, 0, &data[..DIRECT_ALIGN + 1]).unwrap(),
            expected
        );
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[tokio::test]
    async fn a_local_put_replaces_the_object_whole_and_leaves_no_temporary_file() {
        let root = tempfile::tempdir().unwrap();
        let key = ObjectPath::from("events/desk/2026/12/02/1-000000000001.lz4");
        let first = Bytes::from(vec![7u8; 3 * DIRECT_ALIGN + 11]);
        put_local(root.path(), &key, first.clone()).await.unwrap();
        let path = root.path().join(key.as_ref());
        assert_eq!(std::fs::read(&path).unwrap(), first);
        // Written again, shorter: the object is the new bytes only.
        let second = Bytes::from_static(b"shorter");
        put_local(root.path(), &key, second.clone()).await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), second);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [path.file_name().unwrap()]);
    }
}
