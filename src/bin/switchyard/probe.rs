//! `probe`: asks a worker's or an agent's health endpoint whether it is alive (or ready), for a
//! container's health check where no HTTP client is at hand.

use anyhow::{Context, Result};
use switchyard::config::Config;
use switchyard::telemetry::MetricsAddr;
use switchyard::telemetry::health;

use crate::Exit;

#[derive(clap::Args)]
pub struct ProbeArgs {
    /// Where the process serves its health (its --metrics-addr); a bare port is on 127.0.0.1.
    /// By default, the configuration's `telemetry.metrics_addr`.
    #[arg(long, value_name = "HOST:PORT")]
    addr: Option<MetricsAddr>,
    /// Ask whether it is ready (/readyz: broker connected, database reachable, every consumer
    /// running), not only alive (/healthz).
    #[arg(long)]
    ready: bool,
}

/// Exit 0 if the endpoint answers 200; 1 if it answers otherwise (what it said is printed); 2 if
/// it cannot be reached.
pub async fn probe(config: &Config, args: ProbeArgs) -> Result<Exit> {
    let addr = args.addr.or(config.telemetry.metrics_addr).context(
        "no address to probe: give --addr, or telemetry.metrics_addr in the configuration file, \
         or SWITCHYARD_METRICS_ADDR",
    )?;
    let answer = health::probe(addr.socket_addr(), args.ready).await.map_err(anyhow::Error::msg)?;
    if answer.status == 200 {
        println!("{}", answer.body.trim_end());
        Ok(Exit::Success)
    } else {
        let path = if args.ready { "readyz" } else { "healthz" };
        println!("http://{addr}/{path}: {}: {}", answer.status, answer.body.trim_end());
        Ok(Exit::No)
    }
}
