//! The `switchyard` command line. Parses arguments, calls the library, prints; errors are shown
//! with their whole cause chain. The exit code tells a script how it went: see [`Exit`].

mod agent;
mod agents;
mod approval;
mod audit;
mod bench;
mod cancel;
mod cli;
mod demo;
mod follow;
mod list;
mod print;
mod quota;
mod schemas;
mod setup;
mod signals;
mod status;
mod submit;
mod worker;

use std::process::ExitCode;

use anyhow::{Context, Result};
use switchyard::broker::{Broker, redact};
use switchyard::config::Config;
use switchyard::pipeline::topology::Names;
use switchyard::store::Store;

use crate::cli::{Cli, Command};

/// How a command ended, as its exit code (README, Commands), so that scripts can tell a "no"
/// from a failure to find out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Done; or the answer is yes.
    Success = 0,
    /// The answer is no: the request failed or was rejected (`--wait`), the audit is incomplete,
    /// the schemas are stale.
    No = 1,
    /// No answer: a service is unreachable, an argument is wrong (clap exits with 2 too), what
    /// was asked about does not exist.
    Error = 2,
    /// `--wait` gave up before the request settled; it goes on.
    Timeout = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Command::Agent(args) = &mut cli.command
        && let Some(occurrences) =
            matches.subcommand_matches("agent").and_then(|m| m.get_occurrences::<String>("commands"))
    {
        args.command_groups = occurrences.map(|values| values.cloned().collect()).collect();
    }
    let default_level =
        if matches!(cli.command, Command::Worker { .. } | Command::Agent(_)) { "info" } else { "warn" };
    log_to_stderr(default_level);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!("error: {err:#}");
            Exit::Error.into()
        }
    }
}

/// Logs to stderr at `default_level`, unless `RUST_LOG` says otherwise.
fn log_to_stderr(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                // lapin logs every returned message with its body; Switchyard reports them itself.
                .unwrap_or_else(|_| {
                    tracing_subscriber::EnvFilter::new(format!(
                        "{default_level},lapin::returned_messages=error"
                    ))
                }),
        )
        .with_writer(std::io::stderr)
        .init();
}

async fn connect_store(config: &Config) -> Result<Store> {
    Store::connect(&config.database_url, 4)
        .await
        .with_context(|| format!("cannot connect to the database at {}", redact(&config.database_url)))
}

async fn connect_broker(config: &Config) -> Result<Broker> {
    Broker::connect(&config.amqp_url, Names::new(config.namespace.clone()))
        .await
        .with_context(|| format!("cannot connect to the broker at {}", redact(&config.amqp_url)))
}

/// Runs the subcommand, in the file of its own.
async fn run(cli: Cli) -> Result<Exit> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Migrate => setup::migrate(&config).await,
        Command::Topology => setup::topology(&config).await,
        Command::Worker { stage } => worker::run(config, &stage).await,
        Command::Agent(args) => agent::run(config, args).await,
        Command::Submit(args) => submit::submit(&config, args).await,
        Command::Approve { plan_id, by } => approval::approve(&config, plan_id, &by).await,
        Command::Reject { plan_id, reason, by } => approval::reject(&config, plan_id, &reason, &by).await,
        Command::Cancel { request_id, reason, by } => cancel::cancel(&config, request_id, &reason, &by).await,
        Command::Status { request_id, json } => status::status(&config, request_id, json).await,
        Command::List(args) => list::list(&config, args).await,
        Command::Audit { request_id } => audit::audit(&config, request_id).await,
        Command::Agents(command) => agents::run(&config, command).await,
        Command::Quota(args) => quota::run(&config, args).await,
        Command::Schemas { write, check } => schemas::schemas(write, check),
        Command::Demo { text } => demo::demo(config, text).await,
        Command::Bench(args) => bench::bench(config, args).await,
    }
}
