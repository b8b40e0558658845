//! A Switchyard agent written in Rust: it "runs" each task by shouting its description back.
//!
//! ```sh
//! cargo run --example agent            # AMQP_URL and SWITCHYARD_NAMESPACE as for `switchyard`
//! switchyard submit "Write a script that exports Grafana dashboards" --auto-approve
//! ```
//!
//! The runtime does the messaging (queue, heartbeats, prefetch, results with publisher confirms,
//! acknowledging after the result is confirmed); the handler only says how a task ends.

use std::sync::Arc;
use std::time::Duration;

use switchyard::agent::{AgentBuilder, Execution, TaskHandler};
use switchyard::broker::Broker;
use switchyard::config::Config;
use switchyard::model::domain::Resources;
use switchyard::model::wire::TaskAssignment;
use switchyard::pipeline::topology::Names;
use tokio_util::sync::CancellationToken;

/// Answers every task with its description in capitals; refuses tasks without one.
struct Shout;

impl TaskHandler for Shout {
    async fn run(&self, task: &TaskAssignment) -> Execution {
        let description = task.task.description.trim();
        if description.is_empty() {
            return Execution::failed("nothing to shout");
        }
        // Pretend to work for a moment.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Execution::succeeded(description.to_uppercase())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let config = Config::load(None)?;
    let broker = Arc::new(Broker::connect(&config.amqp_url, Names::new(config.namespace.clone())).await?);
    let agent = AgentBuilder::new("shouter".parse()?)
        .capabilities(["code_generation", "code", "research"])
        .capacity(2)
        .label("language", "caps")
        .resources(Resources { cpu: 2.0, memory_mb: 2048, gpu: 0 })
        .heartbeat_every(Duration::from_secs(5))
        .build(Shout)?;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.cancel();
    });
    agent.run(broker.clone(), shutdown).await?;
    broker.close().await;
    Ok(())
}
