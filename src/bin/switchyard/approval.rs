//! `approve` and `reject`: a person's answer to a plan that awaits approval.

use anyhow::Result;
use switchyard::config::Config;
use switchyard::model::ids::PlanId;
use switchyard::ops;

use crate::{Exit, connect_broker, connect_store};

pub async fn approve(config: &Config, plan_id: PlanId, by: &str) -> Result<Exit> {
    let store = connect_store(config).await?;
    let broker = connect_broker(config).await?;
    let outcome = ops::approve(&store, &broker, plan_id, by).await?;
    if outcome.already {
        println!("plan {plan_id} was already approved; routing re-requested");
    } else {
        println!("plan {plan_id} approved by {by}");
    }
    broker.close().await;
    Ok(Exit::Success)
}

pub async fn reject(config: &Config, plan_id: PlanId, reason: &str, by: &str) -> Result<Exit> {
    let store = connect_store(config).await?;
    let outcome = ops::reject(&store, plan_id, by, reason).await?;
    if outcome.already {
        println!("plan {plan_id} was already rejected");
    } else {
        println!("plan {plan_id} rejected by {by}: {reason}");
    }
    Ok(Exit::Success)
}
