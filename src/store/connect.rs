//! Connecting to PostgreSQL: the pool behind a [`Store`], the database it names created if it
//! is missing, and the URLs that name a database.

use std::time::Duration;

use deadpool_postgres::{ManagerConfig, Pool, PoolConfig, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres_rustls::MakeRustlsConnect;

use super::tls::tls_for;
use super::{Error, Store};

pub(super) fn pg_config(url: &str) -> Result<tokio_postgres::Config, Error> {
    // The parse error of tokio-postgres does not echo the URL, so no password can leak from it.
    url.parse::<tokio_postgres::Config>().map_err(|e| Error::Config(e.to_string()))
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
pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
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
