//! Where a database URL points and how to reach it: in the clear, or over TLS when the URL
//! asks for it.
//!
//! `sslmode=require` (and libpq's `verify-ca` / `verify-full`, which mean the same here) makes
//! every connection use TLS, the server's certificate checked against the system's root
//! certificates, or against those of the PEM file `sslrootcert` names, and its host name
//! against the URL's host. Stricter than libpq's `require`, which checks nothing: a connection
//! Stowage encrypts is one it can trust. Without `sslmode` (or with `disable`, `allow`,
//! `prefer`) connections are plain, as before.

use rustls::RootCertStore;
use tokio_postgres::{Client, Connection, Socket, config::SslMode, tls::MakeTlsConnect};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::DbError;

/// A parsed database URL and the TLS settings it asked for.
#[derive(Clone)]
pub struct PgTarget {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for PgTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // tokio-postgres leaves the password out of its settings' debug output.
        f.debug_struct("PgTarget")
            .field("config", &self.config)
            .field("tls", &self.uses_tls())
            .finish()
    }
}

/// A connection made outside a pool (a listener's).
pub type PgConnection = Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

impl PgTarget {
    /// Parses `url` (a `postgres://` URL or a `key=value` string).
    pub fn parse(url: &str) -> Result<Self, DbError> {
        let (url, mode, root_cert) = take_tls_params(url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
        let verified = matches!(
            mode.as_deref(),
            Some("require" | "verify-ca" | "verify-full")
        ) || (mode.is_none() && config.get_ssl_mode() == SslMode::Require);
        let tls = if verified {
            config.ssl_mode(SslMode::Require);
            crate::tls::client_config(root_cert.as_deref()).map_err(DbError::Tls)?
        } else if root_cert.is_some() {
            return Err(DbError::Tls(
                "sslrootcert is set but sslmode does not ask for TLS (use sslmode=require)".into(),
            ));
        } else {
            config.ssl_mode(SslMode::Disable);
            // Never used with TLS off; the connector's type stays one for both.
            crate::tls::client_config_with(RootCertStore::empty()).map_err(DbError::Tls)?
        };
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    /// The connection settings, to adjust (application name, keepalives).
    pub fn config_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.config
    }

    /// Whether connections use TLS.
    pub fn uses_tls(&self) -> bool {
        self.config.get_ssl_mode() == SslMode::Require
    }

    /// Opens one connection; the caller polls the returned [`PgConnection`].
    pub async fn connect(&self) -> Result<(Client, PgConnection), tokio_postgres::Error> {
        self.config.connect(self.tls.clone()).await
    }

    pub(crate) fn into_parts(self) -> (tokio_postgres::Config, MakeRustlsConnect) {
        (self.config, self.tls)
    }
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URL (tokio-postgres knows neither
/// libpq's `verify-*` modes nor `sslrootcert`); a `key=value` string keeps its `sslmode`.
fn take_tls_params(url: &str) -> Result<(String, Option<String>, Option<String>), DbError> {
    let is_url = url.starts_with("postgres://") || url.starts_with("postgresql://");
    if !is_url {
        return Ok((url.to_owned(), None, None));
    }
    let (url, taken) =
        crate::tls::take_params(url, &["sslmode", "sslrootcert"]).map_err(DbError::Tls)?;
    let value = |name: &str| {
        taken
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let (mode, root_cert) = (value("sslmode"), value("sslrootcert"));
    if let Some(mode) = &mode
        && ![
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ]
        .contains(&mode.as_str())
    {
        return Err(DbError::Tls(format!(
            "sslmode {mode:?} is not one of disable, allow, prefer, require, verify-ca, verify-full"
        )));
    }
    Ok((url, mode, root_cert))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_leave_the_url_and_the_rest_stays() {
        let (url, mode, root) = take_tls_params(
            "postgres://u:p%40ss@db.example:5432/app?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20file+1.pem&options=-c%20search_path%3Dstowage",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        // The other parameters are left exactly as written (`%20` stays, not `+`).
        assert_eq!(
            url,
            "postgres://u:p%40ss@db.example:5432/app?application_name=x&options=-c%20search_path%3Dstowage"
        );
        assert_eq!(mode.as_deref(), Some("verify-full"));
        assert_eq!(root.as_deref(), Some("/etc/ca file+1.pem"));
        let (url, mode, root) =
            take_tls_params("host=db sslmode=require").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (url.as_str(), mode, root),
            ("host=db sslmode=require", None, None)
        );
    }

    #[test]
    fn only_tls_urls_use_tls_and_bad_settings_are_named() {
        let plain = PgTarget::parse("postgres://u@localhost/app?sslmode=prefer");
        assert!(plain.is_ok_and(|t| !t.uses_tls()));
        let plain = PgTarget::parse("postgres://u@localhost/app");
        assert!(plain.is_ok_and(|t| !t.uses_tls()));
        let bad = PgTarget::parse("postgres://u@localhost/app?sslmode=sometimes").err();
        assert!(bad.is_some_and(|e| e.to_string().contains("sslmode")));
        let missing =
            PgTarget::parse("postgres://u@localhost/app?sslmode=require&sslrootcert=/nonexistent")
                .err();
        assert!(missing.is_some_and(|e| e.to_string().contains("sslrootcert")));
        let stray = PgTarget::parse("postgres://u@localhost/app?sslrootcert=/x.pem").err();
        assert!(stray.is_some_and(|e| e.to_string().contains("sslmode=require")));
    }
}
