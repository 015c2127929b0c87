//! Activity, inactivity notices spread over a grace window, debounced per-user rechecks and
//! the per-user history (seed 000, in the mesh's shape).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use futures::StreamExt;
use stowage_db::{Cached, GenericClient};
use stowage_events::{Event, EventHandler, HandlerError, topics};
use stowage_proto::v1 as pb;

use crate::{Lifecycle, db, policy::Policy, tasks::Tally, usage::repair_key};

/// Topic of the notice a quiet user gets (for the product's mailer).
pub const NOTICE_TOPIC: &str = "lifecycle.notice";
/// Longest a recheck waits under a steady stream of events.
const MAX_DEBOUNCE_WAIT: &str = "10 seconds";
/// How long a running recheck is claimed: past it, one whose process died runs again.
const RECHECK_LEASE: &str = "5 minutes";
/// Rechecks claimed per pass.
const RECHECK_BATCH: i64 = 100;

/// How failed rechecks are retried, and how many run at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RecheckSettings {
    /// Attempts before a recheck is left to the next reconcile.
    attempts: i32,
    /// Wait before the second attempt.
    backoff: std::time::Duration,
    /// Each later wait is the one before times this.
    factor: f64,
    /// Rechecks run at once.
    concurrency: usize,
}

impl From<&stowage_runtime::config::LifecycleConfig> for RecheckSettings {
    fn from(config: &stowage_runtime::config::LifecycleConfig) -> Self {
        Self {
            attempts: i32::try_from(config.recheck_attempts).unwrap_or(i32::MAX),
            backoff: config.recheck_backoff,
            factor: config.recheck_backoff_factor,
            concurrency: config.recheck_concurrency.max(1),
        }
    }
}

/// What one recheck (its user and claim) came to.
pub(crate) enum Rechecked {
    /// Measured: repaired with the others, then cleared.
    Seen(crate::usage::Observed, String, uuid::Uuid),
    /// Failed for the last time: cleared, left to the reconcile.
    GaveUp(String, uuid::Uuid),
    /// Failed, tried again later (or left to its claim's end).
    Retried,
}
/// Users given a notice time per pass.
const BATCH: i64 = 10_000;

/// Records each user's activity at the paired time in `client`'s transaction, one statement
/// for all. Users must not repeat. Activity after a notice ends that notice cycle: the user
/// may be found quiet again later.
pub(crate) async fn touch(
    client: &impl GenericClient,
    users: &[&str],
    at: &[DateTime<Utc>],
) -> Result<(), tokio_postgres::Error> {
    client
        .execute_cached(
            "INSERT INTO lifecycle.activity AS a (user_id, last_active_at)
             SELECT * FROM unnest($1::text[], $2::timestamptz[])
             ON CONFLICT (user_id) DO UPDATE SET
                 last_active_at = greatest(a.last_active_at, excluded.last_active_at),
                 notice_due_at = CASE WHEN excluded.last_active_at > a.last_active_at THEN NULL
                                      ELSE a.notice_due_at END,
                 notice_sent_at = CASE WHEN excluded.last_active_at > a.last_active_at THEN NULL
                                       ELSE a.notice_sent_at END,
                 cleaned_at = CASE WHEN excluded.last_active_at > a.last_active_at THEN NULL
                                   ELSE a.cleaned_at END",
            &[&users, &at],
        )
        .await?;
    Ok(())
}

/// Asks for a recheck of each of `users` (not repeating) once `debounce` passes without
/// another request, one statement for all.
pub(crate) async fn request_recheck(
    client: &impl GenericClient,
    users: &[&str],
    debounce: Duration,
) -> Result<(), tokio_postgres::Error> {
    let secs = debounce.as_secs_f64();
    client
        .execute_cached(
            "INSERT INTO lifecycle.rechecks (user_id, due_at)
             SELECT user_id, now() + make_interval(secs => $2) FROM unnest($1::text[]) AS u (user_id)
             ON CONFLICT (user_id) DO UPDATE SET due_at = excluded.due_at,
                 -- A retry waiting for its backoff, or a recheck running, is followed by a
                 -- fresh recheck of this burst.
                 attempts = 0, claim = NULL,
                 first_at = CASE WHEN rechecks.attempts > 0 OR rechecks.claim IS NOT NULL
                                 THEN now() ELSE rechecks.first_at END",
            &[&users, &secs],
        )
        .await?;
    Ok(())
}

/// Adds a history event unless one with the same user, event and key exists.
pub(crate) async fn record(
    client: &impl GenericClient,
    user: &str,
    event: &str,
    at: DateTime<Utc>,
    detail: &serde_json::Value,
    dedupe_key: &str,
) -> Result<bool, tokio_postgres::Error> {
    let inserted = client
        .execute_cached(
            "INSERT INTO lifecycle.history (user_id, event, at, detail, dedupe_key)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[&user, &event, &at, detail, &dedupe_key],
        )
        .await?;
    Ok(inserted == 1)
}

/// One history event.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEvent {
    /// Row id (orders events of the same instant).
    pub id: i64,
    /// User.
    pub user_id: String,
    /// Event name.
    pub event: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Details.
    pub detail: serde_json::Value,
}

impl HistoryEvent {
    fn from_row(row: &tokio_postgres::Row) -> Self {
        Self {
            id: row.get("id"),
            user_id: row.get("user_id"),
            event: row.get("event"),
            at: row.get("at"),
            detail: row.get("detail"),
        }
    }

    /// The event as sent over the API.
    pub fn to_proto(&self) -> pb::UserEvent {
        pb::UserEvent {
            user_id: self.user_id.clone(),
            event: self.event.clone(),
            at: Some(stowage_runtime::time::timestamp(self.at)),
            detail_json: self.detail.to_string(),
        }
    }
}

impl Lifecycle {
    /// Records a reported activity (login, worker session up or down).
    pub async fn record_activity(
        &self,
        user: &str,
        kind: pb::ActivityKind,
        at: DateTime<Utc>,
        key: &str,
    ) -> Result<(), tonic::Status> {
        let event = match kind {
            pb::ActivityKind::Login => "login",
            pb::ActivityKind::SessionUp => "session_up",
            pb::ActivityKind::SessionDown => "session_down",
            pb::ActivityKind::Unspecified => {
                return Err(stowage_runtime::status::invalid_argument(
                    "kind",
                    "is required",
                ));
            }
        };
        let key = if key.is_empty() {
            at.to_rfc3339()
        } else {
            key.to_owned()
        };
        let mut conn = self.pool.get().await.map_err(db)?;
        let tx = conn.transaction().await.map_err(db)?;
        touch(&tx, &[user], &[at]).await.map_err(db)?;
        // A report seen before (a retry) changes no state: a retried "up" arriving after its
        // "down" must not bring the session back up.
        let first_report = kind != pb::ActivityKind::Login
            && record(&tx, user, event, at, &serde_json::json!({}), &key)
                .await
                .map_err(db)?;
        if first_report {
            // A report older than the state it would replace (out of order) changes nothing.
            let sql = if kind == pb::ActivityKind::SessionUp {
                "UPDATE lifecycle.activity
                 SET session_up_at = greatest(session_up_at, $2)
                 WHERE user_id = $1 AND NOT EXISTS (
                     SELECT 1 FROM lifecycle.history
                     WHERE user_id = $1 AND event = 'session_down' AND at > $2)"
            } else {
                "UPDATE lifecycle.activity SET session_up_at = NULL
                 WHERE user_id = $1 AND session_up_at <= $2"
            };
            tx.execute_cached(sql, &[&user, &at]).await.map_err(db)?;
        }
        // The live session state for whoever asks quickly, as PostgreSQL now has it: written
        // while the user's row is locked (by `touch`), so two reports write it in the order
        // they commit. (A commit failing after it leaves Redis one report ahead until the next.)
        if let Some(redis) = &self.redis
            && kind != pb::ActivityKind::Login
        {
            use fred::interfaces::KeysInterface;
            let up: bool = tx
                .query_one_cached(
                    "SELECT session_up_at IS NOT NULL FROM lifecycle.activity WHERE user_id = $1",
                    &[&user],
                )
                .await
                .map_err(db)?
                .get(0);
            let redis_key = format!("{}:lifecycle:session:{user}", self.namespace);
            let result: Result<(), fred::error::Error> = if up {
                redis.set(&redis_key, "up", None, None, false).await
            } else {
                redis.del(&redis_key).await
            };
            if let Err(error) = result {
                tracing::warn!(user, %error, "session state not written to Redis");
            }
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    /// The inactivity task: users quiet for `inactivity_days` (and no worker session up) get a
    /// notice time spread evenly over the grace window (not all in the same minute); notices
    /// whose time has come are sent once (an event for the mailer and a history entry, in one
    /// transaction).
    pub(crate) async fn inactivity(
        &self,
        policy: &Policy,
        dry_run: bool,
    ) -> Result<Tally, tonic::Status> {
        let mut tally = Tally::default();
        let mut conn = self.pool.get().await.map_err(db)?;
        let quiet_days = f64::from(policy.inactivity_days) * 86_400.0;
        let quiet: Vec<String> = conn
            .query_cached(
                "SELECT user_id FROM lifecycle.activity
                 WHERE notice_due_at IS NULL AND session_up_at IS NULL
                   AND last_active_at < now() - make_interval(secs => $1)
                 ORDER BY user_id LIMIT $2",
                &[&quiet_days, &BATCH],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tally.examined += quiet.len() as u64;
        if dry_run {
            for user in &quiet {
                tally.note(true, format!("notice for {user}"));
            }
        } else if !quiet.is_empty() {
            // Evenly spread: the i-th of n users is due i/n of the way through the window.
            let grace = f64::from(policy.notice_grace_hours) * 3600.0;
            let n = quiet.len() as f64;
            let offsets: Vec<f64> = (0..quiet.len()).map(|i| grace * i as f64 / n).collect();
            // Still quiet: activity may have come in since the list was read.
            conn.execute_cached(
                "UPDATE lifecycle.activity a SET notice_due_at = now() + make_interval(secs => s.offset_s)
                 FROM unnest($1::text[], $2::float8[]) AS s(user_id, offset_s)
                 WHERE a.user_id = s.user_id AND a.notice_due_at IS NULL
                   AND a.session_up_at IS NULL
                   AND a.last_active_at < now() - make_interval(secs => $3)",
                &[&quiet, &offsets, &quiet_days],
            )
            .await
            .map_err(db)?;
        }
        if dry_run {
            return Ok(tally);
        }
        // Users marked under an earlier policy who are not quiet long enough under this one
        // (the inactivity period was raised), or whose session came up since: no notice.
        conn.execute_cached(
            "UPDATE lifecycle.activity SET notice_due_at = NULL
             WHERE notice_due_at IS NOT NULL AND notice_sent_at IS NULL
               AND (last_active_at >= now() - make_interval(secs => $1)
                    OR session_up_at IS NOT NULL)",
            &[&quiet_days],
        )
        .await
        .map_err(db)?;
        let grace = f64::from(policy.notice_grace_hours) * 3600.0;
        loop {
            let tx = conn.transaction().await.map_err(db)?;
            let due = tx
                .query_cached(
                    "UPDATE lifecycle.activity
                     SET notice_sent_at = now(), notice_action = $1,
                         clean_after = now() + make_interval(secs => $3)
                     WHERE user_id IN (
                         SELECT user_id FROM lifecycle.activity
                         WHERE notice_due_at <= now() AND notice_sent_at IS NULL
                           AND session_up_at IS NULL
                           AND last_active_at < now() - make_interval(secs => $2)
                         ORDER BY notice_due_at LIMIT 500 FOR UPDATE SKIP LOCKED)
                     RETURNING user_id, last_active_at, notice_due_at, clean_after",
                    &[&policy.inactivity_action.as_str(), &quiet_days, &grace],
                )
                .await
                .map_err(db)?;
            if due.is_empty() {
                tx.commit().await.map_err(db)?;
                break;
            }
            for row in &due {
                let user: String = row.get(0);
                let last: DateTime<Utc> = row.get(1);
                let due_at: DateTime<Utc> = row.get(2);
                let clean_after: DateTime<Utc> = row.get(3);
                let payload = serde_json::json!({
                    "user_id": user,
                    "last_active_at": last,
                    "inactivity_days": policy.inactivity_days,
                    "action_after_grace": policy.inactivity_action,
                    "grace_ends_at": clean_after,
                });
                stowage_events::stage(&tx, crate::SCHEMA, NOTICE_TOPIC, &user, &payload)
                    .await
                    .map_err(db)?;
                record(
                    &tx,
                    &user,
                    "notice_sent",
                    Utc::now(),
                    &payload,
                    &due_at.to_rfc3339(),
                )
                .await
                .map_err(db)?;
                tally.note(false, String::new());
            }
            tx.commit().await.map_err(db)?;
        }
        if policy.inactivity_action == crate::policy::InactivityAction::Trash {
            self.clean_after_grace(policy, &mut tally).await?;
        }
        Ok(tally)
    }

    /// Users noticed longer than the grace window ago, still quiet, whose notice said their
    /// files would go to trash: they do (from where the trash retention purges them), once per
    /// notice. A user noticed under "notify only" is not trashed when the policy changes.
    async fn clean_after_grace(
        &self,
        policy: &Policy,
        tally: &mut Tally,
    ) -> Result<(), tonic::Status> {
        let grace = f64::from(policy.notice_grace_hours) * 3600.0;
        let conn = self.pool.get().await.map_err(db)?;
        let due: Vec<(String, DateTime<Utc>)> = conn
            .query_cached(
                "SELECT user_id, notice_sent_at FROM lifecycle.activity
                 WHERE coalesce(clean_after, notice_sent_at + make_interval(secs => $1)) < now()
                   AND notice_sent_at IS NOT NULL AND cleaned_at IS NULL
                   AND notice_action = 'trash' AND session_up_at IS NULL
                 LIMIT 1000",
                &[&grace],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        drop(conn);
        for (user, noticed) in due {
            // The user's row stays locked from here to the mark, across the trashing: a run
            // beside this one skips the user instead of trashing the same files at the same
            // time (and recording a second clean-up), and activity that comes in meanwhile
            // waits for the mark. A crash before the commit leaves the user due again.
            let mut conn = self.pool.get().await.map_err(db)?;
            let tx = conn.transaction().await.map_err(db)?;
            let claimed = tx
                .query_opt_cached(
                    "SELECT 1 FROM lifecycle.activity
                     WHERE user_id = $1 AND cleaned_at IS NULL AND notice_sent_at = $2
                       AND session_up_at IS NULL
                     FOR UPDATE SKIP LOCKED",
                    &[&user, &noticed],
                )
                .await
                .map_err(db)?
                .is_some();
            if !claimed {
                continue;
            }
            let trashed = match self
                .files
                .trash_owner_files(pb::TrashOwnerFilesRequest {
                    owner_id: user.clone(),
                    // What they had when told; what they added since says they are back.
                    created_before: Some(stowage_runtime::time::timestamp(noticed)),
                })
                .await
            {
                Ok(r) => r.trashed,
                Err(s) => {
                    tally.failed += 1;
                    tracing::warn!(user, status = %s, "inactive user's files not trashed");
                    continue;
                }
            };
            let marked = tx
                .execute_cached(
                    "UPDATE lifecycle.activity SET cleaned_at = now()
                     WHERE user_id = $1 AND cleaned_at IS NULL AND notice_sent_at = $2",
                    &[&user, &noticed],
                )
                .await
                .map_err(db)?;
            // The row is locked since the claim, so it is marked; recorded also when files
            // moved without it, to be safe: the owner finds in their history why their files
            // are in trash.
            if marked == 1 || trashed > 0 {
                record(
                    &tx,
                    &user,
                    "cleaned",
                    Utc::now(),
                    &serde_json::json!({ "trashed_files": trashed }),
                    &noticed.to_rfc3339(),
                )
                .await
                .map_err(db)?;
                tally.note(false, String::new());
            }
            tx.commit().await.map_err(db)?;
        }
        Ok(())
    }

    /// Runs the rechecks whose burst ended; returns how many ran. Each is claimed for
    /// `RECHECK_LEASE` and deleted once done, so one a dead process held runs again.
    pub async fn run_due_rechecks(&self) -> Result<usize, tonic::Status> {
        let conn = self.pool.get().await.map_err(db)?;
        let due: Vec<(String, i32, uuid::Uuid)> = conn
            .query_cached(
                &format!(
                    "UPDATE lifecycle.rechecks
                     SET claim = gen_random_uuid(), due_at = now() + interval '{RECHECK_LEASE}'
                     WHERE user_id IN (
                         SELECT user_id FROM lifecycle.rechecks
                         WHERE due_at <= now()
                            OR (claim IS NULL AND attempts = 0
                                AND first_at <= now() - interval '{MAX_DEBOUNCE_WAIT}')
                         LIMIT {RECHECK_BATCH} FOR UPDATE SKIP LOCKED)
                     RETURNING user_id, attempts, claim"
                ),
                &[],
            )
            .await
            .map_err(db)?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        drop(conn);
        let settings = self.rechecks;
        let outcomes: Vec<Rechecked> = futures::stream::iter(due.iter().cloned())
            .map(|(user, attempts, claim)| self.recheck(settings, user, attempts, claim))
            .buffer_unordered(settings.concurrency)
            .collect()
            .await;
        let mut seen = Vec::with_capacity(due.len());
        let mut done = Vec::with_capacity(due.len());
        for outcome in outcomes {
            match outcome {
                Rechecked::Seen(observed, user, claim) => {
                    seen.push(observed);
                    done.push((user, claim));
                }
                Rechecked::GaveUp(user, claim) => done.push((user, claim)),
                Rechecked::Retried => {}
            }
        }
        let mut tally = Tally::default();
        self.repair_settled(seen, &repair_key("recheck"), false, &mut tally)
            .await;
        // Only now, with the repairs made: a process that dies before leaves the claims to
        // end and the rechecks to run again. A claim a new request replaced stays.
        let users: Vec<&str> = done.iter().map(|(u, _)| u.as_str()).collect();
        let claims: Vec<uuid::Uuid> = done.iter().map(|(_, c)| *c).collect();
        let cleared = async {
            self.pool
                .get()
                .await
                .map_err(db)?
                .execute_cached(
                    "DELETE FROM lifecycle.rechecks r USING unnest($1::text[], $2::uuid[]) AS d (user_id, claim)
                     WHERE r.user_id = d.user_id AND r.claim = d.claim",
                    &[&users, &claims],
                )
                .await
                .map_err(db)
        };
        if let Err(status) = cleared.await {
            tracing::warn!(%status, "finished rechecks not cleared; they run again when their claims end");
        }
        Ok(due.len())
    }

    /// Measures `user` for a recheck claimed with `claim`, its `attempts`-th try: on a
    /// failure it is tried again after a backoff, unless that was its last attempt.
    async fn recheck(
        &self,
        settings: RecheckSettings,
        user: String,
        attempts: i32,
        claim: uuid::Uuid,
    ) -> Rechecked {
        metrics::counter!("stowage_lifecycle_rechecks_total").increment(1);
        let status = match self.observe_usage(&user).await {
            Ok(observed) => {
                // Not worth losing the other rechecks for: the next change announces.
                if let Err(status) = self.announce_usage(&observed).await {
                    tracing::warn!(user, %status, "usage measured but not announced");
                }
                return Rechecked::Seen(observed, user, claim);
            }
            Err(status) => status,
        };
        if attempts + 1 >= settings.attempts {
            tracing::warn!(user, %status, attempts = attempts + 1, "recheck failed; the next reconcile covers it");
            return Rechecked::GaveUp(user, claim);
        }
        // Again after a backoff, unclaimed (unless a new request replaced it).
        // An hour at most, whatever the factor and attempts make of it.
        let wait = (settings.backoff.as_secs_f64() * settings.factor.powi(attempts)).min(3600.0);
        tracing::warn!(user, %status, retry_in_s = wait, "recheck failed; retried");
        let retried = async {
            self.pool
                .get()
                .await
                .map_err(db)?
                .execute_cached(
                    "UPDATE lifecycle.rechecks
                     SET claim = NULL, due_at = now() + make_interval(secs => $3),
                         attempts = $4
                     WHERE user_id = $1 AND claim = $2",
                    &[&user, &claim, &wait, &(attempts + 1)],
                )
                .await
                .map_err(db)
        };
        if let Err(status) = retried.await {
            tracing::warn!(user, %status, "recheck retry not recorded; runs again when its claim ends");
        }
        Rechecked::Retried
    }

    /// Tells subscribers what `observed` found (`usage.measured`): a user's size after their
    /// files changed, as a storage scan would publish it.
    async fn announce_usage(&self, observed: &crate::usage::Observed) -> Result<(), tonic::Status> {
        let payload = serde_json::json!({
            "user_id": observed.user_id,
            "stored_bytes": observed.stored,
            "used_bytes": observed.used,
            "reserved_bytes": observed.reserved,
        });
        let conn = self.pool.get().await.map_err(db)?;
        stowage_events::stage(
            &conn,
            crate::SCHEMA,
            stowage_events::topics::USAGE_MEASURED,
            &observed.user_id,
            &payload,
        )
        .await
        .map_err(db)?;
        Ok(())
    }

    /// The latest history event of each user, by user id after `after`.
    pub async fn most_recent_events(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<HistoryEvent>, tonic::Status> {
        let conn = self.pool.get().await.map_err(db)?;
        let rows = conn
            .query_cached(
                // One index probe per user (the next user id, then that user's newest
                // event), not a walk through every event of the users on the page and of
                // those before it. User ids are never empty, so '' is before all of them.
                "WITH RECURSIVE users (user_id) AS (
                     (SELECT user_id FROM lifecycle.history
                      WHERE user_id > coalesce($1::text, '') ORDER BY user_id LIMIT 1)
                     UNION ALL
                     SELECT (SELECT h.user_id FROM lifecycle.history h
                             WHERE h.user_id > u.user_id ORDER BY h.user_id LIMIT 1)
                     FROM users u WHERE u.user_id IS NOT NULL)
                 SELECT latest.* FROM (SELECT user_id FROM users WHERE user_id IS NOT NULL LIMIT $2) page
                 CROSS JOIN LATERAL (
                     SELECT * FROM lifecycle.history h WHERE h.user_id = page.user_id
                     ORDER BY at DESC, id DESC LIMIT 1) latest
                 ORDER BY latest.user_id",
                &[&after, &limit],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(HistoryEvent::from_row).collect())
    }

    /// `user`'s history, newest first, after `before` (keyset).
    pub async fn user_events(
        &self,
        user: &str,
        before: Option<(DateTime<Utc>, i64)>,
        limit: i64,
    ) -> Result<Vec<HistoryEvent>, tonic::Status> {
        let conn = self.pool.get().await.map_err(db)?;
        let (at, id) = before.unzip();
        let rows = conn
            .query_cached(
                // A range on the index, so a later page does not walk the pages before it.
                "SELECT id, user_id, event, at, detail FROM lifecycle.history
                 WHERE user_id = $1
                   AND (at, id) < (coalesce($2::timestamptz, 'infinity'), coalesce($3::bigint, 0))
                 ORDER BY at DESC, id DESC LIMIT $4",
                &[&user, &at, &id, &limit],
            )
            .await
            .map_err(db)?;
        Ok(rows.iter().map(HistoryEvent::from_row).collect())
    }
}

/// File and upload events that count as activity, and ask for a debounced recheck.
pub struct ActivityEvents {
    debounce: Duration,
}

impl ActivityEvents {
    /// Rechecks fire `debounce` after the last event of a burst.
    pub fn new(debounce: Duration) -> Self {
        Self { debounce }
    }

    /// Topics this handler reads. Not `upload.completed`: every upload that completes has
    /// made its `file.created` first, with the same owner and moment, so reading both would
    /// only record the same activity twice. Quota's and Media's only for the user's history.
    pub const TOPICS: &'static [&'static str] = &[
        topics::FILE_CREATED,
        topics::FILE_DELETED,
        topics::FILE_RESTORED,
        topics::FILE_PURGED,
        topics::FILE_DOWNLOADED,
        topics::QUOTA_LIMIT_SET,
        topics::MEDIA_QUARANTINED,
        topics::MEDIA_QUARANTINE_RELEASED,
    ];
}

/// What a batch of events asks of the activity tables: each user's latest own activity, and
/// the users to recheck, each once and in one order (two consumers folding batches that share
/// users then lock their rows in the same order).
fn fold(events: &[&Event]) -> (BTreeMap<String, DateTime<Utc>>, BTreeSet<String>) {
    let mut active: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
    let mut recheck = BTreeSet::new();
    for event in events.iter().filter(|e| e.topic.starts_with("file.")) {
        let Some(user) = event
            .payload
            .get("owner_id")
            .or_else(|| event.payload.get("user_id"))
            .and_then(serde_json::Value::as_str)
        else {
            continue;
        };
        // What a service did on the owner's behalf (trash of an inactive account, retention
        // purges) is not the owner's activity: counting it would end the very notice cycle
        // that caused it. Events without `by` are the owner's.
        let by_system =
            event.payload.get("by").and_then(serde_json::Value::as_str) == Some("system");
        if !by_system {
            let at = active.entry(user.to_owned()).or_insert(event.occurred_at);
            *at = (*at).max(event.occurred_at);
        }
        if event.topic != topics::FILE_DOWNLOADED {
            recheck.insert(user.to_owned());
        }
    }
    (active, recheck)
}

#[async_trait]
impl EventHandler for ActivityEvents {
    async fn handle(&self, event: &Event, tx: &Transaction<'_>) -> Result<(), HandlerError> {
        self.handle_batch(&[event], tx).await.map(|_| ())
    }

    /// A batch's events become one activity write and one recheck request, whatever their
    /// number: the latest activity per user is all that counts, and a recheck is per user.
    async fn handle_batch(
        &self,
        events: &[&Event],
        tx: &Transaction<'_>,
    ) -> Result<bool, HandlerError> {
        let (active, recheck) = fold(events);
        if !active.is_empty() {
            let (users, at): (Vec<&str>, Vec<DateTime<Utc>>) =
                active.iter().map(|(user, at)| (user.as_str(), *at)).unzip();
            touch(tx, &users, &at).await?;
        }
        if !recheck.is_empty() {
            let users: Vec<&str> = recheck.iter().map(String::as_str).collect();
            request_recheck(tx, &users, self.debounce).await?;
        }
        for event in events {
            if let Some((user, name, detail)) = history_entry(event) {
                // When it happened, as its service says (after the lock it took), else when
                // it was committed; once per event, however often it is delivered.
                let at = (event.topic == topics::QUOTA_LIMIT_SET)
                    .then(|| event.payload.get("at"))
                    .flatten()
                    .and_then(|at| serde_json::from_value(at.clone()).ok())
                    .unwrap_or(event.occurred_at);
                record(tx, user, name, at, &detail, &event.id.to_string()).await?;
            }
        }
        Ok(true)
    }
}

/// What was done to a user's account or files that the user should be able to read about:
/// what an admin did (naming the admin) and what the virus scanner held back. The user, the
/// history event and its detail; `None` for the user's own doings and the services' routine.
fn history_entry(event: &Event) -> Option<(&str, &'static str, serde_json::Value)> {
    let text = |field: &str| event.payload.get(field).and_then(serde_json::Value::as_str);
    if event.topic == topics::MEDIA_QUARANTINED {
        // Only those announced for it: older ones (replayed when this group first reads the
        // topic) may have been released without a record.
        event.payload.get("history")?;
        return Some((
            text("owner_id")?,
            "file_quarantined",
            serde_json::json!({ "file_id": text("file_id"), "reason": text("reason") }),
        ));
    }
    let admin = text("admin")?;
    match event.topic.as_str() {
        topics::MEDIA_QUARANTINE_RELEASED => Some((
            text("owner_id")?,
            "quarantine_released_by_admin",
            serde_json::json!({ "admin": admin, "file_id": text("file_id") }),
        )),
        topics::FILE_PURGED => Some((
            text("owner_id")?,
            "file_purged_by_admin",
            serde_json::json!({ "admin": admin, "file_id": text("file_id") }),
        )),
        topics::QUOTA_LIMIT_SET => Some((
            text("user_id")?,
            "limit_set",
            serde_json::json!({
                "admin": admin,
                "limit_bytes": event.payload.get("limit_bytes"),
                "previous_limit_bytes": event.payload.get("previous_limit_bytes"),
            }),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(topic: &str, payload: serde_json::Value, at_s: i64) -> Event {
        Event {
            id: uuid::Uuid::now_v7(),
            topic: topic.to_owned(),
            key: String::new(),
            payload,
            traceparent: None,
            occurred_at: DateTime::from_timestamp(at_s, 0).expect("in range"),
        }
    }

    #[test]
    fn what_others_did_goes_to_the_users_history_and_nothing_else_does() {
        let quarantined = |marked: bool| {
            let mut payload = serde_json::json!({
                "file_id": "f1", "owner_id": "ann", "reason": "Eicar-Signature",
            });
            if marked {
                payload["history"] = serde_json::json!(true);
            }
            event(topics::MEDIA_QUARANTINED, payload, 10)
        };
        let recorded = quarantined(true);
        assert_eq!(
            history_entry(&recorded),
            Some((
                "ann",
                "file_quarantined",
                serde_json::json!({ "file_id": "f1", "reason": "Eicar-Signature" })
            ))
        );
        // Announced before the owner's history took them: replayed, not recorded.
        assert_eq!(history_entry(&quarantined(false)), None);
        let own_purge = event(
            topics::FILE_PURGED,
            serde_json::json!({ "file_id": "f2", "owner_id": "ann", "by": "owner" }),
            10,
        );
        assert_eq!(history_entry(&own_purge), None);
        let limit = event(
            topics::QUOTA_LIMIT_SET,
            serde_json::json!({
                "user_id": "ann", "limit_bytes": 10, "previous_limit_bytes": 5,
                "admin": "root", "at": "2026-12-05T10:00:00.5Z",
            }),
            10,
        );
        let (user, name, detail) = history_entry(&limit).expect("recorded");
        assert_eq!(
            (user, name, &detail["admin"]),
            ("ann", "limit_set", &serde_json::json!("root"))
        );
    }

    #[test]
    fn a_batch_folds_to_each_users_latest_own_activity_and_one_recheck_each() {
        let events = [
            event(
                topics::FILE_CREATED,
                serde_json::json!({"owner_id": "bo"}),
                30,
            ),
            event(
                topics::FILE_CREATED,
                serde_json::json!({"owner_id": "al"}),
                20,
            ),
            event(
                topics::FILE_DOWNLOADED,
                serde_json::json!({"owner_id": "bo"}),
                50,
            ),
            event(
                topics::FILE_CREATED,
                serde_json::json!({"owner_id": "bo"}),
                10,
            ),
            // On the owner's behalf: no activity, but a recheck.
            event(
                topics::FILE_DELETED,
                serde_json::json!({"owner_id": "cy", "by": "system"}),
                60,
            ),
            // A download is activity and nothing to recheck.
            event(
                topics::FILE_DOWNLOADED,
                serde_json::json!({"user_id": "di"}),
                70,
            ),
            event(topics::FILE_CREATED, serde_json::json!({}), 80),
        ];
        let refs: Vec<&Event> = events.iter().collect();
        let (active, recheck) = fold(&refs);
        let active: Vec<(&str, i64)> = active
            .iter()
            .map(|(user, at)| (user.as_str(), at.timestamp()))
            .collect();
        assert_eq!(active, [("al", 20), ("bo", 50), ("di", 70)]);
        let recheck: Vec<&str> = recheck.iter().map(String::as_str).collect();
        assert_eq!(recheck, ["al", "bo", "cy"]);
    }
}
