//! The `switchyard` command line. Parses arguments, calls the library, prints; errors are shown
//! with their whole cause chain. The exit code tells a script how it went: see [`Exit`].

mod agent;
mod bench;
mod demo;
mod follow;
mod print;
mod schemas;
mod signals;
mod worker;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use chrono::Utc;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use switchyard::broker::{Broker, redact};
use switchyard::config::Config;
use switchyard::decisions::audit;
use switchyard::model::ids::{PlanId, RequestId};
use switchyard::model::wire::{Heartbeat, SubmitRequest};
use switchyard::ops;
use switchyard::pipeline::topology::Names;
use switchyard::store::{Lookup, Store};

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
    Submit(SubmitArgs),
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
    Agents(AgentsCommand),
    /// External-AI quotas: each provider's limit, reserved, spent and remaining in its current
    /// window (daily or monthly, UTC), and when that window ends. Figures are in micros
    /// (millionths of the currency unit).
    Quota(QuotaArgs),
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

#[derive(Args)]
struct SubmitArgs {
    /// The request, in plain language.
    text: String,
    /// Ask for approval without a person (if the configuration allows it).
    #[arg(long)]
    auto_approve: bool,
    /// Follow the request until its released tasks are dispatched, it fails, or --timeout passes.
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
    #[arg(long, env = "USER")]
    by: Option<String>,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct QuotaArgs {
    #[command(subcommand)]
    command: Option<QuotaCommand>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum QuotaCommand {
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

#[derive(Subcommand)]
enum AgentsCommand {
    /// Every agent with its health, load and track record.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Register an agent (as its heartbeat would) and declare its queue.
    Register(agent::AgentSpec),
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
        Command::Migrate => {
            switchyard::pipeline::worker::prepare_store(&config).await?;
            println!("database migrated");
        }
        Command::Topology => {
            let broker = connect_broker(&config).await?;
            let topology = broker.declare_topology().await?;
            for queue in &topology.queues {
                println!("{}", queue.name);
            }
            broker.close().await;
        }
        Command::Worker { stage } => return worker::run(config, &stage).await,
        Command::Agent(args) => return agent::run(config, args).await,
        Command::Submit(args) => return submit(&config, args).await,
        Command::Approve { plan_id, by } => {
            let store = connect_store(&config).await?;
            let broker = connect_broker(&config).await?;
            let outcome = ops::approve(&store, &broker, plan_id, &by).await?;
            if outcome.already {
                println!("plan {plan_id} was already approved; routing re-requested");
            } else {
                println!("plan {plan_id} approved by {by}");
            }
            broker.close().await;
        }
        Command::Reject { plan_id, reason, by } => {
            let store = connect_store(&config).await?;
            let outcome = ops::reject(&store, plan_id, &by, &reason).await?;
            if outcome.already {
                println!("plan {plan_id} was already rejected");
            } else {
                println!("plan {plan_id} rejected by {by}: {reason}");
            }
        }
        Command::Cancel { request_id, reason, by } => {
            let store = connect_store(&config).await?;
            let broker = connect_broker(&config).await?;
            let cancelled = ops::cancel(&store, &broker, request_id, &by, &reason).await;
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
        }
        Command::Status { request_id, json } => {
            let store = connect_store(&config).await?;
            let report = match store.lookup(request_id).await? {
                None => bail!("no request {request_id}"),
                Some(Lookup::Request(report)) => *report,
                Some(Lookup::Refused(dead)) => {
                    if json {
                        let refused =
                            json!({ "request_id": request_id, "status": "refused", "dead_letters": dead });
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
        }
        Command::Audit { request_id } => {
            let store = connect_store(&config).await?;
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
        }
        Command::Agents(AgentsCommand::List { json }) => {
            let store = connect_store(&config).await?;
            let agents = store.agents().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&agents)?);
            } else {
                print::agents(&agents, config.routing.heartbeat_ttl_secs);
            }
        }
        Command::Agents(AgentsCommand::Register(spec)) => {
            let builder = spec.builder()?;
            let store = connect_store(&config).await?;
            let broker = connect_broker(&config).await?;
            let id = builder.id();
            let queue = broker.declare_agent_queue(id).await?;
            broker.declare_queue(&broker.names().agent_control_queue(id)).await?;
            let heartbeat = Heartbeat { sent_at: None, ..builder.heartbeat(0) };
            store.register_agent("cli", heartbeat).await?;
            println!("agent {id} registered; its queue is {queue}");
            broker.close().await;
        }
        Command::Quota(QuotaArgs { command: None, json }) => {
            let store = connect_store(&config).await?;
            let quotas = store.quota_report(Utc::now()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&quotas)?);
            } else {
                print::quotas(&quotas);
            }
        }
        Command::Quota(QuotaArgs {
            command: Some(QuotaCommand::Set { provider, limit, by, json }), ..
        }) => {
            let store = connect_store(&config).await?;
            if !store.set_quota_limit(&provider, limit, &by).await? {
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
                    "quota of {provider} set to {limit} micros per {} window by {by}; {} micros remain until {}",
                    quota.window,
                    quota.remaining_micros,
                    quota.window_end.format("%Y-%m-%d %H:%M UTC")
                );
            }
        }
        Command::Schemas { write, check } => return schemas::schemas(write, check),
        Command::Demo { text } => return demo::demo(config, text).await,
        Command::Bench(args) => return bench::bench(config, args).await,
    }
    Ok(Exit::Success)
}

async fn submit(config: &Config, args: SubmitArgs) -> Result<Exit> {
    let broker = connect_broker(config).await?;
    let request = SubmitRequest {
        text: args.text,
        request_id: args.request_id,
        submitted_by: args.by,
        priority: args.priority,
        auto_approve: args.auto_approve.then_some(true),
    };
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

#[cfg(test)]
mod tests {
    use super::*;

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
