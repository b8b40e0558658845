//! `worker`: runs the pipeline stages until a signal.

use anyhow::{Context, Result};
use clap::builder::PossibleValuesParser;
use switchyard::config::Config;
use switchyard::pipeline::worker::{self, StageName, Worker};
use switchyard::telemetry::health::{self, Health};
use tokio_util::sync::CancellationToken;

use crate::Exit;
use crate::signals::stop_on_signals;

/// `all` and every stage: clap refuses anything else, listing these.
pub fn stage_names() -> PossibleValuesParser {
    let stages = StageName::all().iter().map(|stage| <&'static str>::from(*stage));
    PossibleValuesParser::new(std::iter::once("all").chain(stages))
}

pub async fn run(config: Config, stages: &[String]) -> Result<Exit> {
    let stages: Vec<StageName> = if stages.iter().any(|s| s == "all") {
        StageName::all().to_vec()
    } else {
        // clap lets only stage names through.
        stages.iter().map(|s| s.parse()).collect::<Result<_, _>>()?
    };
    let shutdown = CancellationToken::new();
    stop_on_signals(shutdown.clone(), "finishing the messages in hand");
    // Served from the start: alive while it waits for the database, ready once it consumes.
    let health = serve_health(&config, shutdown.clone()).await?;
    // A worker started while the database restarts waits for it, as it waits for the broker.
    let Some(store) = worker::prepare_store_patiently(&config, &shutdown).await? else {
        return Ok(Exit::Success);
    };
    let broker = switchyard::broker::redact(&config.amqp_url);
    let worker = Worker::new(config, store)?.reporting_to(health);
    worker.run(&stages, shutdown).await.map_err(|err| match err {
        // A refused password, a host that does not resolve: say which broker.
        worker::Error::Broker(err) => {
            anyhow::Error::new(err).context(format!("cannot connect to the broker at {broker}"))
        }
        err => err.into(),
    })?;
    Ok(Exit::Success)
}

/// Serves metrics and health where the configuration says, if it says; the health to report to
/// either way. An address that cannot be bound is an error at startup.
pub async fn serve_health(config: &Config, shutdown: CancellationToken) -> Result<Health> {
    let health = Health::new();
    if let Some(addr) = config.telemetry.metrics_addr {
        health::serve(addr.socket_addr(), health.clone(), shutdown)
            .await
            .with_context(|| format!("cannot serve metrics and health at {addr}"))?;
    }
    Ok(health)
}
