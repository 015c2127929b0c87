//! Usage recounts: what each user stores (Files) against what Quota records, and repairs of
//! the drifts that hold still.
//!
//! The services change usage in two steps that no transaction spans: a purge deletes the row
//! and then debits, a completion registers the file and then commits. A recount landing
//! between the two sees a drift that heals by itself a moment later, and "repairing" it would
//! make a real drift once the second step lands. So a drift is repaired only when a second
//! look, `settle` later, finds the same stored bytes, the same recorded usage and no upload
//! in flight; and Quota applies the repair only if the usage is still the one compared
//! (`expected_used_bytes`), so a step landing after the second look is not overwritten.

use std::time::Duration;

use chrono::Utc;
use stowage_proto::v1 as pb;
use tonic::Code;
use uuid::Uuid;

use crate::{Lifecycle, activity::record, db, tasks::Tally};

/// Default wait between the two looks at a drifted account.
pub const DEFAULT_SETTLE: Duration = Duration::from_secs(2);

/// One user's usage seen from both sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Observed {
    /// User id.
    pub user_id: String,
    /// Bytes Files counts for them (originals, trash included, plus charged variants).
    pub stored: u64,
    /// Bytes Quota records as used.
    pub used: u64,
    /// Bytes Quota holds for uploads in flight.
    pub reserved: u64,
    /// Bytes of holds that lapsed lately uncommitted: an upload whose completion began in
    /// time (its file registered) may still commit them.
    pub lapsed: u64,
    /// Files whose variant charge is in flight (Quota charged, Files not yet recorded); 0
    /// where not looked at.
    pub moving: u64,
}

impl Observed {
    /// `stored - used`.
    pub fn drift(&self) -> i64 {
        i64::try_from(self.stored).unwrap_or(i64::MAX)
            - i64::try_from(self.used).unwrap_or(i64::MAX)
    }

    /// Whether this looks like a drift worth a second look: usage differs, and no upload is
    /// between its reservation and its commit (its hold held, or lapsed lately: a commit can
    /// still come), no variant charge between its two steps.
    pub fn drifted(&self) -> bool {
        self.reserved == 0 && self.lapsed == 0 && self.moving == 0 && self.stored != self.used
    }
}

impl Lifecycle {
    /// `user_id`'s usage as Files and Quota see it now (Files first).
    pub(crate) async fn observe_usage(&self, user_id: &str) -> Result<Observed, tonic::Status> {
        let (stored, moving) = self
            .files
            .usage_by_owner(pb::UsageByOwnerRequest {
                page_size: 1,
                owner_id: user_id.to_owned(),
                ..Default::default()
            })
            .await?
            .owners
            .first()
            .map_or((0, 0), |o| (o.stored_bytes, o.charges_in_flight));
        let usage = self
            .quota
            .get_usage(pb::GetUsageRequest {
                user_id: user_id.to_owned(),
            })
            .await?;
        let account = usage.account.unwrap_or_default();
        Ok(Observed {
            user_id: user_id.to_owned(),
            stored,
            used: account.used_bytes,
            reserved: account.reserved_bytes,
            lapsed: usage.lapsed_bytes,
            moving,
        })
    }

    /// Repairs every drift of `seen` that is still there, unchanged, after the settle time
    /// (with `dry_run`, only reports it). Repairs are keyed `{key}:{user}` and written to the
    /// user's history. Returns the total size of the drifts confirmed.
    pub(crate) async fn repair_settled(
        &self,
        seen: Vec<Observed>,
        key: &str,
        dry_run: bool,
        tally: &mut Tally,
    ) -> i64 {
        let seen: Vec<Observed> = seen.into_iter().filter(Observed::drifted).collect();
        if seen.is_empty() {
            return 0;
        }
        tokio::time::sleep(self.settle).await;
        let mut total = 0i64;
        for first in seen {
            let again = match self.observe_usage(&first.user_id).await {
                Ok(again) => again,
                Err(status) => {
                    tally.failed += 1;
                    tracing::warn!(user_id = first.user_id, %status, "usage recount failed; next run");
                    continue;
                }
            };
            if again != first {
                tracing::debug!(
                    user_id = first.user_id,
                    "usage moved since the recount; not a drift"
                );
                continue;
            }
            total += first.drift().abs();
            if dry_run {
                tally.note(
                    true,
                    format!("user {} drift {}", first.user_id, first.drift()),
                );
                continue;
            }
            match self.repair(&first, key).await {
                Ok(()) => tally.note(false, String::new()),
                // The usage moved between the second look and the repair: not a drift.
                Err(status) if status.code() == Code::Aborted => {}
                Err(status) => {
                    tally.failed += 1;
                    tracing::warn!(user_id = first.user_id, %status, "usage repair failed; next run");
                }
            }
        }
        total
    }

    /// Sets the user's usage to what they store, if Quota still records what was seen.
    async fn repair(&self, seen: &Observed, key: &str) -> Result<(), tonic::Status> {
        let user_id = &seen.user_id;
        let repaired = self
            .quota
            .reconcile(pb::ReconcileRequest {
                user_id: user_id.clone(),
                actual_bytes: seen.stored,
                expected_used_bytes: Some(seen.used),
                idempotency_key: format!("{key}:{user_id}"),
            })
            .await?;
        if repaired.drift_bytes == 0 {
            return Ok(());
        }
        tracing::warn!(
            user_id,
            drift = repaired.drift_bytes,
            "usage drift repaired"
        );
        let written = async {
            let conn = self.pool.get().await.map_err(db)?;
            record(
                &conn,
                user_id,
                "drift_repaired",
                Utc::now(),
                &serde_json::json!({ "drift_bytes": repaired.drift_bytes }),
                key,
            )
            .await
            .map_err(db)
        }
        .await;
        if let Err(status) = written {
            tracing::warn!(user_id, %status, "repair not written to the history");
        }
        Ok(())
    }
}

/// A key for one batch of repairs.
pub(crate) fn repair_key(kind: &str) -> String {
    format!("{kind}:{}", Uuid::now_v7())
}
