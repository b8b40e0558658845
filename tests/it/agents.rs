//! The agent runtime against the real broker: in-process agents through the library API, and the
//! `switchyard agent` binary. An agent registers by heartbeat, takes the tasks the pipeline
//! dispatches to it, runs them, reports their results to `<ns>.results` and acknowledges a task
//! only after its result is confirmed.
//!
//! With the whole pipeline running (`spawn_app`), the track stage consumes the results: those
//! tests read them from the store. The tests of the runtime's own delivery semantics run the
//! agent alone in a [`Bare`] namespace (no stage, no database), where the results stay in
//! `<ns>.results` to be read as they were published.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use switchyard::agent::{self, AgentBuilder, Execution, Simulate, TaskHandler};
use switchyard::broker::{Broker, Outgoing};
use switchyard::model::domain::{Resources, Task};
use switchyard::model::ids::{AgentId, MessageId, Namespace, RequestId, WorkType};
use switchyard::model::wire::{self, Envelope, TaskAssignment, TaskResult};
use switchyard::pipeline::topology::{Names, Topology};
use tokio::sync::Notify;

use crate::helpers::*;

const UPTIME_KUMA: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";
const HOMELAB_CAPABILITIES: [&str; 4] = ["deployment", "monitoring", "shell", "docker"];

fn homelab(id: &str) -> AgentBuilder {
    AgentBuilder::new(AgentId::parse(id).unwrap())
        .capabilities(HOMELAB_CAPABILITIES)
        .capacity(2)
        .label("target", "homelab")
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500))
}

/// A namespace with its topology and nothing else: no stage, no database. What an agent
/// publishes stays in the queues, to be read as it was sent. Deleted on drop.
pub(crate) struct Bare {
    pub(crate) amqp_url: String,
    pub(crate) names: Names,
    pub(crate) broker: Broker,
    pub(crate) agent_queues: Vec<String>,
}

impl Bare {
    pub(crate) async fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let names = Names::new(Namespace::parse(format!("a{}", &id[..12])).unwrap());
        let amqp_url = amqp_url();
        let broker = Broker::connect(&amqp_url, names.clone()).await.expect("the broker");
        broker.declare_topology().await.expect("the topology");
        Bare { amqp_url, names, broker, agent_queues: Vec::new() }
    }

    pub(crate) async fn declare_agent_queue(&mut self, id: &str) -> String {
        let agent = AgentId::parse(id).unwrap();
        let queue = self.broker.declare_agent_queue(&agent).await.unwrap();
        self.agent_queues.push(queue.clone());
        // What the agent declares besides, when it runs: deleted with the rest.
        self.agent_queues.push(self.names.agent_control_queue(&agent));
        queue
    }

    pub(crate) async fn publish_assignment(
        &self,
        agent: &str,
        assignment: &Envelope<TaskAssignment>,
        priority: Option<u8>,
    ) {
        let mut outgoing = Outgoing::to_queue(
            self.names.agent_queue(&AgentId::parse(agent).unwrap()),
            serde_json::to_vec(assignment).unwrap(),
        );
        outgoing.message_id = Some(assignment.message_id.to_string());
        outgoing.priority = priority;
        self.broker.publish(&outgoing).await.expect("published");
    }

    /// Every message in `queue` (full name), with its priority.
    pub(crate) async fn drain(&self, queue: &str) -> Vec<(Value, Option<u8>)> {
        let mut messages = Vec::new();
        while let Some(message) = self.broker.get(queue).await.expect("basic.get") {
            messages.push((serde_json::from_slice(&message.body).expect("JSON"), message.priority));
        }
        messages
    }

    /// Takes results from `<ns>.results` until there are `count`.
    pub(crate) async fn wait_results(&self, count: usize) -> Vec<(Value, Option<u8>)> {
        let queue = self.names.queue("results");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut results = Vec::new();
        while results.len() < count {
            results.extend(self.drain(&queue).await);
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} results arrived, expected {count}: {results:#?}",
                results.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        results
    }

    /// The first heartbeat in `<ns>.heartbeats`, waiting for one.
    pub(crate) async fn heartbeats(&self) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some((beat, _)) = self.drain(&self.names.heartbeats()).await.into_iter().next() {
                return beat;
            }
            assert!(tokio::time::Instant::now() < deadline, "no heartbeat");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Bare {
    fn drop(&mut self) {
        let topology = Topology::standard().resolve(self.names.namespace());
        let mut queues: Vec<String> = topology.queues.into_iter().map(|q| q.name).collect();
        queues.extend(self.agent_queues.iter().cloned());
        let exchanges: Vec<String> = topology.exchanges.into_iter().map(|e| e.name).collect();
        let (amqp_url, names) = (self.amqp_url.clone(), self.names.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                if let Ok(broker) = Broker::connect(&amqp_url, names).await {
                    let _ = broker.delete_queues(&queues).await;
                    let _ = broker.delete_exchanges(&exchanges).await;
                    broker.close().await;
                }
            });
        })
        .join()
        .ok();
    }
}

/// An assignment as the dispatch stage makes it, for publishing straight into an agent's queue.
pub(crate) fn assignment(agent: &str, key: &str, duration_secs: u32) -> Envelope<TaskAssignment> {
    let request_id = RequestId::random();
    let plan_id = request_id.plan_id();
    let task_id = plan_id.task_id(key);
    let payload = TaskAssignment {
        plan_id,
        attempt: 1,
        decision_id: task_id.decision_id(1),
        agent_id: AgentId::parse(agent).unwrap(),
        task: Task {
            id: task_id,
            key: key.into(),
            work_type: WorkType::parse("deployment").unwrap(),
            description: "Deploy Uptime Kuma to the homelab".into(),
            estimated_duration_secs: duration_secs,
            resources: Resources { cpu: 1.0, memory_mb: 512, gpu: 0 },
            capabilities: ["deployment".to_owned()].into(),
            depends_on: Vec::new(),
            affinity: Default::default(),
        },
    };
    let message_id = MessageId::random();
    Envelope::derived(message_id, "dispatch", request_id, Utc::now(), payload)
}

fn message_id(value: &Value) -> MessageId {
    value.as_str().expect("a message id").parse().expect("a UUID")
}

#[tokio::test]
async fn an_agent_registers_by_heartbeat_and_runs_a_whole_plan_to_completion() {
    let app = spawn_app().await;
    let agent =
        start_agent(&app.config.amqp_url, &app.names, homelab("homelab-1"), Simulate::new(0.0, 0.0).unwrap())
            .await;
    let registered = wait_registered(&app, "homelab-1").await;
    assert_eq!(registered.capacity, 2);
    assert_eq!(registered.capabilities, HOMELAB_CAPABILITIES.map(String::from).into());
    assert_eq!(registered.labels["target"], "homelab");
    assert_eq!(registered.resources.memory_mb, 8192);
    let queue = app.agent_queue("homelab-1");
    app.broker.queue_len(&queue).await.expect("the agent declared its queue");
    // Declared again (the same way) only so that the test's teardown deletes it.
    app.declare_agent_queue("homelab-1").await;

    let id = app.submit(UPTIME_KUMA, true).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "completed").await;
    let plan = report.plan.as_ref().unwrap();
    let results: Vec<(&str, u32, &str, bool, &str)> = plan
        .results
        .iter()
        .map(|r| {
            let key = plan.tasks.iter().find(|t| t.id == r.task_id).map(|t| t.key.as_str()).unwrap();
            (key, r.attempt, r.agent_id.as_str(), r.success, r.source.as_str())
        })
        .collect();
    assert_eq!(
        results,
        ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"].map(|key| (
            key,
            1,
            "homelab-1",
            true,
            "simulated"
        )),
    );
    for result in &plan.results {
        assert!(result.output.starts_with("simulated ") && result.output.ends_with(" in 0 ms"), "{result:?}");
        assert!(result.error.is_none() && result.started_at <= result.finished_at, "{result:?}");
    }
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));

    // Every assignment was acknowledged: stopped, the agent's channel closes, and an
    // unacknowledged delivery would be back in the queue.
    agent.stop().await.expect("a clean stop");
    assert_eq!(app.broker.queue_len(&queue).await.unwrap(), 0, "every assignment acknowledged");
    let agents = app.store.agents().await.unwrap();
    assert_eq!((agents[0].in_flight, agents[0].succeeded), (0, 5));
}

#[tokio::test]
async fn a_failing_agent_reports_the_failure() {
    let app = spawn_app_with(|c| c.tracking.max_attempts = 1).await;
    let agent =
        start_agent(&app.config.amqp_url, &app.names, homelab("homelab-1"), Simulate::new(0.0, 1.0).unwrap())
            .await;
    wait_registered(&app, "homelab-1").await;
    app.declare_agent_queue("homelab-1").await;
    let id = app.submit(UPTIME_KUMA, true).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "failed").await;
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.results.len(), 1, "{:?}", plan.results);
    let result = &plan.results[0];
    assert_eq!(result.task_id, id.plan_id().task_id("1.prepare"));
    assert_eq!((result.attempt, result.agent_id.as_str(), result.success), (1, "homelab-1", false));
    assert_eq!(result.error.as_deref(), Some(agent::SIMULATED_FAILURE));
    assert_eq!(result.output, "simulated 1.prepare in 0 ms");
    let reason = report.failure_reason.as_deref().unwrap();
    assert!(reason.contains(agent::SIMULATED_FAILURE), "{reason}");
    agent.stop().await.unwrap();
    assert_eq!(app.broker.queue_len(&app.agent_queue("homelab-1")).await.unwrap(), 0);
}

#[tokio::test]
async fn a_result_is_an_envelope_derived_from_its_assignment() {
    let mut bare = Bare::new().await;
    let queue = bare.declare_agent_queue("homelab-1").await;
    let agent =
        start_agent(&bare.amqp_url, &bare.names, homelab("homelab-1"), Simulate::new(0.0, 0.0).unwrap())
            .await;
    let task = assignment("homelab-1", "1.prepare", 5);
    bare.publish_assignment("homelab-1", &task, Some(7)).await;
    let results = bare.wait_results(1).await;
    let (result, priority) = &results[0];
    assert_eq!(result["schema_version"], 1);
    assert_eq!(message_id(&result["message_id"]), task.message_id.derive("result"));
    assert_eq!(message_id(&result["causation_id"]), task.message_id);
    assert_eq!(result["request_id"], task.request_id.to_string());
    assert_eq!(*priority, Some(7), "the assignment's priority");
    let payload = &result["payload"];
    assert_eq!(payload["plan_id"], task.payload.plan_id.to_string());
    assert_eq!(payload["task_id"], task.payload.task.id.to_string());
    assert_eq!(payload["attempt"], 1);
    assert_eq!(payload["agent_id"], "homelab-1");
    assert_eq!(payload["success"], true);
    assert_eq!(payload["output"], "simulated 1.prepare in 0 ms");
    assert!(payload.get("error").is_none() && payload.get("lease_expired").is_none(), "{payload:#}");
    // What the track stage reads.
    let body = serde_json::to_vec(result).unwrap();
    wire::parse_envelope::<TaskResult>(&body, wire::MAX_ENVELOPE_BYTES).expect("a valid result");
    let heartbeat = bare.heartbeats().await;
    assert_eq!(heartbeat["agent_id"], "homelab-1");
    assert_eq!(heartbeat["capacity"], 2);
    agent.stop().await.unwrap();
    assert_eq!(bare.broker.queue_len(&queue).await.unwrap(), 0, "acknowledged");
}

#[tokio::test]
async fn an_unusable_assignment_is_dropped_and_the_agent_carries_on() {
    let mut bare = Bare::new().await;
    let queue = bare.declare_agent_queue("homelab-1").await;
    for garbage in [&b"{not json"[..], br#"{"schema_version": 1, "payload": {}}"#, b"[]"] {
        bare.broker.publish(&Outgoing::to_queue(queue.clone(), garbage.to_vec())).await.unwrap();
    }
    let agent =
        start_agent(&bare.amqp_url, &bare.names, homelab("homelab-1"), Simulate::new(0.0, 0.0).unwrap())
            .await;
    let task = assignment("homelab-1", "1.prepare", 5);
    bare.publish_assignment("homelab-1", &task, None).await;
    let results = bare.wait_results(1).await;
    assert_eq!(results[0].0["payload"]["task_id"], task.payload.task.id.to_string());
    assert!(!agent.handle.is_finished(), "the agent still runs");
    agent.stop().await.unwrap();
    assert_eq!(bare.broker.queue_len(&queue).await.unwrap(), 0, "rejected, not given back");
    assert!(bare.drain(&bare.names.queue("results")).await.is_empty(), "no result for the garbage");
}

#[tokio::test]
async fn an_assignment_for_another_agent_is_rejected_without_running_it() {
    let mut bare = Bare::new().await;
    let queue = bare.declare_agent_queue("homelab-1").await;
    let runs = Arc::new(AtomicU32::new(0));
    let handler = Slow { runs: runs.clone(), ..Slow::default() };
    let agent = start_agent(&bare.amqp_url, &bare.names, homelab("homelab-1"), handler).await;
    // In homelab-1's queue, but routed to homelab-2: its result would be reported under the wrong
    // agent, and the track stage would ignore it.
    let stray = assignment("homelab-2", "1.prepare", 5);
    bare.publish_assignment("homelab-1", &stray, None).await;
    let task = assignment("homelab-1", "1.deploy", 5);
    bare.publish_assignment("homelab-1", &task, None).await;
    let results = bare.wait_results(1).await;
    assert_eq!(results[0].0["payload"]["task_id"], task.payload.task.id.to_string());
    agent.stop().await.expect("a clean stop");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only the agent's own assignment ran");
    assert!(bare.drain(&bare.names.queue("results")).await.is_empty(), "no result for the stray one");
    assert_eq!(bare.broker.queue_len(&queue).await.unwrap(), 0, "rejected, not given back");
}

/// A handler that never finishes on its own, and says when it started and when it was dropped
/// unfinished (aborted).
#[derive(Default)]
struct Endless {
    started: Arc<Notify>,
    aborted: Arc<Notify>,
}

struct NotifyOnDrop(Arc<Notify>);

impl Drop for NotifyOnDrop {
    fn drop(&mut self) {
        self.0.notify_one();
    }
}

impl TaskHandler for Endless {
    async fn run(&self, _: &TaskAssignment) -> Execution {
        let _aborted = NotifyOnDrop(self.aborted.clone());
        self.started.notify_one();
        std::future::pending().await
    }
}

#[tokio::test]
async fn a_lost_connection_aborts_the_running_tasks_at_once_and_gives_them_back() {
    let mut bare = Bare::new().await;
    let queue = bare.declare_agent_queue("homelab-1").await;
    let handler = Endless::default();
    let (started, aborted) = (handler.started.clone(), handler.aborted.clone());
    // A long grace: were it waited for, the test would time out.
    let agent = homelab("homelab-1").shutdown_grace(Duration::from_secs(120)).build(handler).unwrap();
    let broker = Arc::new(Broker::connect(&bare.amqp_url, bare.names.clone()).await.unwrap());
    let running = tokio::spawn(agent.run(broker.clone(), tokio_util::sync::CancellationToken::new()));
    bare.publish_assignment("homelab-1", &assignment("homelab-1", "1.prepare", 5), None).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await.expect("the task started");

    // The agent's connection goes: its deliveries can no longer be acknowledged.
    broker.close().await;
    let ran = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the agent returns at once, without waiting for its running task")
        .expect("the agent's task");
    assert!(ran.is_err(), "a lost connection is an error for the caller to reconnect on: {ran:?}");
    tokio::time::timeout(Duration::from_secs(1), aborted.notified())
        .await
        .expect("the running task was aborted");
    // Not acknowledged: the broker gives it back, to be run again.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bare.broker.queue_len(&queue).await.unwrap() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the aborted task never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(bare.drain(&bare.names.queue("results")).await.is_empty(), "no result");
}

/// A handler that says when it started, works for a while, and counts its runs and how many
/// ran at once.
#[derive(Default)]
struct Slow {
    started: Arc<Notify>,
    runs: Arc<AtomicU32>,
    running: Arc<AtomicU32>,
    most_at_once: Arc<AtomicU32>,
    work: Duration,
}

impl TaskHandler for Slow {
    async fn run(&self, task: &TaskAssignment) -> Execution {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_at_once.fetch_max(now, Ordering::SeqCst);
        self.started.notify_one();
        tokio::time::sleep(self.work).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        Execution::succeeded(format!("done {}", task.task.key))
    }
}

#[tokio::test]
async fn tasks_run_concurrently_up_to_the_capacity() {
    let mut bare = Bare::new().await;
    bare.declare_agent_queue("homelab-1").await;
    let most_at_once = Arc::new(AtomicU32::new(0));
    let handler =
        Slow { most_at_once: most_at_once.clone(), work: Duration::from_millis(300), ..Slow::default() };
    let agent = start_agent(&bare.amqp_url, &bare.names, homelab("homelab-1").capacity(2), handler).await;
    for n in 0..5 {
        bare.publish_assignment("homelab-1", &assignment("homelab-1", &format!("1.step{n}"), 5), None).await;
    }
    let results = bare.wait_results(5).await;
    assert!(results.iter().all(|(r, _)| r["payload"]["success"] == true));
    assert_eq!(most_at_once.load(Ordering::SeqCst), 2, "two at a time, never more");
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn on_shutdown_the_running_task_finishes_and_reports() {
    let mut bare = Bare::new().await;
    let queue = bare.declare_agent_queue("homelab-1").await;
    let started = Arc::new(Notify::new());
    let handler = Slow { started: started.clone(), work: Duration::from_millis(1500), ..Slow::default() };
    let agent = start_agent(&bare.amqp_url, &bare.names, homelab("homelab-1"), handler).await;
    let task = assignment("homelab-1", "1.prepare", 5);
    bare.publish_assignment("homelab-1", &task, None).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await.expect("the task started");
    // Stopped mid-task: `run` returns once the task finished and its result is confirmed.
    let stopping = tokio::time::Instant::now();
    agent.stop().await.expect("a clean stop");
    assert!(stopping.elapsed() >= Duration::from_millis(500), "it waited for the task");
    let results = bare.drain(&bare.names.queue("results")).await;
    assert_eq!(results.len(), 1, "the result was published before the agent stopped");
    assert_eq!(results[0].0["payload"]["output"], "done 1.prepare");
    assert_eq!(bare.broker.queue_len(&queue).await.unwrap(), 0, "and the task acknowledged");
}

#[tokio::test]
async fn a_task_still_running_after_the_grace_goes_back_to_the_queue() {
    let mut bare = Bare::new().await;
    let queue = bare.declare_agent_queue("homelab-1").await;
    let started = Arc::new(Notify::new());
    let handler = Slow { started: started.clone(), work: Duration::from_secs(60), ..Slow::default() };
    let builder = homelab("homelab-1").shutdown_grace(Duration::from_millis(200));
    let agent = start_agent(&bare.amqp_url, &bare.names, builder, handler).await;
    bare.publish_assignment("homelab-1", &assignment("homelab-1", "1.prepare", 5), None).await;
    tokio::time::timeout(Duration::from_secs(10), started.notified()).await.expect("the task started");
    agent.stop().await.expect("a clean stop");
    assert!(bare.drain(&bare.names.queue("results")).await.is_empty(), "no result");
    // Not acknowledged: the broker gives it back once the agent's channel is closed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bare.broker.queue_len(&queue).await.unwrap() != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the abandoned task never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_result_that_cannot_be_published_sends_the_task_back_until_it_can() {
    let mut bare = Bare::new().await;
    bare.declare_agent_queue("homelab-1").await;
    let runs = Arc::new(AtomicU32::new(0));
    let handler = Slow { runs: runs.clone(), ..Slow::default() };
    let agent =
        start_agent(&bare.amqp_url, &bare.names, homelab("homelab-1").result_attempts(2), handler).await;
    // Once it consumes, the agent has declared the topology it starts with; then the results
    // queue goes away, and every publish of a result is unroutable.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while bare.broker.consumer_count(&bare.agent_queues[0]).await.unwrap() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the agent never started consuming");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bare.broker.delete_queues(&[bare.names.queue("results")]).await.unwrap();
    let task = assignment("homelab-1", "1.prepare", 5);
    bare.publish_assignment("homelab-1", &task, None).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while runs.load(Ordering::SeqCst) < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the task was never given back and run again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The queue is back: a later run's result goes through, under the same message id.
    bare.broker.declare_topology().await.unwrap();
    let results = bare.wait_results(1).await;
    assert_eq!(message_id(&results[0].0["message_id"]), task.message_id.derive("result"));
    assert_eq!(results[0].0["payload"]["success"], true);
    agent.stop().await.unwrap();
    assert_eq!(bare.broker.queue_len(&bare.agent_queues[0]).await.unwrap(), 0);
}

#[tokio::test]
async fn the_agent_command_registers_and_runs_a_plan_with_exec() {
    let app = spawn_app().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["agent", "--id", "cli-agent", "--capabilities", "deployment,monitoring"])
        .args(["--capabilities", "shell,docker", "--capacity", "2", "--label", "target=homelab"])
        .args(["--cpu", "4", "--memory-mb", "8192", "--executor", "exec"])
        // No shell: each program gets the task on its standard input.
        .args(["--command", "deployment=/bin/cat", "--command", "monitoring=/usr/bin/tr", "a-z", "A-Z"])
        .args(["--timeout", "10", "--heartbeat-secs", "1"])
        .env("AMQP_URL", &app.config.amqp_url)
        // An agent needs no database: a wrong URL changes nothing.
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env_remove("SWITCHYARD_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts");
    let registered = wait_registered(&app, "cli-agent").await;
    app.declare_agent_queue("cli-agent").await;
    assert_eq!(registered.capacity, 2);
    assert_eq!(registered.capabilities, HOMELAB_CAPABILITIES.map(String::from).into());
    assert_eq!(registered.labels["target"], "homelab");

    let id = app.submit(UPTIME_KUMA, true).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "completed").await;
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.results.len(), 5);
    for result in &plan.results {
        assert_eq!((result.agent_id.as_str(), result.success), ("cli-agent", true), "{result:?}");
        let task = plan.tasks.iter().find(|t| t.id == result.task_id).unwrap();
        if task.work_type == "deployment" {
            // `/bin/cat` echoed the task it was given on standard input.
            let echoed: TaskAssignment = serde_json::from_str(&result.output).expect("the task as JSON");
            assert_eq!((echoed.task.id, echoed.agent_id.as_str()), (task.id, "cli-agent"));
        } else {
            // `tr a-z A-Z`: its arguments reached it as they were.
            let shouted = format!("\"ID\":\"{}\"", task.id.to_string().to_uppercase());
            assert!(result.output.contains(&shouted), "{}", result.output);
            assert!(result.output.contains("\"WORK_TYPE\":\"MONITORING\""), "{}", result.output);
        }
    }
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(child.try_wait().unwrap().is_none(), "the agent still runs");
    child.kill().await.unwrap();
}

#[tokio::test]
async fn agent_and_agents_register_take_the_same_agent_flags_checked_the_same_way() {
    let namespace = format!("t{}-flags", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let env = [("SWITCHYARD_NAMESPACE", namespace.as_str())];
    let base = ["--id", "homelab-1", "--capabilities", "deployment,shell"];
    for command in [&["agent"][..], &["agents", "register"]] {
        let run = |extra: &'static [&'static str]| {
            let args: Vec<&str> = command.iter().chain(&base).chain(extra).copied().collect();
            async move { crate::broker::switchyard(&env, &args).await }
        };
        let too_many = run(&["--capacity", "70000"]).await;
        assert_eq!(too_many.status.code(), Some(2), "{command:?}: {}", stderr_text(&too_many));
        assert!(
            stderr_text(&too_many).contains("70000 is not in 1..=65535"),
            "{command:?}: {}",
            stderr_text(&too_many)
        );
        let negative = run(&["--cpu=-1"]).await;
        assert_eq!(negative.status.code(), Some(2), "{command:?}: {}", stderr_text(&negative));
        assert!(
            stderr_text(&negative).contains("cpu must be a number of cores, 0 or more, not -1"),
            "{command:?}: {}",
            stderr_text(&negative)
        );
        let empty = run(&["--capabilities", "docker,"]).await;
        assert_eq!(empty.status.code(), Some(2), "{command:?}: {}", stderr_text(&empty));
        assert!(
            stderr_text(&empty).contains("empty capability \"\""),
            "{command:?}: {}",
            stderr_text(&empty)
        );
    }
}

fn stderr_text(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}
