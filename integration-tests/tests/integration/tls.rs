//! A database URL with `sslmode=require` reaches PostgreSQL over TLS (pool and listener), and
//! a `rediss://` URL Redis; only a server whose certificate chains to the given CA and names
//! the URL's host is accepted. Against a real PostgreSQL with `ssl=on` and a real Redis with
//! a TLS port, and certificates made for the test.

use std::{sync::Arc, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use stowage_local::LocalPostgres;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// A CA and a server certificate it signed for `names`; returns (CA PEM, cert PEM, key PEM).
fn certificates(names: &[&str]) -> anyhow::Result<(String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate()?;
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = CertificateParams::new(names)?.signed_by(&key, &issuer)?;
    Ok((ca.pem(), cert.pem(), key.serialize_pem()))
}

/// Whether the connection `pool` hands out is encrypted, as the server sees it.
async fn encrypted(pool: &stowage_db::PgPool) -> anyhow::Result<bool> {
    let conn = pool.get().await?;
    let row = conn
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether `error` (or what caused it) is a refused server certificate.
fn certificate_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if e.to_string().contains("invalid peer certificate") {
            return true;
        }
        cause = e.source();
    }
    false
}

#[tokio::test]
async fn a_url_asking_for_tls_gets_it_and_checks_the_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("pg");
    // First start creates the cluster; its certificate goes into the data directory.
    LocalPostgres::start(&data, false).await?.stop().await;
    let (ca, cert, key) = certificates(&["127.0.0.1"])?;
    let (other_ca, _, _) = certificates(&["127.0.0.1"])?;
    std::fs::write(data.join("server.crt"), cert)?;
    std::fs::write(data.join("server.key"), key)?;
    // PostgreSQL refuses a key others can read.
    std::fs::set_permissions(
        data.join("server.key"),
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    let ca_file = dir.path().join("ca.pem");
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&ca_file, ca)?;
    std::fs::write(&other_ca_file, other_ca)?;
    let pg = LocalPostgres::start_with(
        &data,
        false,
        &[
            "ssl=on",
            "ssl_cert_file=server.crt",
            "ssl_key_file=server.key",
        ],
    )
    .await?;
    let base = pg.url("postgres");
    let with = |query: &str| format!("{base}?{query}");

    // Asked for, with the right CA: every connection is encrypted, the listener's too.
    let url = with(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    ));
    let pool = stowage_db::connect(&url, 2)?;
    assert!(encrypted(&pool).await?, "the pool's connection uses TLS");
    let wake = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let listener = tokio::spawn(stowage_db::listen(
        stowage_db::PgTarget::parse(&url)?,
        "tls_test".into(),
        Arc::clone(&wake),
        stop.clone(),
    ));
    // The first wake is the (re)connection's; the second comes from the notification.
    tokio::time::timeout(Duration::from_secs(10), wake.notified()).await?;
    let notified = wake.notified();
    pool.get().await?.batch_execute("NOTIFY tls_test").await?;
    tokio::time::timeout(Duration::from_secs(10), notified).await?;
    let plain_clients: i64 = pool
        .get()
        .await?
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.backend_type = 'client backend' AND NOT s.ssl",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(plain_clients, 0, "the listener uses TLS too");
    stop.cancel();
    listener.await?;

    // A server whose certificate another CA signed is refused.
    let url = with(&format!(
        "sslmode=require&sslrootcert={}",
        other_ca_file.display()
    ));
    let refused = stowage_db::connect(&url, 1)?.get().await.err();
    assert!(
        refused.as_ref().is_some_and(|e| certificate_refused(e)),
        "a certificate of another CA is refused: {refused:?}"
    );
    // So is one that does not name the host the URL connects to.
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require&sslrootcert={}",
        pg.port(),
        ca_file.display()
    );
    let refused = stowage_db::connect(&url, 1)?.get().await.err();
    assert!(
        refused.as_ref().is_some_and(|e| certificate_refused(e)),
        "a certificate for another name is refused: {refused:?}"
    );
    // Without sslmode, connections stay plain, as before.
    assert!(!encrypted(&stowage_db::connect(&base, 1)?).await?);
    pg.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_rediss_url_gets_tls_and_checks_the_server() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (ca, cert, key) = certificates(&["127.0.0.1"])?;
    let (other_ca, _, _) = certificates(&["127.0.0.1"])?;
    let path = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(path("ca.pem"), ca)?;
    std::fs::write(path("other-ca.pem"), other_ca)?;
    std::fs::write(path("server.crt"), cert)?;
    std::fs::write(path("server.key"), key)?;
    let port = stowage_local::free_port()?;
    let _redis = stowage_local::redis_command(0)
        .args(["--tls-port", &port.to_string()])
        .args(["--tls-cert-file", &path("server.crt")])
        .args(["--tls-key-file", &path("server.key")])
        .args(["--tls-ca-cert-file", &path("ca.pem")])
        .args(["--tls-auth-clients", "no"])
        .spawn()?;
    stowage_integration_tests::eventually(Duration::from_secs(10), "redis started", || async {
        Ok(tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok())
    })
    .await?;

    // With the CA that signed the server's certificate: commands go through, encrypted.
    let url = format!("rediss://127.0.0.1:{port}/0?sslrootcert={}", path("ca.pem"));
    let client = stowage_runtime::redis::connect(&url).await?;
    stowage_integration_tests::eventually(Duration::from_secs(10), "redis over TLS", || {
        let client = client.clone();
        async move {
            let r = stowage_runtime::redis::ping(&client).await;
            eprintln!("PING {r:?}");
            Ok(r.is_ok())
        }
    })
    .await?;
    // Only a TLS client could have read the server's port at all: it speaks nothing else.
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tokio::io::AsyncWriteExt::write_all(&mut plain, b"PING\r\n").await?;
    let mut answer = [0u8; 7];
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::io::AsyncReadExt::read(&mut plain, &mut answer),
    )
    .await;
    assert!(
        !matches!(read, Ok(Ok(n)) if answer[..n].starts_with(b"+PONG")),
        "the port answers plain text"
    );

    // Another CA's certificate: no command goes through.
    let url = format!(
        "rediss://127.0.0.1:{port}/0?sslrootcert={}",
        path("other-ca.pem")
    );
    let refused = stowage_runtime::redis::connect(&url).await?;
    let mut connection_errors = fred::interfaces::EventInterface::error_rx(&refused);
    // Every try for a few seconds fails (a first ping can fail even with the right CA, while
    // the client connects), and the client's connections fail on the certificate.
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        let ping = stowage_runtime::redis::ping(&refused).await;
        assert!(
            ping.is_err(),
            "a command went through to a server of another CA"
        );
    }
    let mut errors = Vec::new();
    while let Ok((error, _)) = connection_errors.try_recv() {
        errors.push(error.to_string());
    }
    assert!(
        errors
            .iter()
            .any(|e| e.to_lowercase().contains("certificate")),
        "connections did not fail on the certificate: {errors:?}"
    );
    // A CA file with a plain URL is a mistake, said at once.
    let mixed = stowage_runtime::redis::connect(&format!(
        "redis://127.0.0.1:{port}/0?sslrootcert={}",
        path("ca.pem")
    ))
    .await
    .err();
    assert!(mixed.is_some_and(|e| e.to_string().contains("rediss")));
    Ok(())
}
