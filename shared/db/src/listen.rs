//! LISTEN on a connection of its own (a pooled connection cannot receive notifications), so
//! idle workers and relays sleep until something happens instead of polling.
//!
//! A process keeps one such connection per database, whatever the number of channels: every
//! NOTIFY wakes each listening backend of its database, whichever channel it listens on, so
//! each extra listening connection costs the server a wake-up per notification.

use std::{
    collections::HashMap,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use tokio::sync::{
    Notify,
    mpsc::{UnboundedReceiver, UnboundedSender, WeakUnboundedSender, unbounded_channel},
};
use tokio_postgres::{AsyncMessage, Client};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{PgTarget, target::PgConnection};

/// First delay before reconnecting; it doubles up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(250);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// How the listening connection names itself in `pg_stat_activity`.
pub const LISTENER_APPLICATION_NAME: &str = "stowage-listener";

/// Wakes `wake` on every notification of `channel` until `stop`. The process's connection to
/// `target`'s database that listens is shared with every other caller for that database; it
/// reconnects (backing off up to 30 s) when it drops. Every (re)connection wakes `wake` too,
/// since notifications sent while no one listened are lost.
pub async fn listen(
    mut target: PgTarget,
    channel: String,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    // Names are made by code (`stowage_outbox_{schema}`), but one that PostgreSQL would
    // refuse or shorten would cut every other channel's connection, or never match.
    if channel.is_empty() || channel.len() > 63 || channel.contains(['"', '\0']) {
        tracing::error!(%channel, "not a channel name one can LISTEN to (1 to 63 bytes, no quotes)");
        return;
    }
    target
        .config_mut()
        .application_name(LISTENER_APPLICATION_NAME)
        // A listener mostly waits: keepalives notice a peer that vanished without a word.
        .keepalives_idle(Duration::from_secs(60));
    // Its settings (the password left out) and whether it uses TLS.
    let key = format!("{target:?}");
    loop {
        let hub = hub(&key, &target);
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let added = hub.send(Command::Add {
            id,
            channel: channel.clone(),
            wake: Arc::clone(&wake),
        });
        if added.is_ok() {
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = hub.send(Command::Remove { id });
                    return;
                }
                // The hub ended with the runtime it was started on: join a new one.
                () = hub.closed() => {}
            }
        }
        // Not at once: on a runtime shutting down a new hub ends as soon as it starts.
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(FIRST_RECONNECT_DELAY) => {}
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// The running hub of each database, by its connection settings. A hub lives while a caller
/// of [`listen`] holds its sender.
static HUBS: LazyLock<Mutex<HashMap<String, WeakUnboundedSender<Command>>>> =
    LazyLock::new(Mutex::default);

/// The hub for `key`, started (on the current runtime) if there is none.
fn hub(key: &str, target: &PgTarget) -> UnboundedSender<Command> {
    let mut hubs = HUBS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(hub) = hubs.get(key).and_then(WeakUnboundedSender::upgrade)
        && !hub.is_closed()
    {
        return hub;
    }
    hubs.retain(|_, hub| hub.strong_count() > 0);
    let (hub, commands) = unbounded_channel();
    hubs.insert(key.to_owned(), hub.downgrade());
    tokio::spawn(
        run(target.clone(), commands).instrument(tracing::info_span!("task", name = "pg-listener")),
    );
    hub
}

enum Command {
    Add {
        id: u64,
        channel: String,
        wake: Arc<Notify>,
    },
    Remove {
        id: u64,
    },
}

/// Who waits on which channel.
#[derive(Default)]
struct Channels(HashMap<String, Vec<(u64, Arc<Notify>)>>);

impl Channels {
    /// Records `command`; returns the channel it starts (`Add` of a new one) or ends (`Remove`
    /// of its last waiter), with whether it starts.
    fn apply(&mut self, command: Command) -> Option<(String, bool)> {
        match command {
            Command::Add { id, channel, wake } => {
                let waiters = self.0.entry(channel.clone()).or_default();
                waiters.push((id, wake));
                (waiters.len() == 1).then_some((channel, true))
            }
            Command::Remove { id } => {
                let channel = self
                    .0
                    .iter()
                    .find(|(_, waiters)| waiters.iter().any(|(i, _)| *i == id))
                    .map(|(channel, _)| channel.clone())?;
                let waiters = self.0.get_mut(&channel)?;
                waiters.retain(|(i, _)| *i != id);
                if !waiters.is_empty() {
                    return None;
                }
                self.0.remove(&channel);
                Some((channel, false))
            }
        }
    }

    fn wake(&self, channel: &str) {
        for (_, wake) in self.0.get(channel).into_iter().flatten() {
            wake.notify_one();
        }
    }

    fn wake_all(&self) {
        for wake in self.0.values().flatten().map(|(_, wake)| wake) {
            wake.notify_one();
        }
    }
}

enum Ended {
    /// Every caller is gone.
    Stopped,
    Lost(String),
}

/// One database's listening connection, until every caller is gone.
async fn run(target: PgTarget, mut commands: UnboundedReceiver<Command>) {
    let mut channels = Channels::default();
    let mut delay = FIRST_RECONNECT_DELAY;
    loop {
        match session(&target, &mut channels, &mut commands, &mut delay).await {
            Ended::Stopped => return,
            Ended::Lost(reason) => tracing::warn!(
                %reason,
                retry_in = ?delay,
                "notification connection lost"
            ),
        }
        let pause = tokio::time::sleep(delay);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                command = commands.recv() => match command {
                    // Listened to on the next connection.
                    Some(command) => { channels.apply(command); }
                    None => return,
                },
            }
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

async fn session(
    target: &PgTarget,
    channels: &mut Channels,
    commands: &mut UnboundedReceiver<Command>,
    delay: &mut Duration,
) -> Ended {
    let connect = target.connect();
    tokio::pin!(connect);
    let (client, connection) = loop {
        tokio::select! {
            connected = &mut connect => match connected {
                Ok(pair) => break pair,
                Err(e) => return Ended::Lost(e.to_string()),
            },
            command = commands.recv() => match command {
                Some(command) => { channels.apply(command); }
                None => return Ended::Stopped,
            },
        }
    };
    // The connection yields the notifications and must be polled for statements to complete:
    // a task of its own does both, and ends when `client` is dropped.
    let (notes_tx, mut notes) = unbounded_channel();
    tokio::spawn(
        pump(connection, notes_tx).instrument(tracing::info_span!("task", name = "pg-listener-io")),
    );
    let all: String = channels
        .0
        .keys()
        .map(|channel| format!("LISTEN \"{channel}\";"))
        .collect();
    if let Err(e) = client.batch_execute(&all).await {
        return Ended::Lost(e.to_string());
    }
    tracing::debug!(channels = channels.0.len(), "listening for notifications");
    *delay = FIRST_RECONNECT_DELAY;
    channels.wake_all();
    loop {
        tokio::select! {
            command = commands.recv() => {
                let Some(command) = command else { return Ended::Stopped };
                let added = match &command {
                    Command::Add { wake, .. } => Some(Arc::clone(wake)),
                    Command::Remove { .. } => None,
                };
                if let Some((channel, starts)) = channels.apply(command)
                    && let Err(e) = change(&client, &channel, starts).await
                {
                    return Ended::Lost(e.to_string());
                }
                if let Some(wake) = added {
                    wake.notify_one();
                }
            }
            note = notes.recv() => match note {
                Some(Ok(channel)) => channels.wake(&channel),
                Some(Err(reason)) => return Ended::Lost(reason),
                None => return Ended::Lost("closed".to_owned()),
            },
        }
    }
}

/// LISTEN to `channel` (`starts`) or UNLISTEN it.
async fn change(client: &Client, channel: &str, starts: bool) -> Result<(), tokio_postgres::Error> {
    let verb = if starts { "LISTEN" } else { "UNLISTEN" };
    client.batch_execute(&format!("{verb} \"{channel}\"")).await
}

/// Polls `connection`, passing on the channel of each notification, or why it ended.
async fn pump(mut connection: PgConnection, notes: UnboundedSender<Result<String, String>>) {
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let ended = loop {
        match messages.next().await {
            Some(Ok(AsyncMessage::Notification(note))) => {
                if notes.send(Ok(note.channel().to_owned())).is_err() {
                    return;
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => break e.to_string(),
            None => break "closed by the server".to_owned(),
        }
    };
    let _ = notes.send(Err(ended));
}
