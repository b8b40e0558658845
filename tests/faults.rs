//! The fault-injection suite: the real `switchyard` binaries as separate processes (one `worker`
//! per stage, two simulated agents) on a RabbitMQ node and a PostgreSQL server of the suite's own,
//! under a load of auto-approved requests, while it
//!
//! - SIGKILLs a random stage process at random moments, and starts it again;
//! - SIGKILLs an agent while it runs tasks, and starts a replacement later;
//! - restarts the broker once (a real stop and start of its node) and the database server once
//!   (`pg_ctl restart`, fast mode);
//! - publishes copies of messages that were already delivered: entry requests with the same id,
//!   and outputs the stages recorded (`processed_messages`), into the queues they went to.
//!
//! Then, once every accepted request (its publish confirmed) is terminal or a timeout passed, it
//! checks what "nothing lost" means for each, and prints the counts on its last line.
//!
//! The broker and the database server are private (free ports, a scratch directory), so that
//! restarting them disturbs no other test; they are stopped and their files removed however the
//! suite ends. The faults come from a seeded generator: the seed is printed, and
//! `SWITCHYARD_FAULTS_SEED=N` replays a run's schedule; `SWITCHYARD_FAULTS_LOGS=DIR` keeps the
//! processes' logs.

use std::collections::{BTreeMap, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use switchyard::broker::{Broker, Outgoing};
use switchyard::config::Config;
use switchyard::model::ids::{Namespace, RequestId};
use switchyard::model::wire::SubmitRequest;
use switchyard::pipeline::stages::{Destination, Publish};
use switchyard::pipeline::topology::Names;
use switchyard::store::Store;
use tokio::process::{Child, Command};

/// Requests submitted (each counted as accepted once the broker confirmed it).
const REQUESTS: usize = 500;
/// Independent tasks per request.
const TASKS: usize = 3;
/// Seconds over which the requests are submitted; the faults happen meanwhile.
const LOAD_SECS: f64 = 40.0;
/// SIGKILLs of stage processes.
const STAGE_KILLS: usize = 22;
/// How long the requests may take to end once the load is submitted.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
const STAGES: [&str; 8] =
    ["decompose", "plan", "fallback", "route", "place", "dispatch", "track", "heartbeat"];
/// Slots of each agent: the fleet (2 × 4) is far smaller than the load (500 requests of 3 tasks),
/// so most tasks wait in line for a slot, through every fault.
const AGENT_CAPACITY: &str = "4";
const AGENTS: [&str; 2] = ["fault-agent-1", "fault-agent-2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_or_done_twice_under_kills_restarts_and_duplicates() {
    let seed: u64 = std::env::var("SWITCHYARD_FAULTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed={seed} (replay the schedule with SWITCHYARD_FAULTS_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let scratch = Scratch::new();
    let mut rabbit = Rabbit::start(&scratch.dir);
    let mut postgres = Postgres::start(&scratch.dir);
    println!("private broker on port {}, database server on port {}", rabbit.port, postgres.port);
    let config = scene_config(&scratch.dir, rabbit.url(), postgres.url());
    let store = switchyard::pipeline::worker::prepare_store(&config).await.expect("the database is prepared");
    let client = Client::new(config.amqp_url.clone(), Names::new(config.namespace.clone()));
    client.broker().await.declare_topology().await.expect("the topology");

    let mut fleet = Fleet::new(&scratch.dir, &config);
    for stage in STAGES {
        fleet.start(stage);
    }
    for agent in AGENTS {
        fleet.start(agent);
    }
    wait_until("both agents to register", Duration::from_secs(60), async || {
        store.agents().await.is_ok_and(|agents| agents.len() == AGENTS.len())
    })
    .await;
    println!("fleet up after {:.1} s", started.elapsed().as_secs_f64());

    // The load, in the background: every request retried until the broker confirms it.
    let load = tokio::spawn(submit_load(client.clone()));

    // The schedule: when each fault happens, seconds after the load starts.
    let window = 2.0..LOAD_SECS;
    let mut faults: Vec<(f64, Fault)> = (0..STAGE_KILLS)
        .map(|_| {
            (rng.random_range(window.clone()), Fault::KillStage(STAGES[rng.random_range(0..STAGES.len())]))
        })
        .collect();
    faults.push((rng.random_range(5.0..12.0), Fault::KillAgent));
    faults.push((rng.random_range(12.0..20.0), Fault::RestartBroker));
    faults.push((rng.random_range(24.0..32.0), Fault::RestartDatabase));
    faults.push((rng.random_range(8.0..30.0), Fault::Duplicates));
    faults.push((LOAD_SECS + 1.0, Fault::Duplicates));
    faults.sort_by(|a, b| a.0.total_cmp(&b.0));

    let load_started = Instant::now();
    let mut killed_agent_back_at = None;
    let mut counts = BTreeMap::<&str, usize>::new();
    for (at, fault) in faults {
        while load_started.elapsed().as_secs_f64() < at {
            if killed_agent_back_at.is_some_and(|back: Instant| Instant::now() >= back) {
                fleet.start(AGENTS[0]);
                killed_agent_back_at = None;
                println!(
                    "[{:5.1}s] replacement of {} started",
                    load_started.elapsed().as_secs_f64(),
                    AGENTS[0]
                );
            }
            fleet.supervise().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let t = load_started.elapsed().as_secs_f64();
        match fault {
            Fault::KillStage(stage) => {
                fleet.kill(stage).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..1000))).await;
                fleet.start(stage);
                *counts.entry("stage kills").or_default() += 1;
                println!("[{t:5.1}s] killed and restarted {stage}");
            }
            Fault::KillAgent => {
                // Mid-task: when the store says it holds tasks.
                let agent = AGENTS[0];
                wait_until("the agent to hold a task", Duration::from_secs(20), async || {
                    store
                        .agents()
                        .await
                        .is_ok_and(|agents| agents.iter().any(|a| a.id.as_str() == agent && a.in_flight > 0))
                })
                .await;
                fleet.kill(agent).await;
                // Back only after its heartbeat went stale: meanwhile its tasks' leases expire and
                // the other agent takes them over.
                killed_agent_back_at = Some(Instant::now() + Duration::from_secs(20));
                *counts.entry("agent kills").or_default() += 1;
                println!("[{t:5.1}s] killed {agent} while it held tasks");
            }
            Fault::RestartBroker => {
                let took = Instant::now();
                rabbit.restart();
                *counts.entry("broker restarts").or_default() += 1;
                println!("[{t:5.1}s] restarted the broker ({:.1} s down)", took.elapsed().as_secs_f64());
            }
            Fault::RestartDatabase => {
                let took = Instant::now();
                postgres.restart();
                *counts.entry("database restarts").or_default() += 1;
                println!("[{t:5.1}s] restarted the database server ({:.1} s)", took.elapsed().as_secs_f64());
            }
            Fault::Duplicates => {
                let (entries, outputs) = inject_duplicates(&client, &config.database_url, &mut rng).await;
                *counts.entry("duplicated entries").or_default() += entries;
                *counts.entry("duplicated outputs").or_default() += outputs;
                println!("[{t:5.1}s] published copies of {entries} requests and {outputs} recorded outputs");
            }
        }
    }
    if killed_agent_back_at.is_some() {
        fleet.start(AGENTS[0]);
    }
    let accepted: Vec<(RequestId, SubmitRequest)> = load.await.expect("the load");
    println!(
        "[{:5.1}s] load done: {} accepted; faults: {counts:?}",
        load_started.elapsed().as_secs_f64(),
        accepted.len()
    );
    assert!(accepted.len() >= REQUESTS, "only {} of {REQUESTS} requests were accepted", accepted.len());
    assert!(counts["stage kills"] >= 20);

    // The faults have healed: wait until every accepted request has ended.
    let ids: Vec<uuid::Uuid> = accepted.iter().map(|(id, _)| id.as_uuid()).collect();
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    loop {
        fleet.supervise().await;
        let open = open_requests(&config.database_url, &ids).await;
        if open == Some(0) || Instant::now() >= deadline {
            println!("[{:5.1}s] {open:?} requests still open", load_started.elapsed().as_secs_f64());
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let verdict = check(&store, &config, &accepted, &mut rng).await;
    let exits = fleet.stop().await;
    println!("processes that exited by themselves (not killed by the suite): {exits}");
    println!("warnings and errors logged: {}", fleet.log_summary());
    fleet.keep_logs();
    println!("total run time {:.1} s", started.elapsed().as_secs_f64());
    if verdict.lost > 0 || verdict.duplicated > 0 || !verdict.findings.is_empty() || exits > 0 {
        fleet.show_logs();
    }
    assert!(verdict.findings.is_empty(), "{} findings: {:#?}", verdict.findings.len(), verdict.findings);
    assert_eq!(exits, 0, "a process exited by itself: a worker or agent must survive the faults");
    println!(
        "accepted={} completed={} failed={} dead_lettered={} lost={} duplicated={}",
        verdict.accepted,
        verdict.completed,
        verdict.failed,
        verdict.dead_lettered,
        verdict.lost,
        verdict.duplicated
    );
    assert_eq!((verdict.lost, verdict.duplicated), (0, 0), "lost and duplicated must be 0");
    drop(store);
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillStage(&'static str),
    KillAgent,
    RestartBroker,
    RestartDatabase,
    Duplicates,
}

/// The suite's configuration: short heartbeat TTL, leases and retries, so that recovery takes
/// seconds; the `bench` work type of `TASKS` independent steps, run by the suite's agents.
fn scene_config(dir: &Path, amqp_url: String, database_url: String) -> Config {
    let catalog = dir.join("catalog.toml");
    std::fs::write(&catalog, switchyard::bench::catalog(TASKS)).unwrap();
    let mut config = Config {
        namespace: Namespace::parse("faults").unwrap(),
        amqp_url,
        database_url,
        database_pool_size: 4,
        catalog: Some(catalog),
        ..Config::default()
    };
    config.approval.allow_request_auto_approve = true;
    config.routing.heartbeat_ttl_secs = 12;
    // No default agent: what the fleet cannot take now waits for it.
    config.routing.recheck_secs = 1;
    config.leases.factor = 2.0;
    config.leases.grace_secs = 12;
    config.leases.sweep_every_secs = 1;
    config.worker.retry_base_delay_ms = 50;
    config
}

/// What the check found.
#[derive(Debug, Default)]
struct Verdict {
    accepted: usize,
    completed: usize,
    failed: usize,
    dead_lettered: usize,
    lost: usize,
    duplicated: usize,
    /// What is wrong besides: failed audits, requests lost (with where they stand).
    findings: Vec<String>,
}

/// "Nothing lost": every accepted request is completed, failed with a reason, or dead-lettered
/// with a reason; no (task, attempt) has two routing decisions, dispatches or results; and the
/// audit of every request passes.
async fn check(
    store: &Store,
    config: &Config,
    accepted: &[(RequestId, SubmitRequest)],
    rng: &mut StdRng,
) -> Verdict {
    let mut verdict = Verdict { accepted: accepted.len(), ..Verdict::default() };
    for (id, _) in accepted {
        let report = retry(|| store.report(*id)).await;
        let dead_letters = retry(|| store.dead_letters_of_request(*id)).await;
        let dead_reason =
            dead_letters.iter().all(|d| !d.reason.trim().is_empty()) && !dead_letters.is_empty();
        match &report {
            Some(r) if r.status.as_str() == "completed" => verdict.completed += 1,
            Some(r) if !dead_letters.is_empty() && dead_reason && r.status.is_terminal() => {
                verdict.dead_lettered += 1
            }
            Some(r)
                if matches!(r.status.as_str(), "failed" | "rejected")
                    && r.failure_reason.as_deref().is_some_and(|f| !f.trim().is_empty()) =>
            {
                verdict.failed += 1
            }
            None if dead_reason => verdict.dead_lettered += 1,
            other => {
                verdict.lost += 1;
                let at = other.as_ref().map(|r| {
                    let tasks: Vec<String> = r
                        .plan
                        .iter()
                        .flat_map(|p| &p.tasks)
                        .map(|t| format!("{}={}", t.key, t.status.as_str()))
                        .collect();
                    format!("{} {:?}", r.status.as_str(), tasks)
                });
                verdict.findings.push(format!("request {id} lost: {at:?}"));
                continue;
            }
        }
        if let Some(trail) = retry(|| store.trail(*id)).await {
            let findings = switchyard::decisions::audit::check(&trail);
            if !findings.is_empty() {
                verdict.findings.push(format!("audit of {id}: {}", findings.join("; ")));
            }
        }
    }
    // Unique keys should make these impossible; the suite counts rather than trusts them.
    let client = connect(&config.database_url).await;
    for table in ["routing_decisions", "dispatches", "task_results"] {
        let row = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM (SELECT task_id, attempt FROM {table}
                     GROUP BY task_id, attempt HAVING count(*) > 1) d"
                ),
                &[],
            )
            .await
            .unwrap();
        verdict.duplicated += row.get::<_, i64>(0) as usize;
    }
    // No audit event that happens once per request, or once per attempt of a task, happened
    // twice: the audit log has no unique keys, so a write applied twice would show here.
    let row = client
        .query_one(
            "SELECT
                (SELECT count(*) FROM (SELECT request_id, event FROM audit_log
                    WHERE event IN ('request.received', 'request.decomposed', 'plan.created',
                                    'fallback.decided', 'plan.approved', 'request.completed',
                                    'request.failed')
                    GROUP BY 1, 2 HAVING count(*) > 1) r)
              + (SELECT count(*) FROM (SELECT task_id, detail->>'attempt', event FROM audit_log
                    WHERE event IN ('task.routed', 'task.dispatched', 'task.succeeded',
                                    'task.attempt_failed')
                    GROUP BY 1, 2, 3 HAVING count(*) > 1) t)",
            &[],
        )
        .await
        .unwrap();
    verdict.duplicated += row.get::<_, i64>(0) as usize;
    // Every attempt gave back the capacity its routing decision took, once.
    for row in client.query("SELECT id, in_flight FROM agents_now WHERE in_flight <> 0", &[]).await.unwrap() {
        verdict.findings.push(format!(
            "agent {} still counts {} tasks in flight with every request ended",
            row.get::<_, String>(0),
            row.get::<_, i32>(1)
        ));
    }
    // No plan has more tasks than its request asked for.
    let row = client
        .query_one(
            "SELECT count(*) FROM (SELECT plan_id FROM tasks GROUP BY plan_id HAVING count(*) <> $1) p",
            &[&(TASKS as i64)],
        )
        .await
        .unwrap();
    verdict.duplicated += row.get::<_, i64>(0) as usize;
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE source = 'lease'), count(*) FILTER (WHERE attempt > 1)
             FROM task_results",
            &[],
        )
        .await
        .unwrap();
    println!(
        "attempts ended by an expired lease: {}; results of retried attempts: {}",
        row.get::<_, i64>(0),
        row.get::<_, i64>(1)
    );
    let rows = client
        .query(
            "SELECT agent_id, floor(extract(epoch FROM received_at - (SELECT min(created_at) FROM requests)) / 5)::int * 5,
                    count(*)
             FROM task_results WHERE source = 'lease' GROUP BY 1, 2 ORDER BY 1, 2",
            &[],
        )
        .await
        .unwrap();
    let spread: Vec<String> = rows
        .iter()
        .map(|r| format!("{}@{}s:{}", r.get::<_, String>(0), r.get::<_, i32>(1), r.get::<_, i64>(2)))
        .collect();
    println!("expired leases by agent and time: {spread:?}");
    // The command line's audit too, for a sample (it checks one request per process).
    for _ in 0..10 {
        let (id, _) = &accepted[rng.random_range(0..accepted.len())];
        let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["audit", &id.to_string()])
            .env("AMQP_URL", &config.amqp_url)
            .env("DATABASE_URL", &config.database_url)
            .env("SWITCHYARD_NAMESPACE", config.namespace.as_str())
            .env_remove("SWITCHYARD_CONFIG")
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        if !output.status.success() {
            verdict.findings.push(format!(
                "switchyard audit {id} exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stdout)
            ));
        }
    }
    verdict
}

/// How many of `ids` are not terminal yet (no row counts as open unless a dead letter refused
/// it); `None` when the database cannot tell right now.
async fn open_requests(database_url: &str, ids: &[uuid::Uuid]) -> Option<i64> {
    let (client, connection) = tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT count(*) FROM unnest($1::uuid[]) AS a(id)
             WHERE NOT EXISTS (SELECT 1 FROM requests r WHERE r.id = a.id
                                 AND r.status IN ('completed', 'failed', 'rejected'))
               AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.request_id = a.id
                                 AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.id = a.id))",
            &[&ids],
        )
        .await
        .ok()?;
    Some(row.get(0))
}

async fn connect(database_url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(database_url, tokio_postgres::NoTls).await.expect("the database");
    tokio::spawn(connection);
    client
}

/// Retries a read through the store while the database is restarting.
async fn retry<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(mut f: impl FnMut() -> F) -> T {
    let mut tries = 0;
    loop {
        match f().await {
            Ok(value) => return value,
            Err(err) if tries < 50 => {
                tries += 1;
                eprintln!("read failed ({err}); trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => panic!("the store keeps failing: {err}"),
        }
    }
}

async fn wait_until(what: &str, timeout: Duration, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits `REQUESTS` auto-approved requests evenly over `LOAD_SECS`; a request is accepted once
/// the broker confirmed its publish. A publish that fails (the broker is restarting) is tried
/// again with the same request id, as a client would.
async fn submit_load(client: Client) -> Vec<(RequestId, SubmitRequest)> {
    let started = Instant::now();
    let pace = Duration::from_secs_f64(LOAD_SECS / REQUESTS as f64);
    futures::stream::iter(0..REQUESTS)
        .then(|i| async move {
            tokio::time::sleep_until((started + pace * i as u32).into()).await;
            i
        })
        .map(|i| {
            let client = client.clone();
            async move {
                let request = SubmitRequest {
                    text: format!("benchmark request {i} under faults"),
                    request_id: Some(RequestId::random()),
                    submitted_by: Some("faults".into()),
                    priority: None,
                    auto_approve: Some(true),
                };
                let deadline = Instant::now() + Duration::from_secs(90);
                while Instant::now() < deadline {
                    let broker = client.broker().await;
                    let published = tokio::time::timeout(
                        Duration::from_secs(10),
                        switchyard::ops::submit(&broker, request.clone()),
                    )
                    .await;
                    match published {
                        Ok(Ok(id)) => return Some((id, request)),
                        Ok(Err(_)) | Err(_) => {
                            client.forget(&broker).await;
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                    }
                }
                None
            }
        })
        .buffer_unordered(64)
        .filter_map(std::future::ready)
        .collect()
        .await
}

/// Publishes copies of what was already delivered: entry requests (same id, same body) and
/// outputs the stages recorded, with their message ids, into the queues they went to. Returns
/// how many of each.
async fn inject_duplicates(client: &Client, database_url: &str, rng: &mut StdRng) -> (usize, usize) {
    let db = connect(database_url).await;
    let names = client.names.clone();
    let mut messages = Vec::new();
    let seed = rng.random::<f64>() * 2.0 - 1.0;
    db.execute("SELECT setseed($1)", &[&seed]).await.unwrap();
    let requests = db
        .query("SELECT id, text, submitted_by FROM requests ORDER BY random() LIMIT 40", &[])
        .await
        .unwrap();
    for row in &requests {
        let request = SubmitRequest {
            text: row.get(1),
            request_id: Some(RequestId::from_uuid(row.get(0))),
            submitted_by: row.get(2),
            priority: None,
            auto_approve: Some(true),
        };
        let mut outgoing = Outgoing::to_queue(names.requests(), serde_json::to_vec(&request).unwrap());
        outgoing.message_id = Some(request.request_id.unwrap().to_string());
        messages.push(outgoing);
    }
    let entry_count = messages.len();
    let recorded = db
        .query(
            "SELECT outputs FROM processed_messages WHERE jsonb_array_length(outputs) > 0
             ORDER BY random() LIMIT 150",
            &[],
        )
        .await
        .unwrap();
    for row in recorded {
        let publish: Vec<Publish> = serde_json::from_value(row.get(0)).unwrap();
        for publish in publish {
            let queue = match &publish.destination {
                Destination::Queue(queue) => names.of(*queue),
                Destination::Agent(agent) => names.agent_queue(agent),
            };
            let mut outgoing = Outgoing::to_queue(queue, serde_json::to_vec(&publish.body).unwrap());
            outgoing.message_id = Some(publish.message_id.to_string());
            outgoing.priority = Some(publish.priority);
            messages.push(outgoing);
        }
    }
    let output_count = messages.len() - entry_count;
    for outgoing in &messages {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let broker = client.broker().await;
            match broker.publish(outgoing).await {
                Ok(()) => break,
                Err(err) => {
                    client.forget(&broker).await;
                    assert!(Instant::now() < deadline, "could not publish a duplicate: {err}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    (entry_count, output_count)
}

/// A broker connection for the suite itself, connected again when the broker restarts.
#[derive(Clone)]
struct Client {
    url: String,
    names: Names,
    broker: Arc<tokio::sync::Mutex<Option<Arc<Broker>>>>,
}

impl Client {
    fn new(url: String, names: Names) -> Self {
        Client { url, names, broker: Arc::new(tokio::sync::Mutex::new(None)) }
    }

    async fn broker(&self) -> Arc<Broker> {
        let mut slot = self.broker.lock().await;
        loop {
            if let Some(broker) = slot.as_ref()
                && broker.is_healthy()
            {
                return broker.clone();
            }
            match Broker::connect(&self.url, self.names.clone()).await {
                Ok(broker) => *slot = Some(Arc::new(broker)),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }

    /// Drops `broken` if it is still the current connection.
    async fn forget(&self, broken: &Arc<Broker>) {
        let mut slot = self.broker.lock().await;
        if slot.as_ref().is_some_and(|b| Arc::ptr_eq(b, broken)) {
            *slot = None;
        }
    }
}

/// The `switchyard` processes: one `worker` per stage and the agents, each logging to a file of
/// its own. A process that exits without the suite having killed it is started again, and
/// counted.
struct Fleet {
    exe: PathBuf,
    config_file: PathBuf,
    amqp_url: String,
    database_url: String,
    logs: PathBuf,
    children: HashMap<&'static str, Child>,
    exits: usize,
}

impl Fleet {
    fn new(dir: &Path, config: &Config) -> Self {
        let config_file = dir.join("switchyard.toml");
        // The URLs go through the environment, as in production.
        let mut shown = config.clone();
        shown.amqp_url = switchyard::config::DEFAULT_AMQP_URL.into();
        shown.database_url = switchyard::config::DEFAULT_DATABASE_URL.into();
        std::fs::write(&config_file, toml::to_string(&shown).unwrap()).unwrap();
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        Fleet {
            exe: PathBuf::from(env!("CARGO_BIN_EXE_switchyard")),
            config_file,
            amqp_url: config.amqp_url.clone(),
            database_url: config.database_url.clone(),
            logs,
            children: HashMap::new(),
            exits: 0,
        }
    }

    fn args(name: &str) -> Vec<String> {
        if STAGES.contains(&name) {
            return ["worker", "--stage", name].map(String::from).to_vec();
        }
        [
            "agent",
            "--id",
            name,
            "--capabilities",
            "bench",
            "--capacity",
            AGENT_CAPACITY,
            "--cpu",
            "8",
            "--memory-mb",
            "8192",
            "--speed",
            "0.3",
            "--heartbeat-secs",
            "1",
        ]
        .map(String::from)
        .to_vec()
    }

    fn start(&mut self, name: &'static str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))
            .unwrap();
        let child = Command::new(&self.exe)
            .arg("--config")
            .arg(&self.config_file)
            .args(Self::args(name))
            .env("AMQP_URL", &self.amqp_url)
            .env("DATABASE_URL", &self.database_url)
            .env_remove("SWITCHYARD_NAMESPACE")
            .env_remove("SWITCHYARD_CONFIG")
            .env("RUST_LOG", "warn,lapin::returned_messages=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("the switchyard binary starts");
        self.children.insert(name, child);
    }

    async fn kill(&mut self, name: &'static str) {
        if let Some(mut child) = self.children.remove(name) {
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reaped");
        }
    }

    /// Starts again every process that exited by itself.
    async fn supervise(&mut self) {
        let exited: Vec<&'static str> = self
            .children
            .iter_mut()
            .filter_map(|(name, child)| match child.try_wait() {
                Ok(Some(status)) => {
                    eprintln!("{name} exited by itself ({status}); starting it again");
                    Some(*name)
                }
                _ => None,
            })
            .collect();
        for name in exited {
            self.exits += 1;
            self.start(name);
        }
    }

    /// Stops every process (SIGTERM, then SIGKILL); how many exited by themselves meanwhile.
    async fn stop(&mut self) -> usize {
        self.supervise().await;
        for (_, mut child) in self.children.drain() {
            if let Some(pid) = child.id() {
                // SAFETY: kill(2) on a child of ours that has not been reaped.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            if tokio::time::timeout(Duration::from_secs(10), child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
        self.exits
    }

    /// How many warnings and errors each process logged.
    fn log_summary(&self) -> String {
        let mut counts: Vec<String> = std::fs::read_dir(&self.logs)
            .unwrap()
            .flatten()
            .map(|entry| {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let count = |level: &str| text.lines().filter(|l| l.contains(level)).count();
                let name = entry.file_name().to_string_lossy().trim_end_matches(".log").to_owned();
                format!("{name}={}/{}", count("WARN"), count("ERROR"))
            })
            .collect();
        counts.sort();
        counts.join(" ")
    }

    /// Copies the processes' logs into `SWITCHYARD_FAULTS_LOGS`, if set, before the scratch
    /// directory goes.
    fn keep_logs(&self) {
        let Some(target) = std::env::var_os("SWITCHYARD_FAULTS_LOGS") else { return };
        let target = PathBuf::from(target);
        std::fs::create_dir_all(&target).unwrap();
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            let _ = std::fs::copy(entry.path(), target.join(entry.file_name()));
        }
        println!("process logs copied to {}", target.display());
    }

    /// The last lines each process logged, for a failed run.
    fn show_logs(&self) {
        for entry in std::fs::read_dir(&self.logs).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("---- {} ({} lines), the last 40:", entry.file_name().to_string_lossy(), lines.len());
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// The suite's scratch directory, removed at the end (after the servers in it stopped: they are
/// dropped first, being declared after it).
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let dir = std::env::temp_dir().join(format!("switchyard-faults-{}", &id[..12]));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on the loopback interface (free when asked; the servers take it right after).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

fn running_as_root() -> bool {
    // SAFETY: geteuid(2) cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A RabbitMQ node of the suite's own: its own name, ports, data, logs and Erlang cookie, and no
/// plugins (so no management port to clash with).
struct Rabbit {
    dir: PathBuf,
    node: String,
    port: u16,
    dist_port: u16,
    server: Option<std::process::Child>,
}

impl Rabbit {
    fn start(scratch: &Path) -> Self {
        let dir = scratch.join("rabbitmq");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        let id = scratch.file_name().unwrap().to_string_lossy().replace("switchyard-faults-", "");
        let mut rabbit = Rabbit {
            dir,
            node: format!("sy-fault-{id}@localhost"),
            port: free_port(),
            dist_port: free_port(),
            server: None,
        };
        rabbit.boot();
        rabbit
    }

    /// The scripts themselves rather than the packaged wrappers in the PATH, which switch to the
    /// `rabbitmq` user (and its home, and its cookie) when run as root.
    fn program(name: &str) -> PathBuf {
        let packaged = Path::new("/usr/lib/rabbitmq/bin").join(name);
        if packaged.exists() { packaged } else { PathBuf::from(name) }
    }

    fn command(&self, name: &str) -> std::process::Command {
        let mut command = std::process::Command::new(Self::program(name));
        let dir = &self.dir;
        command
            .current_dir(dir)
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_PID_FILE", dir.join("pid"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .stdin(Stdio::null());
        command
    }

    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn boot(&mut self) {
        use std::os::unix::process::CommandExt;
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("server.out")).unwrap();
        let server = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            // A process group of its own, so that the suite's end can kill it whole.
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server starts");
        self.server = Some(server);
        let deadline = Instant::now() + Duration::from_secs(90);
        while !port_open(self.port) {
            if let Some(status) = self.server.as_mut().unwrap().try_wait().unwrap() {
                let out = std::fs::read_to_string(self.dir.join("server.out")).unwrap_or_default();
                panic!("rabbitmq-server exited ({status}):\n{out}");
            }
            assert!(Instant::now() < deadline, "the private RabbitMQ node did not open its port");
            std::thread::sleep(Duration::from_millis(200));
        }
        let ready = self.command("rabbitmqctl").args(["-n", &self.node, "await_startup"]).output().unwrap();
        assert!(ready.status.success(), "await_startup: {}", String::from_utf8_lossy(&ready.stderr));
    }

    fn stop(&mut self) {
        let Some(mut server) = self.server.take() else { return };
        let _ = self.command("rabbitmqctl").args(["-n", &self.node, "stop"]).output();
        let deadline = Instant::now() + Duration::from_secs(30);
        while server.try_wait().ok().flatten().is_none() {
            if Instant::now() >= deadline {
                // SAFETY: killpg(2) on the group of a child of ours.
                unsafe { libc::killpg(server.id() as i32, libc::SIGKILL) };
                let _ = server.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A real stop and start of the node: durable queues and persistent messages survive.
    fn restart(&mut self) {
        self.stop();
        self.boot();
    }
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL server of the suite's own (initdb into the scratch directory, trust
/// authentication, a free port). initdb refuses root: as root, it runs as the `postgres` user.
struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    running: bool,
}

impl Postgres {
    fn start(scratch: &Path) -> Self {
        let dir = scratch.join("postgres");
        std::fs::create_dir_all(&dir).unwrap();
        if running_as_root() {
            let status = std::process::Command::new("chown").arg("postgres").arg(&dir).status().unwrap();
            assert!(status.success(), "cannot give the database directory to the postgres user");
        }
        let postgres = Postgres { dir, bin: Self::bin_dir(), port: free_port(), running: false };
        let data = postgres.dir.join("data");
        let init = postgres
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .unwrap();
        assert!(init.status.success(), "initdb: {}", String::from_utf8_lossy(&init.stderr));
        let mut postgres = postgres;
        postgres.pg_ctl("start");
        postgres.running = true;
        postgres
    }

    /// The newest installed server's programs, else the PATH's.
    fn bin_dir() -> PathBuf {
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .filter(|(_, bin)| bin.join("initdb").exists())
            .collect();
        found.sort();
        found.pop().map(|(_, bin)| bin).unwrap_or_default()
    }

    fn command(&self, program: &str) -> std::process::Command {
        let program = self.bin.join(program);
        let mut command = if running_as_root() {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            std::process::Command::new(program)
        };
        command.stdin(Stdio::null());
        command
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let output = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-l"])
            .arg(self.dir.join("server.log"))
            .args(["-m", "fast", "-w", "-t", "60", "-o", &options, action])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "pg_ctl {action}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/switchyard", self.port)
    }

    /// `pg_ctl restart`, fast mode: every connection is closed, the server comes back.
    fn restart(&mut self) {
        self.pg_ctl("restart");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-m", "immediate", "-w", "stop"])
                .output();
        }
    }
}
