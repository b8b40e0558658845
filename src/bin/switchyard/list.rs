//! `list`: the requests, newest first, each with its status, age, tasks and a short reason.

use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{TimeDelta, Utc};
use clap::Args;
use switchyard::config::Config;
use switchyard::model::domain::RequestStatus;
use switchyard::store::RequestFilter;

use crate::{Exit, connect_store, print};

/// Every status a request can have, in the order it goes through them.
const STATUSES: [RequestStatus; 9] = [
    RequestStatus::Received,
    RequestStatus::Decomposed,
    RequestStatus::Planned,
    RequestStatus::AwaitingApproval,
    RequestStatus::InProgress,
    RequestStatus::Completed,
    RequestStatus::Failed,
    RequestStatus::Rejected,
    RequestStatus::Cancelled,
];

#[derive(Args)]
pub struct ListArgs {
    /// Only requests with this status: received, decomposed, planned, awaiting_approval,
    /// in_progress, completed, failed, rejected or cancelled.
    #[arg(long, value_parser = parse_status)]
    status: Option<RequestStatus>,
    /// Only requests received within this long: a whole number and a unit, s, m, h or d
    /// (90s, 15m, 2h, 3d).
    #[arg(long, value_parser = parse_since)]
    since: Option<Duration>,
    /// At most this many requests (the newest).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    limit: u32,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
}

fn parse_status(s: &str) -> Result<RequestStatus, String> {
    STATUSES.into_iter().find(|status| status.as_str() == s).ok_or_else(|| {
        let names: Vec<&str> = STATUSES.iter().map(|s| s.as_str()).collect();
        format!("no request status {s:?}; a request is one of: {}", names.join(", "))
    })
}

/// A duration as a whole number and a unit: `90s`, `15m`, `2h`, `3d`.
fn parse_since(s: &str) -> Result<Duration, String> {
    let example = "a whole number and a unit, s, m, h or d: 90s, 15m, 2h, 3d";
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "" => return Err(format!("{s:?} has no unit; expected {example}")),
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; expected {example}")),
    };
    let number: u64 = number.parse().map_err(|_| format!("{s:?} is not a duration; expected {example}"))?;
    number
        .checked_mul(unit_secs)
        .filter(|secs| *secs <= 100 * 365 * 86_400)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is more than a hundred years"))
}

pub async fn list(config: &Config, args: ListArgs) -> Result<Exit> {
    let now = Utc::now();
    let since = args
        .since
        .map(|since| TimeDelta::from_std(since).map(|since| now - since))
        .transpose()
        .context("--since is too long")?;
    let filter = RequestFilter { status: args.status, since, limit: args.limit };
    let store = connect_store(config).await?;
    let requests = store.list_requests(&filter).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&requests)?);
    } else {
        print::requests(&requests, now);
    }
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_number_and_a_unit() {
        assert_eq!(parse_since("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_since("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_since("2h"), Ok(Duration::from_secs(7_200)));
        assert_eq!(parse_since("3d"), Ok(Duration::from_secs(259_200)));
        assert_eq!(parse_since("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn since_says_what_is_wrong() {
        assert!(parse_since("15").unwrap_err().contains("has no unit"));
        assert!(parse_since("15w").unwrap_err().contains("unknown unit \"w\""));
        assert!(parse_since("1.5h").unwrap_err().contains("unknown unit \".5h\""));
        assert!(parse_since("h").unwrap_err().contains("is not a duration"));
        assert!(parse_since("-2h").unwrap_err().contains("unknown unit"));
        assert!(parse_since("99999999999999999d").unwrap_err().contains("hundred years"));
    }

    #[test]
    fn status_names_every_status_when_wrong() {
        assert_eq!(parse_status("in_progress"), Ok(RequestStatus::InProgress));
        let err = parse_status("done").unwrap_err();
        assert!(err.contains("received, decomposed"), "{err}");
        assert!(err.contains("cancelled"), "{err}");
        for status in STATUSES {
            assert_eq!(parse_status(status.as_str()), Ok(status));
        }
    }
}
