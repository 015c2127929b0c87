//! A connection that holds a session-level advisory lock.

use stowage_db::{Cached, Connection};

use crate::error::{Error, Result};

/// A connection that may hold a session-level advisory lock: closed when dropped (PostgreSQL
/// then lets go), never returned to the pool with the lock, where any call that got it next
/// would pass the check (a lock is taken again freely by its holder) and the lock would stay
/// held for as long as the connection lives. A caller cancelled while it holds the lock (a
/// client gone, a deadline passed) drops it, and so lets go. [`release`](Self::release) pools
/// it.
pub(super) struct Unpooled {
    conn: Option<Connection>,
    /// The statement that lets go of the lock (its one parameter: `key`).
    unlock: &'static str,
    key: String,
}

impl Unpooled {
    /// `conn`, about to take the lock that `unlock` (a statement whose one parameter is
    /// `key`) lets go of.
    pub(super) fn new(conn: Connection, unlock: &'static str, key: String) -> Self {
        Self {
            conn: Some(conn),
            unlock,
            key,
        }
    }

    /// The key the lock is taken on.
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    pub(super) fn get(&self) -> Result<&Connection> {
        self.conn
            .as_ref()
            .ok_or(Error::Internal("locked connection already released"))
    }

    pub(super) fn get_mut(&mut self) -> Result<&mut Connection> {
        self.conn
            .as_mut()
            .ok_or(Error::Internal("locked connection already released"))
    }

    /// Moves the connection (and the lock it may hold) out into a new value, leaving this one
    /// holding nothing.
    pub(super) fn take(&mut self) -> Self {
        Self {
            conn: self.conn.take(),
            unlock: self.unlock,
            key: self.key.clone(),
        }
    }

    /// The connection, back to the pool when dropped: only for one that never took the lock.
    pub(super) fn pooled(mut self) -> Option<Connection> {
        self.conn.take()
    }

    /// Lets go of the lock and returns the connection to the pool.
    pub(super) async fn release(&mut self) -> Result<()> {
        self.get()?
            .execute_cached(self.unlock, &[&self.key])
            .await?;
        self.conn = None;
        Ok(())
    }
}

impl Drop for Unpooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            drop(Connection::take(conn));
        }
    }
}
