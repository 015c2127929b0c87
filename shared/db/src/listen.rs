//! LISTEN on a connection of its own (a pooled connection cannot receive notifications), so
//! idle workers and relays sleep until something happens instead of polling.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

/// First delay before reconnecting; it doubles up to [`MAX_RECONNECT_DELAY`].
const FIRST_RECONNECT_DELAY: Duration = Duration::from_millis(250);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(30);

/// Wakes `wake` on every notification of `channel` until `stop`, reconnecting to `target`
/// (backing off up to 30 s) when the connection drops. Every (re)connection wakes it too,
/// since notifications sent while no one listened are lost.
pub async fn listen(
    target: crate::PgTarget,
    channel: String,
    wake: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut delay = FIRST_RECONNECT_DELAY;
    loop {
        match session(&target, &channel, &wake, &stop, &mut delay).await {
            Ended::Stopped => return,
            Ended::Lost(reason) => tracing::warn!(
                %channel,
                %reason,
                retry_in = ?delay,
                "notification connection lost"
            ),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(MAX_RECONNECT_DELAY);
    }
}

enum Ended {
    Stopped,
    Lost(String),
}

async fn session(
    target: &crate::PgTarget,
    channel: &str,
    wake: &Notify,
    stop: &CancellationToken,
    delay: &mut Duration,
) -> Ended {
    let connect = target.connect();
    let (client, mut connection) = tokio::select! {
        () = stop.cancelled() => return Ended::Stopped,
        connected = connect => match connected {
            Ok(pair) => pair,
            Err(e) => return Ended::Lost(e.to_string()),
        },
    };
    // The connection yields the notifications; it must be polled for LISTEN to complete too.
    let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
    let statement = format!("LISTEN \"{channel}\"");
    let listening = client.batch_execute(&statement);
    tokio::pin!(listening);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            done = &mut listening => match done {
                Ok(()) => break,
                Err(e) => return Ended::Lost(e.to_string()),
            },
            message = messages.next() => if let Some(lost) = lost(message) {
                return lost;
            },
        }
    }
    tracing::debug!(channel, "listening for notifications");
    *delay = FIRST_RECONNECT_DELAY;
    wake.notify_one();
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ended::Stopped,
            message = messages.next() => match message {
                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                other => if let Some(lost) = lost(other) {
                    return lost;
                },
            },
        }
    }
}

/// `Some` when `message` says the connection is gone.
fn lost(message: Option<Result<AsyncMessage, tokio_postgres::Error>>) -> Option<Ended> {
    match message {
        Some(Ok(_)) => None,
        Some(Err(e)) => Some(Ended::Lost(e.to_string())),
        None => Some(Ended::Lost("closed by the server".to_owned())),
    }
}
