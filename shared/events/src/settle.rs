//! Settling: what the consumer groups have acknowledged is marked in the outbox and trimmed
//! from Redis, and what Redis lost before every group had it is published again.
//!
//! Each pass, per topic this schema publishes and under the publishers' lock (so no entry is
//! being added meanwhile), the relay reads the stream's state and:
//! - compares how many entries Redis says were ever added to the stream with how many the
//!   relays added, and the newest unsettled row's entry with the last id Redis gave: fewer in
//!   Redis, or a row past its last id, means entries were lost (a failover to a replica that
//!   lagged, a restart from an older snapshot, a deleted stream), so every row not yet settled
//!   goes out again;
//! - marks settled the rows whose entries every group has acknowledged (below the oldest
//!   pending or undelivered entry of the slowest group; all of them when no group reads the
//!   topic), then trims the stream to there, but keeps the replay window's entries for groups
//!   created late;
//! - publishes again the rows not settled whose entries are gone from the front of the stream
//!   (cut by the length cap while a group was far behind), once the stream has room again;
//!   such rows are never settled, since rows are settled before their entries are trimmed.
//!
//! Consumers dedupe, so anything published twice is applied once. What is published again
//! comes after later events of its topic: consumers must not rely on a topic's order. Only
//! rows staged within [`REQUEUE_HORIZON`] are published again (consumers remember 7 days).

use std::{collections::HashMap, fmt, str::FromStr, sync::atomic::Ordering};

use deadpool_postgres::Transaction;
use fred::prelude::*;

use crate::{Relay, RelayError, event::stream_key};
use stowage_db::Cached;

/// How old (since staged) an event may be and still be published again when not settled:
/// well within the 7 days consumers remember what they applied, so a repeat is still known.
pub(crate) const REQUEUE_HORIZON: &str = "6 days";

/// Passes skipped because another relay held the publishers' lock after which a pass waits
/// for it.
const SETTLE_WAITS_AFTER: u32 = 10;

/// A stream entry id: milliseconds and sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct EntryId {
    pub(crate) ms: i64,
    pub(crate) seq: i64,
}

impl EntryId {
    /// The smallest id after this one.
    fn next(self) -> Self {
        Self {
            ms: self.ms,
            seq: self.seq.saturating_add(1),
        }
    }
}

impl FromStr for EntryId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = s.split_once('-').ok_or_else(|| format!("entry id {s:?}"))?;
        let number = |part: &str| part.parse::<i64>().map_err(|_| format!("entry id {s:?}"));
        Ok(Self {
            ms: number(ms)?,
            seq: number(seq)?,
        })
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// What one stream looks like to the relay.
#[derive(Debug)]
struct StreamState {
    /// Entries ever added to the stream (Redis 7's `entries-added`; `None` before 7).
    added: Option<i64>,
    /// The id of the last entry ever added.
    last: EntryId,
    /// Entries the slowest group has still to acknowledge (not yet delivered, or pending).
    needed: i64,
    /// Every entry before this one is gone: its first entry, or past its last id when empty.
    front: EntryId,
    /// Entries before this have been acknowledged by every group; `None` without groups.
    settled_below: Option<EntryId>,
}

/// What a settling pass did, for tests and logs. Rows published again come after later
/// events of their topic: a consumer must not rely on a topic's order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Rows marked settled.
    pub settled: u64,
    /// Rows queued to be published again because Redis lost their entries.
    pub lost: u64,
    /// Rows queued again because the length cap cut their entries before a group read them.
    pub cut: u64,
}

fn protocol(what: impl fmt::Display) -> RelayError {
    RelayError::Redis(fred::error::Error::new(
        fred::error::ErrorKind::Protocol,
        what.to_string(),
    ))
}

fn entry_field(map: &HashMap<String, Value>, name: &str) -> Result<EntryId, RelayError> {
    map.get(name)
        .and_then(Value::as_string)
        .ok_or_else(|| protocol(format!("no {name}")))?
        .parse()
        .map_err(protocol)
}

fn number_field(map: &HashMap<String, Value>, name: &str) -> Option<i64> {
    map.get(name).and_then(Value::as_i64)
}

impl Relay {
    /// The state of `key`'s stream; `None` when Redis has no such stream.
    async fn stream_state(&self, key: &str) -> Result<Option<StreamState>, RelayError> {
        let info: HashMap<String, Value> = match self.redis.xinfo_stream(key, false, None).await {
            Ok(info) => info,
            Err(error) if error.details().contains("no such key") => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let last = entry_field(&info, "last-generated-id")?;
        let length = number_field(&info, "length").unwrap_or(0);
        // Nil when the stream is empty.
        let front = match info.get("first-entry") {
            Some(Value::Array(entry)) => entry
                .first()
                .and_then(Value::as_string)
                .ok_or_else(|| protocol("first-entry"))?
                .parse()
                .map_err(protocol)?,
            _ => last.next(),
        };
        let added = number_field(&info, "entries-added");
        let groups: Vec<HashMap<String, Value>> = self.redis.xinfo_groups(key).await?;
        let mut settled_below: Option<EntryId> = None;
        let mut needed = 0;
        for group in &groups {
            // `lag` is nil when Redis cannot tell (entries deleted in between): the stream.
            let owed = number_field(group, "lag").unwrap_or(length)
                + number_field(group, "pending").unwrap_or(0);
            needed = needed.max(owed);
            let name = group
                .get("name")
                .and_then(Value::as_string)
                .ok_or_else(|| protocol("group name"))?;
            // Everything up to what the group was given, unless some of that is pending.
            let mut below = entry_field(group, "last-delivered-id")?.next();
            if number_field(group, "pending").unwrap_or(0) > 0 {
                let summary: Value = self.redis.xpending(key, name.as_str(), ()).await?;
                if let Some(oldest) = summary.into_array().get(1).and_then(Value::as_string) {
                    below = below.min(oldest.parse().map_err(protocol)?);
                }
            }
            settled_below = Some(settled_below.map_or(below, |b| b.min(below)));
        }
        Ok(Some(StreamState {
            added,
            last,
            needed,
            front,
            settled_below,
        }))
    }

    /// One settling pass over every topic this schema has published (see the module); the
    /// relay runs one every [`crate::RelaySettings::settle_every`].
    pub async fn settle(&self) -> Result<Settled, RelayError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        // Under the publishers' lock, so no entry is being added meanwhile; a pass another
        // relay is publishing through is skipped rather than waited for.
        if self.settle_skipped.load(Ordering::Relaxed) >= SETTLE_WAITS_AFTER {
            // Skipped too often (other relays publish all the time): this pass waits its turn.
            tx.execute_cached(
                "SELECT pg_advisory_xact_lock(hashtext($1))",
                &[&self.publish_lock()],
            )
            .await?;
        } else if !self.try_publish_lock(&tx).await? {
            self.settle_skipped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("stowage_events_settle_skipped_total", "schema" => self.schema.clone()).increment(1);
            return Ok(Settled::default());
        }
        self.settle_skipped.store(0, Ordering::Relaxed);
        let topics = tx
            .query_cached(
                &format!("SELECT topic, added FROM {}.outbox_streams", self.schema),
                &[],
            )
            .await?;
        let mut done = Settled::default();
        let mut trims = Vec::new();
        for row in topics {
            let (topic, added): (String, i64) = (row.get(0), row.get(1));
            let key = stream_key(&self.settings.namespace, &topic);
            let state = self.stream_state(&key).await?;
            let lost = match &state {
                None => added > 0,
                // Fewer entries than were added, or a row whose entry is past the last id
                // Redis knows: the count alone misses a loss a failed publish's surplus covers.
                Some(state) => {
                    state.added.is_some_and(|counted| counted < added)
                        || self
                            .newest_unsettled(&tx, &topic)
                            .await?
                            .is_some_and(|newest| newest > state.last)
                }
            };
            if lost {
                let requeued = self.requeue(&tx, &topic, None).await?;
                tracing::warn!(schema = %self.schema, topic, added, counted = ?state.as_ref().map(|s| s.added), requeued, "redis has lost entries of a stream, publishing again what some group had not acknowledged");
                done.lost += requeued;
            }
            // From here on the relays count from what Redis counts (without a count, Redis
            // before 7, nothing is said to be lost by it).
            let counted = match &state {
                None => Some(0),
                Some(state) => state.added,
            };
            if let Some(counted) = counted.filter(|c| *c != added) {
                if counted > added {
                    tracing::debug!(schema = %self.schema, topic, added, counted, "redis counts entries a failed publish added");
                }
                tx.execute_cached(
                    &format!(
                        "UPDATE {}.outbox_streams SET added = $2 WHERE topic = $1",
                        self.schema
                    ),
                    &[&topic, &counted],
                )
                .await?;
            }
            let Some(state) = state else { continue };
            // Without groups nobody waits on an entry: all are settled (a group created later
            // reads what the stream still holds), and only the length cap bounds the stream.
            let below = state.settled_below.unwrap_or(state.last.next());
            // Rows before the stream's front that are not settled lost their entries to the
            // length cap before some group read them (settled rows are marked before their
            // entries are trimmed): they are never settled, but published again.
            done.settled += tx
                .execute_cached(
                    &format!(
                        "UPDATE {}.outbox SET settled_at = now()
                         WHERE topic = $1 AND settled_at IS NULL AND stream_ms IS NOT NULL
                           AND (stream_ms, stream_seq) >= ($2, $3)
                           AND (stream_ms, stream_seq) < ($4, $5)",
                        self.schema
                    ),
                    &[
                        &topic,
                        &state.front.ms,
                        &state.front.seq,
                        &below.ms,
                        &below.seq,
                    ],
                )
                .await?;
            if state.settled_below.is_none() {
                continue;
            }
            // While a group is behind by close to the cap, the cap may still be cutting; they
            // go, oldest first, as what the groups still need leaves room under half the cap
            // (publishing them before would only cut others).
            let room = self.cap_room() - state.needed;
            if !lost && room > 0 {
                let cut = self.requeue(&tx, &topic, Some((state.front, room))).await?;
                if cut > 0 {
                    tracing::warn!(schema = %self.schema, topic, cut, "a group was behind the stream's length cap, publishing again what it missed");
                }
                done.cut += cut;
            }
            // The stream keeps the replay window's entries, acknowledged or not: a group
            // created late (a new service, or one back after the others following a Redis
            // restart) reads them from the stream.
            let kept_from = EntryId {
                ms: chrono::Utc::now().timestamp_millis()
                    - i64::try_from(self.settings.replay_window.as_millis()).unwrap_or(i64::MAX),
                seq: 0,
            };
            trims.push((key, below.min(kept_from)));
        }
        tx.commit().await?;
        // Only once the rows are marked: a trimmed entry is never one a row still waits on.
        for (key, below) in trims {
            let cap = ("MINID", "~", below.to_string());
            let _: i64 = self.redis.xtrim(key, cap).await?;
        }
        for (reason, n) in [("lost", done.lost), ("cut", done.cut)] {
            if n > 0 {
                metrics::counter!("stowage_events_replayed_total", "schema" => self.schema.clone(), "reason" => reason)
                    .increment(n);
            }
        }
        Ok(done)
    }

    /// The entry of `topic`'s newest row not yet settled.
    async fn newest_unsettled(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
    ) -> Result<Option<EntryId>, RelayError> {
        Ok(tx
            .query_opt_cached(
                &format!(
                    "SELECT stream_ms, stream_seq FROM {}.outbox
                     WHERE topic = $1 AND settled_at IS NULL AND stream_ms IS NOT NULL
                       AND created_at > now() - interval '{REQUEUE_HORIZON}'
                     ORDER BY stream_ms DESC, stream_seq DESC LIMIT 1",
                    self.schema
                ),
                &[&topic],
            )
            .await?
            .map(|row| EntryId {
                ms: row.get(0),
                seq: row.get(1),
            }))
    }

    /// Length under which a stream has room to take back what its cap cut.
    fn cap_room(&self) -> i64 {
        i64::try_from(self.settings.stream_max_len / 2).unwrap_or(i64::MAX)
    }

    /// Queues `topic`'s unsettled rows to be published again: all of them, or the oldest
    /// `limit` of those whose entries lie before `front`.
    async fn requeue(
        &self,
        tx: &Transaction<'_>,
        topic: &str,
        before: Option<(EntryId, i64)>,
    ) -> Result<u64, RelayError> {
        let last = EntryId {
            ms: i64::MAX,
            seq: i64::MAX,
        };
        let (front, limit) = before.unwrap_or((last, i64::MAX));
        Ok(tx
            .execute_cached(
                &format!(
                    "UPDATE {0}.outbox SET published_at = NULL, stream_ms = NULL, stream_seq = NULL
                     WHERE id IN (
                         SELECT id FROM {0}.outbox
                         WHERE topic = $1 AND settled_at IS NULL AND stream_ms IS NOT NULL
                           AND (stream_ms, stream_seq) < ($2, $3)
                           AND created_at > now() - interval '{REQUEUE_HORIZON}'
                         ORDER BY stream_ms, stream_seq LIMIT $4)",
                    self.schema
                ),
                &[&topic, &front.ms, &front.seq, &limit],
            )
            .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::EntryId;

    #[test]
    fn entry_ids_parse_and_order_as_redis_orders_them() {
        let a: EntryId = "1700000000000-9".parse().unwrap();
        let b: EntryId = "1700000000001-0".parse().unwrap();
        assert!(a < b);
        assert_eq!(a.next().to_string(), "1700000000000-10");
        assert!("17-".parse::<EntryId>().is_err());
        assert!("abc".parse::<EntryId>().is_err());
    }
}
