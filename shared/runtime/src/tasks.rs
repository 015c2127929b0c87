//! Named, tracked background tasks and the shutdown signal.

use std::future::Future;

use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

/// Spawns a task that carries its name in every log line it writes.
///
/// Prefer [`Background::spawn`]; use this only for tasks that stop on their own token and
/// need not be awaited at shutdown.
#[allow(clippy::disallowed_methods)]
pub fn spawn<F>(name: &'static str, future: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(future.instrument(tracing::info_span!("task", name)))
}

/// The background tasks of a process and the token that stops them.
#[derive(Clone, Debug, Default)]
pub struct Background {
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Background {
    /// Tasks stopped by `shutdown`.
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            shutdown,
        }
    }

    /// The token cancelled when the process shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    /// Spawns a named task that is awaited by [`Background::wait`].
    pub fn spawn<F>(&self, name: &'static str, future: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tracker
            .spawn(future.instrument(tracing::info_span!("task", name)));
    }

    /// Waits for every task to finish after shutdown.
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    spawn("signals", async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received, draining");
        trigger.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        // A hang-up (the terminal of `stowage dev` closed) drains too: left to its default it
        // would end the process at once, leaving the dev databases it started running.
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(mut term), Ok(mut int), Ok(mut hup)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                    _ = hup.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
