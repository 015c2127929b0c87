//! TLS client settings for connections to PostgreSQL, and to Redis (`rediss://`): rustls with
//! the aws-lc provider, servers checked against the system's root certificates or those of a
//! PEM file.

use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

/// A client configuration trusting the certificates in the PEM file `root_file`, or the
/// system's when there is none; the error says what is wrong, naming the file.
pub fn client_config(root_file: Option<&str>) -> Result<ClientConfig, String> {
    client_config_with(roots(root_file)?)
}

/// A client configuration trusting `roots`.
pub fn client_config_with(roots: RootCertStore) -> Result<ClientConfig, String> {
    Ok(
        ClientConfig::builder_with_provider(
            Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
        )
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Takes the query parameters `keys` out of `url`, with their values percent-decoded, and
/// leaves every other byte of the URL as written (drivers decode the rest themselves, some
/// reading `+` as a plus, so nothing may be re-encoded).
pub fn take_params(url: &str, keys: &[&str]) -> Result<(String, Vec<(String, String)>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_owned(), Vec::new()));
    };
    let mut taken = Vec::new();
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if keys.contains(&key) {
            let value = percent_encoding::percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| format!("{key} is not UTF-8 once decoded"))?;
            taken.push((key.to_owned(), value.into_owned()));
        } else {
            kept.push(pair);
        }
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, taken))
}

/// The certificates a server's must chain to: those in `file`, or the system's.
fn roots(file: Option<&str>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match file {
        Some(file) => {
            let named = |e: &dyn std::fmt::Display| format!("sslrootcert {file:?}: {e}");
            let certs = CertificateDer::pem_file_iter(Path::new(file)).map_err(|e| named(&e))?;
            for cert in certs {
                roots
                    .add(cert.map_err(|e| named(&e))?)
                    .map_err(|e| named(&e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(%error, "a system root certificate could not be read");
            }
            roots.add_parsable_certificates(found.certs);
        }
    }
    if roots.is_empty() {
        return Err(match file {
            Some(file) => format!("sslrootcert {file:?} holds no certificate"),
            None => "no system root certificates found; name a CA file with sslrootcert".into(),
        });
    }
    Ok(roots)
}
