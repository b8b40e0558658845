//! `worker`: runs the pipeline stages until a signal.

use anyhow::Result;
use clap::builder::PossibleValuesParser;
use switchyard::config::Config;
use switchyard::pipeline::worker::{self, StageName, Worker};
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
    // A worker started while the database restarts waits for it, as it waits for the broker.
    let Some(store) = worker::prepare_store_patiently(&config, &shutdown).await? else {
        return Ok(Exit::Success);
    };
    let worker = Worker::new(config, store)?;
    worker.run(&stages, shutdown).await?;
    Ok(Exit::Success)
}
