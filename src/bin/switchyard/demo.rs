//! `demo`: the quick start, the whole pipeline and a simulated agent in one process, run on one
//! request in a namespace and database of its own.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use switchyard::agent::{AgentBuilder, Simulate};
use switchyard::broker::Broker;
use switchyard::config::Config;
use switchyard::decisions::audit;
use switchyard::model::domain::Resources;
use switchyard::model::ids::{AgentId, RequestId};
use switchyard::model::wire::SubmitRequest;
use switchyard::ops;
use switchyard::pipeline::worker::{self, StageName, Worker};
use switchyard::store::Store;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Exit, connect_broker, follow, print};

/// The quick start: every stage and one simulated agent in this process, one request followed
/// to completion, then its status and its audit. Uses the namespace `switchyard-demo` and a
/// database of its own (`<database>_demo`), started afresh, so it never mixes with real work.
pub async fn demo(mut config: Config, text: String) -> Result<Exit> {
    let agent_id: AgentId = "homelab-1".parse()?;
    let (store, broker) = start_afresh(&mut config, &agent_id).await?;

    let shutdown = CancellationToken::new();
    let worker = Worker::new(config.clone(), store.clone())?;
    let stages = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { worker.run(StageName::all(), shutdown).await }
    });
    let agent_run = start_agent(&store, &broker, &agent_id, &shutdown).await?;

    let request = SubmitRequest {
        text,
        request_id: None,
        submitted_by: Some("demo".into()),
        priority: None,
        auto_approve: Some(true),
    };
    let request_id = ops::submit(&broker, request).await?;
    println!("request {request_id} submitted");
    let code = follow::follow(&store, &broker, request_id, 120, false).await?;
    shutdown.cancel();
    agent_run.await??;
    stages.await??;
    if let Some(report) = store.report(request_id).await? {
        println!();
        print::report(&report, &Default::default());
    }
    if !audited(&store, request_id).await? {
        return Ok(Exit::No);
    }
    broker.close().await;
    Ok(code)
}

/// Points `config` at the demo's namespace and database, and empties both: the database and the
/// queues of the last run, the agent's among them, are deleted before they are made again.
async fn start_afresh(config: &mut Config, agent_id: &AgentId) -> Result<(Store, Arc<Broker>)> {
    config.namespace = "switchyard-demo".parse()?;
    let database =
        switchyard::store::database_name(&config.database_url).unwrap_or_else(|| "switchyard".into());
    config.database_url = switchyard::store::with_database(&config.database_url, &format!("{database}_demo"));
    println!("namespace {}, database {database}_demo (both started afresh)", config.namespace);
    // A fresh start each time, so that the demo is repeatable: the last run's tasks are gone.
    switchyard::store::admin::drop_database(&config.database_url, &format!("{database}_demo")).await?;
    let store = worker::prepare_store(config).await?;
    let broker = Arc::new(connect_broker(config).await?);
    let topology =
        switchyard::pipeline::topology::Topology::of_namespace(&config.namespace, &config.topology);
    let mut queues: Vec<String> = topology.queues.iter().map(|q| q.name.clone()).collect();
    queues.push(broker.names().agent_queue(agent_id));
    queues.push(broker.names().agent_control_queue(agent_id));
    broker.delete_queues(&queues).await?;
    broker.declare(&topology).await?;
    Ok((store, broker))
}

/// Runs the demo's agent until `shutdown`, and returns once it has registered.
async fn start_agent(
    store: &Store,
    broker: &Arc<Broker>,
    agent_id: &AgentId,
    shutdown: &CancellationToken,
) -> Result<JoinHandle<Result<(), switchyard::agent::Error>>> {
    // A simulated agent that takes a hundredth of each task's estimated time.
    let agent = AgentBuilder::new(agent_id.clone())
        .capabilities(["deployment", "monitoring", "shell", "docker"])
        .capacity(4)
        .label("target", "homelab")
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500))
        .build(Simulate::new(0.005, 0.0)?)?;
    let agent_run = tokio::spawn(agent.run(broker.clone(), shutdown.clone()));
    // Its first heartbeat registers it; the request is routed only to a registered agent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !store.agents().await?.iter().any(|a| &a.id == agent_id) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the demo agent did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("agent {agent_id} running (simulated), queue {}", broker.names().agent_queue(agent_id));
    Ok(agent_run)
}

/// Prints the audit of the request's trail; whether it is complete.
async fn audited(store: &Store, request_id: RequestId) -> Result<bool> {
    let trail = store.trail(request_id).await?.context("the request's trail")?;
    let findings = audit::check(&trail);
    println!();
    if findings.is_empty() {
        println!("audit: complete; the request {}", audit::outcome(&trail));
        Ok(true)
    } else {
        println!("audit: incomplete: {}", findings.join("; "));
        Ok(false)
    }
}
