//! The chunks of one WriteChunks stream or tus PATCH body, each staged while the one before is
//! recorded.

use stowage_db::Cached;
use uuid::Uuid;

use super::{
    ChunkIn, Session, Sessions, check_checksum, check_open_at, hash_state, hasher_from,
    unpooled::Unpooled,
};
use crate::{
    error::{Error, Result},
    staging::Flushing,
};

/// The chunks of one WriteChunks stream or tus PATCH body.
///
/// While chunks keep coming, the stream holds the session's writer lock (an advisory lock, on a
/// connection of its own). Each chunk is then hashed and handed to the disk while the chunk
/// before it finishes its write and is recorded once flushed (its offset and hash state, one
/// statement outside any transaction): the hashing of one, the disk write of the other and the
/// database round trip overlap, where a lone chunk takes the lock, is staged and is recorded
/// in turn. Other writers are refused meanwhile, as they are by a chunk in progress.
///
/// [`pause`](Self::pause) records what is pending and lets go. The caller pauses whenever its
/// client has no chunk in flight, so a stalled or vanished client holds nothing, and after an
/// error. A stream dropped while holding the lock closes its connection, which releases the
/// lock, once the chunk being written is on disk; its last chunk, staged but not recorded, is
/// sent again on resume.
///
/// Only local-disk staging takes this path (its chunks need no part rows). Elsewhere, and for a
/// session's first chunk (which picks the key), an empty chunk, one that declares the length or
/// one that needs a larger quota hold (the length still deferred), a chunk is written as by
/// [`Sessions::write_chunk`].
pub struct ChunkStream {
    sessions: Sessions,
    id: Uuid,
    owner: String,
    /// Set while the writer lock is held.
    held: Option<Held>,
    /// The session as last recorded.
    last: Option<Session>,
}

/// What a stream holding the writer lock has.
struct Held {
    /// The connection holding the lock.
    conn: Unpooled,
    /// The session as recorded.
    session: Session,
    /// A chunk staged (or being staged) whose offset is not recorded yet.
    unrecorded: Option<Unrecorded>,
    /// Where a write left behind by a dropped stream runs to its end.
    writes: tokio_util::task::TaskTracker,
}

impl Drop for Held {
    /// A stream dropped (its client gone, or cancelled while recording) while its last chunk
    /// is still being written keeps the lock until the write is over: another writer taking
    /// the session meanwhile could stage other bytes at that offset, and the orphaned pieces
    /// would land over them. The chunk is not recorded; its client sends it again.
    fn drop(&mut self) {
        let Some(mut chunk) = self.unrecorded.take() else {
            return;
        };
        let conn = self.conn.take();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.writes.spawn_on(
                async move {
                    let _ = chunk.flushing.flushed().await;
                    drop(conn);
                },
                &runtime,
            );
        }
    }
}

/// A staged chunk to record.
struct Unrecorded {
    start: u64,
    end: u64,
    /// The upload's hash up to `end` (the next chunk goes on from it).
    hasher: sha2::Sha256,
    /// Its write, which may still be under way: recorded once it is on disk.
    flushing: Flushing,
}

impl Sessions {
    /// A writer for the chunks of one WriteChunks stream on session `id` of `owner`.
    pub fn chunk_stream(&self, id: Uuid, owner: &str) -> ChunkStream {
        ChunkStream {
            sessions: self.clone(),
            id,
            owner: owner.to_owned(),
            held: None,
            last: None,
        }
    }
}

impl ChunkStream {
    /// Writes one chunk at its offset (hashed and handed to the disk when this returns; recorded
    /// once flushed, by the next call, by [`pause`](Self::pause) or by
    /// [`finish`](Self::finish)).
    pub async fn write(&mut self, chunk: ChunkIn) -> Result<()> {
        if self.sessions.staging.keeps_parts() {
            self.last = Some(
                self.sessions
                    .write_chunk(self.id, &self.owner, chunk)
                    .await?,
            );
            return Ok(());
        }
        let mut held = hold(self.held.take(), &self.sessions, self.id, &self.owner).await?;
        // The lock goes with `held`: dropped with this call, it would be let go while the
        // chunk is still being written. Run to its end, the write hands it back.
        let (sessions, owner) = (self.sessions.clone(), self.owner.clone());
        let (held, written) = self
            .sessions
            .run_to_end(async move {
                let written = write_held(&sessions, &mut held, &owner, chunk).await;
                Ok((held, written))
            })
            .await?;
        self.held = Some(held);
        if let Err(Error::TypeNotAllowed { .. }) = &written {
            // Let go first: the abort waits for no writer.
            let _ = self.pause().await;
            self.sessions.abort_refused(self.id, &self.owner).await;
        }
        written
    }

    /// Records the chunk not recorded yet and lets go of the writer lock.
    pub async fn pause(&mut self) -> Result<()> {
        // `held` stays in place until the lock is let go: cancelled meanwhile, the stream is
        // dropped holding it, and the connection is closed (once a chunk still being written
        // is on disk).
        let Some(held) = self.held.as_mut() else {
            return Ok(());
        };
        let recorded = record(held).await;
        let released = held.conn.release().await;
        if let Some(held) = self.held.take() {
            self.last = Some(held.session.clone());
        }
        recorded.and(released)
    }

    /// Records what is pending, lets go, and returns the session as recorded (`None` if the
    /// stream wrote nothing).
    pub async fn finish(mut self) -> Result<Option<Session>> {
        self.pause().await?;
        Ok(self.last.take())
    }

    /// Ends the stream after its caller's loop of writes: [`finish`](Self::finish) when the
    /// loop ended well; when it failed, what was staged before the failure is still recorded
    /// (the client resumes from the offset, which then includes it) and the loop's error is
    /// returned.
    pub async fn settle<E: From<Error>>(
        mut self,
        written: std::result::Result<(), E>,
    ) -> std::result::Result<Option<Session>, E> {
        if let Err(error) = written {
            let _ = self.pause().await;
            return Err(error);
        }
        Ok(self.finish().await?)
    }
}

/// Writes `chunk` while holding the lock: hashed and staged while the chunk before it is flushed
/// and recorded.
async fn write_held(
    sessions: &Sessions,
    held: &mut Held,
    owner: &str,
    chunk: ChunkIn,
) -> Result<()> {
    let id = held.session.id;
    // The client's offset, not checked yet: one past any length is refused below as a wrong
    // offset (saturated, it still is).
    let end = chunk.offset.saturating_add(chunk.data.len() as u64);
    if held.session.key.is_none()
        || chunk.size.is_some()
        || chunk.data.is_empty()
        || Sessions::needs_more_held(&held.session, end)
    {
        // On the connection holding the lock, whose own transactions may take it again.
        record(held).await?;
        held.session = sessions
            .write_chunk_on(held.conn.get_mut()?, id, owner, chunk)
            .await?;
        return Ok(());
    }
    sessions.check_chunk_size(&chunk)?;
    let offset = held
        .unrecorded
        .as_ref()
        .map_or(held.session.offset, |u| u.end);
    check_open_at(&held.session, offset, chunk.offset)?;
    sessions.check_end(&held.session, end)?;
    check_checksum(&chunk).await?;
    let hasher = match &held.unrecorded {
        Some(u) => u.hasher.clone(),
        None => hasher_from(held.session.hash_state.as_deref())?,
    };
    let staging = sessions
        .staging
        .write_local(id, chunk.offset, chunk.data, hasher);
    let (staged, recorded) = tokio::join!(staging, record(held));
    if let Err(error) = recorded {
        // This chunk is not recorded after the failure, but its write ends before the lock
        // can go.
        if let Ok((_, mut flushing)) = staged {
            let _ = flushing.flushed().await;
        }
        return Err(error);
    }
    let (hasher, flushing) = staged?;
    held.unrecorded = Some(Unrecorded {
        start: chunk.offset,
        end,
        hasher,
        flushing,
    });
    Ok(())
}

/// Takes the writer lock of session `id` of `owner` on a connection of its own, unless
/// already `held`.
async fn hold(held: Option<Held>, sessions: &Sessions, id: Uuid, owner: &str) -> Result<Held> {
    if let Some(held) = held {
        return Ok(held);
    }
    let conn = Unpooled::new(
        sessions.pool.get().await?,
        concat!("SELECT pg_advisory_unlock(", writer_lock!("$1"), ")"),
        id.to_string(),
    );
    // The lock first, then the row in a statement of its own: its snapshot then shows what
    // the writer that held the lock last committed.
    let locked: bool = conn
        .get()?
        .query_one_cached(
            concat!("SELECT pg_try_advisory_lock(", writer_lock!("$1"), ")"),
            &[&conn.key()],
        )
        .await?
        .get(0);
    if !locked {
        // Not taken: the connection holds nothing and can go back to the pool.
        drop(conn.pooled());
        return Err(Error::Busy);
    }
    let session = match sessions.read(conn.get()?, id, owner).await {
        Ok(session) => session,
        Err(error) => {
            // No such session of this owner (or the read failed): let go at once, so that a
            // caller guessing ids neither costs a connection nor keeps a writer waiting.
            let mut conn = conn;
            let _ = conn.release().await;
            return Err(error);
        }
    };
    Ok(Held {
        conn,
        session,
        unrecorded: None,
        writes: sessions.writes.clone(),
    })
}

/// Records `held`'s staged chunk, if any: one statement, which changes nothing unless the
/// session is still open at the chunk's start.
async fn record(held: &mut Held) -> Result<()> {
    // Waited for in place: cancelled meanwhile, the chunk goes with `held`, which keeps the
    // lock until the write is over.
    let Some(unrecorded) = held.unrecorded.as_mut() else {
        return Ok(());
    };
    let flushed = unrecorded.flushing.flushed().await;
    let Some(chunk) = held.unrecorded.take() else {
        return Ok(());
    };
    flushed?;
    let id = held.session.id;
    let row = held
        .conn
        .get()?
        .query_opt_cached(
            concat!(
                "UPDATE ingest.uploads SET received_bytes = $3, hash_state = $4, updated_at = now()
                 WHERE id = $1 AND received_bytes = $2 AND state = 'open'
                 RETURNING ",
                session_columns!()
            ),
            &[
                &id,
                &(chunk.start as i64),
                &(chunk.end as i64),
                &hash_state(&chunk.hasher),
            ],
        )
        .await?;
    if let Some(row) = row {
        held.session = Session::from_row(&row, held.session.chunk_size_hint);
        return Ok(());
    }
    // Ended meanwhile (expired by the sweeper): say how it stands now.
    let now = held
        .conn
        .get()?
        .query_one_cached(
            "SELECT state, received_bytes FROM ingest.uploads WHERE id = $1",
            &[&id],
        )
        .await?;
    let state: String = now.get("state");
    if state != "open" {
        return Err(Error::SessionState(state));
    }
    Err(Error::WrongOffset {
        expected: now.get::<_, i64>("received_bytes") as u64,
        got: chunk.start,
    })
}
