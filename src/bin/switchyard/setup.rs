//! `migrate` and `topology`: prepare the database and the broker before anything runs on them,
//! or describe the broker's part as RabbitMQ definitions to import.

use anyhow::Result;
use clap::Args;
use switchyard::config::Config;
use switchyard::model::ids::AgentId;
use switchyard::pipeline::definitions::{self, Scope};
use switchyard::pipeline::topology::QueueType;
use switchyard::pipeline::worker;

use crate::{Exit, connect_broker, within};

pub async fn migrate(config: &Config) -> Result<Exit> {
    let transient =
        |e: &worker::Error| matches!(e, worker::Error::Store(e) if e.is_transient() && !e.is_unknown_host());
    within("database", &config.database_url, transient, || worker::prepare_store(config)).await?;
    println!("database migrated");
    Ok(Exit::Success)
}

#[derive(Args)]
pub struct TopologyArgs {
    /// Print the namespace's exchanges, queues and bindings as RabbitMQ definitions (JSON, for
    /// `rabbitmqctl import_definitions` or `load_definitions`) instead of declaring them. Needs
    /// no broker.
    #[arg(long)]
    definitions: bool,
    /// With --definitions: print the least-privilege users and their permissions instead, with
    /// no password (set them after the import; importing them again clears them).
    #[arg(long, requires = "definitions")]
    users: bool,
    /// The queue type, over the configuration's `topology.queue_type`.
    #[arg(long, value_enum)]
    queue_type: Option<QueueTypeArg>,
    /// With --definitions: the virtual host.
    #[arg(long, default_value = "/", requires = "definitions")]
    vhost: String,
    /// With --definitions: an agent to give a user and queues of its own (repeatable or
    /// comma-separated).
    #[arg(long = "agent", value_delimiter = ',', requires = "definitions")]
    agents: Vec<AgentId>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum QueueTypeArg {
    /// Classic queues (version 2): one node.
    Classic,
    /// Quorum queues: a cluster.
    Quorum,
}

pub async fn topology(mut config: Config, args: TopologyArgs) -> Result<Exit> {
    if let Some(queue_type) = args.queue_type {
        config.topology.queue_type = match queue_type {
            QueueTypeArg::Classic => QueueType::Classic,
            QueueTypeArg::Quorum => QueueType::Quorum,
        };
    }
    if args.definitions {
        let scope = Scope {
            namespace: &config.namespace,
            settings: &config.topology,
            vhost: &args.vhost,
            agents: &args.agents,
        };
        let definitions = if args.users { definitions::users(&scope) } else { definitions::topology(&scope) };
        println!("{}", serde_json::to_string_pretty(&definitions)?);
        return Ok(Exit::Success);
    }
    let config = &config;
    let broker = connect_broker(config).await?;
    let topology = broker.declare_topology().await?;
    for queue in &topology.queues {
        println!("{}", queue.name);
    }
    broker.close().await;
    Ok(Exit::Success)
}
