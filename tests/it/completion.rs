//! Complete workflows run to the end by simulated agents in this process: every task routed to
//! an agent that can do it, dispatched in the order of the plan's DAG, run, reported and
//! recorded; a failed attempt retried on another agent; no task for an agent whose heartbeat
//! stopped. What is asserted is what a user sees: the request's report and trail, the agents'
//! counters, and `switchyard audit`.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use switchyard::agent::{AgentBuilder, Execution, Simulate, TaskHandler};
use switchyard::model::domain::{self, Resources};
use switchyard::model::ids::{AgentId, RequestId, TaskId};
use switchyard::model::wire::TaskAssignment;
use switchyard::store::{DecisionRow, RequestReport, TaskState, Trail};
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

const UPTIME_KUMA: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";
const HOMELAB: [&str; 4] = ["deployment", "monitoring", "shell", "docker"];
const UPTIME_KUMA_TASKS: [&str; 5] =
    ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"];

/// An agent with these capabilities, room for every task's resources and a heartbeat every
/// 500 ms.
fn agent(id: &str, capabilities: &[&str]) -> AgentBuilder {
    AgentBuilder::new(AgentId::parse(id).unwrap())
        .capabilities(capabilities.iter().copied())
        .capacity(2)
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500))
}

fn homelab(id: &str) -> AgentBuilder {
    agent(id, &HOMELAB).label("target", "homelab")
}

/// Finishes every task at once; fails it with probability `failure_rate`.
fn simulate(failure_rate: f64) -> Simulate {
    Simulate::new(0.0, failure_rate).unwrap()
}

/// A simulated agent whose tasks wait until the test opens the gate: until then, what it was
/// given stays in flight.
struct Gated {
    open: CancellationToken,
    work: Simulate,
}

impl TaskHandler for Gated {
    async fn run(&self, task: &TaskAssignment) -> Execution {
        self.open.cancelled().await;
        self.work.run(task).await
    }
}

/// Waits until the request ends, then checks that it completed as a user would: the request and
/// its plan completed, every task succeeded with a successful result, the audit passes and the
/// dispatches followed the DAG. Returns the report and the trail.
async fn completed(app: &TestApp, id: RequestId) -> (RequestReport, Trail) {
    let report = app.wait_for(id, |r| matches!(r.status.as_str(), "completed" | "failed" | "rejected")).await;
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    assert!(report.failure_reason.is_none() && report.dead_letters.is_empty(), "{report:#?}");
    let plan = report.plan.as_ref().expect("a plan");
    assert_eq!(plan.status.as_str(), "completed", "{report:#?}");
    for task in &plan.tasks {
        assert_eq!(task.status.as_str(), "succeeded", "{task:?}");
        let successes = plan.results.iter().filter(|r| r.task_id == task.id && r.success).count();
        assert_eq!(successes, 1, "{} has one successful result: {:#?}", task.key, plan.results);
    }
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}{}", stdout(&audit), String::from_utf8_lossy(&audit.stderr));
    let trail = app.store.trail(id).await.unwrap().expect("a trail");
    assert_dispatched_in_dag_order(&trail);
    (report, trail)
}

/// Every dispatch of every task was confirmed at or after the successful result of each of its
/// dependencies was received (both times are the database's).
fn assert_dispatched_in_dag_order(trail: &Trail) {
    let done: HashMap<TaskId, DateTime<Utc>> =
        trail.results.iter().filter(|r| r.success).map(|r| (r.task_id, r.received_at)).collect();
    for task in &trail.tasks {
        let dispatches: Vec<_> = trail.dispatches.iter().filter(|d| d.task_id == task.id).collect();
        assert!(!dispatches.is_empty(), "{} was never dispatched: {:#?}", task.key, trail.dispatches);
        for dependency in &task.depends_on {
            let key = &key_of(&trail.tasks, *dependency);
            let finished = done.get(dependency).unwrap_or_else(|| panic!("{key} never succeeded"));
            for dispatch in &dispatches {
                assert!(
                    dispatch.confirmed_at >= *finished,
                    "{} attempt {} was dispatched at {} before {key}, which it depends on, succeeded at {}",
                    task.key,
                    dispatch.attempt,
                    dispatch.confirmed_at,
                    finished,
                );
            }
        }
    }
}

fn task<'a>(tasks: &'a [TaskState], key: &str) -> &'a TaskState {
    tasks.iter().find(|t| t.key == key).unwrap_or_else(|| panic!("no task {key} in {tasks:#?}"))
}

fn key_of(tasks: &[TaskState], id: TaskId) -> String {
    tasks.iter().find(|t| t.id == id).map(|t| t.key.clone()).unwrap_or_else(|| id.to_string())
}

fn keys(tasks: &[TaskState]) -> Vec<&str> {
    tasks.iter().map(|t| t.key.as_str()).collect()
}

/// Each task's results as (key, attempt, agent, success), in the order received.
fn results(report: &RequestReport) -> Vec<(String, u32, String, bool)> {
    let plan = report.plan.as_ref().unwrap();
    plan.results
        .iter()
        .map(|r| (key_of(&plan.tasks, r.task_id), r.attempt, r.agent_id.clone(), r.success))
        .collect()
}

/// The report's tasks each ran once, successfully, on the agent `expected` gives for its key.
fn assert_ran_once_each(report: &RequestReport, expected: impl Fn(&str) -> &'static str) {
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.results.len(), plan.tasks.len(), "one result per task: {:#?}", plan.results);
    for (key, attempt, agent, success) in results(report) {
        assert_eq!((attempt, agent.as_str(), success), (1, expected(&key), true), "{key}");
    }
    for result in &plan.results {
        // Reported by its (simulated) agent, not given up by its lease.
        assert_eq!(result.source, "simulated", "{result:?}");
        assert!(result.started_at <= result.finished_at, "{result:?}");
    }
}

async fn agents(app: &TestApp) -> HashMap<String, domain::Agent> {
    app.store.agents().await.unwrap().into_iter().map(|a| (a.id.to_string(), a)).collect()
}

/// (succeeded, failed, in_flight) of an agent.
fn counters(agent: &domain::Agent) -> (u64, u64, u32) {
    (agent.succeeded, agent.failed, agent.in_flight)
}

/// Why the decision rejected `agent`; panics if it did not.
fn rejection<'a>(decision: &'a DecisionRow, agent: &str) -> Vec<&'a str> {
    let candidates = decision.candidates.as_array().expect("a list of candidates");
    let candidate = candidates
        .iter()
        .find(|c| c["agent_id"] == agent)
        .unwrap_or_else(|| panic!("{agent} is not a candidate: {:#}", decision.candidates));
    assert_eq!(candidate["verdict"], "rejected", "{candidate:#}");
    candidate["reasons"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect()
}

#[tokio::test]
async fn uptime_kuma_is_deployed_then_monitored_to_completion() {
    let app = spawn_app().await;
    let _deployer =
        app.start_agent(agent("deployer", &["deployment", "shell", "docker"]), simulate(0.0)).await;
    let _watcher = app.start_agent(agent("watcher", &["monitoring"]), simulate(0.0)).await;
    wait_registered(&app, "deployer").await;
    wait_registered(&app, "watcher").await;

    let id = app.submit(UPTIME_KUMA, true).await;
    let (report, trail) = completed(&app, id).await;
    let tasks = &report.plan.as_ref().unwrap().tasks;
    assert_eq!(keys(tasks), UPTIME_KUMA_TASKS);
    assert_ran_once_each(&report, |key| if key.starts_with("1.") { "deployer" } else { "watcher" });
    // The monitoring waits for the deployment: its first step depends on the deployment's last.
    let verify = task(tasks, "1.verify");
    assert_eq!(task(tasks, "2.configure_checks").depends_on, [verify.id]);
    let verified = trail.results.iter().find(|r| r.task_id == verify.id).unwrap().received_at;
    let monitoring = trail.dispatches.iter().filter(|d| d.agent_id == "watcher");
    assert!(monitoring.clone().count() == 2 && monitoring.clone().all(|d| d.confirmed_at >= verified));

    let agents = agents(&app).await;
    assert_eq!(counters(&agents["deployer"]), (3, 0, 0));
    assert_eq!(counters(&agents["watcher"]), (2, 0, 0));
}

#[tokio::test]
async fn a_code_generation_request_runs_to_completion() {
    let app = spawn_app().await;
    let _coder = app.start_agent(agent("coder", &["code_generation", "code"]), simulate(0.0)).await;
    let _deployer = app.start_agent(homelab("deployer"), simulate(0.0)).await;
    wait_registered(&app, "coder").await;
    wait_registered(&app, "deployer").await;

    let id = app.submit("Write a Python script that exports Grafana dashboards", true).await;
    let (report, _) = completed(&app, id).await;
    let tasks = &report.plan.as_ref().unwrap().tasks;
    assert_eq!(keys(tasks), ["1.design", "1.implement", "1.test"]);
    assert!(tasks.iter().all(|t| t.work_type == "code_generation"), "{tasks:#?}");
    assert_ran_once_each(&report, |_| "coder");
    let agents = agents(&app).await;
    assert_eq!(counters(&agents["coder"]), (3, 0, 0));
    assert_eq!(counters(&agents["deployer"]), (0, 0, 0), "nothing for an agent that cannot code");
}

#[tokio::test]
async fn a_monitoring_setup_runs_to_completion() {
    let app = spawn_app().await;
    let _watcher = app.start_agent(agent("watcher", &["monitoring"]), simulate(0.0)).await;
    wait_registered(&app, "watcher").await;

    let id = app.submit("Monitor the NAS and notify me on Telegram when it is down", true).await;
    let (report, _) = completed(&app, id).await;
    let tasks = &report.plan.as_ref().unwrap().tasks;
    assert_eq!(keys(tasks), ["1.configure_checks", "1.configure_alerts"]);
    assert_eq!(task(tasks, "1.configure_alerts").depends_on, [task(tasks, "1.configure_checks").id]);
    assert_ran_once_each(&report, |_| "watcher");
    assert_eq!(counters(&agents(&app).await["watcher"]), (2, 0, 0));
}

#[tokio::test]
async fn independent_intents_run_in_parallel_to_completion() {
    let app = spawn_app().await;
    // The agents hold their tasks until the gate opens, so that a task given to them is still in
    // flight when the test looks: no timing decides what the test sees.
    let gate = CancellationToken::new();
    let work = |open: &CancellationToken| Gated { open: open.clone(), work: simulate(0.0) };
    let _scholar = app.start_agent(agent("scholar", &["research", "web"]), work(&gate)).await;
    let _deployer = app.start_agent(agent("deployer", &["deployment", "shell"]), work(&gate)).await;
    wait_registered(&app, "scholar").await;
    wait_registered(&app, "deployer").await;

    let id = app
        .submit("Research self-hosted password managers and deploy Vaultwarden to the homelab", true)
        .await;
    // Both first tasks are dispatched while neither can finish: wave 0 is two tasks in flight.
    let first = ["1.gather", "2.prepare"];
    let in_flight = app
        .wait_for(id, |r| {
            r.plan.as_ref().is_some_and(|p| {
                first.iter().all(|k| p.tasks.iter().any(|t| t.key == *k && t.status.as_str() == "dispatched"))
            })
        })
        .await;
    let plan = in_flight.plan.as_ref().unwrap();
    assert!(plan.results.is_empty(), "{:#?}", plan.results);
    gate.cancel();

    let (report, trail) = completed(&app, id).await;
    let intents: Vec<&str> = report
        .intents
        .as_ref()
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["work_type"].as_str().unwrap())
        .collect();
    assert_eq!(intents, ["research", "deployment"]);
    let tasks = &report.plan.as_ref().unwrap().tasks;
    assert_eq!(keys(tasks), ["1.gather", "1.summarize", "2.prepare", "2.deploy", "2.verify"]);
    for key in first {
        assert!(task(tasks, key).depends_on.is_empty(), "{key} waits for nothing");
    }
    assert_ran_once_each(&report, |key| if key.starts_with("1.") { "scholar" } else { "deployer" });
    // From the trail: both first tasks were dispatched before either of them finished.
    let first_ids: Vec<TaskId> = first.iter().map(|k| task(tasks, k).id).collect();
    let last_dispatched = trail
        .dispatches
        .iter()
        .filter(|d| first_ids.contains(&d.task_id))
        .map(|d| d.confirmed_at)
        .max()
        .unwrap();
    let first_finished =
        trail.results.iter().filter(|r| first_ids.contains(&r.task_id)).map(|r| r.received_at).min().unwrap();
    assert!(last_dispatched < first_finished, "{:#?}\n{:#?}", trail.dispatches, trail.results);

    let agents = agents(&app).await;
    assert_eq!(counters(&agents["scholar"]), (2, 0, 0));
    assert_eq!(counters(&agents["deployer"]), (3, 0, 0));
}

#[tokio::test]
async fn a_failed_attempt_is_retried_on_the_healthy_agent() {
    let app = spawn_app().await;
    // Equal in everything but the id: ties go to the lowest id, so "flaky" gets the first task.
    let _flaky = app.start_agent(homelab("flaky"), simulate(1.0)).await;
    let _steady = app.start_agent(homelab("steady"), simulate(0.0)).await;
    wait_registered(&app, "flaky").await;
    wait_registered(&app, "steady").await;

    let id = app.submit(UPTIME_KUMA, true).await;
    let (report, trail) = completed(&app, id).await;
    let tasks = &report.plan.as_ref().unwrap().tasks;
    assert_eq!(keys(tasks), UPTIME_KUMA_TASKS);
    let results = results(&report);
    let failures: Vec<_> = results.iter().filter(|(_, _, _, success)| !success).collect();
    assert_eq!(*failures.first().expect("a failed attempt"), &("1.prepare".into(), 1, "flaky".into(), false));
    for (key, attempt, agent, _) in &failures {
        assert_eq!((*attempt, agent.as_str()), (1, "flaky"), "{key}: {results:?}");
        let retry = (key.clone(), 2, "steady".to_owned(), true);
        assert!(results.contains(&retry), "{key} was retried on steady: {results:?}");
        let task = task(tasks, key);
        assert_eq!((task.attempt, task.agent_id.as_deref()), (2, Some("steady")));
        let decision = trail
            .decisions
            .iter()
            .find(|d| d.task_id == task.id && d.attempt == 2)
            .unwrap_or_else(|| panic!("no routing decision for {key} attempt 2: {:#?}", trail.decisions));
        assert_eq!(decision.agent_id.as_deref(), Some("steady"));
        let reasons = rejection(decision, "flaky");
        assert!(reasons.iter().any(|r| r.contains("failed an earlier attempt")), "{reasons:?}");
    }
    let successes: Vec<_> = results.iter().filter(|(_, _, _, success)| *success).collect();
    assert_eq!(successes.len(), tasks.len());
    assert!(successes.iter().all(|(_, _, agent, _)| agent == "steady"), "{results:?}");
    assert_eq!(results.len(), tasks.len() + failures.len());

    let agents = agents(&app).await;
    assert_eq!(counters(&agents["flaky"]), (0, failures.len() as u64, 0));
    assert_eq!(counters(&agents["steady"]), (5, 0, 0));
}

#[tokio::test]
async fn an_agent_that_stopped_heartbeating_gets_no_new_tasks() {
    // Heartbeats every 500 ms against a 4 s TTL: the running agent stays fresh even when the
    // machine is busy, and the stopped one goes stale soon enough.
    let app = spawn_app_with(|c| c.routing.heartbeat_ttl_secs = 4).await;
    let ttl = TimeDelta::seconds(4);
    // Equal in everything but the id: while both heartbeat, ties go to "homelab-1".
    let first = app.start_agent(homelab("homelab-1"), simulate(0.0)).await;
    let _second = app.start_agent(homelab("homelab-2"), simulate(0.0)).await;
    wait_registered(&app, "homelab-1").await;
    wait_registered(&app, "homelab-2").await;
    let before = app.submit(UPTIME_KUMA, true).await;
    let (report, _) = completed(&app, before).await;
    assert_eq!(results(&report)[0], ("1.prepare".into(), 1, "homelab-1".into(), true));

    first.stop().await.expect("a clean stop");
    // Every heartbeat it sent was sent before `stop` returned; wait until the last is too old.
    let stopped_at = Utc::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let last = agents(&app).await["homelab-1"].last_heartbeat;
        assert!(last <= stopped_at, "a heartbeat from the future: {last} > {stopped_at}");
        if Utc::now() - stopped_at > ttl {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the TTL never passed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let after = app.submit(UPTIME_KUMA, true).await;
    let (report, trail) = completed(&app, after).await;
    assert_ran_once_each(&report, |_| "homelab-2");
    assert_eq!(trail.decisions.len(), UPTIME_KUMA_TASKS.len(), "{:#?}", trail.decisions);
    for decision in &trail.decisions {
        assert_eq!(decision.agent_id.as_deref(), Some("homelab-2"));
        let reasons = rejection(decision, "homelab-1");
        assert!(reasons.iter().any(|r| r.contains("heartbeat")), "{reasons:?}");
    }
    let queue = app.agent_queue("homelab-1");
    assert_eq!(app.broker.queue_len(&queue).await.unwrap(), 0, "nothing was sent to the stopped agent");
    let agents = agents(&app).await;
    assert_eq!(agents["homelab-1"].in_flight, 0);
    assert_eq!(agents["homelab-2"].in_flight, 0);
}
