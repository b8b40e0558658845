//! `approve` and `reject`: a person's answer to a plan that awaits approval, named by its own id
//! or by its request's.

use anyhow::{Result, bail};
use switchyard::config::Config;
use switchyard::model::ids::{PlanId, RequestId};
use switchyard::ops;
use switchyard::store::Store;
use uuid::Uuid;

use crate::{Exit, connect_broker, connect_store};

/// The plan that `id` names: a plan's own id, or the id of the request whose plan it is (a
/// request has one plan, whose id follows from the request's).
async fn plan_of(store: &Store, id: Uuid) -> Result<PlanId> {
    let as_plan = PlanId::from_uuid(id);
    if store.plan_status(as_plan).await?.is_some() {
        return Ok(as_plan);
    }
    let request = RequestId::from_uuid(id);
    let plan = request.plan_id();
    if store.plan_status(plan).await?.is_some() {
        return Ok(plan);
    }
    match store.request_status(request).await? {
        Some(status) => bail!("request {request} has no plan to decide on yet (it is {status})"),
        None => bail!("no plan {id}, and no request {id}"),
    }
}

pub async fn approve(config: &Config, id: Uuid, by: &str) -> Result<Exit> {
    let store = connect_store(config).await?;
    let plan_id = plan_of(&store, id).await?;
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

pub async fn reject(config: &Config, id: Uuid, reason: &str, by: &str) -> Result<Exit> {
    let store = connect_store(config).await?;
    let plan_id = plan_of(&store, id).await?;
    let outcome = ops::reject(&store, plan_id, by, reason).await?;
    if outcome.already {
        println!("plan {plan_id} was already rejected");
    } else {
        println!("plan {plan_id} rejected by {by}: {reason}");
    }
    Ok(Exit::Success)
}
