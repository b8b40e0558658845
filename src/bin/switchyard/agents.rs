//! `agents list`, `agents register` and `agents remove`: the agents the database knows,
//! registering one by hand as its first heartbeat would, and removing one that is gone for good.

use anyhow::{Result, bail};
use clap::Subcommand;
use switchyard::config::Config;
use switchyard::model::ids::AgentId;
use switchyard::model::wire::Heartbeat;

use crate::agent::AgentSpec;
use crate::{Exit, connect_broker, connect_store, print};

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Every agent with its health, load and track record.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Register an agent (as its heartbeat would) and declare its queue.
    Register(AgentSpec),
    /// Remove an agent that is gone for good: its row (audited as `agent.removed`), and its
    /// queues if nothing consumes them and no message waits in them. Refused (exit 2) while it
    /// has tasks in flight. An agent still running registers again with its next heartbeat:
    /// stop it first.
    Remove {
        id: AgentId,
        /// Who removes it (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
    },
}

pub async fn run(config: &Config, command: AgentsCommand) -> Result<Exit> {
    match command {
        AgentsCommand::List { json } => list(config, json).await,
        AgentsCommand::Register(spec) => register(config, spec).await,
        AgentsCommand::Remove { id, by } => remove(config, &id, &by).await,
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

async fn remove(config: &Config, id: &AgentId, by: &str) -> Result<Exit> {
    let store = connect_store(config).await?;
    let broker = connect_broker(config).await?;
    let Some(agent) = store.remove_agent(id, by).await? else {
        broker.close().await;
        bail!("no agent {id}");
    };
    println!(
        "agent {id} removed by {by} ({} succeeded, {} failed; last heartbeat {} ago)",
        agent.succeeded,
        agent.failed,
        print::age(chrono::Utc::now() - agent.last_heartbeat)
    );
    // The row is what routing reads: with it gone, nothing is sent to the agent any more. What
    // its queues still hold is left to whoever looks, and a queue in use belongs to a running agent.
    for queue in [broker.names().agent_queue(id), broker.names().agent_control_queue(id)] {
        match broker.delete_queue_if_idle(&queue).await? {
            None => {}
            Some((_, true)) => println!("queue {queue} deleted"),
            Some((state, false)) => {
                let mut why = Vec::new();
                if state.messages > 0 {
                    let messages = if state.messages == 1 { "message waits" } else { "messages wait" };
                    why.push(format!("{} {messages} in it", state.messages));
                }
                if state.consumers > 0 {
                    why.push("the agent still consumes it (stop it, or it registers again)".to_owned());
                }
                println!("queue {queue} kept: {}", why.join("; "));
            }
        }
    }
    broker.close().await;
    Ok(Exit::Success)
}
