//! The TLS of connections to PostgreSQL, chosen by the URL's `sslmode`: verified against the
//! system's roots and a private CA's, or none.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::Error;

/// The TLS of connections to the server that `config` names: none unless its `sslmode` is
/// `require`, then encrypted and the server's certificate verified against the system's roots
/// and, as for `psql`, the certificates of the file that `PGSSLROOTCERT` names (a private CA).
/// Stricter than `psql`'s `require`, which encrypts without verifying: an encrypted connection to
/// an impostor protects nothing.
pub(super) fn tls_for(config: &tokio_postgres::Config) -> Result<Option<MakeRustlsConnect>, Error> {
    if config.get_ssl_mode() != SslMode::Require {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    // Certificates the system has that cannot be read are skipped, as every TLS client does.
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = std::env::var_os("PGSSLROOTCERT") {
        let shown = std::path::Path::new(&path).display().to_string();
        let certs = CertificateDer::pem_file_iter(&path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Error::Config(format!("PGSSLROOTCERT {shown}: {e}")))?;
        for cert in certs {
            roots.add(cert).map_err(|e| Error::Config(format!("PGSSLROOTCERT {shown}: {e}")))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Some(MakeRustlsConnect::new(tls)))
}
