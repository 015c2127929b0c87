//! Accounts, reservations and the ledger in PostgreSQL.

use std::sync::LazyLock;
use std::time::Duration;

use chrono::{DateTime, Utc};
use stowage_db::{Cached, GenericClient, PgPool};
use stowage_events::{StageParams, topics};
use tokio_postgres::{Row, error::SqlState};
use uuid::Uuid;

use crate::error::{Error, Result};

/// The columns an [`Account`] is read from. Named rather than `*` in cached statements: one
/// whose result type changes (a migration adding a column while this version still runs) fails
/// on every later call on its connection.
macro_rules! account_columns {
    () => {
        "user_id, limit_bytes, used_bytes, reserved_bytes, created_at, updated_at"
    };
}

/// The columns a [`Reservation`] is read from (see [`account_columns`]).
macro_rules! reservation_columns {
    () => {
        "id, user_id, bytes, state, committed_bytes, expires_at"
    };
}

/// Longest reservation we grant.
const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// One user's account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// User id.
    pub user_id: String,
    /// Limit in bytes.
    pub limit_bytes: u64,
    /// Committed bytes.
    pub used_bytes: u64,
    /// Bytes held by live reservations.
    pub reserved_bytes: u64,
    /// Created on first use.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Account {
    /// Bytes that can still be reserved.
    pub fn available_bytes(&self) -> u64 {
        self.limit_bytes
            .saturating_sub(self.used_bytes)
            .saturating_sub(self.reserved_bytes)
    }

    fn from_row(row: &Row) -> Self {
        Self {
            user_id: row.get("user_id"),
            limit_bytes: to_u64(row.get("limit_bytes")),
            used_bytes: to_u64(row.get("used_bytes")),
            reserved_bytes: to_u64(row.get("reserved_bytes")),
            created_at: row.get("created_at"),
            updated_at: row.get("updated_at"),
        }
    }
}

/// State of a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationState {
    /// Bytes held.
    Held,
    /// Turned into usage.
    Committed,
    /// Given back.
    Released,
    /// Expired before commit.
    Expired,
}

impl ReservationState {
    fn parse(s: &str) -> Self {
        match s {
            "committed" => Self::Committed,
            "released" => Self::Released,
            "expired" => Self::Expired,
            _ => Self::Held,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Held => "held",
            Self::Committed => "committed",
            Self::Released => "released",
            Self::Expired => "expired",
        }
    }
}

/// A hold on part of a user's quota.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Id.
    pub id: Uuid,
    /// User id.
    pub user_id: String,
    /// Bytes held.
    pub bytes: u64,
    /// State.
    pub state: ReservationState,
    /// Bytes committed, once committed.
    pub committed_bytes: Option<u64>,
    /// Expiry of an uncommitted hold.
    pub expires_at: DateTime<Utc>,
}

impl Reservation {
    fn from_row(row: &Row) -> Self {
        Self {
            id: row.get("id"),
            user_id: row.get("user_id"),
            bytes: to_u64(row.get("bytes")),
            state: ReservationState::parse(row.get("state")),
            committed_bytes: row.get::<_, Option<i64>>("committed_bytes").map(to_u64),
            expires_at: row.get("expires_at"),
        }
    }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// An idempotency key: at most 200 characters.
fn check_key(key: &str) -> Result<()> {
    stowage_runtime::validate::idempotency_key(key)
        .map_err(|why| Error::invalid("idempotency_key", why))
}

/// A ledger entry's key: required, at most 200 characters (it is kept with the entry).
fn check_ledger_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("idempotency_key", "is required"));
    }
    check_key(key)
}

fn to_i64(field: &'static str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::invalid(field, "is too large"))
}

fn check_user(field: &'static str, user_id: &str) -> Result<()> {
    stowage_blob::keys::validate_user_id(user_id).map_err(|why| Error::invalid(field, why))
}

/// Quota's state, in its own schema.
#[derive(Clone, Debug)]
pub struct Quota {
    pool: PgPool,
    default_limit: u64,
    default_ttl: Duration,
}

impl Quota {
    /// Quota over `pool`; new accounts get `default_limit` bytes.
    pub fn new(pool: PgPool, default_limit: u64, default_ttl: Duration) -> Self {
        Self {
            pool,
            default_limit,
            default_ttl,
        }
    }

    /// Creates `user_id`'s account with the default limit if it has none. The `NOT EXISTS`
    /// read sees a committed account without waiting: a bare `ON CONFLICT DO NOTHING` would
    /// wait for every transaction holding the row, serialising a user's parallel uploads.
    async fn ensure_account(&self, conn: &impl GenericClient, user_id: &str) -> Result<()> {
        conn.execute_cached(
            "INSERT INTO quota.accounts (user_id, limit_bytes)
             SELECT $1, $2
             WHERE NOT EXISTS (SELECT 1 FROM quota.accounts WHERE user_id = $1)
             ON CONFLICT (user_id) DO NOTHING",
            &[&user_id, &to_i64("limit_bytes", self.default_limit)?],
        )
        .await?;
        Ok(())
    }

    /// The account of `user_id` as it is (one never used reads as new: the default limit,
    /// nothing used; a read creates nothing), and the bytes of its holds that lapsed in the
    /// last day and were neither committed nor released: an upload whose completion began in
    /// time may still commit them. One statement.
    pub async fn usage(&self, user_id: &str) -> Result<(Account, u64)> {
        check_user("user_id", user_id)?;
        let conn = self.pool.get().await?;
        let row = conn
            .query_opt_cached(
                concat!(
                    "SELECT ",
                    account_columns!(),
                    ", (SELECT COALESCE(sum(bytes), 0)::bigint FROM quota.reservations
                        WHERE user_id = $1 AND state = 'expired'
                          AND expires_at > now() - interval '1 day') AS lapsed
                     FROM quota.accounts WHERE user_id = $1"
                ),
                &[&user_id],
            )
            .await?;
        Ok(match row {
            Some(row) => (Account::from_row(&row), to_u64(row.get("lapsed"))),
            None => {
                let now = Utc::now();
                let unused = Account {
                    user_id: user_id.to_owned(),
                    limit_bytes: self.default_limit,
                    used_bytes: 0,
                    reserved_bytes: 0,
                    created_at: now,
                    updated_at: now,
                };
                (unused, 0)
            }
        })
    }

    /// Holds `bytes` of `user_id`'s quota for `ttl` (default when `None`).
    ///
    /// The hold is one conditional `UPDATE` on the account row: PostgreSQL re-checks the
    /// condition after waiting for the row lock, so concurrent reservations are serialised and
    /// the sum of holds plus usage never passes the limit. A repeated `idempotency_key` returns
    /// the first reservation; the same key for another amount is refused (`idempotency_key`).
    pub async fn reserve(
        &self,
        user_id: &str,
        bytes: u64,
        ttl: Option<Duration>,
        idempotency_key: Option<&str>,
    ) -> Result<(Reservation, Account)> {
        check_user("user_id", user_id)?;
        let amount = to_i64("bytes", bytes)?;
        let ttl_secs = self.ttl_secs(ttl)?;
        if let Some(key) = idempotency_key {
            check_key(key)?;
        }
        let conn = self.pool.get().await?;
        let hold = Hold {
            user_id,
            amount,
            ttl_secs,
            idempotency_key,
        };
        if let Some(granted) = hold.try_on(&conn).await? {
            return Ok(granted);
        }
        // A used key returns its reservation as it is, even when no more would fit.
        if let Some(existing) = find_by_key(&conn, user_id, idempotency_key, amount).await? {
            let account = account_row(&conn, user_id).await?;
            return Ok((existing, Account::from_row(&account)));
        }
        // It did not fit, or the account is new: create the account if missing, give back
        // holds past their expiry, and try once more before deciding.
        self.ensure_account(&conn, user_id).await?;
        conn.execute_cached(
            "WITH expired AS (
                 UPDATE quota.reservations SET state = 'expired', updated_at = now()
                 WHERE user_id = $1 AND state = 'held' AND expires_at < now()
                 RETURNING bytes)
             UPDATE quota.accounts
             SET reserved_bytes = reserved_bytes - (SELECT COALESCE(sum(bytes), 0) FROM expired)
             WHERE user_id = $1 AND EXISTS (SELECT 1 FROM expired)",
            &[&user_id],
        )
        .await?;
        if let Some(granted) = hold.try_on(&conn).await? {
            return Ok(granted);
        }
        // A concurrent call with the same key may have won meanwhile.
        if let Some(existing) = find_by_key(&conn, user_id, idempotency_key, amount).await? {
            let account = account_row(&conn, user_id).await?;
            return Ok((existing, Account::from_row(&account)));
        }
        let row = account_row(&conn, user_id).await?;
        Err(Error::Exhausted {
            requested: bytes,
            available: Account::from_row(&row).available_bytes(),
        })
    }

    /// A hold's lifetime in seconds: `ttl`, or the default.
    fn ttl_secs(&self, ttl: Option<Duration>) -> Result<f64> {
        let ttl = ttl.unwrap_or(self.default_ttl);
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(Error::invalid(
                "ttl_seconds",
                "must be between 1 and 604800",
            ));
        }
        Ok(f64::from(u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX)))
    }

    /// Sets the bytes a held reservation holds, in place, and starts its lifetime again.
    /// Growing it checks the limit against the growth alone: an upload whose length becomes
    /// known as it goes never needs its bytes held twice. The size is absolute, so a retry
    /// changes nothing more.
    ///
    /// With a `fallback` below `bytes`, a growth that does not fit holds `fallback` instead:
    /// one call where an upload near its limit would otherwise ask twice.
    ///
    /// Like commit, it is one statement (`RESIZE_SQL`), so the account row is locked only
    /// while PostgreSQL runs it.
    pub async fn resize(
        &self,
        reservation_id: Uuid,
        bytes: u64,
        fallback: Option<u64>,
        ttl: Option<Duration>,
    ) -> Result<(Reservation, Account)> {
        let wanted = to_i64("bytes", bytes)?;
        let fallback = match fallback {
            Some(smaller) if smaller > bytes => {
                return Err(Error::invalid("fallback_bytes", "must be at most bytes"));
            }
            Some(smaller) => smaller,
            None => bytes,
        };
        let otherwise = to_i64("fallback_bytes", fallback)?;
        let ttl_secs = self.ttl_secs(ttl)?;
        let conn = self.pool.get().await?;
        let resized = conn
            .query_opt_cached(
                RESIZE_SQL,
                &[&reservation_id, &wanted, &otherwise, &ttl_secs],
            )
            .await?;
        if let Some(row) = resized {
            return Ok((Reservation::from_row(&row), Account::from_row(&row)));
        }
        // Not resized: say why, from what is there now.
        let reservation = reservation_now(&conn, reservation_id).await?;
        if reservation.state != ReservationState::Held {
            return Err(Error::WrongState(reservation.state.as_str().into()));
        }
        let account = Account::from_row(&account_row(&conn, &reservation.user_id).await?);
        Err(Error::Exhausted {
            requested: fallback,
            available: reservation.bytes.saturating_add(account.available_bytes()),
        })
    }

    /// Turns a reservation into `bytes` of usage. Committing again returns the first commit.
    ///
    /// An expired hold is still committed up to its bytes, even past the limit: the upload
    /// finished within its hold (its completion began in time), its file is stored and
    /// registered, and refusing the charge would leave it stored for free, or lose it. The
    /// user is then over the limit, as after a lowered limit, until files go. More than it
    /// held is checked against the limit, as for a hold still held. The whole commit is one
    /// statement (`COMMIT_SQL`), so the account row is locked only while PostgreSQL
    /// runs it, never across a round trip: a user's parallel uploads queue for microseconds.
    pub async fn commit(&self, reservation_id: Uuid, bytes: u64) -> Result<(Reservation, Account)> {
        let amount = to_i64("bytes", bytes)?;
        let conn = self.pool.get().await?;
        let notice = StageParams::new(crate::SCHEMA, topics::QUOTA_THRESHOLD_CROSSED);
        let committed = conn
            .query_opt_cached(
                &COMMIT_SQL,
                &[
                    &reservation_id,
                    &amount,
                    &notice.topic,
                    &notice.traceparent,
                    &notice.channel,
                ],
            )
            .await?;
        let Some(row) = committed else {
            // Not committable: say why, from what is there now.
            let reservation = reservation_now(&conn, reservation_id).await?;
            return match reservation.state {
                ReservationState::Committed => {
                    let account = account_row(&conn, &reservation.user_id).await?;
                    Ok((reservation, Account::from_row(&account)))
                }
                ReservationState::Released => Err(Error::WrongState("released".into())),
                ReservationState::Held => {
                    let account =
                        Account::from_row(&account_row(&conn, &reservation.user_id).await?);
                    Err(Error::Exhausted {
                        requested: bytes,
                        available: account.available_bytes() + reservation.bytes,
                    })
                }
                // A lapsed hold is committed whatever the limit up to its bytes; more than
                // that must fit, as for a held one.
                ReservationState::Expired => {
                    let account =
                        Account::from_row(&account_row(&conn, &reservation.user_id).await?);
                    Err(Error::Exhausted {
                        requested: bytes,
                        available: account.available_bytes().max(reservation.bytes),
                    })
                }
            };
        };
        Ok((Reservation::from_row(&row), Account::from_row(&row)))
    }

    /// Gives a held reservation's bytes back; releasing twice is a no-op. A hold that lapsed
    /// first (its bytes given back by the expiry) is marked released all the same: its
    /// holder gave it up, so it no longer counts as lapsed (one a late commit may still take).
    pub async fn release(&self, reservation_id: Uuid) -> Result<Reservation> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let reservation = locked_reservation(&tx, reservation_id).await?;
        let held = match reservation.state {
            ReservationState::Released => return Ok(reservation),
            ReservationState::Committed => return Err(Error::WrongState("committed".into())),
            ReservationState::Expired => 0,
            ReservationState::Held => reservation.bytes,
        };
        let row = tx
            .query_one_cached(
                concat!(
                    "UPDATE quota.reservations SET state = $2, updated_at = now()
                     WHERE id = $1 RETURNING ",
                    reservation_columns!()
                ),
                &[&reservation_id, &ReservationState::Released.as_str()],
            )
            .await?;
        if held > 0 {
            tx.execute_cached(
                "UPDATE quota.accounts SET reserved_bytes = reserved_bytes - $2, updated_at = now()
                 WHERE user_id = $1",
                &[&reservation.user_id, &to_i64("bytes", held)?],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Reservation::from_row(&row))
    }

    /// Lowers `user_id`'s usage by `bytes` (never below zero) once per `idempotency_key`.
    pub async fn debit(
        &self,
        user_id: &str,
        bytes: u64,
        idempotency_key: &str,
        reason: &str,
    ) -> Result<Account> {
        self.adjust(user_id, bytes, false, idempotency_key, reason)
            .await
    }

    /// Raises `user_id`'s usage by `bytes` once per `idempotency_key`, without a limit
    /// check: derived data (variants) of an upload that was admitted.
    pub async fn charge(
        &self,
        user_id: &str,
        bytes: u64,
        idempotency_key: &str,
        reason: &str,
    ) -> Result<Account> {
        self.adjust(user_id, bytes, true, idempotency_key, reason)
            .await
    }

    async fn adjust(
        &self,
        user_id: &str,
        bytes: u64,
        raise: bool,
        idempotency_key: &str,
        reason: &str,
    ) -> Result<Account> {
        check_user("user_id", user_id)?;
        check_ledger_key(idempotency_key)?;
        if reason.chars().count() > 255 || reason.chars().any(char::is_control) {
            return Err(Error::invalid(
                "reason",
                "must be at most 255 characters without control characters",
            ));
        }
        let amount = to_i64("bytes", bytes)?;
        let mut conn = self.pool.get().await?;
        self.ensure_account(&conn, user_id).await?;
        let tx = conn.transaction().await?;
        // A charge takes the account row's lock last (see `reserve`); a debit reads the usage
        // under the lock first, because usage cannot go below zero: if it would, the ledger
        // records what really moved and reconciliation reports the drift.
        let (delta, kind) = if raise {
            (amount, "charge")
        } else {
            let account = tx
                .query_one_cached(
                    concat!(
                        "SELECT ",
                        account_columns!(),
                        " FROM quota.accounts WHERE user_id = $1 FOR UPDATE"
                    ),
                    &[&user_id],
                )
                .await?;
            (
                -amount.min(Account::from_row(&account).used_bytes as i64),
                "debit",
            )
        };
        let inserted = tx
            .execute_cached(
                "INSERT INTO quota.ledger (user_id, delta_bytes, asked_bytes, kind, idempotency_key, reason)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (user_id, idempotency_key) DO NOTHING",
                &[&user_id, &delta, &amount, &kind, &idempotency_key, &reason],
            )
            .await?;
        if inserted == 0 {
            // Done before under this key: the same movement again is answered with the account
            // as it is; another amount or kind under the key is a caller's mistake, refused.
            let first = tx
                .query_one_cached(
                    "SELECT kind, asked_bytes FROM quota.ledger
                     WHERE user_id = $1 AND idempotency_key = $2",
                    &[&user_id, &idempotency_key],
                )
                .await?;
            let (first_kind, asked): (&str, Option<i64>) = (first.get(0), first.get(1));
            if first_kind != kind || asked.is_some_and(|asked| asked != amount) {
                let what = asked.map_or_else(String::new, |a| format!(" of {a} bytes"));
                return Err(Error::invalid(
                    "idempotency_key",
                    format!("was used for a {first_kind}{what}, not a {kind} of {amount} bytes"),
                ));
            }
            let account = account_row(&tx, user_id).await?;
            tx.commit().await?;
            return Ok(Account::from_row(&account));
        }
        let notice = StageParams::new(crate::SCHEMA, topics::QUOTA_THRESHOLD_CROSSED);
        let row = tx
            .query_one_cached(
                &ADJUST_SQL,
                &[
                    &user_id,
                    &delta,
                    &notice.topic,
                    &notice.traceparent,
                    &notice.channel,
                ],
            )
            .await?;
        tx.commit().await?;
        Ok(Account::from_row(&row))
    }

    /// Expires every held reservation past its time, giving its bytes back; with `dry_run`
    /// only lists them. Returns the ids (at most 1000) and the count. Expired in batches of
    /// `EXPIRE_BATCH` (1,000), each its own transaction, so that after a long outage of the sweeper
    /// no one statement holds every affected account (and their uploads) at once.
    pub async fn expire_reservations(&self, dry_run: bool) -> Result<(Vec<Uuid>, u64)> {
        let conn = self.pool.get().await?;
        if dry_run {
            // The count over all of them, taken before the limit.
            let rows = conn
                .query_cached(
                    "SELECT id, count(*) OVER () AS total FROM quota.reservations
                     WHERE state = 'held' AND expires_at < now()
                     ORDER BY expires_at LIMIT 1000",
                    &[],
                )
                .await?;
            let count = rows.first().map_or(0, |r| r.get::<_, i64>("total"));
            return Ok((rows.iter().map(|r| r.get(0)).collect(), count as u64));
        }
        let (mut ids, mut count) = (Vec::new(), 0u64);
        loop {
            // Reservations first, then their accounts: the order commits and releases take.
            // The accounts are locked in user order before any is updated: two sweeps at once
            // take disjoint reservations (SKIP LOCKED) but may share accounts, and taking those
            // in the order a join happens to produce could deadlock the two.
            let rows = conn
                .query_cached(
                    "WITH expired AS (
                         UPDATE quota.reservations SET state = 'expired', updated_at = now()
                         WHERE id IN (
                             SELECT id FROM quota.reservations
                             WHERE state = 'held' AND expires_at < now()
                             ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                         RETURNING id, user_id, bytes
                     ), per_user AS (
                         SELECT user_id, sum(bytes)::bigint AS bytes FROM expired GROUP BY user_id
                     ), locked AS MATERIALIZED (
                         SELECT user_id FROM quota.accounts
                         WHERE user_id IN (SELECT user_id FROM per_user)
                         ORDER BY user_id FOR UPDATE
                     ), released AS (
                         UPDATE quota.accounts a
                         SET reserved_bytes = a.reserved_bytes - p.bytes, updated_at = now()
                         FROM per_user p JOIN locked l USING (user_id)
                         WHERE a.user_id = p.user_id
                     )
                     SELECT id FROM expired",
                    &[&EXPIRE_BATCH],
                )
                .await?;
            count += rows.len() as u64;
            ids.extend(
                rows.iter()
                    .take(1000usize.saturating_sub(ids.len()))
                    .map(|r| r.get::<_, Uuid>(0)),
            );
            if (rows.len() as i64) < EXPIRE_BATCH {
                return Ok((ids, count));
            }
        }
    }

    /// Sets `user_id`'s usage to `actual_bytes`, recording the drift; returns the drift. With
    /// `expected_used`, only if the usage is still what the recount was compared with.
    pub async fn reconcile(
        &self,
        user_id: &str,
        actual_bytes: u64,
        expected_used: Option<u64>,
        idempotency_key: &str,
    ) -> Result<(i64, Account)> {
        check_user("user_id", user_id)?;
        check_ledger_key(idempotency_key)?;
        let actual = to_i64("actual_bytes", actual_bytes)?;
        let mut conn = self.pool.get().await?;
        self.ensure_account(&conn, user_id).await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_one_cached(
                concat!(
                    "SELECT ",
                    account_columns!(),
                    " FROM quota.accounts WHERE user_id = $1 FOR UPDATE"
                ),
                &[&user_id],
            )
            .await?;
        let recorded: i64 = row.get("used_bytes");
        // A retry of a repair already made answers as it did not drift (before the
        // expected usage is compared: the repair itself moved it).
        let done = tx
            .query_opt_cached(
                "SELECT kind FROM quota.ledger WHERE user_id = $1 AND idempotency_key = $2",
                &[&user_id, &idempotency_key],
            )
            .await?;
        if let Some(done) = done {
            let kind: &str = done.get(0);
            if kind != "reconcile" {
                return Err(Error::invalid(
                    "idempotency_key",
                    format!("was used by a {kind}, not a recount"),
                ));
            }
            tx.commit().await?;
            return Ok((0, Account::from_row(&row)));
        }
        if let Some(expected) = expected_used
            && u64::try_from(recorded).ok() != Some(expected)
        {
            return Err(Error::Moved(format!(
                "expected_used_bytes: usage is {recorded} bytes now, not {expected}; recount"
            )));
        }
        let drift = actual - recorded;
        if drift == 0 {
            tx.commit().await?;
            return Ok((0, Account::from_row(&row)));
        }
        let inserted = tx
            .execute_cached(
                "INSERT INTO quota.ledger (user_id, delta_bytes, kind, idempotency_key, reason)
                 VALUES ($1, $2, 'reconcile', $3, 'usage recount')
                 ON CONFLICT (user_id, idempotency_key) DO NOTHING",
                &[&user_id, &drift, &idempotency_key],
            )
            .await?;
        if inserted == 0 {
            tx.commit().await?;
            return Ok((0, Account::from_row(&row)));
        }
        let row = tx
            .query_one_cached(
                concat!(
                    "UPDATE quota.accounts SET used_bytes = $2, updated_at = now()
                     WHERE user_id = $1 RETURNING ",
                    account_columns!()
                ),
                &[&user_id, &actual],
            )
            .await?;
        tx.commit().await?;
        tracing::warn!(user_id, drift, "usage drift repaired");
        Ok((drift, Account::from_row(&row)))
    }

    /// Sets a user's limit.
    pub async fn set_limit(&self, user_id: &str, limit_bytes: u64, admin: &str) -> Result<Account> {
        check_user("user_id", user_id)?;
        let limit = to_i64("limit_bytes", limit_bytes)?;
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        // The account exists (with the default limit, as GetUsage showed it) and is locked:
        // two changes at once each name the limit the other left.
        self.ensure_account(&tx, user_id).await?;
        let locked = tx
            .query_one_cached(
                "SELECT limit_bytes, clock_timestamp() FROM quota.accounts
                 WHERE user_id = $1 FOR UPDATE",
                &[&user_id],
            )
            .await?;
        let (previous, at): (i64, DateTime<Utc>) = (locked.get(0), locked.get(1));
        let row = tx
            .query_one_cached(
                concat!(
                    "UPDATE quota.accounts SET limit_bytes = $2, updated_at = now()
                     WHERE user_id = $1 RETURNING ",
                    account_columns!()
                ),
                &[&user_id, &limit],
            )
            .await?;
        // Who changed it, for the user's history (an admin's doing, not the user's activity);
        // `at` is when the lock was had, so changes read in that order.
        let payload = serde_json::json!({
            "user_id": user_id,
            "limit_bytes": limit_bytes,
            "previous_limit_bytes": previous,
            "admin": admin,
            "at": at,
            "by": "system",
        });
        stowage_events::stage(
            &tx,
            crate::SCHEMA,
            stowage_events::topics::QUOTA_LIMIT_SET,
            user_id,
            &payload,
        )
        .await?;
        tx.commit().await?;
        Ok(Account::from_row(&row))
    }

    /// Accounts with `used / limit >= min_percent`, by user id, after `after`.
    pub async fn list_accounts(
        &self,
        min_percent: f64,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Account>> {
        if !(0.0..=1000.0).contains(&min_percent) {
            return Err(Error::invalid(
                "min_used_percent",
                "must be between 0 and 1000",
            ));
        }
        let conn = self.pool.get().await?;
        let rows = conn
            .query_cached(
                concat!(
                    "SELECT ",
                    account_columns!(),
                    " FROM quota.accounts
                 WHERE user_id > $1
                   AND CASE WHEN limit_bytes = 0 THEN 100 >= $2::float8
                            ELSE used_bytes::float8 * 100 >= $2::float8 * limit_bytes::float8 END
                 ORDER BY user_id LIMIT $3"
                ),
                &[&after.unwrap_or(""), &min_percent, &limit],
            )
            .await?;
        Ok(rows.iter().map(Account::from_row).collect())
    }

    /// Platform totals.
    pub async fn stats(&self) -> Result<Stats> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_one_cached(
                // Sums and products in numeric, the sums saturating at bigint's largest: limits
                // near i64::MAX (a way of saying "unlimited") must not make the totals fail.
                // Holds past their expiry still count in their accounts' reserved bytes until
                // they are given back: the reserved total and the count are of live holds.
                "WITH live AS (
                     SELECT count(*) AS held, COALESCE(sum(bytes), 0) AS bytes
                     FROM quota.reservations WHERE state = 'held' AND expires_at >= now())
                 SELECT count(*) AS accounts,
                        LEAST(COALESCE(sum(used_bytes), 0), 9223372036854775807)::bigint AS used,
                        LEAST((SELECT bytes FROM live), 9223372036854775807)::bigint AS reserved,
                        LEAST(COALESCE(sum(limit_bytes), 0), 9223372036854775807)::bigint AS limits,
                        count(*) FILTER (WHERE used_bytes::numeric * 5 >= limit_bytes::numeric * 4) AS above80,
                        count(*) FILTER (WHERE used_bytes >= limit_bytes) AS full,
                        (SELECT held FROM live) AS held
                 FROM quota.accounts",
                &[],
            )
            .await?;
        Ok(Stats {
            accounts: to_u64(row.get("accounts")),
            used: to_u64(row.get("used")),
            reserved: to_u64(row.get("reserved")),
            limits: to_u64(row.get("limits")),
            above_80: to_u64(row.get("above80")),
            full: to_u64(row.get("full")),
            held: to_u64(row.get("held")),
        })
    }

    /// Sum of the ledger for `user_id`: what usage must be if nothing drifted.
    pub async fn ledger_total(&self, user_id: &str) -> Result<i64> {
        let conn = self.pool.get().await?;
        let row = conn
            .query_one_cached(
                "SELECT COALESCE(sum(delta_bytes), 0)::bigint FROM quota.ledger WHERE user_id = $1",
                &[&user_id],
            )
            .await?;
        Ok(row.get(0))
    }
}

/// Platform totals.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Accounts.
    pub accounts: u64,
    /// Sum of usage.
    pub used: u64,
    /// Sum of holds.
    pub reserved: u64,
    /// Sum of limits.
    pub limits: u64,
    /// Accounts at 80 % or more.
    pub above_80: u64,
    /// Accounts at or over their limit.
    pub full: u64,
    /// Holds outstanding.
    pub held: u64,
}

/// One reservation attempt: a single statement, so the account row's lock is held only while
/// PostgreSQL runs and commits it, never across a round trip to us.
struct Hold<'a> {
    user_id: &'a str,
    amount: i64,
    ttl_secs: f64,
    idempotency_key: Option<&'a str>,
}

impl Hold<'_> {
    /// The reservation and the account after it, or `None` when the bytes do not fit, the
    /// account does not exist, or the idempotency key was used before.
    async fn try_on(&self, conn: &impl GenericClient) -> Result<Option<(Reservation, Account)>> {
        // The row lock is taken by the conditional UPDATE, which PostgreSQL re-checks after
        // waiting for it: concurrent holds are serialised and never pass the limit together.
        // A used key makes the INSERT fail, which undoes the UPDATE with it.
        let row = conn
            .query_opt_cached(
                "WITH account AS (
                     UPDATE quota.accounts
                     SET reserved_bytes = reserved_bytes + $3, updated_at = now()
                     WHERE user_id = $2 AND used_bytes::numeric + reserved_bytes + $3::bigint <= limit_bytes
                     RETURNING *),
                 held AS (
                     INSERT INTO quota.reservations
                         (id, user_id, bytes, asked_bytes, state, idempotency_key, expires_at)
                     SELECT $1, $2, $3, $3, 'held', $4, now() + make_interval(secs => $5) FROM account
                     RETURNING *)
                 SELECT h.id, h.user_id, h.bytes, h.state, h.committed_bytes, h.expires_at,
                        a.limit_bytes, a.used_bytes, a.reserved_bytes, a.created_at, a.updated_at
                 FROM held h, account a",
                &[
                    &Uuid::now_v7(),
                    &self.user_id,
                    &self.amount,
                    &self.idempotency_key,
                    &self.ttl_secs,
                ],
            )
            .await;
        match row {
            Ok(row) => Ok(row.map(|r| (Reservation::from_row(&r), Account::from_row(&r)))),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// The reservation made under `key`, if any. The key used before for another amount is
/// refused: answering with the first reservation would hold what the caller did not ask for.
async fn find_by_key(
    conn: &impl GenericClient,
    user_id: &str,
    key: Option<&str>,
    amount: i64,
) -> Result<Option<Reservation>> {
    let Some(key) = key else { return Ok(None) };
    let row = conn
        .query_opt_cached(
            concat!(
                "SELECT ",
                reservation_columns!(),
                ", asked_bytes FROM quota.reservations WHERE user_id = $1 AND idempotency_key = $2"
            ),
            &[&user_id, &key],
        )
        .await?;
    let Some(row) = row else { return Ok(None) };
    match row.get::<_, Option<i64>>("asked_bytes") {
        Some(asked) if asked != amount => Err(Error::invalid(
            "idempotency_key",
            format!("was used for a reservation of {asked} bytes, not {amount}"),
        )),
        _ => Ok(Some(Reservation::from_row(&row))),
    }
}

/// Reservation `id` as it is now (unlocked: to say why a statement did not apply).
async fn reservation_now(conn: &impl GenericClient, id: Uuid) -> Result<Reservation> {
    let row = conn
        .query_opt_cached(
            concat!(
                "SELECT ",
                reservation_columns!(),
                " FROM quota.reservations WHERE id = $1"
            ),
            &[&id],
        )
        .await?
        .ok_or(Error::ReservationNotFound)?;
    Ok(Reservation::from_row(&row))
}

/// Reservation `id`, locked for the transaction `tx`.
async fn locked_reservation(tx: &impl GenericClient, id: Uuid) -> Result<Reservation> {
    let row = tx
        .query_opt_cached(
            concat!(
                "SELECT ",
                reservation_columns!(),
                " FROM quota.reservations WHERE id = $1 FOR UPDATE"
            ),
            &[&id],
        )
        .await?
        .ok_or(Error::ReservationNotFound)?;
    Ok(Reservation::from_row(&row))
}

async fn account_row(conn: &impl GenericClient, user_id: &str) -> Result<Row> {
    Ok(conn
        .query_one_cached(
            concat!(
                "SELECT ",
                account_columns!(),
                " FROM quota.accounts WHERE user_id = $1"
            ),
            &[&user_id],
        )
        .await?)
}

/// Usage levels, in percent of the limit, whose crossing is announced.
const NOTICE_THRESHOLDS: &str = "ARRAY[80, 90, 100]";

/// CTEs that stage `quota.threshold_crossed` when the usage in the `account` CTE, raised by
/// `added`, crossed a notice threshold (the highest one crossed); the topic, traceparent and
/// channel are parameters `$p` to `$p+2`. The statement must read `notified`.
fn notice_ctes(added: &str, p: usize) -> String {
    format!(
        "crossed AS (
             SELECT a.user_id AS key,
                    jsonb_build_object('user_id', a.user_id, 'threshold_percent', max(t.percent),
                                       'used_bytes', a.used_bytes, 'limit_bytes', a.limit_bytes) AS payload
             FROM account a, unnest({NOTICE_THRESHOLDS}) AS t(percent)
             WHERE GREATEST(a.used_bytes - {added}, 0)::numeric * 100 < t.percent::numeric * a.limit_bytes
               AND t.percent::numeric * a.limit_bytes <= a.used_bytes::numeric * 100
             GROUP BY a.user_id, a.used_bytes, a.limit_bytes),
         {}",
        stowage_events::stage_ctes(crate::SCHEMA, "crossed", p)
    )
}

/// A commit in one statement: lock the reservation (before the account row, as `release`
/// does), move its bytes from held to used if they fit, mark it committed, write the ledger
/// and stage a threshold notice. `$1` reservation, `$2` bytes, `$3`..`$5` the notice. No row:
/// not committable (missing, released, committed before, or over the limit).
static COMMIT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS (
             SELECT id, user_id, CASE WHEN state = 'held' THEN bytes ELSE 0 END AS held,
                    state = 'expired' AS lapsed, bytes AS hold
             FROM quota.reservations
             WHERE id = $1 AND state IN ('held', 'expired') FOR UPDATE),
         account AS (
             UPDATE quota.accounts a
             SET reserved_bytes = a.reserved_bytes - r.held,
                 used_bytes = a.used_bytes + $2::bigint, updated_at = now()
             FROM r
             WHERE a.user_id = r.user_id
               AND ((r.lapsed AND $2::bigint <= r.hold) OR $2::bigint <= r.held
                    OR a.used_bytes::numeric + a.reserved_bytes - r.held + $2::bigint <= a.limit_bytes)
             RETURNING a.*),
         done AS (
             UPDATE quota.reservations c
             SET state = 'committed', committed_bytes = $2, updated_at = now()
             FROM account
             WHERE c.id = $1
             RETURNING c.*),
         ledger AS (
             INSERT INTO quota.ledger (user_id, delta_bytes, kind, reservation_id, idempotency_key)
             SELECT user_id, $2, 'commit', id, 'commit:' || id FROM done),
         {}
         SELECT d.id, d.user_id, d.bytes, d.state, d.committed_bytes, d.expires_at,
                a.limit_bytes, a.used_bytes, a.reserved_bytes, a.created_at, a.updated_at,
                (SELECT count(*) FROM notified) AS notices
         FROM done d, account a",
        notice_ctes("$2::bigint", 3)
    )
});

/// A resize in one statement. The reservation and its account row are locked together, the
/// reservation first (the order commit and release take them in), and the new hold is worked
/// out from the locked account: `$2` bytes, or where they do not fit `$3`. The account's held
/// bytes move by the difference only if that fits (or shrinks), and the reservation lives `$4`
/// seconds from now. No row: not held, or neither fits.
const RESIZE_SQL: &str = "WITH r AS (
         SELECT r.id, r.bytes AS was, a.user_id,
                CASE WHEN $2::bigint <= r.bytes + GREATEST(a.limit_bytes - a.used_bytes - a.reserved_bytes, 0)
                     THEN $2::bigint ELSE $3::bigint END AS held
         FROM quota.reservations r JOIN quota.accounts a ON a.user_id = r.user_id
         WHERE r.id = $1 AND r.state = 'held'
         FOR UPDATE OF r, a),
     account AS (
         UPDATE quota.accounts a
         SET reserved_bytes = a.reserved_bytes - r.was + r.held, updated_at = now()
         FROM r
         WHERE a.user_id = r.user_id
           AND (r.held <= r.was OR a.used_bytes::numeric + a.reserved_bytes - r.was + r.held <= a.limit_bytes)
         RETURNING a.*),
     done AS (
         UPDATE quota.reservations c
         SET bytes = r.held, expires_at = now() + make_interval(secs => $4), updated_at = now()
         FROM r, account
         WHERE c.id = r.id
         RETURNING c.*)
     SELECT d.id, d.user_id, d.bytes, d.state, d.committed_bytes, d.expires_at,
            a.limit_bytes, a.used_bytes, a.reserved_bytes, a.created_at, a.updated_at
     FROM done d, account a";

/// A charge or debit of `$2` bytes (signed) on `$1`'s usage, with its threshold notice
/// (`$3`..`$5`); a debit never crosses one.
static ADJUST_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH account AS (
             UPDATE quota.accounts SET used_bytes = used_bytes + $2, updated_at = now()
             WHERE user_id = $1 RETURNING *),
         {}
         SELECT {}, (SELECT count(*) FROM notified) AS notices FROM account",
        notice_ctes("$2::bigint", 3),
        account_columns!()
    )
});

/// Reservations expired in one transaction.
const EXPIRE_BATCH: i64 = 1000;
