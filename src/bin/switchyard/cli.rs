//! The command line's arguments: the top-level options and the list of subcommands, whose help
//! text is the doc comments below. Arguments that belong to one subcommand live in its file.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use switchyard::model::ids::{PlanId, RequestId};

use crate::agent::AgentArgs;
use crate::agents::AgentsCommand;
use crate::bench::BenchArgs;
use crate::list::ListArgs;
use crate::quota::QuotaArgs;
use crate::submit::SubmitArgs;
use crate::worker::stage_names;

/// Switchyard: decomposes plain-language requests, plans them as DAGs of tasks, routes every task
/// to the best agent and dispatches it, with every decision audited in PostgreSQL.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    /// TOML configuration file (see README.md); environment variables override it.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Create the database if needed and apply the migrations.
    Migrate,
    /// Declare the namespace's exchanges and queues on the broker.
    Topology,
    /// Run pipeline stages until interrupted.
    Worker {
        /// Stages to run (repeatable or comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "all", value_parser = stage_names())]
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
    /// The requests, newest first: status, age, tasks done of all, and why in a few words.
    List(ListArgs),
    /// Check that a request's trail is complete and consistent; exit 0 only if it is.
    Audit { request_id: RequestId },
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
