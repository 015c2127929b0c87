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
//!
//! Staging also keeps the upload's running SHA-256: each write takes the state before its chunk
//! and gives back the state after it. On local disk a chunk is hashed piece by piece as it is
//! copied into the buffer the disk writes from, while the piece before is being written.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use object_store::{
    ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart, multipart::MultipartStore,
    path::Path as ObjectPath,
};
use sha2::{Digest, Sha256};
use stowage_blob::{Blobs, keys};
use uuid::Uuid;

use crate::error::{Error, Result};

/// Smallest native part that is not the last one (the S3 minimum).
pub const MIN_NATIVE_PART: usize = 5 * 1024 * 1024;

/// Most parts of one native multipart upload (S3's and GCS's limit; Azure's is 50,000).
const MAX_NATIVE_PARTS: u64 = 10_000;

/// Size native parts may grow to (past S3's 5 MiB) to keep an upload within the 10,000 parts
/// a store takes; for uploads over 150 GiB, 5/4 of their even share instead.
const NATIVE_PART_ROOM: u64 = 16 * 1024 * 1024;

/// Smallest next native part, other than the last, of an upload of at most `max_size` bytes
/// that has `parts` native parts holding `covered` bytes so far. Chunks are held back and
/// merged until a part reaches it, so no upload needs more parts than a store takes.
///
/// Parts stay at S3's 5 MiB while the rest of the largest upload would still fit in the parts
/// left at [`NATIVE_PART_ROOM`] (or 5/4 of the even share, for uploads over 150 GiB) each;
/// past that point each takes at least an even share of what is left. What is left thus
/// always fits in the parts left at that room each, so no part but the last needs more than
/// the room, and a part is at most the room plus a chunk. Chunks of 5 MiB are each a part of
/// their own through the first 48 GiB of a 50 GiB upload, and 2.3% of them are held back in
/// all (an even share from the start, 5.37 MB, held every other chunk back to be read again).
pub fn min_native_part(max_size: u64, parts: u64, covered: u64) -> u64 {
    let floor = MIN_NATIVE_PART as u64;
    // Parts still to come, the last one included.
    let left = MAX_NATIVE_PARTS.saturating_sub(parts);
    if left <= 1 {
        return u64::MAX;
    }
    let room = NATIVE_PART_ROOM.max(max_size.div_ceil(MAX_NATIVE_PARTS - 1).saturating_mul(5) / 4);
    let remaining = max_size.saturating_sub(covered);
    if remaining.saturating_sub(floor) <= (left - 1).saturating_mul(room) {
        floor
    } else {
        floor.max(remaining.div_ceil(left))
    }
}

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
    /// The most the upload may hold (its declared length, or the limit while it is deferred),
    /// which decides how small its native parts may be ([`min_native_part`]).
    pub max_size: u64,
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
    /// Writer threads of local chunks (see [`MAX_WRITER_THREADS`]).
    writers: Arc<tokio::sync::Semaphore>,
}

/// Most writer threads local staging runs at once (each with [`PIECE_BUFFERS`] buffers of a
/// direct piece): past them, a chunk is written by the thread that hashes it, piece after
/// piece, as it would be on a busy machine anyway.
const MAX_WRITER_THREADS: usize = 32;

/// Held-back chunks read at once when they are merged into a native part.
const PENDING_READS: usize = 16;

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
            writers: Arc::new(tokio::sync::Semaphore::new(MAX_WRITER_THREADS)),
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

    /// Stages `data` starting at `start`, given the parts staged so far, and adds it to
    /// `hasher` (the upload's hash up to `start`), which it returns. `last` says whether the
    /// chunk ends the file (then pending bytes are flushed with it).
    pub async fn write(
        &self,
        target: Target<'_>,
        parts: &[Part],
        start: u64,
        data: Bytes,
        last: bool,
        mut hasher: Sha256,
    ) -> Result<(Staged, Sha256)> {
        if self.local_root.is_some() {
            let (hasher, mut flushing) =
                self.write_local(target.upload, start, data, hasher).await?;
            flushing.flushed().await?;
            return Ok((Staged::default(), hasher));
        }
        // Hashed off the async threads while the store takes the bytes.
        let hashing = tokio::task::spawn_blocking({
            let data = data.clone();
            move || {
                hasher.update(&data);
                hasher
            }
        });
        let (staged, hashed) =
            tokio::join!(self.write_part(target, parts, start, data, last), hashing);
        let hasher = hashed.map_err(|_| Error::Internal("hashing panicked"))?;
        Ok((staged?, hasher))
    }

    /// Starts writing `data` at `start` of the local staging file of `upload`, and returns
    /// once all of it is hashed: `hasher` with `data` added, and the write under way, which
    /// says when the bytes are on disk. Until then the hash is not to be recorded: a write
    /// that fails may stop the hashing half way.
    ///
    /// A chunk of more than one direct piece is hashed here piece by piece, each piece right
    /// after its copy into an aligned buffer (while it is in the CPU's cache), and written by
    /// a thread of its own meanwhile; the caller can hash the next chunk while this one's last
    /// piece is written and flushed.
    pub async fn write_local(
        &self,
        upload: Uuid,
        start: u64,
        data: Bytes,
        mut hasher: Sha256,
    ) -> Result<(Sha256, Flushing)> {
        let root = self.local_root.as_ref().ok_or(Error::Internal(
            "local staging on a store that is not local",
        ))?;
        let path = local_data(root, upload);
        let writer = Arc::clone(&self.writers).try_acquire_owned().ok();
        tokio::task::spawn_blocking(move || {
            let flushing = stage_local(path, start, data, &mut hasher, writer)?;
            Ok((hasher, flushing))
        })
        .await
        .map_err(|_| Error::Internal("local file system work panicked"))?
    }

    /// [`write`](Self::write) to a store that is not local disk, without the hashing.
    async fn write_part(
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
            max_size,
        } = target;
        let next = parts.iter().map(|p| p.number + 1).max().unwrap_or(0);
        let (Some(mp), Some(id)) = (&self.multipart, multipart_id) else {
            return self.put_part_object(upload, next, start, data, false).await;
        };
        let pending: Vec<&Part> = parts.iter().filter(|p| p.pending).collect();
        let pending_size: u64 = pending.iter().map(|p| p.size).sum();
        let native = parts.iter().filter(|p| !p.pending);
        let min_part = min_native_part(
            max_size,
            native.clone().count() as u64,
            native.map(|p| p.size).sum(),
        );
        if !last && (pending_size + data.len() as u64) < min_part {
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

    /// Appends the bytes held back in `pending` (under one minimum part in all) to `buf`,
    /// reading [`PENDING_READS`] of them at a time: a client sending small chunks leaves
    /// thousands of them.
    async fn read_pending(
        &self,
        upload: Uuid,
        pending: &[&Part],
        buf: &mut BytesMut,
    ) -> Result<()> {
        let paths: Vec<ObjectPath> = pending
            .iter()
            .map(|p| part_object(upload, p.number))
            .collect();
        let mut held = futures::stream::iter(paths)
            .map(|path| {
                let store = Arc::clone(&self.store);
                async move { Ok::<_, Error>(store.get(&path).await?.bytes().await?) }
            })
            .buffered(PENDING_READS);
        while let Some(bytes) = held.try_next().await? {
            buf.extend_from_slice(&bytes);
        }
        Ok(())
    }

    /// Completes native upload `id` at `key` from its parts; held-back bytes become its last
    /// part, and an empty file is put as an empty object.
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
            if ids.is_empty() && buf.is_empty() {
                // An empty file: a plain empty object. Azure refuses an empty block, and no
                // store needs a multipart upload for nothing.
                self.store.put(key, PutPayload::default()).await?;
                if let Err(error) = mp.abort_multipart(key, &id).await {
                    tracing::debug!(%upload, %error, "multipart upload of an empty file not aborted; the store's rule ends it");
                }
                return Ok(());
            }
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

/// A chunk being written to a local staging file.
pub struct Flushing(tokio::sync::oneshot::Receiver<Result<()>>);

impl Flushing {
    fn done(result: Result<()>) -> Self {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let _ = tx.send(result);
        Self(rx)
    }

    /// Waits until every byte of the chunk is written and flushed to the disk (once: the
    /// caller lets go of it after).
    pub async fn flushed(&mut self) -> Result<()> {
        (&mut self.0)
            .await
            .map_err(|_| Error::Internal("the staging writer stopped"))?
    }
}

/// Aligned buffers a chunk's pieces go through: one being filled and hashed, one waiting and one
/// being written, so that a slow write does not stop the hashing at once. On this project's
/// machine (upload-bench, 1 GiB through WriteChunks) two gave 1,010 and 1,053 MB/s, four 1,052
/// and 1,107.
const PIECE_BUFFERS: usize = 3;

/// A piece of a chunk for the writer thread.
enum Piece {
    /// `len` bytes of `buffer` (aligned) to write at the aligned offset `at`.
    Direct {
        buffer: Aligned,
        len: usize,
        at: u64,
    },
    /// The unaligned rest of the chunk, written through the page cache at `at`.
    Buffered { data: Bytes, at: u64 },
}

/// A buffer aligned for direct I/O.
struct Aligned {
    buffer: Vec<u8>,
    start: usize,
}

impl Aligned {
    /// A buffer of `len` bytes.
    fn new(len: usize) -> Self {
        let buffer = vec![0u8; len + DIRECT_ALIGN];
        let start = buffer.as_ptr().align_offset(DIRECT_ALIGN);
        Self { buffer, start }
    }

    /// Copies `data` (at most a piece) in and returns the copy.
    fn fill(&mut self, data: &[u8]) -> &[u8] {
        let copy = &mut self.buffer[self.start..self.start + data.len()];
        copy.copy_from_slice(data);
        copy
    }

    fn bytes(&self, len: usize) -> &[u8] {
        &self.buffer[self.start..self.start + len]
    }
}

/// Writes `data` at `offset` of the staging file at `path` and adds it to `hasher` (see
/// [`Staging::write_local`]), its pieces written by a thread of its own while `writer` (a
/// place among the writer threads) is given. A chunk of one direct piece or less, or at an
/// unaligned offset, or without a place, is hashed and written here, and its write is over
/// when this returns.
fn stage_local(
    path: std::path::PathBuf,
    offset: u64,
    data: Bytes,
    hasher: &mut Sha256,
    writer: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<Flushing> {
    let direct = direct_len(offset, data.len());
    if direct <= DIRECT_PIECE || writer.is_none() {
        hasher.update(&data);
        return Ok(Flushing::done(write_at(&path, offset, &data)));
    }
    if let Some(dir) = path.parent() {
        create_dirs_durably(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_error)?;
    let (pieces, to_write) = std::sync::mpsc::sync_channel::<Piece>(1);
    let (spares, spare) = std::sync::mpsc::channel::<Aligned>();
    for _ in 0..PIECE_BUFFERS {
        let _ = spares.send(Aligned::new(DIRECT_PIECE));
    }
    let (done, flushing) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stowage-staging".into())
        .spawn(move || {
            let _place = writer;
            let written = write_pieces(&file, to_write, &spares)
                .and_then(|()| file.sync_data())
                .map_err(io_error);
            // The first chunk created the file: its directory entry must be on disk too.
            let _ = done.send(written.and_then(|()| match offset {
                0 => sync_parent(&path),
                _ => Ok(()),
            }));
        })
        .map_err(io_error)?;
    let (aligned, rest) = data.split_at(direct);
    for (i, part) in aligned.chunks(DIRECT_PIECE).enumerate() {
        // Either fails only when the writer has stopped, which it reports.
        let Ok(mut buffer) = spare.recv() else {
            break;
        };
        hasher.update(buffer.fill(part));
        let at = offset + (i * DIRECT_PIECE) as u64;
        if pieces
            .send(Piece::Direct {
                buffer,
                len: part.len(),
                at,
            })
            .is_err()
        {
            break;
        }
    }
    hasher.update(rest);
    if !rest.is_empty() {
        let at = offset + direct as u64;
        let _ = pieces.send(Piece::Buffered {
            data: data.slice(direct..),
            at,
        });
    }
    Ok(Flushing(flushing))
}

/// The writer thread of [`stage_local`]: writes the pieces in order, past the page cache while
/// the file system allows it, and hands each buffer back.
fn write_pieces(
    file: &std::fs::File,
    pieces: std::sync::mpsc::Receiver<Piece>,
    spares: &std::sync::mpsc::Sender<Aligned>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut direct = DirectIo::new(file);
    for piece in pieces {
        match piece {
            Piece::Direct { buffer, len, at } => {
                direct.write(buffer.bytes(len), at)?;
                let _ = spares.send(buffer);
            }
            Piece::Buffered { data, at } => {
                direct.off()?;
                file.write_all_at(&data, at)?;
            }
        }
    }
    direct.off()
}

/// `O_DIRECT` on a file, turned on for aligned writes while the file system accepts it.
struct DirectIo<'a> {
    file: &'a std::fs::File,
    /// Whether the file system may accept it (until it refuses).
    possible: bool,
    on: bool,
}

impl<'a> DirectIo<'a> {
    fn new(file: &'a std::fs::File) -> Self {
        Self {
            file,
            possible: cfg!(target_os = "linux"),
            on: false,
        }
    }

    /// Writes `data` (aligned in memory and length) at the aligned offset `at`: past the page
    /// cache, or through it where the file system refuses direct I/O.
    fn write(&mut self, data: &[u8], at: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.possible && !self.on {
            self.set(true)?;
        }
        match self.file.write_all_at(data, at) {
            Err(e) if self.on && e.raw_os_error().is_some_and(refuses_direct_io) => {
                // A retry of the same bytes through the page cache, and for the rest.
                self.set(false)?;
                self.possible = false;
                self.file.write_all_at(data, at)
            }
            written => written,
        }
    }

    /// Turns `O_DIRECT` off (for an unaligned write, and before the file is flushed).
    fn off(&mut self) -> std::io::Result<()> {
        if self.on { self.set(false) } else { Ok(()) }
    }

    #[cfg(target_os = "linux")]
    fn set(&mut self, on: bool) -> std::io::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_truncate(fcntl(self.file, FcntlArg::F_GETFL)?);
        let flags = if on {
            flags | OFlag::O_DIRECT
        } else {
            flags - OFlag::O_DIRECT
        };
        match fcntl(self.file, FcntlArg::F_SETFL(flags)) {
            Ok(_) => {
                self.on = on;
                Ok(())
            }
            Err(errno) if on && no_direct_io(errno) => {
                self.possible = false;
                Ok(())
            }
            Err(errno) => Err(errno.into()),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn set(&mut self, _on: bool) -> std::io::Result<()> {
        self.possible = false;
        Ok(())
    }
}

/// Whether an I/O error code says direct I/O is not possible here.
fn refuses_direct_io(code: i32) -> bool {
    #[cfg(target_os = "linux")]
    {
        no_direct_io(nix::errno::Errno::from_raw(code))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = code;
        false
    }
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
    let direct = direct_len(offset, data.len());
    let mut io = DirectIo::new(&file);
    if direct > 0 {
        let mut buffer = Aligned::new(direct.min(DIRECT_PIECE));
        for (i, part) in data[..direct].chunks(DIRECT_PIECE).enumerate() {
            io.write(buffer.fill(part), offset + (i * DIRECT_PIECE) as u64)
                .map_err(io_error)?;
        }
    }
    io.off().map_err(io_error)?;
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

/// How much of `len` bytes written at `offset` can go past the page cache: the longest aligned
/// prefix (none at an unaligned offset).
///
/// Every chunk is flushed before it is acknowledged, so the page cache would only add a copy
/// into freshly allocated pages, which on this project's machine costs more than the disk (dd,
/// 1 GiB in 8 MiB blocks each flushed: 201 MB/s through the cache, 766 MB/s direct).
fn direct_len(offset: u64, len: usize) -> usize {
    if offset.is_multiple_of(DIRECT_ALIGN as u64) {
        len / DIRECT_ALIGN * DIRECT_ALIGN
    } else {
        0
    }
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

    /// Parts made from chunks of `chunk` bytes of an upload of `total` bytes that may hold
    /// `max_size`, as `write_part` makes them (the last chunk takes what is held back), and
    /// how many chunks were held back to be read again.
    fn parts_of(max_size: u64, total: u64, chunk: u64) -> (Vec<u64>, u64) {
        let (mut parts, mut held, mut pending, mut offset) = (Vec::new(), 0, 0, 0);
        while offset < total {
            let size = chunk.min(total - offset);
            let min = min_native_part(max_size, parts.len() as u64, offset - pending);
            offset += size;
            if offset < total && pending + size < min {
                pending += size;
                held += 1;
            } else {
                parts.push(pending + size);
                pending = 0;
            }
        }
        (parts, held)
    }

    /// However chunks come, an upload makes at most 10,000 native parts, each but the last of
    /// S3's 5 MiB at least, none much larger than it must be; and chunks of 5 MiB are parts of
    /// their own, without being held back, through the first 48 GiB of the default 50 GiB.
    #[test]
    fn no_upload_needs_more_native_parts_than_a_store_takes() {
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        for max_size in [
            9_999 * 5 * MIB,
            9_999 * 5 * MIB + 1,
            50 * GIB,
            200 * GIB,
            5 << 40,
        ] {
            let room = NATIVE_PART_ROOM.max(max_size.div_ceil(MAX_NATIVE_PARTS - 1) * 5 / 4);
            for chunk in [5 * MIB, 5 * MIB + 1, 8 * MIB, 64 * MIB] {
                let (parts, _) = parts_of(max_size, max_size, chunk);
                let context = format!("{max_size} bytes in chunks of {chunk}");
                assert!(
                    parts.len() as u64 <= MAX_NATIVE_PARTS,
                    "{context}: {}",
                    parts.len()
                );
                assert_eq!(parts.iter().sum::<u64>(), max_size, "{context}");
                let (last, others) = parts.split_last().unwrap();
                assert!(others.iter().all(|&p| p >= 5 * MIB), "{context}");
                assert!(
                    others.iter().all(|&p| p < room + chunk),
                    "{context}: {} over {room}",
                    others.iter().max().unwrap()
                );
                assert!(*last < room + chunk, "{context}: last part {last}");
            }
        }
        let (parts, held) = parts_of(50 * GIB, 48 * GIB, 5 * MIB);
        assert_eq!((parts.len() as u64, held), (48 * GIB / (5 * MIB) + 1, 0));
        let (_, held) = parts_of(50 * GIB, 50 * GIB, 5 * MIB);
        assert!(held * 100 < 3 * 10_240, "{held} of 10,240 chunks held back");
        // A small upload is one part whatever its limit.
        assert_eq!(parts_of(50 * GIB, 1000, 5 * MIB), (vec![1000], 0));
    }

    /// A place among the writer threads.
    fn writer() -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .ok()
    }

    /// Chunks at aligned and unaligned offsets, of aligned and odd lengths, longer and shorter
    /// than a direct piece (handed to the writer thread, or written in place), and a rewrite of
    /// an acknowledged range (a retry after a crash): the staging file holds exactly the bytes
    /// sent, and the hash carried from chunk to chunk is the whole file's.
    #[tokio::test]
    async fn chunks_written_every_way_make_one_byte_exact_file_and_its_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("staging").join("data");
        let (a, p) = (DIRECT_ALIGN, DIRECT_PIECE);
        let data = Bytes::from(
            (0..5 * a + 6 * p + 12_345)
                .map(|i| (i * 7 % 251) as u8)
                .collect::<Vec<u8>>(),
        );
        let cuts = [
            0,
            a,                 // aligned, one block
            3 * a + 100,       // aligned start, odd length: direct then buffered
            5 * a,             // unaligned start: buffered
            5 * a + 2 * p + 7, // aligned start, two pieces and an odd tail: the writer thread
            5 * a + 4 * p,     // unaligned start, two pieces long: buffered in place
            data.len(),        // aligned start, two pieces and an odd tail
        ];
        let write = |start: usize, end: usize, mut hasher: Sha256| {
            let (path, data) = (path.clone(), data.slice(start..end));
            async move {
                let flushing = tokio::task::spawn_blocking(move || {
                    stage_local(path, start as u64, data, &mut hasher, writer())
                        .map(|f| (hasher, f))
                });
                let (hasher, mut flushing) = flushing.await.unwrap().unwrap();
                flushing.flushed().await.unwrap();
                hasher
            }
        };
        let mut hasher = Sha256::new();
        for pair in cuts.windows(2) {
            hasher = write(pair[0], pair[1], hasher).await;
        }
        assert_eq!(
            hasher.finalize().as_slice(),
            Sha256::digest(&data).as_slice()
        );
        // The retry of an acknowledged chunk writes the same bytes again.
        write(cuts[4], cuts[5], Sha256::new()).await;
        assert_eq!(std::fs::read(&path).unwrap(), data);

        // Where the file system has direct I/O (ext4, XFS, tmpfs since Linux 6.6), aligned
        // pieces go past the page cache; where it has not, through it.
        let direct_io = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                .open(&path)
                .is_ok()
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut io = DirectIo::new(&file);
        io.write(Aligned::new(a).fill(&data[..a]), 0).unwrap();
        assert_eq!(io.on, direct_io);
        io.off().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    /// A disk that fails a write (here /dev/full, which refuses every write with ENOSPC) while
    /// the writer thread has pieces queued: the hashing side stops instead of waiting for ever,
    /// and the chunk's write reports the failure (so its offset is never recorded).
    #[tokio::test]
    async fn a_failed_piece_write_is_reported_when_the_chunk_is_flushed() {
        // More pieces than buffers: the hashing side waits for buffers the writer never
        // gives back.
        let data = Bytes::from(vec![1u8; (PIECE_BUFFERS + 5) * DIRECT_PIECE]);
        let flushing = tokio::task::spawn_blocking(move || {
            stage_local("/dev/full".into(), 0, data, &mut Sha256::new(), writer())
        });
        let mut flushing = flushing.await.unwrap().unwrap();
        let error = flushing.flushed().await.unwrap_err();
        assert!(error.to_string().contains("No space left"), "{error}");
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
