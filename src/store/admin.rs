//! Database administration for test harnesses and tooling: a template database migrated once,
//! cloned per test.

use tokio_postgres::NoTls;

use super::connect::{pg_config, quote_ident};
use super::{Error, Store, with_database};

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
        let exists =
            client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template]).await?.is_some();
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
                    format!("ALTER DATABASE {} RENAME TO {}", quote_ident(&building), quote_ident(template))
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
