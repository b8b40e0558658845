//! The `switchyard` command line. Parses arguments, calls the library, prints; errors are shown
//! with their whole cause chain. The exit code tells a script how it went: see [`Exit`].

// Every module of the binary prints through these, declared before them so that they shadow the
// standard macros: a reader that closes its end (`switchyard status ID | head -3`) ends the
// command quietly with 0, where the standard macros would panic.
macro_rules! println {
    () => {
        $crate::stdout::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::stdout::write(format_args!($($arg)*))
    };
}

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
mod probe;
mod quota;
mod schemas;
mod setup;
mod signals;
mod status;
mod stdout;
mod submit;
mod why;
mod worker;

use std::process::ExitCode;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Result;
use backon::BackoffBuilder;
use switchyard::backoff;
use switchyard::broker::{self, Broker, redact};
use switchyard::config::Config;
use switchyard::pipeline::topology::Names;
use switchyard::store::{self, Store};
use switchyard::telemetry;

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
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    // The configuration first, so that its log format counts; what is wrong with it is said
    // before logging is set up.
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {}", switchyard::error_chain(&err));
            return Exit::Error.into();
        }
    };
    let format = cli.log_format.unwrap_or(config.telemetry.log_format);
    let telemetry = match telemetry::logs::init(format, default_level, runtime.handle().clone()) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("error: {err}");
            return Exit::Error.into();
        }
    };
    let exit = match runtime.block_on(run(cli, config)) {
        Ok(exit) => exit,
        Err(err) => {
            eprintln!("error: {}", switchyard::error_chain(err.as_ref()));
            Exit::Error
        }
    };
    // While the runtime runs: the exporter sends the last spans on it.
    telemetry.shutdown();
    exit.into()
}

/// How long a command tries to reach the broker and the database (`--connect-timeout`).
static CONNECT_TIMEOUT: OnceLock<Duration> = OnceLock::new();

async fn connect_store(config: &Config) -> Result<Store> {
    let url = &config.database_url;
    within(
        "database",
        url,
        |e: &store::Error| e.is_transient() && !e.is_unknown_host(),
        || Store::connect(url, 4),
    )
    .await
}

async fn connect_broker(config: &Config) -> Result<Broker> {
    let url = &config.amqp_url;
    let names = Names::new(config.namespace.clone());
    within(
        "broker",
        url,
        |e: &broker::Error| e.is_transient() && !e.is_unknown_host(),
        || Broker::connect(url, names.clone()),
    )
    .await
    .map(|broker| broker.with_settings(config.topology.clone()))
}

/// One attempt at the broker, for `agent`, which paces its own attempts and says each.
async fn connect_broker_once(config: &Config) -> Result<Broker> {
    Broker::connect(&config.amqp_url, Names::new(config.namespace.clone()))
        .await
        .map(|broker| broker.with_settings(config.topology.clone()))
        .map_err(|err| {
            anyhow::Error::new(err)
                .context(format!("cannot connect to the broker at {}", redact(&config.amqp_url)))
        })
}

/// Connects with `attempt`, again and again while `transient` says that may help, for at most
/// the connect timeout; then says what it tried. What cannot help (a refused password, a host
/// that does not resolve, a bad URL) fails at once.
async fn within<T, E, F>(
    what: &str,
    url: &str,
    transient: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> F,
) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
    F: Future<Output = Result<T, E>>,
{
    let timeout = *CONNECT_TIMEOUT.get_or_init(|| Duration::from_secs(5));
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pauses =
        backoff::exponential(Duration::from_millis(100), Duration::from_secs(1), usize::MAX).build();
    let mut attempts = 0;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        attempts += 1;
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(err)) if !transient(&err) => {
                return Err(anyhow::Error::new(err)
                    .context(format!("cannot connect to the {what} at {}", redact(url))));
            }
            Ok(Err(err)) => last = Some(err),
            // The time ran out during this attempt; what the earlier ones met is the reason.
            Err(_) => break,
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        tokio::time::sleep(pauses.next().unwrap_or(Duration::from_secs(1)).min(left)).await;
    }
    let gave_up = format!(
        "cannot reach the {what} at {} within {} s ({attempts} {})",
        redact(url),
        timeout.as_secs_f64(),
        if attempts == 1 { "attempt" } else { "attempts" }
    );
    Err(match last {
        Some(err) => anyhow::Error::new(err).context(gave_up),
        None => anyhow::anyhow!(gave_up),
    })
}

/// Runs the subcommand, in the file of its own.
async fn run(cli: Cli, config: Config) -> Result<Exit> {
    CONNECT_TIMEOUT.get_or_init(|| Duration::from_secs_f64(cli.connect_timeout));
    match cli.command {
        Command::Migrate => setup::migrate(&config).await,
        Command::Topology(args) => setup::topology(config, args).await,
        Command::Worker { stage, metrics_addr } => {
            let mut config = config;
            config.telemetry.metrics_addr = metrics_addr.or(config.telemetry.metrics_addr);
            worker::run(config, &stage).await
        }
        Command::Agent(args) => agent::run(config, args).await,
        Command::Submit(args) => submit::submit(&config, args).await,
        Command::Approve { id, by } => approval::approve(&config, id, &by).await,
        Command::Reject { id, reason, by } => approval::reject(&config, id, &reason, &by).await,
        Command::Cancel { request_id, reason, by } => cancel::cancel(&config, request_id, &reason, &by).await,
        Command::Status { request_id, json } => status::status(&config, request_id, json).await,
        Command::List(args) => list::list(&config, args).await,
        Command::Audit { request_id } => audit::audit(&config, request_id).await,
        Command::Why(args) => why::why(&config, args).await,
        Command::Agents(command) => agents::run(&config, command).await,
        Command::Quota(args) => quota::run(&config, args).await,
        Command::Probe(args) => probe::probe(&config, args).await,
        Command::Schemas { write, check } => schemas::schemas(write, check),
        Command::Demo { text } => demo::demo(config, text).await,
        Command::Bench(args) => bench::bench(config, args).await,
    }
}
