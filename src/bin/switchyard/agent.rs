//! `agent`: runs an agent process, with the executor its arguments choose (simulate, exec or
//! llm), and connects again whenever the broker goes away. [`AgentSpec`] is shared with
//! `agents register`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use switchyard::agent::{AgentBuilder, Exec, ExecCommand, ExecConfig, Executor, Llm, Simulate};
use switchyard::backoff::Pauses;
use switchyard::config::Config;
use switchyard::llm;
use switchyard::model::domain::Resources;
use switchyard::model::ids::{AgentId, WorkType};
use tokio_util::sync::CancellationToken;

use crate::signals::stop_on_signals;
use crate::{Exit, connect_broker_once};

/// Who an agent is and what it offers: the same for `agent` and `agents register`, checked by
/// [`AgentBuilder::check`] for both.
#[derive(Args)]
pub struct AgentSpec {
    /// The agent's id; its queue is `<namespace>.agent.<id>`.
    #[arg(long)]
    id: AgentId,
    /// What it can do (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', required = true)]
    capabilities: Vec<String>,
    /// Tasks run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=65535))]
    capacity: u32,
    /// key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// CPUs it offers [default: this machine's].
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory it offers, in MiB [default: this machine's].
    #[arg(long)]
    memory_mb: Option<u64>,
    /// GPUs it offers [default: the NVIDIA GPUs this machine shows, else 0].
    #[arg(long)]
    gpu: Option<u32>,
}

impl AgentSpec {
    /// The agent's settings, checked.
    pub fn builder(self) -> Result<AgentBuilder> {
        let AgentSpec { id, capabilities, capacity, labels, cpu, memory_mb, gpu } = self;
        let host = switchyard::agent::host::resources();
        let resources = Resources {
            cpu: cpu.unwrap_or(host.cpu),
            memory_mb: memory_mb.unwrap_or(host.memory_mb),
            gpu: gpu.unwrap_or(host.gpu),
        };
        let builder = AgentBuilder::new(id)
            .capabilities(capabilities)
            .capacity(capacity)
            .labels(labels)
            .resources(resources);
        builder.check()?;
        Ok(builder)
    }
}

#[derive(Args)]
pub struct AgentArgs {
    #[command(flatten)]
    spec: AgentSpec,
    /// Serve Prometheus metrics on /metrics, and /healthz and /readyz, at HOST:PORT (a bare port
    /// binds to 127.0.0.1). Over the configuration file's `telemetry.metrics_addr`.
    #[arg(long, env = "SWITCHYARD_METRICS_ADDR", value_name = "HOST:PORT")]
    pub metrics_addr: Option<switchyard::telemetry::MetricsAddr>,
    /// How tasks are run.
    #[arg(long, value_enum, default_value_t = ExecutorKind::Simulate)]
    executor: ExecutorKind,
    /// simulate: factor of each task's estimated duration (0 finishes at once).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// simulate: probability that a task fails, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// exec: the command for a work type, run without a shell: `--command deployment=/usr/bin/deploy
    /// ARG…` (repeatable). Arguments that start with `-` would be read as options: put such
    /// commands in --exec-config.
    #[arg(long = "command", value_name = "WORK_TYPE=PROGRAM [ARGS]", num_args = 1..)]
    commands: Vec<String>,
    /// `commands`, one vector per occurrence of --command (clap's derive flattens them; `main`
    /// fills this from the matches).
    #[arg(skip)]
    pub command_groups: Vec<Vec<String>>,
    /// exec: a TOML file: `timeout_secs = N` and a `[commands]` table of work type =
    /// ["program", "arg", …]. --command adds to it and overrides it.
    #[arg(long)]
    exec_config: Option<PathBuf>,
    /// exec: seconds a command may run before it is killed [default: the file's, else 300].
    /// llm: seconds to wait for each answer of the model [default: 120].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: Option<u64>,
    /// llm: the provider to serve, by its name in the configuration's `[[fallback.providers]]`.
    /// The agent gets the capability `provider:<name>`.
    #[arg(long)]
    provider: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    heartbeat_secs: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ExecutorKind {
    /// Wait the estimated duration times --speed, fail with --failure-rate.
    Simulate,
    /// Run the command configured for the task's work type.
    Exec,
    /// Ask the model of the --provider (an OpenAI-compatible API) to do the task.
    Llm,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

/// The executor that the agent's arguments describe, and the capabilities it adds to the agent's.
fn executor(args: &AgentArgs, config: &Config) -> Result<(Executor, Vec<String>)> {
    let uses_exec = !args.command_groups.is_empty() || args.exec_config.is_some();
    if uses_exec && args.executor != ExecutorKind::Exec {
        bail!("--command and --exec-config need --executor exec");
    }
    if args.provider.is_some() && args.executor != ExecutorKind::Llm {
        bail!("--provider needs --executor llm");
    }
    match args.executor {
        ExecutorKind::Simulate => {
            if args.timeout.is_some() {
                bail!("--timeout needs --executor exec or llm");
            }
            Ok((Simulate::new(args.speed, args.failure_rate)?.into(), Vec::new()))
        }
        ExecutorKind::Llm => {
            let name = args.provider.as_deref().context("--executor llm needs --provider NAME")?;
            let timeout = Duration::from_secs(args.timeout.unwrap_or(120));
            let (endpoint, capability) = llm_endpoint(config, name, timeout)?;
            tracing::info!(provider = name, ?endpoint, %capability, "llm executor");
            let client = llm::Client::new(endpoint).with_context(|| format!("provider {name:?}"))?;
            Ok((Llm::new(client).into(), vec![capability]))
        }
        ExecutorKind::Exec => Ok((exec_executor(args)?.into(), Vec::new())),
    }
}

/// The exec executor: the commands of --exec-config, then those of --command over them.
fn exec_executor(args: &AgentArgs) -> Result<Exec> {
    let config = match &args.exec_config {
        Some(path) => ExecConfig::load(path)?,
        None => ExecConfig::default(),
    };
    let mut exec = Exec::from_config(config)?;
    for argv in &args.command_groups {
        let (work_type, program) = argv[0]
            .split_once('=')
            .with_context(|| format!("--command {:?}: expected WORK_TYPE=PROGRAM", argv[0]))?;
        let work_type: WorkType = work_type.parse().with_context(|| format!("--command {:?}", argv[0]))?;
        let command =
            ExecCommand::from_argv(std::iter::once(program.to_owned()).chain(argv[1..].iter().cloned()))
                .with_context(|| format!("--command {:?}: no program", argv[0]))?;
        exec = exec.command(work_type, command);
    }
    if let Some(secs) = args.timeout {
        exec = exec.with_timeout(Duration::from_secs(secs));
    }
    if exec.commands().is_empty() {
        bail!("--executor exec needs a --command or an --exec-config with commands");
    }
    for (work_type, command) in exec.commands() {
        tracing::info!(%work_type, program = %command.program, args = ?command.args, timeout = ?exec.timeout(), "exec command");
    }
    Ok(exec)
}

/// The endpoint of the configured provider `name`, its API key read from the environment
/// variable its `api_key_env` names, and the capability of agents that serve it.
fn llm_endpoint(config: &Config, name: &str, timeout: Duration) -> Result<(llm::Endpoint, String)> {
    let providers = &config.fallback.providers;
    let Some(provider) = config.fallback.provider(name) else {
        if providers.is_empty() {
            bail!("no provider {name:?}: the configuration has no [[fallback.providers]]");
        }
        let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        bail!("no provider {name:?} in the configuration; its providers are {}", names.join(", "));
    };
    let api_key = match &provider.api_key_env {
        None => None,
        Some(var) => {
            let key = std::env::var_os(var).filter(|value| !value.is_empty()).with_context(|| {
                format!("the API key of provider {name:?} is read from the environment variable {var}, which is not set or empty")
            })?;
            let key = key.into_string().map_err(|_| {
                anyhow::anyhow!(
                    "the environment variable {var} (the API key of provider {name:?}) is not valid UTF-8"
                )
            })?;
            Some(llm::Secret::new(key))
        }
    };
    let endpoint = llm::Endpoint {
        base_url: provider.endpoint.clone(),
        model: provider.model.clone(),
        api_key,
        timeout,
    };
    Ok((endpoint, provider.capability()))
}

/// Runs an agent until a signal; connects again when the connection is lost.
pub async fn run(mut config: Config, args: AgentArgs) -> Result<Exit> {
    config.telemetry.metrics_addr = args.metrics_addr.or(config.telemetry.metrics_addr);
    let (executor, capabilities) = executor(&args, &config)?;
    let agent = args
        .spec
        .builder()?
        .capabilities(capabilities)
        .heartbeat_every(Duration::from_secs(args.heartbeat_secs))
        .build(executor)?;
    let shutdown = CancellationToken::new();
    stop_on_signals(shutdown.clone(), "finishing the running tasks");
    let health = crate::worker::serve_health(&config, shutdown.clone()).await?;
    let agent = agent.reporting_to(health);
    let mut pauses = Pauses::new(Duration::from_secs(30));
    let mut connections = 0u64;
    loop {
        let connected = tokio::select! {
            connected = connect_broker_once(&config) => connected,
            () = shutdown.cancelled() => return Ok(Exit::Success),
        };
        let error = match connected {
            Ok(broker) => {
                connections += 1;
                if connections > 1 {
                    switchyard::telemetry::metrics::metrics().broker_reconnects.inc();
                }
                let broker = Arc::new(broker);
                let started = std::time::Instant::now();
                let ran = agent.clone().run(broker.clone(), shutdown.clone()).await;
                broker.close().await;
                // A session that lasted was a success: the next outage starts from a short pause,
                // not from where the last one left it.
                if started.elapsed() > Duration::from_secs(60) {
                    pauses.reset();
                }
                match ran {
                    Ok(()) => return Ok(Exit::Success),
                    Err(err) => anyhow::Error::new(err),
                }
            }
            // Waiting will not mend a bad URL or a refused password.
            Err(err)
                if err.downcast_ref::<switchyard::broker::Error>().is_some_and(|e| !e.is_transient()) =>
            {
                return Err(err);
            }
            Err(err) => err,
        };
        let pause = pauses.next_pause();
        let error = switchyard::error_chain(error.as_ref());
        tracing::error!(%error, ?pause, "not connected to the broker; trying again");
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = shutdown.cancelled() => return Ok(Exit::Success),
        }
    }
}
