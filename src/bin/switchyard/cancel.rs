//! `cancel`: stops a request, and says which of its running tasks its agents were told to stop.

use anyhow::Result;
use switchyard::config::Config;
use switchyard::model::ids::RequestId;
use switchyard::ops;

use crate::{Exit, connect_broker, connect_store};

pub async fn cancel(config: &Config, request_id: RequestId, reason: &str, by: &str) -> Result<Exit> {
    let store = connect_store(config).await?;
    let broker = connect_broker(config).await?;
    let cancelled = ops::cancel(&store, &broker, request_id, by, reason).await;
    broker.close().await;
    let cancelled = match cancelled {
        Ok(cancelled) => cancelled,
        Err(ops::Error::Store(switchyard::store::Error::Refused(why))) => {
            println!("{why}");
            return Ok(Exit::No);
        }
        Err(err) => return Err(err.into()),
    };
    if cancelled.already {
        println!("request {request_id} was cancelled already");
    } else {
        println!("request {request_id} cancelled by {by}: {reason}");
    }
    for stop in &cancelled.stopped {
        let told = if cancelled.unreachable.contains(&stop.agent_id) {
            "cannot be told (no control queue): it runs to its end and its result is ignored"
        } else {
            "told to stop it"
        };
        println!("  task {} attempt {} on {}: {told}", stop.key, stop.attempt, stop.agent_id);
    }
    Ok(Exit::Success)
}
