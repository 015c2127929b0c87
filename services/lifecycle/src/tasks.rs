//! The scheduled jobs. Each is idempotent and safe on any number of replicas: every effect
//! goes through a conditional, keyed call of the service that owns the data.

use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use stowage_db::Cached;
use stowage_proto::v1 as pb;
use tonic::Code;

use crate::{
    Lifecycle,
    policy::Policy,
    usage::{Observed, repair_key},
};

/// Longest report of a dry run.
const MAX_REPORT: usize = 1000;

/// History events one `history_prune` run deletes at most.
const HISTORY_PRUNE_MAX: u64 = 1_000_000;
/// Items fetched per page from another service.
const PAGE: u32 = 500;

/// blob_gc's cursor over the store's objects.
const GC_BLOBS: &str = "blob_gc/objects";
/// blob_gc's cursor over files' originals.
const GC_ORIGINALS: &str = "blob_gc/originals";

/// HEAD requests blob_gc has in flight at once while it checks originals.
const GC_HEADS_AT_ONCE: usize = 16;

/// Where one of blob_gc's ways stopped (`lifecycle.gc_cursors`), moved as a run goes. A move
/// applies only if the cursor still says what this run last read or wrote: a run another one
/// overtook (two at once) stops moving it. A dry run never moves it.
struct GcCursor {
    part: &'static str,
    position: Option<String>,
    /// Moves no more: a dry run, a run overtaken, or a listing out of order.
    frozen: bool,
}

impl GcCursor {
    async fn read(
        lifecycle: &Lifecycle,
        part: &'static str,
        dry_run: bool,
    ) -> Result<Self, tonic::Status> {
        let conn = lifecycle.pool.get().await.map_err(crate::db)?;
        let row = conn
            .query_opt_cached(
                "SELECT position FROM lifecycle.gc_cursors WHERE part = $1",
                &[&part],
            )
            .await
            .map_err(crate::db)?;
        Ok(Self {
            part,
            position: row.map(|r| r.get(0)),
            frozen: dry_run,
        })
    }

    /// Where the last run stopped (`None`: at the start of a pass).
    fn position(&self) -> Option<&str> {
        self.position.as_deref()
    }

    /// Moves no more in this run.
    fn freeze(&mut self) {
        self.frozen = true;
    }

    /// Moves to `to` (`None`: the pass ended, and the next run starts over).
    async fn advance(
        &mut self,
        lifecycle: &Lifecycle,
        to: Option<&str>,
    ) -> Result<(), tonic::Status> {
        if self.frozen || self.position.as_deref() == to {
            return Ok(());
        }
        let conn = lifecycle.pool.get().await.map_err(crate::db)?;
        let moved = match (&self.position, to) {
            (Some(from), Some(to)) => {
                conn.execute_cached(
                    "UPDATE lifecycle.gc_cursors SET position = $3, updated_at = now()
                     WHERE part = $1 AND position = $2",
                    &[&self.part, from, &to],
                )
                .await
            }
            (Some(from), None) => {
                conn.execute_cached(
                    "DELETE FROM lifecycle.gc_cursors WHERE part = $1 AND position = $2",
                    &[&self.part, from],
                )
                .await
            }
            (None, Some(to)) => {
                conn.execute_cached(
                    "INSERT INTO lifecycle.gc_cursors (part, position) VALUES ($1, $2)
                     ON CONFLICT (part) DO NOTHING",
                    &[&self.part, &to],
                )
                .await
            }
            (None, None) => Ok(1),
        }
        .map_err(crate::db)?;
        if moved == 1 {
            self.position = to.map(str::to_owned);
        } else {
            tracing::info!(
                part = self.part,
                "another blob_gc run moved the cursor; this one leaves it"
            );
            self.frozen = true;
        }
        Ok(())
    }
}

/// A scheduled job: its name and default interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Task {
    /// Name, as in the API.
    pub name: &'static str,
    /// Default time between runs.
    pub interval: Duration,
}

/// Every scheduled job.
pub const TASKS: [Task; 10] = [
    Task {
        name: "stuck_processing",
        interval: Duration::from_secs(15 * 60),
    },
    Task {
        name: "ephemeral_cleanup",
        interval: Duration::from_secs(60),
    },
    Task {
        name: "inactivity",
        interval: Duration::from_secs(60),
    },
    Task {
        name: "orphan_uploads",
        interval: Duration::from_secs(15 * 60),
    },
    Task {
        name: "trash_purge",
        interval: Duration::from_secs(3600),
    },
    Task {
        name: "staging_cleanup",
        interval: Duration::from_secs(3600),
    },
    Task {
        name: "blob_gc",
        interval: Duration::from_secs(6 * 3600),
    },
    Task {
        name: "reservations_expire",
        interval: Duration::from_secs(15 * 60),
    },
    Task {
        name: "usage_reconcile",
        interval: Duration::from_secs(6 * 3600),
    },
    Task {
        name: "history_prune",
        interval: Duration::from_secs(24 * 3600),
    },
];

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Items looked at.
    pub examined: u64,
    /// Items acted on (or that a dry run would act on).
    pub acted: u64,
    /// Items that failed (retried on the next run; by blob_gc, on its next pass over them).
    pub failed: u64,
    /// What a dry run would do (bounded).
    pub report: Vec<String>,
}

impl Tally {
    pub(crate) fn note(&mut self, dry_run: bool, item: String) {
        self.acted += 1;
        if dry_run && self.report.len() < MAX_REPORT {
            self.report.push(item);
        }
    }
}

impl Lifecycle {
    /// Runs task `name` once.
    pub(crate) async fn run_task(
        &self,
        name: &str,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<Tally, tonic::Status> {
        match name {
            "orphan_uploads" => self.orphan_uploads(policy, dry_run).await,
            "trash_purge" => self.trash_purge(policy, dry_run).await,
            "usage_reconcile" => self.usage_reconcile(dry_run).await,
            "reservations_expire" => self.reservations_expire(dry_run).await,
            "staging_cleanup" => self.staging_cleanup(policy, dry_run).await,
            "blob_gc" => self.blob_gc(policy, dry_run).await,
            "inactivity" => self.inactivity(policy, dry_run).await,
            "stuck_processing" => self.stuck_processing(policy, dry_run).await,
            "ephemeral_cleanup" => self.ephemeral_cleanup(policy, dry_run).await,
            "history_prune" => self.history_prune(policy, dry_run).await,
            other => Err(stowage_runtime::status::invalid_argument(
                "name",
                format!("no scheduled job {other:?}"),
            )),
        }
    }

    /// Sessions past their expiry and one-shot uploads nobody wrote to for
    /// `orphan_upload_hours`: staging removed, reservation released, session expired (Ingest
    /// does it; a session being written is locked and skipped).
    async fn orphan_uploads(&self, policy: &Policy, dry_run: bool) -> Result<Tally, tonic::Status> {
        let swept = self
            .ingest
            .sweep_uploads(pb::SweepUploadsRequest {
                idle_seconds: u64::from(policy.orphan_upload_hours) * 3600,
                limit: 10_000,
                dry_run,
            })
            .await?;
        let mut tally = Tally {
            examined: swept.examined,
            failed: swept.failed,
            ..Tally::default()
        };
        for id in swept.upload_ids {
            tally.note(dry_run, format!("upload {id}"));
        }
        Ok(tally)
    }

    /// Files in trash longer than the retention: purged through Files (row, blob, variants;
    /// usage debited once, keyed by the file, so two runs at once cannot debit twice).
    async fn trash_purge(&self, policy: &Policy, dry_run: bool) -> Result<Tally, tonic::Status> {
        let before = Utc::now() - chrono::Duration::days(i64::from(policy.trash_retention_days));
        let mut tally = Tally::default();
        let mut page_token = String::new();
        loop {
            let page = self
                .files
                .list_expired_trash(pb::ListExpiredTrashRequest {
                    deleted_before: Some(stowage_runtime::time::timestamp(before)),
                    page_size: PAGE,
                    page_token: page_token.clone(),
                })
                .await?;
            for file in page.files {
                tally.examined += 1;
                if dry_run {
                    tally.note(true, format!("file {} of {}", file.id, file.owner_id));
                    continue;
                }
                match self
                    .files
                    .purge_file(pb::PurgeFileRequest {
                        file_id: file.id.clone(),
                        // Restored since the listing (or restored and trashed again): kept.
                        trashed_before: Some(stowage_runtime::time::timestamp(before)),
                    })
                    .await
                {
                    Ok(_) => tally.note(false, String::new()),
                    // Purged or restored by someone else meanwhile.
                    Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {}
                    Err(s) => {
                        tally.failed += 1;
                        tracing::warn!(file_id = %file.id, status = %s, "trash purge failed; next run");
                    }
                }
            }
            if page.next_page_token.is_empty() {
                return Ok(tally);
            }
            page_token = page.next_page_token;
        }
    }

    /// Staging data older than `staging_max_age_hours` that no live session owns, and stored
    /// event screenshots that old that no event names (Ingest decides what is live; it owns
    /// the sessions and the streams).
    async fn staging_cleanup(
        &self,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<Tally, tonic::Status> {
        let swept = self
            .ingest
            .sweep_staging(pb::SweepStagingRequest {
                max_age_seconds: u64::from(policy.staging_max_age_hours) * 3600,
                dry_run,
            })
            .await?;
        Ok(Tally {
            examined: swept.examined,
            acted: swept.removed,
            failed: swept.failed,
            report: if dry_run {
                swept
                    .keys
                    .into_iter()
                    .map(|k| format!("staging {k}"))
                    .collect()
            } else {
                Vec::new()
            },
        })
    }

    /// Unreferenced blobs, both ways. Objects under `users/` that no file or variant
    /// references and that are older than the safety age (an upload writes its bytes before
    /// it registers the file) are deleted; files whose original is missing from the store are
    /// reported and marked failed with the reason. A dry run lists both and changes nothing.
    ///
    /// Each way looks at most at `gc_batch` items per run, and the next run goes on where this
    /// one stopped (`lifecycle.gc_cursors`; a dry run does not move them), so a large store is
    /// covered over several runs instead of listed whole by each.
    async fn blob_gc(&self, policy: &Policy, dry_run: bool) -> Result<Tally, tonic::Status> {
        let safety = chrono::Duration::minutes(i64::from(policy.gc_safety_minutes));
        let cutoff = Utc::now() - safety;
        let mut tally = Tally::default();
        self.collect_unreferenced_blobs(cutoff, dry_run, &mut tally)
            .await?;
        self.sweep_temporaries(cutoff, dry_run, &mut tally).await?;
        self.find_missing_originals(cutoff, dry_run, &mut tally)
            .await?;
        Ok(tally)
    }

    /// Unreferenced objects under `users/` last written before `cutoff` go. Stores other than
    /// a local disk list in key order, so a run goes on after the last key the one before
    /// looked at; a local disk's walk has no order, and is walked whole, as is a store whose
    /// listing turns out not to be in order.
    async fn collect_unreferenced_blobs(
        &self,
        cutoff: chrono::DateTime<Utc>,
        dry_run: bool,
        tally: &mut Tally,
    ) -> Result<(), tonic::Status> {
        use futures::TryStreamExt;
        let deadline = tokio::time::Instant::now() + self.gc_time;
        let mut cursor = GcCursor::read(self, GC_BLOBS, dry_run).await?;
        let ordered = self.local_root.is_none();
        let prefix = object_store::path::Path::from("users");
        let after = cursor
            .position()
            .filter(|_| ordered)
            .and_then(|key| object_store::path::Path::parse(key).ok());
        let mut listing = match &after {
            Some(key) => self.store.list_with_offset(Some(&prefix), key),
            None => self.store.list(Some(&prefix)),
        };
        let mut batch: Vec<object_store::ObjectMeta> = Vec::new();
        let mut previous = after;
        let mut in_order = ordered;
        let mut looked = 0u64;
        loop {
            // Past its time, a run still looks at one blob: each one moves the pass on.
            let late = looked > 0 && tokio::time::Instant::now() >= deadline;
            let stop = in_order && (looked >= self.gc_batch || late);
            let next = match stop {
                true => None,
                false => listing
                    .try_next()
                    .await
                    .map_err(|e| stowage_runtime::status::dependency_failed("object store", &e))?,
            };
            if let Some(meta) = &next {
                looked += 1;
                tally.examined += 1;
                if in_order && previous.as_ref().is_some_and(|p| meta.location <= *p) {
                    // Not in key order after all: this run walks the whole store and leaves
                    // the cursor alone.
                    tracing::warn!(key = %meta.location, "the store does not list in key order; blob_gc walks it whole");
                    in_order = false;
                    cursor.freeze();
                }
                previous = Some(meta.location.clone());
                if meta.last_modified < cutoff {
                    batch.push(meta.clone());
                }
            }
            if batch.len() >= 500 || (next.is_none() && !batch.is_empty()) {
                self.collect_unreferenced(std::mem::take(&mut batch), dry_run, tally)
                    .await?;
                // Everything up to `previous` is handled: a run cut off later goes on from here.
                if in_order {
                    let at = previous.as_ref().map(ToString::to_string);
                    cursor.advance(self, at.as_deref()).await?;
                }
            }
            if next.is_none() {
                // Stopped by the batch or the time: go on from here; the listing ended: the
                // next run starts a new pass.
                let at = previous.as_ref().map(ToString::to_string);
                let to = if stop { at.as_deref() } else { None };
                if ordered {
                    cursor.advance(self, to).await?;
                }
                return Ok(());
            }
        }
    }

    /// The other way: files created before `cutoff` whose original is gone from the store are
    /// reported and marked failed. A pass keeps the cutoff it started with, so a run that goes
    /// on with its page token asks the same question; files created since wait for the next
    /// pass.
    async fn find_missing_originals(
        &self,
        cutoff: chrono::DateTime<Utc>,
        dry_run: bool,
        tally: &mut Tally,
    ) -> Result<(), tonic::Status> {
        let deadline = tokio::time::Instant::now() + self.gc_time;
        let mut cursor = GcCursor::read(self, GC_ORIGINALS, dry_run).await?;
        let resumed = cursor.position().and_then(|position| {
            let (at, token) = position.split_once(' ')?;
            let at = chrono::DateTime::parse_from_rfc3339(at).ok()?;
            Some((at.with_timezone(&Utc), token.to_owned()))
        });
        let (mut before, mut page_token) = resumed.unwrap_or((cutoff, String::new()));
        let mut looked = 0u64;
        // Past its time, a run still looks at one page.
        while looked < self.gc_batch && (looked == 0 || tokio::time::Instant::now() < deadline) {
            let room = u32::try_from(self.gc_batch - looked).unwrap_or(u32::MAX);
            let listed = self
                .files
                .list_originals(pb::ListOriginalsRequest {
                    created_before: Some(stowage_runtime::time::timestamp(before)),
                    page_size: PAGE.min(room),
                    page_token: page_token.clone(),
                    status: pb::FileStatus::Unspecified as i32,
                })
                .await;
            let page = match listed {
                Ok(page) => page,
                // A token Files no longer takes (another release's): a new pass, rather than
                // the same refusal every run.
                Err(status) if status.code() == Code::InvalidArgument && !page_token.is_empty() => {
                    tracing::warn!(%status, "blob_gc's saved page of files refused; starting over");
                    (before, page_token) = (cutoff, String::new());
                    continue;
                }
                Err(status) => return Err(status),
            };
            // A page's HEADs run side by side (the store's round trips are the time); what
            // they find is handled in order.
            let heads: Vec<_> = futures::stream::iter(page.originals)
                .map(|original| async move {
                    let path = object_store::path::Path::from(original.storage_key.as_str());
                    let head = self.store.head(&path).await;
                    (original, head)
                })
                .buffered(GC_HEADS_AT_ONCE)
                .collect()
                .await;
            for (original, head) in heads {
                tally.examined += 1;
                looked += 1;
                match head {
                    Ok(_) => continue,
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => {
                        tally.failed += 1;
                        tracing::warn!(key = %original.storage_key, error = %e, "cannot check a blob");
                        continue;
                    }
                }
                tracing::error!(file_id = %original.file_id, key = %original.storage_key, "original missing from the store");
                tally.note(
                    dry_run,
                    format!(
                        "missing {} of file {}",
                        original.storage_key, original.file_id
                    ),
                );
                if dry_run || original.status == pb::FileStatus::Failed as i32 {
                    continue;
                }
                if let Err(s) = self
                    .files
                    .set_variants(pb::SetVariantsRequest {
                        file_id: original.file_id.clone(),
                        status: pb::FileStatus::Failed as i32,
                        status_reason: "the original's bytes are missing from the store".into(),
                        ..Default::default()
                    })
                    .await
                {
                    tally.failed += 1;
                    tracing::warn!(file_id = %original.file_id, status = %s, "could not mark a file whose blob is missing");
                }
            }
            // This page is handled: a run cut off later goes on from the next.
            if page.next_page_token.is_empty() {
                cursor.advance(self, None).await?;
                return Ok(());
            }
            page_token = page.next_page_token;
            let at = format!("{} {page_token}", before.to_rfc3339());
            cursor.advance(self, Some(&at)).await?;
        }
        Ok(())
    }

    async fn sweep_temporaries(
        &self,
        cutoff: chrono::DateTime<Utc>,
        dry_run: bool,
        tally: &mut Tally,
    ) -> Result<(), tonic::Status> {
        let Some(root) = self.local_root.clone() else {
            return Ok(());
        };
        let found = {
            let root = root.clone();
            tokio::task::spawn_blocking(move || {
                stowage_blob::local_temporaries(&root, cutoff.into())
            })
            .await
            .map_err(|_| tonic::Status::internal("listing temporary files panicked"))?
            .map_err(|e| stowage_runtime::status::dependency_failed("object store", &e))?
        };
        for path in found {
            tally.examined += 1;
            if !dry_run
                && let Err(e) = tokio::fs::remove_file(root.join(&path)).await
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tally.failed += 1;
                tracing::warn!(path, error = %e, "temporary file not removed");
                continue;
            }
            tally.note(dry_run, format!("unfinished write {path}"));
        }
        Ok(())
    }

    async fn collect_unreferenced(
        &self,
        batch: Vec<object_store::ObjectMeta>,
        dry_run: bool,
        tally: &mut Tally,
    ) -> Result<(), tonic::Status> {
        let keys: Vec<String> = batch.iter().map(|m| m.location.to_string()).collect();
        // Ingest first: a file placed in the store whose registration is still to come (Files
        // was unavailable, its completer crashed) is named by its upload. An upload that ends
        // after this answer registered its file first, so Files, asked next, names it.
        let mut referenced: std::collections::HashSet<String> = self
            .ingest
            .find_upload_keys(pb::FindUploadKeysRequest { keys: keys.clone() })
            .await?
            .in_use
            .into_iter()
            .collect();
        let unclaimed: Vec<String> = keys
            .iter()
            .filter(|k| !referenced.contains(*k))
            .cloned()
            .collect();
        if !unclaimed.is_empty() {
            referenced.extend(
                self.files
                    .find_keys(pb::FindKeysRequest { keys: unclaimed })
                    .await?
                    .referenced,
            );
        }
        for (meta, key) in batch.iter().zip(keys) {
            if referenced.contains(&key) {
                continue;
            }
            if !dry_run && let Err(e) = self.store.delete(&meta.location).await {
                tally.failed += 1;
                tracing::warn!(key, error = %e, "unreferenced blob not deleted");
                continue;
            }
            tally.note(dry_run, format!("unreferenced {key}"));
        }
        Ok(())
    }

    /// Files in processing for longer than `stuck_processing_minutes` (a lost event, a job
    /// dead after its attempts): their media job is requested again.
    async fn stuck_processing(
        &self,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<Tally, tonic::Status> {
        let before =
            Utc::now() - chrono::Duration::minutes(i64::from(policy.stuck_processing_minutes));
        let mut tally = Tally::default();
        let mut page_token = String::new();
        loop {
            let page = self
                .files
                .list_originals(pb::ListOriginalsRequest {
                    created_before: Some(stowage_runtime::time::timestamp(before)),
                    page_size: PAGE,
                    page_token: page_token.clone(),
                    status: pb::FileStatus::Processing as i32,
                })
                .await?;
            for file in page.originals {
                tally.examined += 1;
                if dry_run {
                    tally.note(true, format!("reprocess {}", file.file_id));
                    continue;
                }
                match self
                    .media
                    .reprocess(pb::ReprocessRequest {
                        file_id: file.file_id.clone(),
                    })
                    .await
                {
                    Ok(_) => tally.note(false, String::new()),
                    Err(s) => {
                        tally.failed += 1;
                        tracing::warn!(file_id = %file.file_id, status = %s, "reprocess request failed");
                    }
                }
            }
            if page.next_page_token.is_empty() {
                return Ok(tally);
            }
            page_token = page.next_page_token;
        }
    }

    /// History events older than `history_retention_days` are deleted (none when it is 0), a
    /// batch per statement so no statement holds many rows locked; a run stops after
    /// `HISTORY_PRUNE_MAX` and the next goes on.
    async fn history_prune(&self, policy: &Policy, dry_run: bool) -> Result<Tally, tonic::Status> {
        if policy.history_retention_days == 0 {
            return Ok(Tally::default());
        }
        let days = i32::try_from(policy.history_retention_days).unwrap_or(i32::MAX);
        let conn = self.pool.get().await.map_err(crate::db)?;
        let mut tally = Tally::default();
        if dry_run {
            let row = conn
                .query_one(
                    "SELECT count(*), min(at)::text FROM lifecycle.history
                     WHERE at < now() - make_interval(days => $1)",
                    &[&days],
                )
                .await
                .map_err(crate::db)?;
            let old = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
            tally.examined = old;
            // What one run would delete; the rest goes in the runs after it.
            tally.acted = old.min(HISTORY_PRUNE_MAX);
            if let Some(oldest) = row.get::<_, Option<String>>(1) {
                tally.report.push(format!(
                    "{old} history events, the oldest of {oldest}; a run deletes {HISTORY_PRUNE_MAX} at most"
                ));
            }
            return Ok(tally);
        }
        loop {
            let removed = conn
                .execute(
                    "DELETE FROM lifecycle.history WHERE id IN (
                         SELECT id FROM lifecycle.history
                         WHERE at < now() - make_interval(days => $1)
                         LIMIT 10000)",
                    &[&days],
                )
                .await
                .map_err(crate::db)?;
            tally.examined += removed;
            tally.acted += removed;
            if removed < 10_000 || tally.acted >= HISTORY_PRUNE_MAX {
                return Ok(tally);
            }
        }
    }

    /// Ephemeral blobs acknowledged or past their time to live are deleted, except the newest
    /// `ephemeral_keep_last` per owner (a dev option for debugging).
    async fn ephemeral_cleanup(
        &self,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<Tally, tonic::Status> {
        let keep = i64::from(policy.ephemeral_keep_last);
        let conn = self.pool.get().await.map_err(crate::db)?;
        // Keeping none (the production value) needs no ranking of every owner's rows.
        let done: Vec<String> = if keep == 0 {
            conn.query(
                "SELECT storage_key FROM lifecycle.ephemeral
                 WHERE acknowledged_at IS NOT NULL OR expires_at < now()
                 LIMIT 10000",
                &[],
            )
            .await
        } else {
            conn.query(
                "SELECT storage_key FROM (
                     SELECT storage_key, acknowledged_at, expires_at,
                            row_number() OVER (PARTITION BY owner ORDER BY created_at DESC) AS rank
                     FROM lifecycle.ephemeral) e
                 WHERE (acknowledged_at IS NOT NULL OR expires_at < now()) AND rank > $1
                 LIMIT 10000",
                &[&keep],
            )
            .await
        }
        .map_err(crate::db)?
        .iter()
        .map(|r| r.get(0))
        .collect();
        drop(conn);
        let mut tally = Tally {
            examined: done.len() as u64,
            ..Tally::default()
        };
        for key in done {
            if dry_run {
                tally.note(true, format!("ephemeral {key}"));
                continue;
            }
            // The row stays locked while its blob goes: a registration of the key again
            // waits, and one that came since the listing (not done any more) is left alone.
            let mut conn = self.pool.get().await.map_err(crate::db)?;
            let tx = conn.transaction().await.map_err(crate::db)?;
            let still_done = tx
                .query_opt(
                    "SELECT 1 FROM lifecycle.ephemeral WHERE storage_key = $1
                       AND (acknowledged_at IS NOT NULL OR expires_at < now()) FOR UPDATE",
                    &[&key],
                )
                .await
                .map_err(crate::db)?
                .is_some();
            if !still_done {
                continue;
            }
            match self
                .store
                .delete(&object_store::path::Path::from(key.as_str()))
                .await
            {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tally.failed += 1;
                    tracing::warn!(key, error = %e, "ephemeral blob not deleted");
                    continue;
                }
            }
            tx.execute(
                "DELETE FROM lifecycle.ephemeral WHERE storage_key = $1",
                &[&key],
            )
            .await
            .map_err(crate::db)?;
            tx.commit().await.map_err(crate::db)?;
            tally.note(false, String::new());
        }
        Ok(tally)
    }

    /// Held quota reservations past their expiry give their bytes back (an upload that never
    /// completed and was never swept must not hold its owner's quota).
    async fn reservations_expire(&self, dry_run: bool) -> Result<Tally, tonic::Status> {
        let expired = self
            .quota
            .expire_reservations(pb::ExpireReservationsRequest { dry_run })
            .await?;
        let mut tally = Tally {
            examined: expired.count,
            ..Tally::default()
        };
        tally.acted = expired.count;
        if dry_run {
            tally.report = expired
                .reservation_ids
                .into_iter()
                .map(|id| format!("reservation {id}"))
                .collect();
        }
        Ok(tally)
    }

    /// Bytes stored per owner whose id is after `after` and up to `until` (empty: no bound),
    /// from Files' usage listing.
    async fn stored_between(
        &self,
        after: &str,
        until: &str,
    ) -> Result<std::collections::BTreeMap<String, u64>, tonic::Status> {
        let mut stored = std::collections::BTreeMap::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .files
                .usage_by_owner(pb::UsageByOwnerRequest {
                    page_size: 1000,
                    page_token: page_token.clone(),
                    owner_id: String::new(),
                    after_owner_id: after.to_owned(),
                    until_owner_id: until.to_owned(),
                })
                .await?;
            for owner in page.owners {
                stored.insert(owner.owner_id, owner.stored_bytes);
            }
            if page.next_page_token.is_empty() {
                return Ok(stored);
            }
            page_token = page.next_page_token;
        }
    }

    /// Every user's usage recounted from Files (originals, trash included, plus charged
    /// variants) and set in Quota where it drifted and holds still (see [`crate::usage`]),
    /// with a ledger entry saying so. Accounts with an upload in flight (bytes reserved) are
    /// left for the next run: their files and their usage may be between two steps of a
    /// commit.
    async fn usage_reconcile(&self, dry_run: bool) -> Result<Tally, tonic::Status> {
        // Quota's accounts page by page, and beside each page Files' owners between the
        // previous page's last id and this one's: only a page's worth of owners is held at a
        // time, whatever the number of users. Ranges are cut in each service's own collation:
        // should the two differ, an owner may fall beside another page than its account, and
        // looks drifted on both sides; the second look, user by user, finds the truth.
        let mut tally = Tally::default();
        let mut seen = Vec::new();
        let mut accounts_token = String::new();
        let mut after = String::new();
        loop {
            let page = self
                .quota
                .list_accounts(pb::ListAccountsRequest {
                    min_used_percent: 0.0,
                    page_size: 1000,
                    page_token: accounts_token.clone(),
                })
                .await?;
            // The last page takes every owner after the one before it. (A page without
            // accounts but with a next one cannot bound a range: taken as the last.)
            let until = match (page.next_page_token.is_empty(), page.accounts.last()) {
                (false, Some(account)) => account.user_id.clone(),
                _ => String::new(),
            };
            let last = until.is_empty();
            let mut stored = self.stored_between(&after, &until).await?;
            for account in page.accounts {
                tally.examined += 1;
                let observed = Observed {
                    stored: stored.remove(&account.user_id).unwrap_or(0),
                    user_id: account.user_id,
                    used: account.used_bytes,
                    reserved: account.reserved_bytes,
                    // Looked at in the second look (which must find them 0 too).
                    lapsed: 0,
                    moving: 0,
                };
                // Only drifts are kept for the second look: every account held here at once
                // would take memory by the million users.
                if observed.drifted() {
                    seen.push(observed);
                }
            }
            // Owners with files but no account: their usage is 0 where it should not be.
            for (user_id, stored) in stored {
                tally.examined += 1;
                seen.push(Observed {
                    user_id,
                    stored,
                    used: 0,
                    reserved: 0,
                    lapsed: 0,
                    moving: 0,
                });
            }
            if last {
                break;
            }
            accounts_token = page.next_page_token;
            after = until;
        }
        let drift = self
            .repair_settled(seen, &repair_key("reconcile"), dry_run, &mut tally)
            .await;
        if !dry_run {
            // With its time: of the replicas, the one that reconciled last is believed (each
            // keeps the figure of its own last run).
            metrics::gauge!("stowage_usage_drift_bytes").set(drift as f64);
            metrics::gauge!("stowage_usage_reconciled_timestamp_seconds")
                .set(Utc::now().timestamp() as f64);
        }
        Ok(tally)
    }
}
