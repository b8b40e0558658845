//! The test harness: every test gets its own namespace of queues and its own database (a copy
//! of a template migrated once), and a worker running every stage against the real broker and
//! the real database.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use switchyard::agent::{self, Agent, AgentBuilder, TaskHandler};
use switchyard::broker::{Broker, Outgoing};
use switchyard::config::Config;
use switchyard::decisions::routing::Route;
use switchyard::model::domain::{self, Resources};
use switchyard::model::effect::{Write, write};
use switchyard::model::ids::{AgentId, Namespace, PlanId, RequestId, TaskId, WorkType};
use switchyard::model::wire::{Heartbeat, SubmitRequest};
use switchyard::ops::{self, Progress};
use switchyard::pipeline::topology::{Names, Topology};
use switchyard::pipeline::worker::{StageName, Worker};
use switchyard::store::{self, RequestReport, Store};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| switchyard::config::DEFAULT_AMQP_URL.into())
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The template's name changes with the migrations, so an edited migration gets a new template.
fn template_name() -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in files {
        file.file_name().hash(&mut hasher);
        std::fs::read(&file).unwrap().hash(&mut hasher);
    }
    format!("switchyard_tmpl_{:016x}", hasher.finish())
}

/// A default agent for every built-in work type, as an operator would configure.
pub fn default_agents() -> BTreeMap<WorkType, AgentId> {
    ["deployment", "code_generation", "monitoring", "maintenance", "research"]
        .into_iter()
        .map(|wt| {
            (
                WorkType::parse(wt).unwrap(),
                AgentId::parse(format!("default-{}", wt.replace('_', "-"))).unwrap(),
            )
        })
        .collect()
}

pub struct TestApp {
    pub config: Config,
    pub names: Names,
    pub store: Store,
    pub broker: Broker,
    pub database: String,
    shutdown: CancellationToken,
    workers: Vec<tokio::task::JoinHandle<()>>,
    extra_queues: Arc<Mutex<Vec<String>>>,
}

/// Builds a test app with the default test configuration and every stage running.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Builds a test app after `configure` adjusted its configuration.
pub async fn spawn_app_with(configure: impl FnOnce(&mut Config)) -> TestApp {
    let mut app = spawn_bare_app(configure).await;
    app.start_worker(StageName::all()).await;
    app
}

/// A test app (namespace, database, topology) with no stage running in this process: for tests
/// that run `switchyard worker` as a process of its own.
pub async fn spawn_bare_app(configure: impl FnOnce(&mut Config)) -> TestApp {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let namespace = Namespace::parse(format!("t{}", &id[..12])).unwrap();
    let database = format!("switchyard_t_{}", &id[..16]);
    store::admin::create_from_template(&database_url(), &template_name(), &database)
        .await
        .expect("a test database");
    let mut config = Config {
        namespace: namespace.clone(),
        amqp_url: amqp_url(),
        database_url: store::with_database(&database_url(), &database),
        database_pool_size: 4,
        ..Config::default()
    };
    config.routing.default_agents = default_agents();
    config.worker.retry_base_delay_ms = 20;
    configure(&mut config);
    let store =
        Store::connect(&config.database_url, config.database_pool_size).await.expect("the test database");
    for provider in &config.fallback.providers {
        store.ensure_quota(&provider.name, provider.quota_micros, provider.window).await.unwrap();
    }
    let names = Names::new(namespace);
    let broker = Broker::connect(&config.amqp_url, names.clone())
        .await
        .expect("the broker")
        .with_settings(config.topology.clone());
    // Declared before the worker starts, so that nothing a test publishes can go nowhere.
    broker.declare_topology().await.expect("the topology");
    TestApp {
        config,
        names,
        store,
        broker,
        database,
        shutdown: CancellationToken::new(),
        workers: Vec::new(),
        extra_queues: Arc::new(Mutex::new(Vec::new())),
    }
}

impl TestApp {
    /// Starts one more worker process's worth of stages, in this process.
    pub async fn start_worker(&mut self, stages: &[StageName]) {
        let worker = Worker::new(self.config.clone(), self.store.clone()).expect("a worker");
        let shutdown = self.shutdown.clone();
        let stages = stages.to_vec();
        self.workers.push(tokio::spawn(async move {
            worker.run(&stages, shutdown).await.expect("the worker runs");
        }));
    }

    pub async fn submit(&self, text: &str, auto_approve: bool) -> RequestId {
        let request = SubmitRequest {
            text: text.into(),
            request_id: None,
            submitted_by: Some("tests".into()),
            priority: None,
            auto_approve: Some(auto_approve),
        };
        ops::submit(&self.broker, request).await.expect("submitted")
    }

    /// Publishes raw bytes to a queue of the namespace (relative name), as any AMQP client could.
    pub async fn publish_raw(&self, queue: &str, body: &[u8]) {
        self.broker
            .publish(&Outgoing::to_queue(self.names.queue(queue), body.to_vec()))
            .await
            .expect("published");
    }

    /// Registers an agent and declares its queue, as `switchyard agents register` does.
    pub async fn register_agent(
        &self,
        id: &str,
        capabilities: &[&str],
        capacity: u32,
        labels: &[(&str, &str)],
    ) {
        let heartbeat = self.heartbeat(id, capabilities, capacity, labels);
        self.declare_agent_queue(id).await;
        self.store.register_agent("tests", heartbeat).await.expect("registered");
    }

    pub fn heartbeat(
        &self,
        id: &str,
        capabilities: &[&str],
        capacity: u32,
        labels: &[(&str, &str)],
    ) -> Heartbeat {
        Heartbeat {
            agent_id: AgentId::parse(id).unwrap(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            capacity,
            in_flight: 0,
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            resources: Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 },
            sent_at: None,
            every_secs: None,
        }
    }

    pub async fn declare_agent_queue(&self, id: &str) -> String {
        let agent = AgentId::parse(id).unwrap();
        let queue = self.broker.declare_agent_queue(&agent).await.expect("declared");
        let mut extra = self.extra_queues.lock().unwrap();
        extra.push(queue.clone());
        // What the agent declares besides, when it runs.
        extra.push(self.names.agent_control_queue(&agent));
        queue
    }

    /// Polls the request's report until `done` holds; panics with the last report after 20 s.
    pub async fn wait_for(
        &self,
        request_id: RequestId,
        done: impl Fn(&RequestReport) -> bool,
    ) -> RequestReport {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let report = self.store.report(request_id).await.expect("a report");
            if let Some(report) = &report
                && done(report)
            {
                return report.clone();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("request {request_id} did not get there in time; last report: {report:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until every released task is dispatched or the request failed or awaits approval.
    pub async fn wait_settled(&self, request_id: RequestId) -> RequestReport {
        self.wait_for(request_id, |r| {
            !matches!(ops::progress(r), Progress::Waiting(_)) || r.status.as_str() == "awaiting_approval"
        })
        .await
    }

    /// Takes every message from a queue (full name).
    pub async fn drain(&self, queue: &str) -> Vec<(Value, BTreeMap<String, String>)> {
        let mut messages = Vec::new();
        while let Some(message) = self.broker.get(queue).await.expect("basic.get") {
            let body = serde_json::from_slice(&message.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&message.body).into_owned()));
            messages.push((body, message.headers));
        }
        messages
    }

    /// Every row of every table of the test's database, as text: what a search for something
    /// that must never be stored (a credential) looks through.
    pub async fn dump_rows(&self) -> Vec<String> {
        let (client, connection) =
            tokio_postgres::connect(&self.config.database_url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let tables = client
            .query(
                "SELECT quote_ident(table_name) FROM information_schema.tables
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                &[],
            )
            .await
            .unwrap();
        let mut rows = Vec::new();
        for table in tables {
            let table: String = table.get(0);
            for row in client.query(&format!("SELECT t::text FROM {table} t"), &[]).await.unwrap() {
                rows.push(row.get(0));
            }
        }
        rows
    }

    /// The tables of the test's database.
    pub async fn tables(&self) -> Vec<String> {
        let (client, connection) =
            tokio_postgres::connect(&self.config.database_url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let rows = client
            .query(
                "SELECT table_name::text FROM information_schema.tables
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE'",
                &[],
            )
            .await
            .unwrap();
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// Whether every worker started in this process is still running.
    pub fn workers_alive(&self) -> bool {
        self.workers.iter().all(|w| !w.is_finished())
    }

    pub fn agent_queue(&self, id: &str) -> String {
        self.names.agent_queue(&AgentId::parse(id).unwrap())
    }

    /// Waits until `stage` recorded `count` dead letters, and returns them.
    pub async fn wait_dead_letters(&self, stage: &str, count: usize) -> Vec<store::DeadLetter> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let dead = self.store.dead_letters_of_stage(stage).await.unwrap();
            if dead.len() >= count {
                return dead;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{stage} recorded {} dead letters, expected {count}",
                dead.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs the `switchyard` binary against this app's namespace and database.
    pub async fn cli(&self, args: &[&str]) -> Output {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(args)
            .env("AMQP_URL", &self.config.amqp_url)
            .env("DATABASE_URL", &self.config.database_url)
            .env("SWITCHYARD_NAMESPACE", self.config.namespace.as_str())
            .env_remove("SWITCHYARD_CONFIG")
            .env("RUST_LOG", "warn")
            .output()
            .await
            .expect("the switchyard binary runs")
    }

    /// Starts an in-process agent against this app's namespace (see [`start_agent`]), its queue
    /// declared first so that the teardown deletes it.
    pub async fn start_agent<H: TaskHandler>(&self, builder: AgentBuilder, handler: H) -> RunningAgent {
        let agent = builder.build(handler).expect("a valid agent");
        self.declare_agent_queue(agent.id().as_str()).await;
        let broker = Broker::connect(&self.config.amqp_url, self.names.clone())
            .await
            .expect("the broker")
            .with_settings(self.config.topology.clone());
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(agent.run(Arc::new(broker), shutdown.clone()));
        RunningAgent { shutdown, handle }
    }

    /// Every queue this app declared.
    fn queues(&self) -> Vec<String> {
        let mut queues: Vec<String> =
            Topology::standard().resolve(self.names.namespace()).queues.into_iter().map(|q| q.name).collect();
        queues.extend(self.extra_queues.lock().unwrap().iter().cloned());
        queues
    }
}

/// An agent running in this process, on a connection of its own as a separate process would.
pub struct RunningAgent {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), agent::Error>>,
}

impl RunningAgent {
    /// Stops it and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), agent::Error> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(20), &mut self.handle)
            .await
            .expect("the agent stops in time")
            .expect("the agent's task")
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Builds the agent and runs it in the namespace of `names` (see [`run_agent`]).
pub async fn start_agent<H: TaskHandler>(
    amqp_url: &str,
    names: &Names,
    builder: AgentBuilder,
    handler: H,
) -> RunningAgent {
    run_agent(amqp_url, names, builder.build(handler).expect("a valid agent")).await
}

/// Runs the agent (`Agent::run`) on a broker connection of its own, until stopped.
pub async fn run_agent<H: TaskHandler>(amqp_url: &str, names: &Names, agent: Agent<H>) -> RunningAgent {
    let broker = Arc::new(Broker::connect(amqp_url, names.clone()).await.expect("the broker"));
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(agent.run(broker, shutdown.clone()));
    RunningAgent { shutdown, handle }
}

/// Waits until the agent's heartbeat registered it.
pub async fn wait_registered(app: &TestApp, id: &str) -> domain::Agent {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let agents = app.store.agents().await.expect("the agents");
        if let Some(agent) = agents.into_iter().find(|a| a.id.as_str() == id) {
            return agent;
        }
        assert!(tokio::time::Instant::now() < deadline, "agent {id} never registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `dead_letters` row as a user would read it with `psql`.
#[derive(Debug)]
pub struct DeadRow {
    pub message_id: Uuid,
    pub stage: String,
    pub queue: String,
    pub request_id: Option<Uuid>,
    pub reason: String,
    pub body: String,
}

/// Every `dead_letters` row of the app's database, oldest first.
pub async fn dead_rows(app: &TestApp) -> Vec<DeadRow> {
    let (client, connection) = tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls)
        .await
        .expect("the test database");
    let connection = tokio::spawn(connection);
    let rows = client
        .query("SELECT message_id, stage, queue, request_id, reason, body FROM dead_letters ORDER BY id", &[])
        .await
        .expect("dead letters");
    drop(client);
    let _ = connection.await;
    rows.iter()
        .map(|r| DeadRow {
            message_id: r.get(0),
            stage: r.get(1),
            queue: r.get(2),
            request_id: r.get(3),
            reason: r.get(4),
            body: r.get(5),
        })
        .collect()
}

/// How many requests the store holds, whatever their status.
pub async fn request_total(app: &TestApp) -> i64 {
    app.store.request_counts().await.unwrap().values().sum()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl Drop for TestApp {
    /// Stops the workers, then deletes the namespace's queues and the test database, on a thread
    /// of its own because `Drop` cannot await.
    fn drop(&mut self) {
        self.shutdown.cancel();
        for worker in &self.workers {
            worker.abort();
        }
        let queues = self.queues();
        let exchanges: Vec<String> = Topology::standard()
            .resolve(self.names.namespace())
            .exchanges
            .into_iter()
            .map(|e| e.name)
            .collect();
        let (amqp, names, database) =
            (self.config.amqp_url.clone(), self.names.clone(), self.database.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(broker) = Broker::connect(&amqp, names).await {
                    let _ = broker.delete_queues(&queues).await;
                    let _ = broker.delete_exchanges(&exchanges).await;
                    broker.close().await;
                }
                let _ = store::admin::drop_database(&database_url(), &database).await;
            });
        })
        .join()
        .ok();
    }
}

/// The routing decision of a task's first attempt onto `agent`, reserving a slot.
pub fn route_to(agent: &str, request_id: RequestId, plan_id: PlanId, task_id: TaskId) -> Write {
    Write::Route(write::Route {
        request_id,
        plan_id,
        attempt: 1,
        decision_id: task_id.decision_id(1),
        ready_at: chrono::Utc::now(),
        route: Route {
            task_id,
            agent_id: AgentId::parse(agent).unwrap(),
            score: Some(0.9),
            reason: "best".into(),
            candidates: vec![],
            reserves_capacity: true,
        },
    })
}
