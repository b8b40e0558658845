//! `agents list`, `agents register` and `agents remove`: the agents the database knows,
//! registering one by hand as its first heartbeat would, and removing one that is gone for good.

use anyhow::{Result, bail};
use chrono::{TimeDelta, Utc};
use clap::Subcommand;
use serde_json::json;
use switchyard::config::Config;
use switchyard::model::ids::AgentId;
use switchyard::model::wire::Heartbeat;

use crate::agent::AgentSpec;
use crate::{Exit, connect_broker, connect_store, print};

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Every agent with its health, its last heartbeat, its load and its track record.
    ///
    /// HEALTH is `online`; `silent` once its last heartbeat is older than the interval the agent
    /// announced and half again (at least a second more): it missed a beat, and may have
    /// stopped, though routing still counts on it; `offline` past the routing TTL
    /// (`routing.heartbeat_ttl_secs`), when routing no longer sends it anything. SUCCEEDED is its
    /// successful results of all ("-" before any); ROUTED AS is the rate routing scores it with,
    /// smoothed as (succeeded + 1) / (results + 2) so that a new agent starts at 50%.
    List {
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Register an agent (as its heartbeat would) and declare its queue.
    Register(AgentSpec),
    /// Remove an agent that is gone for good, unless tasks are in flight on it.
    ///
    /// Removes its row (audited as `agent.removed`), and its queues if nothing consumes them and
    /// no message waits in them. Refused (exit 2) while it has tasks in flight. An agent still
    /// running registers again with its next heartbeat: stop it first.
    Remove {
        /// The agent to remove.
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

/// What an agent's last heartbeat says of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::Display, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Health {
    /// It heartbeats as often as it said it would.
    Online,
    /// It missed a beat: it may have stopped, but routing still counts on it until the TTL.
    Silent,
    /// Its last heartbeat is older than the routing TTL: routing sends it nothing.
    Offline,
}

impl Health {
    /// The health of an agent whose last heartbeat is `age` old (negative for a heartbeat from a
    /// clock ahead of ours), which said it heartbeats every `every_secs`, under a routing TTL of
    /// `ttl_secs`: offline exactly when routing finds its heartbeat stale.
    pub fn of(age: TimeDelta, every_secs: Option<u32>, ttl_secs: u64) -> Health {
        let ttl =
            TimeDelta::try_seconds(i64::try_from(ttl_secs).unwrap_or(i64::MAX)).unwrap_or(TimeDelta::MAX);
        if age > ttl {
            return Health::Offline;
        }
        let missed_a_beat = every_secs.is_some_and(|every| {
            let every = TimeDelta::seconds(i64::from(every));
            age > every + (every / 2).max(TimeDelta::seconds(1))
        });
        if missed_a_beat { Health::Silent } else { Health::Online }
    }
}

async fn list(config: &Config, json: bool) -> Result<Exit> {
    let store = connect_store(config).await?;
    let agents = store.list_agents().await?;
    let ttl = config.routing.heartbeat_ttl_secs;
    let now = Utc::now();
    if json {
        let mut rows = Vec::with_capacity(agents.len());
        for listed in &agents {
            let age = now - listed.agent.last_heartbeat;
            let mut row = serde_json::to_value(listed)?;
            row["health"] = json!(Health::of(age, listed.heartbeat_every_secs, ttl).to_string());
            row["heartbeat_age_secs"] = json!(age.num_seconds().max(0));
            row["routed_success_rate"] = json!(listed.agent.success_rate());
            rows.push(row);
        }
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print::agents(&agents, ttl, now);
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
    // A registration is no heartbeat: it says neither when nor how often the agent beats.
    let heartbeat = Heartbeat { sent_at: None, every_secs: None, ..builder.heartbeat(0) };
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
        print::age(Utc::now() - agent.last_heartbeat)
    );
    // The row is what routing reads: with it gone, nothing is sent to the agent any more. What
    // its queues still hold is left to whoever looks, and a queue in use belongs to a running agent.
    // The agent is removed whatever becomes of its queues: a queue that cannot be looked at or
    // deleted now is said, and left.
    for queue in [broker.names().agent_queue(id), broker.names().agent_control_queue(id)] {
        match broker.delete_queue_if_idle(&queue).await {
            Err(err) => println!("queue {queue} kept: {}", switchyard::error_chain(&err)),
            Ok((_, true)) => println!("queue {queue} deleted"),
            Ok((state, false)) => {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn health(age_millis: i64, every_secs: Option<u32>) -> Health {
        Health::of(TimeDelta::milliseconds(age_millis), every_secs, 30)
    }

    #[test]
    fn an_agent_that_missed_a_beat_is_silent_and_past_the_ttl_offline() {
        // Every 5 s: late by half an interval, it missed a beat.
        assert_eq!(health(0, Some(5)), Health::Online);
        assert_eq!(health(7_500, Some(5)), Health::Online);
        assert_eq!(health(7_501, Some(5)), Health::Silent);
        assert_eq!(health(30_000, Some(5)), Health::Silent);
        // Past the TTL as routing counts it, to the millisecond.
        assert_eq!(health(30_001, Some(5)), Health::Offline);
        // At least a second of slack for short intervals.
        assert_eq!(health(1_900, Some(1)), Health::Online);
        assert_eq!(health(2_001, Some(1)), Health::Silent);
        // An agent that did not say how often it beats is online until the TTL.
        assert_eq!(health(29_000, None), Health::Online);
        assert_eq!(health(31_000, None), Health::Offline);
        // An interval longer than the TTL: offline before it could be silent.
        assert_eq!(health(40_000, Some(60)), Health::Offline);
        // A clock ahead of ours.
        assert_eq!(health(-120_000, Some(5)), Health::Online);
    }

    #[test]
    fn a_huge_ttl_never_makes_an_agent_offline() {
        assert_eq!(Health::of(TimeDelta::days(3650), None, u64::MAX), Health::Online);
    }
}
