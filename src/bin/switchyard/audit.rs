//! `audit`: checks that a request's trail is complete and consistent, and answers with the exit
//! code.

use anyhow::{Result, bail};
use switchyard::config::Config;
use switchyard::decisions::audit;
use switchyard::model::ids::RequestId;
use switchyard::store::Lookup;

use crate::{Exit, connect_store};

pub async fn audit(config: &Config, request_id: RequestId) -> Result<Exit> {
    let store = connect_store(config).await?;
    let (outcome, findings) = match store.trail(request_id).await? {
        Some(trail) => (audit::outcome(&trail), audit::check(&trail)),
        None => match store.lookup(request_id).await? {
            Some(Lookup::Refused(refusal)) => audit::refused(&refusal),
            _ => bail!("no request {request_id}"),
        },
    };
    if findings.is_empty() {
        println!("audit of {request_id}: complete; the request {outcome}");
    } else {
        println!("audit of {request_id}: incomplete; the request {outcome}");
        for finding in &findings {
            println!("  - {finding}");
        }
        return Ok(Exit::No);
    }
    Ok(Exit::Success)
}
