//! `probe`: asks a worker's or an agent's health endpoint whether it is alive (or ready), for a
//! container's health check where no HTTP client is at hand.

use std::time::Duration;

use anyhow::{Context, Result};
use switchyard::config::Config;
use switchyard::telemetry::MetricsAddr;

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
    let path = if args.ready { "readyz" } else { "healthz" };
    let url = format!("http://{addr}/{path}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).build()?;
    let response = client.get(&url).send().await.with_context(|| format!("cannot reach {url}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        println!("{}", body.trim_end());
        Ok(Exit::Success)
    } else {
        println!("{url}: {status}: {}", body.trim_end());
        Ok(Exit::No)
    }
}
