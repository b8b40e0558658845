//! `agents list` and `agents register`: the agents the database knows, and registering one by
//! hand as its first heartbeat would.

use anyhow::Result;
use clap::Subcommand;
use switchyard::config::Config;
use switchyard::model::wire::Heartbeat;

use crate::agent::AgentSpec;
use crate::{Exit, connect_broker, connect_store, print};

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Every agent with its health, load and track record.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register an agent (as its heartbeat would) and declare its queue.
    Register(AgentSpec),
}

pub async fn run(config: &Config, command: AgentsCommand) -> Result<Exit> {
    match command {
        AgentsCommand::List { json } => list(config, json).await,
        AgentsCommand::Register(spec) => register(config, spec).await,
    }
}

async fn list(config: &Config, json: bool) -> Result<Exit> {
    let store = connect_store(config).await?;
    let agents = store.agents().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&agents)?);
    } else {
        print::agents(&agents, config.routing.heartbeat_ttl_secs);
    }
    Ok(Exit::Success)
}

async fn register(config: &Config, spec: AgentSpec) -> Result<Exit> {
    let builder = spec.builder()?;
    let store = connect_store(config).await?;
    let broker = connect_broker(config).await?;
    let id = builder.id();
    let queue = broker.declare_agent_queue(id).await?;
    broker.declare_queue(&broker.names().agent_control_queue(id)).await?;
    let heartbeat = Heartbeat { sent_at: None, ..builder.heartbeat(0) };
    store.register_agent("cli", heartbeat).await?;
    println!("agent {id} registered; its queue is {queue}");
    broker.close().await;
    Ok(Exit::Success)
}
