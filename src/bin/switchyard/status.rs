//! `status`: shows a request, its plan and its tasks, or why it was refused on arrival.

use anyhow::{Result, bail};
use chrono::Utc;
use serde_json::json;
use switchyard::config::Config;
use switchyard::model::ids::RequestId;
use switchyard::ops;
use switchyard::store::Lookup;

use crate::{Exit, connect_store, print};

pub async fn status(config: &Config, request_id: RequestId, json: bool) -> Result<Exit> {
    let store = connect_store(config).await?;
    let report = match store.lookup(request_id).await? {
        None => bail!("no request {request_id}"),
        Some(Lookup::Request(report)) => *report,
        Some(Lookup::Refused(dead)) => {
            if json {
                let refused = json!({ "request_id": request_id, "status": "refused", "dead_letters": dead });
                println!("{}", serde_json::to_string_pretty(&refused)?);
            } else {
                println!("request   {request_id}");
                println!("status    refused on arrival");
                print::dead_letters(dead.dead_letters());
            }
            // Something to show is an answer, whatever the request's fate.
            return Ok(Exit::Success);
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        let waits = ops::waiting_reasons(&store, &report, &config.routing, Utc::now()).await?;
        print::report(&report, &waits);
    }
    Ok(Exit::Success)
}
