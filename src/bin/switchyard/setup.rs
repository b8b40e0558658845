//! `migrate` and `topology`: prepare the database and the broker before anything runs on them.

use anyhow::Result;
use switchyard::config::Config;
use switchyard::pipeline::worker;

use crate::{Exit, connect_broker, within};

pub async fn migrate(config: &Config) -> Result<Exit> {
    let transient =
        |e: &worker::Error| matches!(e, worker::Error::Store(e) if e.is_transient() && !e.is_unknown_host());
    within("database", &config.database_url, transient, || worker::prepare_store(config)).await?;
    println!("database migrated");
    Ok(Exit::Success)
}

pub async fn topology(config: &Config) -> Result<Exit> {
    let broker = connect_broker(config).await?;
    let topology = broker.declare_topology().await?;
    for queue in &topology.queues {
        println!("{}", queue.name);
    }
    broker.close().await;
    Ok(Exit::Success)
}
