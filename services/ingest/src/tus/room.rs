//! Room for PATCH bodies held in memory (checksummed ones whole until verified, others a chunk
//! at a time): a bound across the process, and a share of it per user, so that one user's
//! stalled bodies cannot keep every other user waiting.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Held room, given back when dropped.
pub struct Permit {
    /// Given back before the user's room is forgotten.
    _shared: OwnedSemaphorePermit,
    _user: UserPermit,
}

/// Room for bodies of `total` KiB at once, `per_user` of it for one user.
pub struct Room {
    shared: Arc<Semaphore>,
    total: usize,
    per_user: usize,
    users: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
}

impl Room {
    pub fn new(total: usize, per_user: usize) -> Self {
        Self {
            shared: Arc::new(Semaphore::new(total)),
            total,
            per_user: per_user.min(total),
            users: Arc::default(),
        }
    }

    /// Takes `kib` for `user` in one go, waiting at most `wait`: the user's share first, then
    /// the shared room. A body larger than either takes all of it (never more than there is,
    /// or it would wait for ever). `None` when no room came free in time.
    pub async fn take(&self, user: &str, kib: usize, wait: Duration) -> Option<Permit> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut user = UserPermit::new(Arc::clone(&self.users), user, self.per_user);
        let own = u32::try_from(kib.min(self.per_user)).unwrap_or(u32::MAX);
        user.permit = Some(acquire(&user.room, own, deadline).await?);
        let shared = u32::try_from(kib.min(self.total)).unwrap_or(u32::MAX);
        let shared = acquire(&self.shared, shared, deadline).await?;
        Some(Permit {
            _shared: shared,
            _user: user,
        })
    }

    /// Users with room held or awaited.
    #[cfg(test)]
    fn users(&self) -> usize {
        self.users.lock().map(|u| u.len()).unwrap_or(0)
    }
}

/// `kib` of `semaphore` (never closed), if they come free by `deadline`.
async fn acquire(
    semaphore: &Arc<Semaphore>,
    kib: u32,
    deadline: tokio::time::Instant,
) -> Option<OwnedSemaphorePermit> {
    tokio::time::timeout_at(deadline, Arc::clone(semaphore).acquire_many_owned(kib))
        .await
        .ok()?
        .ok()
}

/// A user's share, taken or awaited; the user's entry is forgotten with the last of these.
struct UserPermit {
    users: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    user: String,
    room: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
}

impl UserPermit {
    fn new(users: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>, user: &str, share: usize) -> Self {
        let room = {
            let mut map = users.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(
                map.entry(user.to_owned())
                    .or_insert_with(|| Arc::new(Semaphore::new(share))),
            )
        };
        Self {
            users,
            user: user.to_owned(),
            room,
            permit: None,
        }
    }
}

impl Drop for UserPermit {
    fn drop(&mut self) {
        let mut map = self.users.lock().unwrap_or_else(|e| e.into_inner());
        self.permit.take();
        // Every other holder of the entry is a `UserPermit` too (waits hold theirs while
        // they wait), and they are made and dropped under the lock: two references left are
        // the map's and this one.
        if Arc::strong_count(&self.room) == 2 {
            map.remove(&self.user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHORT: Duration = Duration::from_millis(50);

    #[tokio::test]
    async fn one_user_cannot_take_the_room_of_the_others() {
        let room = Room::new(256, 64);
        let ann = room.take("ann", 64, SHORT).await.expect("ann's share");
        assert!(
            room.take("ann", 1, SHORT).await.is_none(),
            "ann has her share"
        );
        let ben = room.take("ben", 64, SHORT).await.expect("ben's share");
        let cy = room.take("cy", 64, SHORT).await.expect("cy's share");
        let dee = room.take("dee", 64, SHORT).await.expect("dee's share");
        assert!(
            room.take("eve", 1, SHORT).await.is_none(),
            "the room is full"
        );
        drop(ann);
        let ann = room
            .take("ann", 64, SHORT)
            .await
            .expect("ann's share again");
        drop((ann, ben, cy, dee));
        assert_eq!(room.users(), 0, "every user forgotten");
        let whole = room
            .take("ann", 1000, SHORT)
            .await
            .expect("a body over the share");
        drop(whole);
        assert_eq!(room.users(), 0);
    }
}
