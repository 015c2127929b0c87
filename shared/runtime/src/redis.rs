//! Redis connection (fred). Redis only ever holds what can be rebuilt.

use std::time::Duration;

use fred::prelude::*;

/// A client for `url` that keeps reconnecting in the background. It waits up to 5 s for the
/// first connection, then returns anyway: a process starts without Redis and its readiness
/// says so until Redis answers.
///
/// A `rediss://` URL connects over TLS, the server's certificate checked against the system's
/// roots or the PEM file its `sslrootcert` parameter names, and its name against the host.
pub async fn connect(url: &str) -> Result<Client, Error> {
    let mut config = config(url)?;
    // Reconnect as after a lost connection when the first one fails too: by default fred
    // gives up for good, and a process started before Redis would never use it.
    config.fail_fast = false;
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

/// The settings `url` names, TLS made here (fred's own would give up on a system with one
/// unreadable root certificate, and could not take a CA file).
fn config(url: &str) -> Result<Config, Error> {
    let invalid = |why: String| Error::new(ErrorKind::Config, why);
    let (url, taken) = stowage_db::tls::take_params(url, &["sslrootcert"])
        .map_err(|e| invalid(format!("redis url: {e}")))?;
    let root_cert = taken.into_iter().next_back().map(|(_, v)| v);
    let parsed = url::Url::parse(&url).map_err(|e| invalid(format!("redis url: {e}")))?;
    let scheme = parsed.scheme().to_owned();
    let (tls, plain_scheme) = match scheme.strip_prefix("rediss") {
        Some(rest) => (true, format!("redis{rest}")),
        None => (false, scheme.clone()),
    };
    if !tls && root_cert.is_some() {
        return Err(invalid(
            "redis url: sslrootcert is set but the scheme is redis (use rediss)".into(),
        ));
    }
    let plain = format!("{plain_scheme}{}", &parsed.as_str()[scheme.len()..]);
    let mut config = Config::from_url(&plain)?;
    if tls {
        let client = stowage_db::tls::client_config(root_cert.as_deref())
            .map_err(|e| Error::new(ErrorKind::Tls, format!("redis: {e}")))?;
        config.tls = Some(client.into());
    }
    Ok(config)
}

/// Checks that Redis answers, for readiness probes.
pub async fn ping(client: &Client) -> Result<(), Error> {
    let _: String = tokio::time::timeout(Duration::from_secs(2), client.ping(None))
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "ping timed out"))??;
    Ok(())
}
