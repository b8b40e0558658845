//! `quota` and `quota set`: the external-AI providers' limits, what is spent and reserved in the
//! current window, and setting a limit by hand.

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::{Args, Subcommand};
use switchyard::config::Config;

use crate::{Exit, connect_store, print};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct QuotaArgs {
    #[command(subcommand)]
    command: Option<QuotaCommand>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum QuotaCommand {
    /// Set a provider's limit per window. It holds until set again, or until a worker starts with
    /// a configured limit (`quota_micros`) other than the one last configured.
    Set {
        /// The provider, as named in the configuration.
        provider: String,
        /// The new limit in micros (millionths of the currency unit), a whole number; `_` may
        /// separate digits: 12_500_000 is 12.50.
        #[arg(value_parser = parse_micros)]
        limit: i64,
        /// Who sets it (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
        /// Print the provider's quota as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// A limit in micros: a whole, non-negative number, digits optionally separated by `_`.
fn parse_micros(s: &str) -> Result<i64, String> {
    let digits = s.replace('_', "");
    if digits.contains('.') || digits.contains(',') {
        return Err(format!(
            "limits are whole numbers of micros (millionths of the currency unit): 12.50 is 12_500_000, got {s:?}"
        ));
    }
    match digits.parse::<i64>() {
        Ok(micros) if micros >= 0 => Ok(micros),
        Ok(_) => Err(format!("a limit cannot be negative, got {s:?}")),
        Err(e) => Err(format!("expected a whole number of micros, got {s:?}: {e}")),
    }
}

pub async fn run(config: &Config, args: QuotaArgs) -> Result<Exit> {
    match args {
        QuotaArgs { command: None, json } => show(config, json).await,
        QuotaArgs { command: Some(QuotaCommand::Set { provider, limit, by, json }), .. } => {
            set(config, &provider, limit, &by, json).await
        }
    }
}

async fn show(config: &Config, json: bool) -> Result<Exit> {
    let store = connect_store(config).await?;
    let quotas = store.quota_report(Utc::now()).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&quotas)?);
    } else {
        print::quotas(&quotas);
    }
    Ok(Exit::Success)
}

async fn set(config: &Config, provider: &str, limit: i64, by: &str, json: bool) -> Result<Exit> {
    let store = connect_store(config).await?;
    if !store.set_quota_limit(provider, limit, by).await? {
        let known: Vec<String> =
            store.quota_report(Utc::now()).await?.into_iter().map(|q| q.provider).collect();
        if known.is_empty() {
            bail!(
                "no provider {provider:?}: no provider has a quota yet (configure \
                 [[fallback.providers]] and start a worker, or run `switchyard migrate`)"
            );
        }
        bail!("no provider {provider:?}; known providers: {}", known.join(", "));
    }
    let quota = store
        .quota_report(Utc::now())
        .await?
        .into_iter()
        .find(|q| q.provider == provider)
        .with_context(|| format!("the quota of {provider}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&quota)?);
    } else {
        println!(
            "quota of {provider} set to {} ({limit} micros) per {} window by {by}; {} remain until {}",
            print::units(limit),
            quota.window,
            print::units(quota.remaining_micros),
            quota.window_end.format("%Y-%m-%d %H:%M UTC")
        );
    }
    Ok(Exit::Success)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn limits_are_whole_micros() {
        assert_eq!(parse_micros("12500000"), Ok(12_500_000));
        assert_eq!(parse_micros("12_500_000"), Ok(12_500_000));
        assert_eq!(parse_micros("0"), Ok(0));
        let decimal = parse_micros("12.50").unwrap_err();
        assert!(decimal.contains("12.50 is 12_500_000"), "{decimal}");
        assert!(parse_micros("-1").unwrap_err().contains("negative"));
        assert!(parse_micros("lots").unwrap_err().contains("whole number"));
        assert!(parse_micros("99999999999999999999").is_err());
    }

    #[test]
    fn quota_parses_with_and_without_set() {
        let cli = Cli::try_parse_from(["switchyard", "quota", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Quota(QuotaArgs { command: None, json: true })));
        let cli =
            Cli::try_parse_from(["switchyard", "quota", "set", "bigmodel", "5_000", "--by", "ops"]).unwrap();
        match cli.command {
            Command::Quota(QuotaArgs {
                command: Some(QuotaCommand::Set { provider, limit, by, json }),
                ..
            }) => {
                assert_eq!((provider.as_str(), limit, by.as_str(), json), ("bigmodel", 5_000, "ops", false));
            }
            _ => panic!("not quota set"),
        }
        assert!(Cli::try_parse_from(["switchyard", "quota", "set", "bigmodel", "1.5"]).is_err());
    }
}
