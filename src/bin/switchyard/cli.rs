//! The command line's arguments: the top-level options and the list of subcommands, whose help
//! text is the doc comments below. Arguments that belong to one subcommand live in its file.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switchyard::model::ids::RequestId;

use crate::agent::AgentArgs;
use crate::agents::AgentsCommand;
use crate::bench::BenchArgs;
use crate::list::ListArgs;
use crate::probe::ProbeArgs;
use crate::quota::QuotaArgs;
use crate::setup::TopologyArgs;
use crate::submit::SubmitArgs;
use crate::why::WhyArgs;
use crate::worker::stage_names;

/// Switchyard: decomposes plain-language requests, plans them as DAGs of tasks, routes every task
/// to the best agent and dispatches it, with every decision audited in PostgreSQL.
#[derive(Parser)]
#[command(version, about, after_help = ENVIRONMENT)]
pub struct Cli {
    /// TOML configuration file (see README.md); environment variables override it.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Seconds a command tries to reach the broker and the database before it gives up; a refused
    /// password or an unknown host fails at once. `worker` and `agent` wait for them instead.
    #[arg(long, global = true, default_value_t = 5.0, value_name = "SECONDS", value_parser = connect_timeout)]
    pub connect_timeout: f64,
    /// How logs are written to standard error: `text` for people, `json` (one object per line)
    /// for a log collector. Over the configuration file's `telemetry.log_format`.
    #[arg(long, global = true, env = "SWITCHYARD_LOG_FORMAT", value_name = "FORMAT")]
    pub log_format: Option<switchyard::telemetry::LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

/// What the top-level help says of the environment.
const ENVIRONMENT: &str = "\
Environment (over the configuration file):
  AMQP_URL              the broker [default: amqp://guest:guest@127.0.0.1:5672/%2f]
  DATABASE_URL          the database [default: postgres://postgres@127.0.0.1:5432/switchyard]
  SWITCHYARD_NAMESPACE  the prefix of every queue and exchange [default: switchyard]
  SWITCHYARD_CONFIG     the configuration file (as --config)
  SWITCHYARD_LOG_FORMAT text or json (as --log-format)
  SWITCHYARD_METRICS_ADDR  where `worker` and `agent` serve metrics and health (as --metrics-addr)
  OTEL_EXPORTER_OTLP_ENDPOINT  export traces over OTLP/HTTP there; none when unset
  RUST_LOG              what is logged, to standard error (as `warn`, `info,switchyard=debug`)
  NO_COLOR              set (not empty): no colour in logs, even on a terminal

See README.md for the configuration file and every command.";

#[derive(Subcommand)]
pub enum Command {
    /// Create the database if needed and apply the migrations.
    Migrate,
    /// Declare the namespace's exchanges and queues on the broker, or print them as RabbitMQ
    /// definitions.
    Topology(TopologyArgs),
    /// Run pipeline stages until interrupted.
    Worker {
        /// Stages to run (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "all", value_parser = stage_names())]
        stage: Vec<String>,
        /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at HOST:PORT (a bare
        /// port binds to 127.0.0.1). Over the configuration file's `telemetry.metrics_addr`.
        #[arg(long, env = "SWITCHYARD_METRICS_ADDR", value_name = "HOST:PORT")]
        metrics_addr: Option<switchyard::telemetry::MetricsAddr>,
    },
    /// Submit a request and print its id.
    Submit(SubmitArgs),
    /// Approve a plan that awaits approval: it is routed at once.
    Approve {
        /// The plan's id, or its request's.
        #[arg(value_name = "PLAN_OR_REQUEST_ID")]
        id: uuid::Uuid,
        /// Who approves (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
    },
    /// Reject a plan that awaits approval: nothing of it runs, and its quota goes back.
    Reject {
        /// The plan's id, or its request's.
        #[arg(value_name = "PLAN_OR_REQUEST_ID")]
        id: uuid::Uuid,
        /// Why (recorded in the audit log and shown by `status`).
        #[arg(long)]
        reason: String,
        /// Who rejects (recorded in the audit log).
        #[arg(long, env = "USER", default_value = "cli")]
        by: String,
    },
    /// Cancel a request: what it had not started never runs, and the tasks its agents run are
    /// stopped there. Safe to repeat; a request that already ended is left as it is (exit 1).
    Cancel {
        /// The request to cancel.
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
        /// The request to show.
        request_id: RequestId,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The requests, newest first: status, age, tasks done of all, and why in a few words.
    List(ListArgs),
    /// Check that a request's trail is complete and consistent; exit 0 only if it is.
    Audit {
        /// The request to check.
        request_id: RequestId,
    },
    /// Why a task went where it went: per attempt, every candidate agent's verdict (why it was
    /// rejected, or its score term by term), the winner and why it won; for a waiting task, why
    /// no agent fits now. `--rescore` adds each decision made again against today's fleet.
    Why(WhyArgs),
    /// Agents: list them, register one, or remove one that is gone for good.
    #[command(subcommand)]
    Agents(AgentsCommand),
    /// External-AI quotas: each provider's limit, reserved, spent and remaining in its current
    /// window (daily or monthly, UTC), and when that window ends. Figures are in micros
    /// (millionths of the currency unit).
    Quota(QuotaArgs),
    /// Run an agent: heartbeat, take tasks from its queue, run them, report their results. Needs
    /// the broker only (AMQP_URL), no database. Runs until interrupted.
    Agent(AgentArgs),
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
    Bench(BenchArgs),
    /// Ask a worker or an agent served with --metrics-addr whether it is alive, or ready: exit 0
    /// if so, 1 if not, 2 if it cannot be reached.
    Probe(ProbeArgs),
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

/// A connect timeout: a positive number of seconds, at most an hour.
fn connect_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs <= 3600.0 => Ok(secs),
        _ => Err(format!("{text:?} is not a number of seconds between 0 and 3600")),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every command, option and argument a user can type says what it is for.
    #[test]
    fn everything_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            let path = format!("{path} {}", command.get_name());
            if command.get_about().is_none() {
                missing.push(path.clone());
            }
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if !matches!(id, "help" | "version")
                    && arg.get_help().is_none()
                    && arg.get_long_help().is_none()
                {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &path, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    #[test]
    fn the_top_level_help_names_the_environment_and_its_defaults() {
        let help = Cli::command().render_long_help().to_string();
        for shown in [
            "AMQP_URL",
            "DATABASE_URL",
            "SWITCHYARD_NAMESPACE",
            "NO_COLOR",
            switchyard::config::DEFAULT_AMQP_URL,
            switchyard::config::DEFAULT_DATABASE_URL,
        ] {
            assert!(help.contains(shown), "{shown} is not in the help:\n{help}");
        }
        let namespace = switchyard::config::Config::default().namespace;
        assert!(help.contains(&format!("[default: {namespace}]")), "{help}");
    }
}
