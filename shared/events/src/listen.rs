//! LISTEN on a dedicated connection, so an idle relay wakes the moment an event is staged
//! instead of polling hard.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

/// The notification channel of `schema`'s outbox.
pub(crate) fn channel(schema: &str) -> String {
    format!("stowage_outbox_{schema}")
}

/// Keeps a connection listening on `channel` until `shutdown`, reconnecting after failures,
/// and signals `wake` for every notification (and after each reconnect, since notifications
/// sent while disconnected are lost).
pub(crate) async fn listen(
    database_url: String,
    channel: String,
    wake: std::sync::Arc<Notify>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match tokio_postgres::connect(&database_url, NoTls).await {
            Ok((client, mut connection)) => {
                let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                let command = format!("LISTEN {channel}");
                let mut listen = std::pin::pin!(client.batch_execute(&command));
                // The connection must be polled for the LISTEN to complete.
                let listening = loop {
                    tokio::select! {
                        result = &mut listen => break result.is_ok(),
                        message = messages.next() => match message {
                            Some(Ok(_)) => {}
                            _ => break false,
                        },
                    }
                };
                if listening {
                    wake.notify_one();
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            message = messages.next() => match message {
                                Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                                Some(Ok(_)) => {}
                                Some(Err(error)) => {
                                    tracing::warn!(%error, "outbox listener connection failed");
                                    break;
                                }
                                None => break,
                            },
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "outbox listener cannot connect"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
