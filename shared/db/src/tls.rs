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
