//! The `switchyard` command line. Parses arguments, calls the library, prints; errors are shown
//! with their whole cause chain. The exit code tells a script how it went: see [`Exit`].

mod agent;
mod agents;
mod approval;
mod audit;
mod bench;
mod cancel;
mod demo;
mod follow;
mod print;
mod quota;
mod schemas;
mod setup;
mod signals;
mod status;
mod submit;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use switchyard::broker::{Broker, redact};
use switchyard::config::Config;
use switchyard::model::ids::{PlanId, RequestId};
use switchyard::pipeline::topology::Names;
use switchyard::store::Store;

/// Switchyard: decomposes plain-language requests, plans them as DAGs of tasks, routes every task
/// to the best agent and dispatches it, with every decision audited in PostgreSQL.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see README.md); environment variables override it.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the database if needed and apply the migrations.
    Migrate,
    /// Declare the namespace's exchanges and queues on the broker.
    Topology,
    /// Run pipeline stages until interrupted.
    Worker {
        /// Stages to run (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "all", value_parser = worker::stage_names())]
        stage: Vec<String>,
    },
    /// Submit a request and print its id.
    Submit(submit::SubmitArgs),
    /// Approve a plan that awaits approval.
    Approve {
        plan_id: PlanId,
        /// Who approves (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
    },
    /// Reject a plan that awaits approval.
    Reject {
        plan_id: PlanId,
        #[arg(long)]
        reason: String,
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
    },
    /// Cancel a request: what it had not started never runs, and the tasks its agents run are
    /// stopped there. Safe to repeat; a request that already ended is left as it is (exit 1).
    Cancel {
        request_id: RequestId,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
        /// Who cancels (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
    },
    /// Show a request, its plan and every task with its state, agent and routing reason.
    Status {
        request_id: RequestId,
        #[arg(long)]
        json: bool,
    },
    /// Check that a request's trail is complete and consistent; exit 0 only if it is.
    Audit { request_id: RequestId },
    /// Agents: list them, or register one.
    #[command(subcommand)]
    Agents(agents::AgentsCommand),
    /// External-AI quotas: each provider's limit, reserved, spent and remaining in its current
    /// window (daily or monthly, UTC), and when that window ends. Figures are in micros
    /// (millionths of the currency unit).
    Quota(quota::QuotaArgs),
    /// Run an agent: heartbeat, take tasks from its queue, run them, report their results. Needs
    /// the broker only (AMQP_URL), no database. Runs until interrupted.
    Agent(agent::AgentArgs),
    /// Run the whole pipeline on a sample request, in a namespace and database of its own.
    Demo {
        /// The request to run.
        #[arg(default_value = "Deploy Uptime Kuma to the homelab and send alerts to Discord")]
        text: String,
    },
    /// Measure the whole pipeline against the broker's own ceiling, in a namespace and database
    /// of its own: N auto-approved requests of T tasks, every stage and simulated agents of zero
    /// duration, then the same deliveries through as many hops by plain relays. Ends with one
    /// JSON line holding every figure.
    Bench(bench::BenchArgs),
    /// Print or check the JSON Schemas of the message types.
    Schemas {
        /// Write them into this directory.
        #[arg(long, conflicts_with = "check")]
        write: Option<PathBuf>,
        /// Exit non-zero if the files in this directory differ from the current types.
        #[arg(long)]
        check: Option<PathBuf>,
    },
}

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
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(exit) => exit.into(),
        Err(err) => {
            eprintln!("error: {err:#}");
            Exit::Error.into()
        }
    }
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
        Command::Audit { request_id } => audit::audit(&config, request_id).await,
        Command::Agents(command) => agents::run(&config, command).await,
        Command::Quota(args) => quota::run(&config, args).await,
        Command::Schemas { write, check } => schemas::schemas(write, check),
        Command::Demo { text } => demo::demo(config, text).await,
        Command::Bench(args) => bench::bench(config, args).await,
    }
}
