//! Client commands: `upload`, `ls`, `get`, `rm`, `restore`, `usage`, `stats`, `cleanup`.

use std::{
    path::Path,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use stowage_proto::v1::{
    self as pb, files_client::FilesClient, ingest_client::IngestClient,
    lifecycle_client::LifecycleClient, quota_client::QuotaClient,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Request, metadata::MetadataValue, transport::Channel};

/// Bytes per upload message.
const CHUNK: usize = 1 << 20;

/// A connection to a Stowage endpoint with a bearer token.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    token: MetadataValue<tonic::metadata::Ascii>,
    /// The server and the user, which resumable uploads are remembered for.
    scope: String,
}

impl Client {
    /// Connects to `addr` (`http://host:port`, or `https://host` through a TLS front such as
    /// an ingress, verified against the system's roots or `SSL_CERT_FILE`) with `token`.
    pub async fn connect(addr: &str, token: &str) -> anyhow::Result<Self> {
        let addr = if addr.contains("://") {
            addr.to_owned()
        } else {
            format!("http://{addr}")
        };
        let mut endpoint = tonic::transport::Endpoint::from_shared(addr.clone())
            .with_context(|| format!("{addr} is not an address (http://host:port)"))?
            .connect_timeout(Duration::from_secs(5));
        if addr.starts_with("https://") {
            endpoint = endpoint
                .tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots())
                .context("TLS settings")?;
        } else if !addr.starts_with("http://") {
            bail!("{addr}: give an http:// or https:// address");
        }
        // Printed with its causes (a certificate refused, a connection refused).
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot reach Stowage at {addr}"))?;
        let scope = format!("{addr}\0{}", token_subject(token));
        let token = MetadataValue::try_from(format!("Bearer {token}"))
            .context("STOWAGE_TOKEN is not a valid token")?;
        Ok(Self {
            channel,
            token,
            scope,
        })
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", self.token.clone());
        request
    }

    fn lifecycle(&self) -> LifecycleClient<Channel> {
        LifecycleClient::new(self.channel.clone())
    }

    fn files(&self) -> FilesClient<Channel> {
        FilesClient::new(self.channel.clone()).max_decoding_message_size(16 << 20)
    }

    /// Uploads one file through a resumable session, with a progress bar. The session id is
    /// kept in the state directory until the upload completes, so running the same command
    /// again continues from the server's offset instead of starting over.
    pub async fn upload(
        &self,
        path: &Path,
        tags: &[String],
        quiet: bool,
    ) -> anyhow::Result<pb::File> {
        self.upload_then(path, tags, quiet, |_| Ok(())).await
    }

    /// [`Self::upload`], with `done` told of the file before the upload's resume state goes:
    /// a run over several files records it there, so that no moment is left where neither
    /// says the file is uploaded.
    pub async fn upload_then(
        &self,
        path: &Path,
        tags: &[String],
        quiet: bool,
        done: impl FnOnce(&pb::File) -> anyhow::Result<()>,
    ) -> anyhow::Result<pb::File> {
        let file = tokio::fs::File::open(path)
            .await
            .with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file.metadata().await?;
        let size = meta.len();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "upload".into());
        let state = resume_state_path(path, &meta, &self.scope)?;
        let mut ingest =
            IngestClient::new(self.channel.clone()).max_encoding_message_size(32 << 20);
        let session = match std::fs::read_to_string(&state).ok() {
            Some(id) => match ingest
                .get_upload(self.request(pb::GetUploadRequest {
                    upload_id: id.trim().to_owned(),
                }))
                .await
            {
                // Open: resumed. Completing or completed (a reply lost, an interrupt after the
                // server finished): completing it again returns its one file.
                Ok(r) => r.into_inner().session.filter(|s| {
                    s.state == pb::UploadState::Open as i32
                        || s.state == pb::UploadState::Completing as i32
                        || s.state == pb::UploadState::Completed as i32
                }),
                // Gone, or not an upload id at all (a state file cut short by a crash): a new
                // session, as for a first run.
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::NotFound | tonic::Code::InvalidArgument
                    ) =>
                {
                    None
                }
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    bail!(
                        "the server refused the token ({}); check STOWAGE_TOKEN",
                        s.message()
                    )
                }
                Err(s) => {
                    return Err(anyhow::anyhow!(
                        "cannot look up the upload of {} to resume it ({}); run the same \
                         command again",
                        path.display(),
                        s.message()
                    ));
                }
            },
            None => None,
        };
        let session = match session {
            Some(s) => s,
            None => {
                // The whole file's SHA-256 goes with the session: should the file change
                // before a resumed upload ends, the server refuses the spliced result.
                let expected_sha256 = sha256_of(path).await?;
                let created = ingest
                    .create_upload(self.request(pb::CreateUploadRequest {
                        size_bytes: Some(size),
                        metadata: Some(pb::UploadMetadata {
                            display_name: name.clone(),
                            tags: tags.to_vec(),
                            expected_sha256,
                            ..Default::default()
                        }),
                        idempotency_key: String::new(),
                        ..Default::default()
                    }))
                    .await
                    .map_err(status)?
                    .into_inner()
                    .session
                    .context("server sent no session")?;
                if let Err(e) = remember(&state, &created.id) {
                    // Not resumable: its hold is given back now, not at its expiry.
                    self.abort(&created.id).await;
                    return Err(e);
                }
                created
            }
        };
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(size)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:20!} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(name);
        bar.set_position(session.offset);
        if session.offset > 0 && !quiet {
            // Not through the bar: it draws nothing when stderr is not a terminal.
            eprintln!("resuming {} at byte {}", path.display(), session.offset);
        }
        let chunk = usize::try_from(session.chunk_size_hint)
            .unwrap_or(CHUNK)
            .clamp(64 * 1024, 8 << 20);
        use tokio::io::AsyncSeekExt;
        let mut offset = session.offset;
        let mut held = 0;
        while offset < size {
            let mut file = file.try_clone().await?;
            file.seek(std::io::SeekFrom::Start(offset)).await?;
            bar.set_position(offset);
            let progress = bar.clone();
            let first_id = session.id.clone();
            // A read that fails ends the stream; the error is reported once the server
            // answered.
            let read_failed: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
            let failed = Arc::clone(&read_failed);
            let chunks =
                futures::stream::unfold((file, offset, true), move |(mut file, offset, first)| {
                    let progress = progress.clone();
                    let first_id = first_id.clone();
                    let failed = Arc::clone(&failed);
                    async move {
                        let mut buf = vec![0u8; chunk];
                        let mut filled = 0;
                        while filled < chunk {
                            match file.read(&mut buf[filled..]).await {
                                Ok(0) => break,
                                Ok(n) => filled += n,
                                Err(e) => {
                                    *failed.lock().unwrap_or_else(PoisonError::into_inner) =
                                        Some(e);
                                    return None;
                                }
                            }
                        }
                        if filled == 0 {
                            return None;
                        }
                        buf.truncate(filled);
                        progress.inc(filled as u64);
                        let message = pb::WriteChunksRequest {
                            upload_id: if first { first_id } else { String::new() },
                            chunk: Some(pb::Chunk {
                                offset,
                                data: buf.into(),
                                sha256: String::new(),
                                size_bytes: None,
                            }),
                        };
                        Some((message, (file, offset + filled as u64, false)))
                    }
                });
            let written = ingest.write_chunks(self.request(chunks)).await;
            if let Some(e) = read_failed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                anyhow::bail!(
                    "cannot read {} ({e}); run the same command to resume",
                    path.display()
                );
            }
            match written {
                Ok(_) => break,
                // Still held by a writer that is gone (this command killed mid-upload and
                // run again at once): the server lets go when it notices. Or that writer's
                // last chunk was recorded after this run read the offset, and the server
                // refuses the stale one, naming its own. Go on from where it stands then.
                Err(s)
                    if (s.code() == tonic::Code::Aborted
                        || (s.code() == tonic::Code::FailedPrecondition
                            && s.metadata().contains_key("upload-offset")))
                        && held < HELD_RETRIES =>
                {
                    held += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200 * held)).await;
                    offset = ingest
                        .get_upload(self.request(pb::GetUploadRequest {
                            upload_id: session.id.clone(),
                        }))
                        .await
                        .map_err(status)?
                        .into_inner()
                        .session
                        .context("server sent no session")?
                        .offset;
                }
                Err(s) => anyhow::bail!(
                    "upload of {} interrupted ({}); run the same command to resume",
                    path.display(),
                    s.message()
                ),
            }
        }
        let completed = ingest
            .complete_upload(self.request(pb::CompleteUploadRequest {
                upload_id: session.id.clone(),
            }))
            .await;
        let file = match completed {
            Ok(r) => r.into_inner().file.context("server sent no file")?,
            Err(s) if refuses_field(&s, "metadata.expected_sha256") => {
                // The bytes sent before and after an interruption are of two versions of the
                // file. Nothing of it is kept: the next run starts over.
                self.abort(&session.id).await;
                let _ = std::fs::remove_file(&state);
                anyhow::bail!(
                    "{} changed while it was being uploaded; nothing was kept, run the same \
                     command to upload it anew",
                    path.display()
                );
            }
            Err(s) => return Err(status(s)),
        };
        bar.finish();
        done(&file)?;
        let _ = std::fs::remove_file(&state);
        Ok(file)
    }

    /// Ends session `id`, giving its hold back, as best it can: a refusal that may pass (the
    /// session busy with a stream the server has not yet seen end, a rate limit, the server
    /// unreachable for a moment) is asked again a few times, as a write is; left ended or
    /// not, the session's expiry gives the hold back at last.
    async fn abort(&self, id: &str) {
        let mut ingest = IngestClient::new(self.channel.clone());
        for held in 1..=HELD_RETRIES {
            let aborted = ingest
                .abort_upload(self.request(pb::AbortUploadRequest {
                    upload_id: id.to_owned(),
                }))
                .await;
            match aborted {
                Err(s)
                    if matches!(
                        s.code(),
                        tonic::Code::Aborted
                            | tonic::Code::Unavailable
                            | tonic::Code::ResourceExhausted
                    ) =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(200 * held)).await;
                }
                _ => return,
            }
        }
    }

    /// Whether `file_id` is still one of the caller's files, out of the trash.
    pub async fn still_stored(&self, file_id: &str) -> anyhow::Result<bool> {
        match self
            .files()
            .get_file(self.request(pb::GetFileRequest {
                file_id: file_id.to_owned(),
            }))
            .await
        {
            Ok(r) => Ok(r.into_inner().file.is_some_and(|f| f.deleted_at.is_none())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(false),
            Err(s) => Err(status(s)),
        }
    }

    /// Follows the sealed batches of the caller's event streams (`streams`, or all of them)
    /// as an observer, from `cursor` (empty: from now on; "0": from the oldest kept), and
    /// prints each event. The server ending the stream (it is shutting down) is an error, so
    /// that a script following events sees the tail stopped and can start it again.
    pub async fn tail_events(&self, streams: Vec<String>, cursor: String) -> anyhow::Result<()> {
        let request = pb::SubscribeBatchesRequest {
            stream_ids: streams,
            cursor,
            observe: true,
            ..Default::default()
        };
        let mut batches = IngestClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
            .subscribe_batches(self.request(request))
            .await
            .map_err(status)?
            .into_inner();
        while let Some(message) = batches.message().await.map_err(status)? {
            let Some(batch) = message.batch else {
                continue;
            };
            for event in &batch.events {
                println!("{}", event_line(&batch.stream_id, event));
            }
        }
        bail!("the server ended the subscription (shutting down?); run again to go on")
    }

    /// Storage totals (of everyone with `all_users`, an admin's right) and the `largest` files.
    pub async fn stats(
        &self,
        all_users: bool,
        largest: u32,
    ) -> anyhow::Result<pb::StorageStatsResponse> {
        Ok(self
            .files()
            .storage_stats(self.request(pb::StorageStatsRequest { all_users, largest }))
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Runs Lifecycle's job `name` now and returns the finished run.
    pub async fn run_now(&self, name: &str, dry_run: bool) -> anyhow::Result<pb::Run> {
        self.lifecycle()
            .run_now(self.request(pb::RunNowRequest {
                name: name.to_owned(),
                dry_run,
            }))
            .await
            .map_err(status)?
            .into_inner()
            .run
            .context("no run in the answer")
    }

    /// Lifecycle's schedules.
    pub async fn schedules(&self) -> anyhow::Result<Vec<pb::Schedule>> {
        Ok(self
            .lifecycle()
            .list_schedules(self.request(pb::ListSchedulesRequest {}))
            .await
            .map_err(status)?
            .into_inner()
            .schedules)
    }

    /// Lists files.
    pub async fn list(
        &self,
        request: pb::ListFilesRequest,
    ) -> anyhow::Result<pb::ListFilesResponse> {
        Ok(self
            .files()
            .list_files(self.request(request))
            .await
            .map_err(status)?
            .into_inner())
    }

    /// Lists trash, all of it, a page at a time (`print` is called with each).
    pub async fn trash(&self, mut print: impl FnMut(&[pb::File])) -> anyhow::Result<()> {
        let mut request = pb::ListTrashRequest {
            page_size: 200,
            ..Default::default()
        };
        loop {
            let page = self
                .files()
                .list_trash(self.request(request.clone()))
                .await
                .map_err(status)?
                .into_inner();
            print(&page.files);
            if page.next_page_token.is_empty() {
                return Ok(());
            }
            request.page_token = page.next_page_token;
        }
    }

    /// Downloads a file to `out` (or stdout for `-`; by default a file named as the stored one
    /// in the current directory, never replacing one there unless `force`), checking its
    /// SHA-256. The bytes go to a temporary file beside the target (or, in a directory the
    /// user cannot write to, the system's), renamed over it (or copied into it) only once
    /// they are all there and their digest is right: a broken download leaves nothing behind.
    pub async fn get(&self, id: &str, out: Option<&Path>, force: bool) -> anyhow::Result<pb::File> {
        let mut stream = self
            .files()
            .download(self.request(pb::DownloadRequest {
                file_id: id.to_owned(),
                ..Default::default()
            }))
            .await
            .map_err(status)?
            .into_inner();
        let first = stream
            .message()
            .await
            .map_err(status)?
            .context("empty download")?;
        let header = first.header.context("download without header")?;
        let file = header.file.context("download without file")?;
        // A name the server chose (a file someone uploaded through a link, say) never
        // replaces a file of the user's without `--force`; a path the user gave does.
        let (target, replace) = match out {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(sanitize(&file.display_name)), force),
        };
        if target.as_os_str() != "-" && !replace && target.exists() {
            bail!(
                "{} exists; give --force to replace it, or -o PATH",
                target.display()
            );
        }
        let sink = Sink::for_target(&target)?;
        let mut writer: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match &sink {
            Sink::Stdout => Box::new(tokio::io::stdout()),
            Sink::Direct(path) => Box::new(
                tokio::fs::File::create(path)
                    .await
                    .with_context(|| format!("cannot write {}", path.display()))?,
            ),
            Sink::Atomic { partial, .. } | Sink::Copied { partial, .. } => {
                Box::new(tokio::fs::File::from_std(partial.reopen()?))
            }
        };
        let mut hasher = Sha256::new();
        while let Some(message) = stream.message().await.map_err(status)? {
            hasher.update(&message.data);
            writer.write_all(&message.data).await?;
        }
        writer.flush().await?;
        drop(writer);
        let digest = hex::encode(hasher.finalize());
        if digest != file.sha256 {
            bail!("checksum mismatch: got {digest}, expected {}", file.sha256);
        }
        match sink {
            Sink::Atomic { partial, target } => {
                partial.as_file().sync_all()?;
                let placed = if replace {
                    partial.persist(&target).map(drop)
                } else {
                    partial.persist_noclobber(&target).map(drop)
                };
                placed.map_err(|e| e.error).with_context(|| {
                    format!("cannot place the download at {}", target.display())
                })?;
            }
            Sink::Copied { partial, target } => {
                // In a blocking task, which Ctrl-C does not cut short (the runtime waits for it
                // before the process ends): a copy stopped half-way would leave the file cut
                // short. Should it fail (a full disk), the verified download is kept, and named.
                tokio::task::spawn_blocking(move || match copy_into(&partial, &target) {
                    Ok(()) => Ok(()),
                    Err(e) => match partial.keep() {
                        Ok((_, kept)) => Err(anyhow::anyhow!(
                            "cannot write {}: {e}; the verified download is kept at {}",
                            target.display(),
                            kept.display()
                        )),
                        Err(_) => Err(anyhow::anyhow!("cannot write {}: {e}", target.display())),
                    },
                })
                .await??;
            }
            Sink::Stdout | Sink::Direct(_) => {}
        }
        Ok(file)
    }

    /// Moves a file to trash, or purges it.
    pub async fn remove(&self, id: &str, purge: bool) -> anyhow::Result<()> {
        let mut files = self.files();
        files
            .delete_file(self.request(pb::DeleteFileRequest {
                file_id: id.to_owned(),
            }))
            .await
            .map_err(status)?;
        if purge {
            files
                .purge_file(self.request(pb::PurgeFileRequest {
                    file_id: id.to_owned(),
                    ..Default::default()
                }))
                .await
                .map_err(status)?;
        }
        Ok(())
    }

    /// Restores a file from trash.
    pub async fn restore(&self, id: &str) -> anyhow::Result<pb::File> {
        let response = self
            .files()
            .restore_file(self.request(pb::RestoreFileRequest {
                file_id: id.to_owned(),
            }))
            .await
            .map_err(status)?;
        response.into_inner().file.context("no file in response")
    }

    /// The caller's quota account.
    pub async fn usage(&self) -> anyhow::Result<pb::Account> {
        let response = QuotaClient::new(self.channel.clone())
            .get_usage(self.request(pb::GetUsageRequest::default()))
            .await
            .map_err(status)?;
        response
            .into_inner()
            .account
            .context("no account in response")
    }
}

/// The lowercase hex SHA-256 of the file at `path`, read off the runtime.
async fn sha256_of(path: &Path) -> anyhow::Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = std::io::Read::read(&mut file, &mut buf)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if n == 0 {
                return Ok(hex::encode(hasher.finalize()));
            }
            hasher.update(&buf[..n]);
        }
    })
    .await?
}

/// Where a download's bytes go.
enum Sink {
    /// Standard output (`-o -`).
    Stdout,
    /// Straight into an existing file that is not a regular one (`/dev/null`, a FIFO):
    /// nothing to rename over.
    Direct(PathBuf),
    /// A temporary file beside `target` (through a symlink, beside what it points to),
    /// renamed over it once complete and verified.
    Atomic {
        partial: tempfile::NamedTempFile,
        target: PathBuf,
    },
    /// An existing file in a directory we cannot write to: the download goes to a temporary
    /// file of the system's, and is copied over the file once complete and verified (written
    /// into straight away, a broken download would leave the file cut short).
    Copied {
        partial: tempfile::NamedTempFile,
        target: PathBuf,
    },
}

impl Sink {
    fn for_target(target: &Path) -> anyhow::Result<Self> {
        if target.as_os_str() == "-" {
            return Ok(Self::Stdout);
        }
        let existing = std::fs::metadata(target).ok();
        if existing.as_ref().is_some_and(|m| !m.is_file()) {
            return Ok(Self::Direct(target.to_path_buf()));
        }
        // A link is written through: the file it names is replaced, the link stays.
        let target = if existing.is_some() {
            std::fs::canonicalize(target)?
        } else {
            target.to_path_buf()
        };
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // Created with the mode of any new file (0666 less the umask), not a temporary
        // file's 0600.
        let made = tempfile::Builder::new()
            .prefix(".stowage-get-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
            .tempfile_in(&dir);
        match made {
            Ok(partial) => {
                // A file replaced keeps who may read it (a private file stays private) and,
                // where we may set it, its owner and group.
                if let Some(existing) = &existing {
                    std::fs::set_permissions(partial.path(), existing.permissions())
                        .with_context(|| format!("cannot write in {}", dir.display()))?;
                    let _ = std::os::unix::fs::chown(
                        partial.path(),
                        Some(std::os::unix::fs::MetadataExt::uid(existing)),
                        Some(std::os::unix::fs::MetadataExt::gid(existing)),
                    );
                }
                Ok(Self::Atomic { partial, target })
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && existing.is_some() => {
                // Writable, or nothing is fetched.
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&target)
                    .with_context(|| format!("cannot write {}", target.display()))?;
                let partial = tempfile::Builder::new()
                    .prefix(".stowage-get-")
                    .tempfile()
                    .context("cannot make a temporary file for the download")?;
                Ok(Self::Copied { partial, target })
            }
            Err(e) => Err(e).with_context(|| format!("cannot write in {}", dir.display())),
        }
    }
}

/// Writes what `partial` holds into the existing file `target` as it is (its owner and mode
/// kept: `fs::copy` would give it the temporary file's 0600, and fail after truncating a file
/// not ours).
fn copy_into(partial: &tempfile::NamedTempFile, target: &Path) -> std::io::Result<()> {
    let mut into = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(target)?;
    std::io::copy(&mut partial.reopen()?, &mut into)?;
    into.sync_all()
}

/// Writes `text` to `state` whole or not at all (a temporary file renamed over it), so that a
/// crash never leaves a state file cut short.
fn remember(state: &Path, text: &str) -> anyhow::Result<()> {
    let dir = state.parent().context("state file without a directory")?;
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut partial = tempfile::NamedTempFile::new_in(dir)?;
        std::io::Write::write_all(&mut partial, text.as_bytes())?;
        partial.as_file().sync_all()?;
        partial.persist(state).map_err(|e| e.error)?;
        Ok(())
    };
    write().with_context(|| {
        format!(
            "cannot keep the upload's state in {} (set XDG_STATE_HOME to a writable directory)",
            dir.display()
        )
    })
}

/// Who `token` speaks for: its `sub` claim when it is a JWT (read, not verified: it only
/// keeps one user's resumable uploads apart from another's), else a digest of the token.
fn token_subject(token: &str) -> String {
    crate::unverified_claims(token)
        .and_then(|claims| claims.get("sub")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| hex::encode(Sha256::digest(token.as_bytes())))
}

/// Where the session of an upload of `path` is remembered: one file per (server and user,
/// path, size, modification time) under `$XDG_STATE_HOME/stowage/uploads` (or
/// `~/.local/state/...`). The same file sent to another server, or as another user, is another
/// upload, and does not take the place of the first one's session.
fn resume_state_path(
    path: &Path,
    meta: &std::fs::Metadata,
    scope: &str,
) -> anyhow::Result<std::path::PathBuf> {
    Ok(state_dir()?
        .join("uploads")
        .join(&upload_identity(path, meta, scope)?[..32]))
}

/// One upload of `path` as it is now: a digest of the server and user, the path, the size
/// and the modification time.
fn upload_identity(path: &Path, meta: &std::fs::Metadata, scope: &str) -> anyhow::Result<String> {
    let canonical =
        std::fs::canonicalize(path).with_context(|| format!("cannot open {}", path.display()))?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    Ok(hex::encode(Sha256::digest(format!(
        "{scope}\0{}\0{}\0{modified}",
        canonical.display(),
        meta.len()
    ))))
}

/// `$XDG_STATE_HOME/stowage` (or `~/.local/state/stowage`).
fn state_dir() -> anyhow::Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".local/state"))
        })
        .context("neither XDG_STATE_HOME nor HOME is set")?;
    Ok(base.join("stowage"))
}

/// What a run of `stowage upload` over several files finished, kept until the whole run
/// succeeds: a file's own resume state goes with its completion, so the same command run
/// again after a failure would otherwise store the files done before a second time. One
/// record per set of files (as they are now), tags, server and user, under
/// `$XDG_STATE_HOME/stowage/runs`; each line is a file's identity, the id it was stored under
/// and what was printed for it. A file recorded there is skipped only while the server still
/// holds it, out of the trash; records of runs never finished go after a month.
pub struct UploadRun {
    state: PathBuf,
    done: Vec<Finished>,
    identities: Vec<String>,
}

/// A file an earlier run finished.
#[derive(Clone)]
struct Finished {
    identity: String,
    file_id: String,
    line: String,
}

/// Records of runs older than this (never finished) are removed.
const RUN_RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

impl UploadRun {
    /// The record of uploading `paths` with `tags`, with what an earlier run of the same
    /// files finished.
    pub fn open(client: &Client, paths: &[PathBuf], tags: &[String]) -> anyhow::Result<Self> {
        let identities = paths
            .iter()
            .map(|path| {
                let meta = std::fs::metadata(path)
                    .with_context(|| format!("cannot open {}", path.display()))?;
                upload_identity(path, &meta, &client.scope)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let run = hex::encode(Sha256::digest(format!(
            "{}\0{}",
            identities.join("\n"),
            tags.join("\n")
        )));
        let runs = state_dir()?.join("runs");
        for old in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
            let age = old
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| at.elapsed().ok());
            if age.is_some_and(|age| age > RUN_RECORD_TTL) {
                let _ = std::fs::remove_file(old.path());
            }
        }
        let state = runs.join(&run[..32]);
        let done = std::fs::read_to_string(&state)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut fields = l.splitn(3, '\t');
                Some(Finished {
                    identity: fields.next()?.to_owned(),
                    file_id: fields.next()?.to_owned(),
                    line: fields.next()?.to_owned(),
                })
            })
            .collect();
        Ok(Self {
            state,
            done,
            identities,
        })
    }

    /// The id and the printed line of the `index`th file, when an earlier run uploaded it.
    pub fn finished(&self, index: usize) -> Option<(&str, &str)> {
        let identity = self.identities.get(index)?;
        self.done
            .iter()
            .find(|f| &f.identity == identity)
            .map(|f| (f.file_id.as_str(), f.line.as_str()))
    }

    /// Records that the `index`th file is uploaded as `file`, printed as `line`.
    pub fn record(&mut self, index: usize, file: &pb::File, line: &str) -> anyhow::Result<()> {
        let identity = self.identities.get(index).context("no such file")?;
        self.done.retain(|f| &f.identity != identity);
        self.done.push(Finished {
            identity: identity.clone(),
            file_id: file.id.clone(),
            line: line.replace(['\t', '\n'], " "),
        });
        let text: String = self
            .done
            .iter()
            .map(|f| format!("{}\t{}\t{}\n", f.identity, f.file_id, f.line))
            .collect();
        remember(&self.state, &text)
    }

    /// The whole run succeeded: its record goes (the same files uploaded later are new
    /// uploads).
    pub fn finish(self) {
        let _ = std::fs::remove_file(&self.state);
    }
}

/// The line `stowage upload` prints for `file`.
pub fn file_line(file: &pb::File) -> String {
    format!(
        "{}  {}  {}",
        file.id,
        human(file.size_bytes),
        file.display_name
    )
}

/// Times an upload waits for a session another (gone) writer still holds, 0.2 s longer each.
const HELD_RETRIES: u64 = 10;

/// Whether `s` refuses `field`, as the server names it in the status's details.
fn refuses_field(s: &tonic::Status, field: &str) -> bool {
    use tonic_types::StatusExt;
    s.code() == tonic::Code::InvalidArgument
        && s.get_details_bad_request()
            .is_some_and(|b| b.field_violations.iter().any(|v| v.field == field))
}

fn status(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

/// A display name made safe to use as a local file name (no directories, no control or
/// bidirectional characters).
fn sanitize(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("download");
    let cleaned: String = stowage_runtime::validate::without_bidi_controls(base)
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    match cleaned.as_str() {
        // "-" would be standard output.
        "" | "." | ".." | "-" => "download".into(),
        _ => cleaned,
    }
}

/// Human-readable size.
pub fn human(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// One line for an event: its time, stream, type, payload (as text when it is, cut at 200
/// characters; its size otherwise) and screenshot.
fn event_line(stream: &str, event: &pb::Event) -> String {
    let at = event
        .timestamp
        .as_ref()
        .and_then(|t| {
            chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        })
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| "-".into());
    let payload = match std::str::from_utf8(&event.payload) {
        Ok(text) if !text.chars().any(char::is_control) => {
            let mut shown: String = text.chars().take(200).collect();
            if shown.len() < text.len() {
                shown.push('…');
            }
            shown
        }
        _ => format!("<{} bytes>", event.payload.len()),
    };
    let mut line = format!(
        "{at}  {}  {}  {payload}",
        printable(stream),
        printable(&event.r#type)
    );
    if let Some(shot) = &event.screenshot {
        let source = match &shot.source {
            Some(pb::screenshot::Source::InlineData(data)) => format!("{} bytes", data.len()),
            Some(pb::screenshot::Source::StorageKey(key)) => printable(key),
            None => "deleted".into(),
        };
        line.push_str(&format!(
            "  [screenshot {} {}x{}, {source}]",
            printable(&shot.mime_type),
            shot.width,
            shot.height
        ));
    }
    line
}

/// `text` with its control characters escaped (`\u{1b}`), so that what a producer sent
/// cannot drive the terminal.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// One line per file.
pub fn print_files(files: &[pb::File]) {
    for f in files {
        let kind = pb::FileKind::try_from(f.kind)
            .map(|k| {
                k.as_str_name()
                    .trim_start_matches("FILE_KIND_")
                    .to_lowercase()
            })
            .unwrap_or_default();
        let created = f
            .created_at
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, 0))
            .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
            .unwrap_or_default();
        println!(
            "{}  {:9}  {:>10}  {}  {}",
            f.id,
            kind,
            human(f.size_bytes),
            created,
            // As it would be saved: a bidirectional override would turn the line around.
            stowage_runtime::validate::without_bidi_controls(&f.display_name)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A saved file's name is the display name's last part, without control or bidirectional
    /// characters.
    #[test]
    fn saved_names_keep_no_directories_or_bidirectional_controls() {
        assert_eq!(sanitize("../x/invoice\u{202E}fdp.exe"), "invoicefdp.exe");
        assert_eq!(sanitize("a\\b\u{7}.txt"), "b.txt");
        assert_eq!(sanitize("\u{2067}.."), "download");
        assert_eq!(sanitize("Résumé.pdf"), "Résumé.pdf");
    }

    /// What a producer put in an event reaches the terminal as text, never as escapes.
    #[test]
    fn event_lines_escape_control_characters() {
        let event = pb::Event {
            r#type: "window\u{1b}[2J".into(),
            payload: b"{\"title\":\"a\"}".to_vec(),
            screenshot: Some(pb::Screenshot {
                source: Some(pb::screenshot::Source::StorageKey("k\u{7}".into())),
                mime_type: "image/png".into(),
                width: 2,
                height: 3,
            }),
            timestamp: None,
        };
        assert_eq!(
            event_line("desk", &event),
            r#"-  desk  window\u{1b}[2J  {"title":"a"}  [screenshot image/png 2x3, k\u{7}]"#
        );
        let binary = pb::Event {
            payload: vec![0, 1, 2],
            ..Default::default()
        };
        assert_eq!(event_line("desk", &binary), "-  desk    <3 bytes>");
    }
}
