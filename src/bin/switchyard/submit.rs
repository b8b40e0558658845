//! `submit`: sends a request and prints its id, then with `--wait` follows it (see `follow`).

use anyhow::{Result, anyhow, bail};
use clap::Args;
use serde_json::json;
use switchyard::config::Config;
use switchyard::model::ids::RequestId;
use switchyard::model::wire::{self, SubmitRequest};
use switchyard::ops;
use switchyard::pipeline::stages::reused_id;
use switchyard::store::Store;

use crate::{Exit, connect_broker, connect_store, follow};

#[derive(Args)]
pub struct SubmitArgs {
    /// The request, in plain language.
    text: String,
    /// Ask for approval without a person (if the configuration allows it).
    #[arg(long)]
    auto_approve: bool,
    /// Follow the request to its end: exit 0 when it completed, 1 when it failed, was rejected or
    /// cancelled, 3 when --timeout passed first or nothing runs its tasks.
    #[arg(long)]
    wait: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// 0 (lowest) to 9.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
    priority: Option<u8>,
    /// Idempotency key; a fresh one by default.
    #[arg(long)]
    request_id: Option<RequestId>,
    /// Who submits (recorded with the request).
    #[arg(long, env = "USER")]
    by: Option<String>,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

pub async fn submit(config: &Config, args: SubmitArgs) -> Result<Exit> {
    let request = SubmitRequest {
        text: args.text,
        request_id: args.request_id,
        submitted_by: args.by,
        priority: args.priority,
        auto_approve: args.auto_approve.then_some(true),
    };
    // The entry contract, as the decompose stage checks it: what it would refuse is not sent.
    let body = serde_json::to_vec(&request)?;
    let submission = wire::parse_submission(&body, config.worker.max_payload_bytes, None)
        .map_err(|err| anyhow!("the request is not valid: {err}"))?;
    // Said before sending when the database can say it; a client that may publish requests but
    // not read the database (the least-privilege `switchyard-submit`) learns it from the dead
    // letter, as any client would.
    if let Some(request_id) = args.request_id
        && let Ok(store) = Store::connect(&config.database_url, 1).await
        && let Ok(Some(recorded)) = store.request_text(request_id).await
        && recorded != submission.request.text
    {
        bail!("{}; nothing was sent", reused_id(request_id, &recorded));
    }
    let broker = connect_broker(config).await?;
    let request_id = ops::submit(&broker, request).await?;
    if !args.wait {
        broker.close().await;
        if args.json {
            println!("{}", json!({ "request_id": request_id }));
        } else {
            println!("{request_id}");
        }
        return Ok(Exit::Success);
    }
    if !args.json {
        println!("{request_id}");
    }
    let store = connect_store(config).await?;
    let exit = follow::follow(&store, &broker, request_id, args.timeout, args.json).await;
    broker.close().await;
    exit
}
