//! Redis connection (fred). Redis only ever holds what can be rebuilt.

use std::time::Duration;

use fred::prelude::*;

/// A client for `url` that keeps reconnecting in the background. It waits up to 5 s for the
/// first connection, then returns anyway: a process starts without Redis and its readiness
/// says so until Redis answers.
pub async fn connect(url: &str) -> Result<Client, Error> {
    let config = Config::from_url(url)?;
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(5);
            c.internal_command_timeout = Duration::from_secs(5);
        })
        // Without a timeout, commands wait for a reconnection that may never come, and a
        // task stuck on one cannot even shut down.
        .with_performance_config(|p| p.default_command_timeout = Duration::from_secs(5))
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 5_000, 2))
        .build()?;
    // The connection task lives as long as the client.
    let _task = client.connect();
    if tokio::time::timeout(Duration::from_secs(5), client.wait_for_connect())
        .await
        .is_err()
    {
        tracing::warn!("redis not reachable yet; not ready until it is");
    }
    Ok(client)
}

/// Checks that Redis answers, for readiness probes.
pub async fn ping(client: &Client) -> Result<(), Error> {
    let _: String = tokio::time::timeout(Duration::from_secs(2), client.ping(None))
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "ping timed out"))??;
    Ok(())
}
