//! PostgreSQL: the only module that holds SQL. It applies the [`Write`]s that stages decide, each
//! message's writes in one transaction with its idempotency marker and audit rows, and answers
//! the queries that stages (their context), the command line and the audit need.
//!
//! [`Write`]: crate::model::effect::Write

mod agents;
mod apply;
mod approvals;
mod cached;
mod dead_letters;
mod line;
mod quota;
mod read;
mod report;
mod stats;

use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio_postgres::NoTls;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

pub use apply::{Applied, Delivery, Marker};
pub use approvals::ApprovalOutcome;
pub use line::{Cancelled, Stopped, WaitingTask};
pub use quota::{QuotaReport, StoredReservation};
pub use read::*;
pub use report::*;
pub use stats::RequestTiming;

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// What went wrong talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("database migration: {0}")]
    Migration(#[from] refinery::Error),
    #[error("invalid database configuration: {0}")]
    Config(String),
    #[error("{0}")]
    NotFound(String),
    /// The operation is not allowed in the current state (approving a rejected plan, say).
    #[error("{0}")]
    Refused(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
}

impl Error {
    /// Whether retrying later can succeed: the database is unreachable, restarting, overloaded,
    /// or the transaction lost a race. Everything else (bad data, a refused operation) is
    /// permanent.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Pool(_) => true,
            Error::Db(e) => db_error_is_transient(e),
            // A migration that lost its connection (the server restarting) can run again; one
            // that the server refused, or that is invalid, cannot.
            Error::Migration(e) => match e.kind() {
                refinery::error::Kind::Connection(_, source) => {
                    source.downcast_ref::<tokio_postgres::Error>().is_some_and(db_error_is_transient)
                }
                _ => false,
            },
            Error::Config(_) | Error::NotFound(_) | Error::Refused(_) => false,
            Error::Corrupt(_) => false,
        }
    }
}

fn db_error_is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        None => true, // connection closed, I/O: not an answer from the server
        Some(code) => {
            let class = &code.code()[..2];
            matches!(class, "08" | "53" | "57" | "58" | "40") || *code == SqlState::LOCK_NOT_AVAILABLE
        }
    }
}

/// A handle on the database: a connection pool. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: Pool,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("status", &self.pool.status()).finish()
    }
}

fn pg_config(url: &str) -> Result<tokio_postgres::Config, Error> {
    // The parse error of tokio-postgres does not echo the URL, so no password can leak from it.
    url.parse::<tokio_postgres::Config>().map_err(|e| Error::Config(e.to_string()))
}

/// The TLS of connections to the server that `config` names: none unless its `sslmode` is
/// `require`, then encrypted and the server's certificate verified against the system's roots
/// and, as for `psql`, the certificates of the file that `PGSSLROOTCERT` names (a private CA).
/// Stricter than `psql`'s `require`, which encrypts without verifying: an encrypted connection to
/// an impostor protects nothing.
fn tls_for(config: &tokio_postgres::Config) -> Result<Option<MakeRustlsConnect>, Error> {
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

impl Store {
    /// A pool of at most `max_connections` to `url`; fails if the database does not answer.
    pub async fn connect(url: &str, max_connections: usize) -> Result<Self, Error> {
        let mut config = pg_config(url)?;
        config.connect_timeout(Duration::from_secs(5));
        // Fast: a broken connection shows up as an error on use, and that error is transient.
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match tls_for(&config)? {
            Some(tls) => deadpool_postgres::Manager::from_config(config, tls, recycling),
            None => deadpool_postgres::Manager::from_config(config, NoTls, recycling),
        };
        let mut pool_config = PoolConfig::new(max_connections.max(1));
        pool_config.timeouts.wait = Some(Duration::from_secs(10));
        pool_config.timeouts.create = Some(Duration::from_secs(5));
        let pool = Pool::builder(manager)
            .config(pool_config)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let store = Store { pool };
        drop(store.pool.get().await?);
        Ok(store)
    }

    /// Applies the embedded migrations. Safe to run from several processes at once: they take
    /// turns on an advisory lock.
    ///
    /// The migration's own error is the one reported, even if giving the lock back fails too;
    /// and a connection that may still hold the lock is closed, not returned to the pool, where
    /// it would keep every other process from migrating.
    pub async fn migrate(&self) -> Result<(), Error> {
        const LOCK: i64 = 0x5357_4954_4348; // "SWITCH"
        let mut client = self.pool.get().await?;
        client.execute("SELECT pg_advisory_lock($1)", &[&LOCK]).await?;
        let migrated = embedded::migrations::runner().run_async(&mut **client).await.map(drop);
        let unlocked = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]).await.map(drop);
        if unlocked.is_err() {
            // Out of the pool: dropped, the connection closes and the server frees its locks.
            drop(deadpool_postgres::Object::take(client));
        }
        migrated?;
        unlocked?;
        Ok(())
    }

    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object, Error> {
        Ok(self.pool.get().await?)
    }
}

/// Creates the database named in `url` if it does not exist yet. It connects to that database
/// first, and only if the server says it does not exist (SQLSTATE 3D000) to the server's
/// `postgres` database to create it: managed PostgreSQL services often refuse connections to
/// `postgres`, and a database that exists needs nothing from it.
pub async fn ensure_database(url: &str) -> Result<(), Error> {
    let config = pg_config(url)?;
    let tls = tls_for(&config)?;
    match connect_once(&config, tls.as_ref()).await {
        Ok((client, task)) => {
            // Without its client the connection task ends at once.
            drop(client);
            let _ = task.await;
            return Ok(());
        }
        Err(e) if e.code() == Some(&SqlState::INVALID_CATALOG_NAME) => {}
        Err(e) => return Err(e.into()),
    }
    let name = config
        .get_dbname()
        .map(str::to_owned)
        .or_else(|| config.get_user().map(str::to_owned))
        .ok_or_else(|| Error::Config("no database name in the URL".into()))?;
    let mut admin = config.clone();
    admin.dbname("postgres");
    let (client, task) = connect_once(&admin, tls.as_ref()).await?;
    let sql = format!("CREATE DATABASE {}", quote_ident(&name));
    if let Err(e) = client.execute(sql.as_str(), &[]).await {
        // Another process may have created it in the meantime.
        if e.code() != Some(&SqlState::DUPLICATE_DATABASE) {
            return Err(e.into());
        }
    }
    drop(client);
    let _ = task.await;
    Ok(())
}

/// One connection outside the pool, with `tls` if given; its connection task runs until the
/// client is dropped.
async fn connect_once(
    config: &tokio_postgres::Config,
    tls: Option<&MakeRustlsConnect>,
) -> Result<(tokio_postgres::Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
    Ok(match tls {
        Some(tls) => {
            let (client, connection) = config.connect(tls.clone()).await?;
            (client, tokio::spawn(async move { drop(connection.await) }))
        }
        None => {
            let (client, connection) = config.connect(NoTls).await?;
            (client, tokio::spawn(async move { drop(connection.await) }))
        }
    })
}

/// Quotes an SQL identifier (database names cannot be bound parameters).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Database administration for test harnesses and tooling: a template database migrated once,
/// cloned per test.
pub mod admin {
    use super::*;

    async fn connect_admin(url: &str) -> Result<tokio_postgres::Client, Error> {
        let mut config = pg_config(url)?;
        config.dbname("postgres");
        let (client, connection) = config.connect(NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Makes sure the migrated template `template` exists (several processes may race to create
    /// it: an advisory lock serialises them), then creates `database` as its copy.
    pub async fn create_from_template(url: &str, template: &str, database: &str) -> Result<(), Error> {
        const LOCK: i64 = 0x5357_5445_4d50; // "SWTEMP"
        let client = connect_admin(url).await?;
        client.execute("SELECT pg_advisory_lock($1)", &[&LOCK]).await?;
        let result = async {
            let exists = client
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
                .await?
                .is_some();
            if !exists {
                let building = format!("{template}_building");
                client
                    .execute(format!("DROP DATABASE IF EXISTS {}", quote_ident(&building)).as_str(), &[])
                    .await?;
                client.execute(format!("CREATE DATABASE {}", quote_ident(&building)).as_str(), &[]).await?;
                let store = Store::connect(&with_database(url, &building), 1).await?;
                store.migrate().await?;
                store.pool.close();
                // Templates of earlier migrations (same name but for the part after the last
                // '_') are of no use any more.
                if let Some((family, _)) = template.rsplit_once('_') {
                    let family = format!("{family}_");
                    for row in client.query("SELECT datname FROM pg_database", &[]).await? {
                        let name: String = row.get(0);
                        if name.starts_with(&family) && name != template && !name.ends_with("_building") {
                            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(&name));
                            // A test run of an older build may still be using it: then it stays.
                            let _ = client.execute(sql.as_str(), &[]).await;
                        }
                    }
                }
                // Renamed only once migrated, so a template that exists is a complete one.
                client
                    .execute(
                        format!(
                            "ALTER DATABASE {} RENAME TO {}",
                            quote_ident(&building),
                            quote_ident(template)
                        )
                        .as_str(),
                        &[],
                    )
                    .await?;
            }
            client
                .execute(
                    format!("CREATE DATABASE {} TEMPLATE {}", quote_ident(database), quote_ident(template))
                        .as_str(),
                    &[],
                )
                .await?;
            Ok::<_, Error>(())
        }
        .await;
        client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]).await?;
        result
    }

    /// Opens or closes `database` to new connections; closing also ends the open ones. An
    /// outage of one database, for tests of what happens while it is away.
    pub async fn set_connections_allowed(url: &str, database: &str, allowed: bool) -> Result<(), Error> {
        let client = connect_admin(url).await?;
        let sql = format!("ALTER DATABASE {} ALLOW_CONNECTIONS {allowed}", quote_ident(database));
        client.execute(sql.as_str(), &[]).await?;
        if !allowed {
            client
                .execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE datname = $1 AND pid <> pg_backend_pid()",
                    &[&database],
                )
                .await?;
        }
        Ok(())
    }

    /// Drops `database`, disconnecting whoever is still connected.
    pub async fn drop_database(url: &str, database: &str) -> Result<(), Error> {
        let client = connect_admin(url).await?;
        client
            .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(database)).as_str(), &[])
            .await?;
        Ok(())
    }
}

/// The database that `url` names, if it names one.
pub fn database_name(url: &str) -> Option<String> {
    pg_config(url).ok()?.get_dbname().map(str::to_owned)
}

/// `url` (a `postgres://` URL) pointing at `database` instead.
pub fn with_database(url: &str, database: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.scheme().starts_with("postgres") => {
            parsed.set_path(&format!("/{database}"));
            parsed.to_string()
        }
        // A key=value connection string: a later dbname overrides an earlier one.
        _ => format!("{url} dbname={database}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_database_replaces_the_path() {
        assert_eq!(
            with_database("postgres://u:p@127.0.0.1:5432/test?sslmode=disable", "t_1"),
            "postgres://u:p@127.0.0.1:5432/t_1?sslmode=disable"
        );
        assert_eq!(with_database("host=/tmp user=x", "t_1"), "host=/tmp user=x dbname=t_1");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
    }
}
