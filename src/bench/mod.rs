//! `switchyard bench`: the whole pipeline against the real broker and database, measured against
//! the broker's own ceiling in the same run.
//!
//! A run gets a namespace and a database of its own, and a work type of its own (`bench`, with
//! `T` independent steps), so that it touches nothing else and leaves nothing behind. It starts
//! the stages and simulated agents of zero duration (in this process, or as `switchyard worker`
//! and `switchyard agent` processes), submits `N` auto-approved requests at full speed or at a
//! fixed rate, waits until every one completed, and reads the timings from the database. Then it
//! relays the same number of deliveries through the same number of hops with plain consumers
//! ([`ceiling`]), and reports the ratio of the two delivery rates.

pub mod ceiling;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentBuilder, Simulate};
use crate::broker::{self, Broker};
use crate::config::Config;
use crate::model::domain::Resources;
use crate::model::ids::{AgentId, Namespace, RequestId};
use crate::model::wire::SubmitRequest;
use crate::ops;
use crate::pipeline::topology::Names;
use crate::pipeline::worker::{self, StageName, Worker};
use crate::store::{self, Store};

/// The longest chain of deliveries a request goes through: requests → decompose → plan →
/// fallback → route → dispatch → agent → track. The ceiling relays through as many hops.
pub const PIPELINE_HOPS: usize = 7;

/// What to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Requests to submit (N).
    pub requests: usize,
    /// Tasks per request (T), independent of each other: one wave.
    pub tasks: usize,
    /// Simulated agents.
    pub agents: usize,
    /// Tasks each agent runs at once.
    pub agent_capacity: u32,
    /// How long each task takes its agent, in milliseconds; 0: no time at all. A fleet whose
    /// slots cannot keep up with the load makes the run fleet-bound: tasks wait in line, and
    /// the report says how busy the slots were and how long tasks waited.
    pub task_ms: u64,
    /// Requests per second; `None`: as fast as the broker confirms them.
    pub rate: Option<f64>,
    /// Run the stages and agents as processes of this executable (`switchyard`); `None`: in
    /// this process.
    pub processes: Option<Processes>,
    /// Give up waiting for the requests after this long.
    pub timeout: Duration,
    /// Keep the namespace's queues and the database afterwards, for a look.
    pub keep: bool,
    /// How long the broker's ceiling is measured at least, in rounds of the pipeline's
    /// deliveries (see [`ceiling::CeilingSettings::min_duration`]).
    pub ceiling_duration: Duration,
}

/// The most messages the ceiling relays in all its rounds.
pub const CEILING_MAX_MESSAGES: usize = 50_000;

#[derive(Debug, Clone)]
pub struct Processes {
    /// The `switchyard` executable.
    pub exe: PathBuf,
    /// `switchyard worker --stage all` processes.
    pub workers: usize,
}

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// The percentiles of `samples` (nearest rank); all zero for no samples.
    pub fn of(mut samples: Vec<f64>) -> Self {
        if samples.is_empty() {
            return Latency { p50_ms: 0.0, p95_ms: 0.0, p99_ms: 0.0, max_ms: 0.0 };
        }
        samples.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let i = ((p / 100.0) * samples.len() as f64).ceil() as usize;
            round(samples[i.clamp(1, samples.len()) - 1])
        };
        Latency { p50_ms: rank(50.0), p95_ms: rank(95.0), p99_ms: rank(99.0), max_ms: rank(100.0) }
    }
}

/// What a run measured. Serialised as the JSON line that ends the output.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The run's own namespace and database (gone afterwards unless kept).
    pub namespace: String,
    pub database: String,
    pub requests: usize,
    pub tasks_per_request: usize,
    /// The simulated fleet: how many agents, and the slots of each.
    pub agents: usize,
    pub agent_capacity: u32,
    pub mode: &'static str,
    /// Requests per second asked for; `None`: full speed.
    pub rate: Option<f64>,
    /// From the first submission to the last completion.
    pub elapsed_secs: f64,
    pub requests_per_sec: f64,
    pub tasks_per_sec: f64,
    /// From submission to the request's last task dispatched.
    pub latency_to_last_dispatch: Latency,
    /// From submission to the request completed.
    pub latency_to_completed: Latency,
    /// Peak resident memory of each worker process (in process: of this whole process, agents
    /// and client included), MiB.
    pub peak_rss_mib: Vec<f64>,
    /// From ready (released, or waiting in line) to confirmed in the agent's queue.
    pub wait_to_dispatch: Latency,
    /// Each task's time on its agent, in milliseconds (`task_ms`).
    pub task_ms: u64,
    /// With tasks that take time: busy slot time over the slot time there was while work waited
    /// for a slot (`None` if nothing ever waited).
    pub utilisation: Option<f64>,
    /// Deliveries the pipeline consumed (stage inputs and agent tasks).
    pub pipeline_deliveries: u64,
    pub pipeline_deliveries_per_sec: f64,
    pub ceiling: ceiling::Ceiling,
    /// The pipeline's delivery rate over the ceiling's.
    pub ratio_to_ceiling: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error(transparent)]
    Worker(#[from] worker::Error),
    #[error(transparent)]
    Agent(#[from] agent::Error),
    #[error(transparent)]
    Submit(#[from] ops::Error),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(
        "the run did not finish within {timeout:?}: {completed} of {requests} requests completed, {failed} failed"
    )]
    Timeout { timeout: Duration, requests: usize, completed: u64, failed: u64 },
    #[error("{failed} of {requests} requests failed; the first: {reason}")]
    Failed { requests: usize, failed: u64, reason: String },
    #[error("invalid settings: {0}")]
    Settings(String),
}

/// The `bench` work type: `tasks` independent steps that any `bench` agent can take.
pub fn catalog(tasks: usize) -> String {
    let mut text = String::from(
        "[[work_type]]\nname = \"bench\"\ndescription = \"Benchmark work\"\nkeywords = [\"benchmark\"]\n\
         capabilities = [\"bench\"]\nbase_complexity = 0.1\nresources = { cpu = 0.1, memory_mb = 16, gpu = 0 }\n",
    );
    for step in 1..=tasks {
        text.push_str(&format!(
            "\n[[work_type.step]]\nkey = \"s{step}\"\ndescription = \"Step {step} of {{text}}\"\nduration_secs = 1\n"
        ));
    }
    text
}

/// A run's own namespace, database and files, removed when it ends (unless kept).
struct Scene {
    config: Config,
    admin_url: String,
    database: String,
    dir: PathBuf,
    config_file: PathBuf,
}

impl Scene {
    fn new(base: &Config, settings: &Settings) -> Result<Self, Error> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = Namespace::parse(format!("bench{}", &id[..8])).expect("a valid namespace");
        let database = format!("switchyard_bench_{}", &id[..12]);
        let dir = std::env::temp_dir().join(format!("switchyard-bench-{}", &id[..8]));
        std::fs::create_dir_all(&dir)
            .map_err(|source| Error::Io { what: format!("creating {}", dir.display()), source })?;
        let catalog_file = dir.join("catalog.toml");
        write(&catalog_file, &catalog(settings.tasks))?;

        let mut config = base.clone();
        config.namespace = namespace;
        config.database_url = store::with_database(&base.database_url, &database);
        config.catalog = Some(catalog_file);
        config.decomposer = Default::default();
        config.fallback.providers.clear();
        config.approval.allow_request_auto_approve = true;
        // No default agent: what the fleet cannot take at once waits for a slot.
        config.routing.default_agents.clear();
        // The file holds no credentials: the processes get the URLs from the environment.
        let mut shown = config.clone();
        shown.amqp_url = crate::config::DEFAULT_AMQP_URL.into();
        shown.database_url = crate::config::DEFAULT_DATABASE_URL.into();
        let config_file = dir.join("switchyard.toml");
        let text = toml::to_string(&shown).map_err(|e| Error::Settings(format!("configuration: {e}")))?;
        write(&config_file, &text)?;
        Ok(Scene { config, admin_url: base.database_url.clone(), database, dir, config_file })
    }

    async fn clean(&self, broker: Option<&Broker>, agents: usize) {
        if let Some(broker) = broker {
            let names = broker.names().clone();
            let topology = crate::pipeline::topology::Topology::standard().resolve(names.namespace());
            let mut queues: Vec<String> = topology.queues.into_iter().map(|q| q.name).collect();
            queues.extend((1..=agents).map(|i| names.agent_queue(&agent_id(i))));
            queues.extend((1..=agents).map(|i| names.agent_control_queue(&agent_id(i))));
            let exchanges: Vec<String> = topology.exchanges.into_iter().map(|e| e.name).collect();
            let _ = broker.delete_queues(&queues).await;
            let _ = broker.delete_exchanges(&exchanges).await;
        }
        let _ = store::admin::drop_database(&self.admin_url, &self.database).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &std::path::Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text)
        .map_err(|source| Error::Io { what: format!("writing {}", path.display()), source })
}

fn agent_id(i: usize) -> AgentId {
    AgentId::parse(format!("bench-agent-{i}")).expect("a valid agent id")
}

impl Settings {
    /// The capacity each of `agents` agents needs to run every task of the run at once (up to
    /// the most an agent can declare): a fleet that never makes a task wait, so that the run
    /// measures the pipeline and not the fleet.
    pub fn unbounded_capacity(requests: usize, tasks: usize, agents: usize) -> u32 {
        let total = requests.saturating_mul(tasks);
        let each = total.div_ceil(agents.max(1)).max(1);
        u32::try_from(each).unwrap_or(u32::MAX).min(u32::from(u16::MAX))
    }
}

/// Runs the benchmark with `base` as the configuration to start from (its broker, its database
/// server, its worker settings). `progress` is told how many requests completed so far.
pub async fn run(base: &Config, settings: &Settings, progress: impl Fn(u64, u64)) -> Result<Report, Error> {
    if settings.requests == 0 || settings.tasks == 0 || settings.agents == 0 || settings.agent_capacity == 0 {
        return Err(Error::Settings("requests, tasks, agents and capacity must be at least 1".into()));
    }
    if settings.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(Error::Settings("the rate must be a positive number of requests per second".into()));
    }
    let scene = Scene::new(base, settings)?;
    let store = worker::prepare_store(&scene.config).await?;
    let names = Names::new(scene.config.namespace.clone());
    let broker = match Broker::connect(&scene.config.amqp_url, names.clone()).await {
        Ok(broker) => broker.with_settings(scene.config.topology.clone()),
        Err(err) => {
            scene.clean(None, settings.agents).await;
            return Err(err.into());
        }
    };
    let result = measure(&scene, &store, &broker, settings, progress).await;
    // Its connections closed first: a database in use cannot be dropped.
    drop(store);
    if !settings.keep {
        scene.clean(Some(&broker), settings.agents).await;
    }
    broker.close().await;
    result
}

async fn measure(
    scene: &Scene,
    store: &Store,
    broker: &Broker,
    settings: &Settings,
    progress: impl Fn(u64, u64),
) -> Result<Report, Error> {
    broker.declare_topology().await?;
    let fleet = Fleet::start(scene, store, settings).await?;
    let outcome = drive(store, broker, settings, progress).await;
    let peak_rss_mib = fleet.stop().await;
    let (submitted, started, finished) = outcome?;

    let elapsed = (finished - started).max(Duration::from_millis(1));
    let timings = store.request_timings().await?;
    let latency = |pick: fn(&store::RequestTiming) -> DateTime<Utc>| {
        let samples = timings
            .iter()
            .filter_map(|t| {
                submitted
                    .get(&t.request_id)
                    .map(|at| (pick(t) - *at).num_microseconds().unwrap_or(0) as f64 / 1000.0)
            })
            .collect();
        Latency::of(samples)
    };
    let deliveries = store.deliveries().await?;
    let secs = elapsed.as_secs_f64();
    let wait_to_dispatch = Latency::of(store.waits_to_dispatch().await?);
    let utilisation = if settings.task_ms == 0 {
        None
    } else {
        let slots = settings.agents as f64 * f64::from(settings.agent_capacity);
        utilisation(&store.waits().await?, &store.runs().await?, slots).map(round)
    };
    let pipeline_rate = deliveries as f64 / secs;

    // The same deliveries through the same number of hops, on the same broker, right after.
    let ceiling = ceiling::measure(
        &scene.config.amqp_url,
        &Names::new(scene.config.namespace.clone()),
        &ceiling::CeilingSettings {
            messages: (deliveries as usize).div_ceil(PIPELINE_HOPS).max(1),
            hops: PIPELINE_HOPS,
            prefetch: scene.config.worker.prefetch.max(1),
            body_bytes: 600,
            min_duration: settings.ceiling_duration,
            max_messages: CEILING_MAX_MESSAGES,
        },
    )
    .await?;
    Ok(Report {
        namespace: scene.config.namespace.to_string(),
        database: scene.database.clone(),
        requests: settings.requests,
        tasks_per_request: settings.tasks,
        agents: settings.agents,
        agent_capacity: settings.agent_capacity,
        mode: if settings.processes.is_some() { "processes" } else { "in-process" },
        rate: settings.rate,
        elapsed_secs: round(secs),
        requests_per_sec: round(settings.requests as f64 / secs),
        tasks_per_sec: round((settings.requests * settings.tasks) as f64 / secs),
        latency_to_last_dispatch: latency(|t| t.last_dispatched_at),
        latency_to_completed: latency(|t| t.completed_at),
        wait_to_dispatch,
        task_ms: settings.task_ms,
        utilisation,
        peak_rss_mib,
        pipeline_deliveries: deliveries,
        pipeline_deliveries_per_sec: round(pipeline_rate),
        ratio_to_ceiling: round(pipeline_rate / ceiling.hop_messages_per_sec),
        ceiling,
    })
}

type Submitted = std::collections::HashMap<RequestId, DateTime<Utc>>;

/// Submits the requests and waits until they all completed: when each was submitted, and when
/// the first went out and the last completed.
async fn drive(
    store: &Store,
    broker: &Broker,
    settings: &Settings,
    progress: impl Fn(u64, u64),
) -> Result<(Submitted, Instant, Instant), Error> {
    let started = Instant::now();
    let pace = settings.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    // Many publishes in flight: a confirm takes milliseconds, and one at a time would make the
    // client the bottleneck.
    let in_flight = if pace.is_some() { 64 } else { 256 };
    let submitted: Vec<Result<(RequestId, DateTime<Utc>), ops::Error>> =
        futures::stream::iter(0..settings.requests)
            .then(|i| async move {
                if let Some(pace) = pace {
                    tokio::time::sleep_until((started + pace.mul_f64(i as f64)).into()).await;
                }
                i
            })
            .map(|i| async move {
                let at = Utc::now();
                let request = SubmitRequest {
                    text: format!("benchmark request {i}"),
                    request_id: None,
                    submitted_by: Some("bench".into()),
                    priority: None,
                    auto_approve: Some(true),
                };
                ops::submit(broker, request).await.map(|id| (id, at))
            })
            .buffer_unordered(in_flight)
            .collect()
            .await;
    let submitted: Submitted = submitted.into_iter().collect::<Result<_, _>>()?;

    let deadline = started + settings.timeout;
    loop {
        let (completed, failed) = store.ended_requests().await?;
        progress(completed, failed);
        if failed > 0 {
            let reason = store.first_failure().await?.unwrap_or_else(|| "no reason recorded".into());
            return Err(Error::Failed { requests: settings.requests, failed, reason });
        }
        if completed as usize >= settings.requests {
            break;
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                timeout: settings.timeout,
                requests: settings.requests,
                completed,
                failed,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The last completion as the database recorded it, on the clock the submissions were read on.
    let last = store.request_timings().await?.iter().map(|t| t.completed_at).max().unwrap_or_else(Utc::now);
    let first = submitted.values().min().copied().unwrap_or_else(Utc::now);
    let span = (last - first).to_std().unwrap_or_default();
    Ok((submitted, started, started + span))
}

/// The stages and agents of a run.
enum Fleet {
    InProcess { shutdown: CancellationToken, tasks: Vec<tokio::task::JoinHandle<()>> },
    Processes { workers: Vec<tokio::process::Child>, agents: Vec<tokio::process::Child> },
}

impl Fleet {
    async fn start(scene: &Scene, store: &Store, settings: &Settings) -> Result<Self, Error> {
        let fleet = match &settings.processes {
            None => {
                let shutdown = CancellationToken::new();
                let mut tasks = Vec::new();
                let worker = Worker::new(scene.config.clone(), store.clone())?;
                let token = shutdown.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(err) = worker.run(StageName::all(), token).await {
                        tracing::error!(error = %err, "the benchmark's worker stopped");
                    }
                }));
                for i in 1..=settings.agents {
                    let broker = Arc::new(
                        Broker::connect(&scene.config.amqp_url, Names::new(scene.config.namespace.clone()))
                            .await?
                            .with_settings(scene.config.topology.clone()),
                    );
                    let agent = agent_builder(i, settings.agent_capacity)
                        .build(Simulate::new(speed(settings), 0.0)?)?;
                    let token = shutdown.clone();
                    tasks.push(tokio::spawn(async move {
                        if let Err(err) = agent.run(broker, token).await {
                            tracing::error!(error = %err, "a benchmark agent stopped");
                        }
                    }));
                }
                Fleet::InProcess { shutdown, tasks }
            }
            Some(processes) => {
                let spawn = |args: Vec<String>| -> Result<tokio::process::Child, Error> {
                    tokio::process::Command::new(&processes.exe)
                        .arg("--config")
                        .arg(&scene.config_file)
                        .args(&args)
                        .env("AMQP_URL", &scene.config.amqp_url)
                        .env("DATABASE_URL", &scene.config.database_url)
                        .env_remove("SWITCHYARD_NAMESPACE")
                        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
                        .stdin(std::process::Stdio::null())
                        .stdout(std::process::Stdio::null())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|source| Error::Io {
                            what: format!("starting {}", processes.exe.display()),
                            source,
                        })
                };
                let workers = (0..processes.workers)
                    .map(|_| spawn(vec!["worker".into(), "--stage".into(), "all".into()]))
                    .collect::<Result<Vec<_>, _>>()?;
                let agents = (1..=settings.agents)
                    .map(|i| {
                        spawn(
                            [
                                "agent",
                                "--id",
                                agent_id(i).as_str(),
                                "--capabilities",
                                "bench",
                                "--capacity",
                                &settings.agent_capacity.to_string(),
                                "--cpu",
                                "8",
                                "--memory-mb",
                                "8192",
                                "--speed",
                                &speed(settings).to_string(),
                                "--heartbeat-secs",
                                "1",
                            ]
                            .map(String::from)
                            .to_vec(),
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Fleet::Processes { workers, agents }
            }
        };
        // Every agent must be known before the first plan is routed, or the work goes to the
        // default agent alone.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.agents().await?.len() < settings.agents {
            if Instant::now() >= deadline {
                fleet.stop().await;
                return Err(Error::Settings("the benchmark's agents did not register within 30 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(fleet)
    }

    /// Stops everything; the peak resident memory of each worker process (in process: of this
    /// process), MiB.
    async fn stop(self) -> Vec<f64> {
        match self {
            Fleet::InProcess { shutdown, tasks } => {
                let rss = peak_rss_mib(std::process::id()).into_iter().collect();
                shutdown.cancel();
                for task in tasks {
                    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
                }
                rss
            }
            Fleet::Processes { workers, agents } => {
                let rss = workers.iter().filter_map(|w| w.id()).filter_map(peak_rss_mib).collect();
                for mut child in workers.into_iter().chain(agents) {
                    terminate(&mut child).await;
                }
                rss
            }
        }
    }
}

type Span = (DateTime<Utc>, DateTime<Utc>);

/// How busy `slots` slots were while work waited: the time of `runs` within the union of `waits`
/// (each task's wait, from when it joined the line to when it was placed), over the slot time
/// that union offered. `None` when nothing waited.
fn utilisation(waits: &[Span], runs: &[Span], slots: f64) -> Option<f64> {
    let mut waits: Vec<Span> = waits.iter().copied().filter(|(from, to)| to > from).collect();
    waits.sort();
    let mut union: Vec<Span> = Vec::new();
    for (from, to) in waits {
        match union.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => union.push((from, to)),
        }
    }
    let secs = |d: chrono::TimeDelta| d.num_microseconds().unwrap_or(0) as f64 / 1e6;
    let waited: f64 = union.iter().map(|(from, to)| secs(*to - *from)).sum();
    if waited <= 0.0 {
        return None;
    }
    let busy: f64 = runs
        .iter()
        .flat_map(|(start, end)| {
            union.iter().map(move |(from, to)| secs((*end).min(*to) - (*start).max(*from)).max(0.0))
        })
        .sum();
    Some(busy / (slots * waited))
}

/// The simulated agents' speed: the `bench` steps are estimated at a second each.
fn speed(settings: &Settings) -> f64 {
    settings.task_ms as f64 / 1000.0
}

fn agent_builder(i: usize, capacity: u32) -> AgentBuilder {
    AgentBuilder::new(agent_id(i))
        .capabilities(["bench"])
        .capacity(capacity)
        .resources(Resources { cpu: 8.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_secs(1))
}

/// SIGTERM, then SIGKILL if it does not exit within ten seconds.
async fn terminate(child: &mut tokio::process::Child) {
    #[cfg(unix)]
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on a child of ours that has not been reaped.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// The peak resident set (`VmHWM`) of process `pid`, MiB; `None` where `/proc` cannot tell.
fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round(kib / 1024.0))
}

fn round(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unbounded_fleet_has_a_slot_for_every_task_of_the_run() {
        assert_eq!(Settings::unbounded_capacity(2000, 5, 2), 5000);
        assert_eq!(Settings::unbounded_capacity(7, 3, 2), 11);
        assert_eq!(Settings::unbounded_capacity(1, 1, 100), 1);
        assert_eq!(Settings::unbounded_capacity(1_000_000, 100, 1), 65535);
    }

    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let l = Latency::of((1..=100).map(f64::from).collect());
        assert_eq!((l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms), (50.0, 95.0, 99.0, 100.0));
        let one = Latency::of(vec![7.0]);
        assert_eq!((one.p50_ms, one.max_ms), (7.0, 7.0));
        assert_eq!(Latency::of(Vec::new()).max_ms, 0.0);
    }

    #[test]
    fn the_bench_work_type_has_independent_steps() {
        let catalog =
            crate::understanding::catalog::Catalog::default().extend_from_toml_str(&catalog(5)).unwrap();
        let d = catalog.decompose("benchmark request 3").unwrap();
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(plan.tasks().len(), 5);
        assert!(plan.tasks().iter().all(|t| t.depends_on.is_empty()), "one wave");
    }

    #[test]
    fn utilisation_is_busy_slot_time_while_work_waited() {
        let t0 = Utc::now();
        let at = |ms: i64| t0 + chrono::TimeDelta::milliseconds(ms);
        // Work waited from 0 to 1,000 ms (two overlapping waits) and from 2,000 to 3,000 ms.
        let waits = [(at(0), at(600)), (at(400), at(1000)), (at(2000), at(3000))];
        // One slot, busy 0–900 and 2,500–4,000 (only 2,500–3,000 counts).
        let runs = [(at(0), at(900)), (at(2500), at(4000))];
        let u = utilisation(&waits, &runs, 1.0).unwrap();
        assert!((u - 0.7).abs() < 1e-9, "{u}");
        assert_eq!(utilisation(&waits, &runs, 2.0).map(|u| (u * 100.0).round()), Some(35.0));
        assert_eq!(utilisation(&[], &runs, 1.0), None);
    }

    #[test]
    fn this_process_has_a_peak_resident_set() {
        assert!(peak_rss_mib(std::process::id()).is_some_and(|m| m > 0.0));
    }
}
