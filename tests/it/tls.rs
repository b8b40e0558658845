//! TLS to PostgreSQL: with `sslmode=require` the connection is encrypted and the server's
//! certificate verified, against the system's roots and the file `PGSSLROOTCERT` names. The
//! server here has TLS on, with a self-signed certificate for `localhost`.

use switchyard::store::{self, Store};

use crate::helpers::*;

/// The certificate the test server presents, which signs itself.
const SERVER_CERT: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// A URL of `database` on the test server, by the name its certificate holds, with TLS required
/// and a password (which the server's trust authentication ignores) that must not be shown.
fn tls_url(database: &str) -> String {
    let mut url = url::Url::parse(&store::with_database(&database_url(), database)).unwrap();
    url.set_host(Some("localhost")).unwrap();
    url.set_password(Some("pw-never-shown")).unwrap();
    url.set_query(Some("sslmode=require"));
    url.to_string()
}

/// The system's roots as most machines have them: the public authorities' bundle, without the
/// certificates directory (which, here, also holds the server's own certificate).
fn public_roots_only() {
    let empty = std::env::temp_dir().join(format!("switchyard-no-certs-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&empty).unwrap();
    // SAFETY: each test runs in a process of its own, and nothing else reads the environment now.
    unsafe {
        std::env::set_var("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt");
        std::env::set_var("SSL_CERT_DIR", &empty);
    }
}

async fn encrypted_connections(database: &str) -> i64 {
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.datname = $1 AND s.ssl",
            &[&database],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn with_sslmode_require_the_database_connection_is_encrypted_and_verified() {
    let app = spawn_bare_app(|_| {}).await;
    public_roots_only();
    // SAFETY: as above.
    unsafe { std::env::set_var("PGSSLROOTCERT", SERVER_CERT) };

    let store = Store::connect(&tls_url(&app.database), 2).await.expect("a verified TLS connection");

    assert!(encrypted_connections(&app.database).await >= 1, "the pool's connection is encrypted");
    assert!(store.agents().await.unwrap().is_empty(), "and it works");
}

#[tokio::test]
async fn with_sslmode_require_a_server_whose_certificate_cannot_be_verified_is_refused() {
    let app = spawn_bare_app(|_| {}).await;
    public_roots_only();
    // SAFETY: as above.
    unsafe { std::env::remove_var("PGSSLROOTCERT") };

    let err = Store::connect(&tls_url(&app.database), 2).await.expect_err("an unverified server is refused");

    // What the worker logs: the error and its causes.
    let mut shown = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        shown.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    assert!(shown.contains("certificate"), "{shown}");
    assert!(!shown.contains("pw-never-shown"), "{shown}");
    assert_eq!(encrypted_connections(&app.database).await, 0);
}
