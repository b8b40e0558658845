//! Results close the loop: the track stage releases the next wave, retries a failed attempt on
//! another agent, fails a task that fails every attempt, and re-routes an attempt whose lease
//! expired. The agent here is the test itself, answering through the broker as any agent would.

use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use switchyard::model::ids::{AgentId, MessageId, PlanId, RequestId, TaskId};
use switchyard::model::wire::{Envelope, SCHEMA_VERSION, TaskResult};

use crate::helpers::*;

/// Publishes the result of the assignment `task` (an envelope read from an agent queue).
pub(crate) async fn report(app: &TestApp, assignment: &Value, success: bool) {
    let payload = &assignment["payload"];
    let message_id: MessageId = assignment["message_id"].as_str().unwrap().parse().unwrap();
    let envelope = Envelope {
        message_id: message_id.derive("result"),
        schema_version: SCHEMA_VERSION,
        request_id: assignment["request_id"].as_str().unwrap().parse::<RequestId>().unwrap(),
        causation_id: Some(message_id),
        timestamp: Utc::now(),
        payload: TaskResult {
            plan_id: payload["plan_id"].as_str().unwrap().parse::<PlanId>().unwrap(),
            task_id: payload["task"]["id"].as_str().unwrap().parse::<TaskId>().unwrap(),
            attempt: payload["attempt"].as_u64().unwrap() as u32,
            agent_id: AgentId::parse(payload["agent_id"].as_str().unwrap()).unwrap(),
            success,
            output: format!("ran {}", payload["task"]["key"]),
            error: (!success).then(|| "exit code 1".to_owned()),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            lease_expired: false,
            usage: None,
            simulated: false,
        },
    };
    app.publish_raw("results", &serde_json::to_vec(&envelope).unwrap()).await;
}

/// Waits until `agent`'s queue holds at least one assignment and takes them all.
pub(crate) async fn assignments(app: &TestApp, agent: &str) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let taken: Vec<Value> =
            app.drain(&app.agent_queue(agent)).await.into_iter().map(|(m, _)| m).collect();
        if !taken.is_empty() {
            return taken;
        }
        assert!(tokio::time::Instant::now() < deadline, "no assignment reached {agent}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn key(assignment: &Value) -> &str {
    assignment["payload"]["task"]["key"].as_str().unwrap()
}

#[tokio::test]
async fn a_plan_runs_wave_by_wave_to_completion_and_its_audit_passes() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "monitoring", "shell"], 4, &[("target", "homelab")])
        .await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", true).await;
    let mut order = Vec::new();
    for _ in 0..5 {
        for assignment in assignments(&app, "homelab-1").await {
            order.push(key(&assignment).to_owned());
            report(&app, &assignment, true).await;
        }
    }
    assert_eq!(order, ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"]);
    let report = app.wait_for(id, |r| r.status.as_str() == "completed").await;
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.status.as_str(), "completed");
    assert!(plan.tasks.iter().all(|t| t.status.as_str() == "succeeded"));
    assert_eq!(plan.results.len(), 5);
    let agents = app.store.agents().await.unwrap();
    assert_eq!((agents[0].in_flight, agents[0].succeeded), (0, 5), "every reservation given back");
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn a_failed_attempt_is_retried_on_another_agent() {
    let app = spawn_app().await;
    app.register_agent("flaky", &["maintenance", "shell"], 2, &[]).await;
    app.register_agent("steady", &["maintenance", "shell"], 1, &[]).await;
    let id = app.submit("Restart Jellyfin", true).await;
    // "flaky" has more room, so it gets the first attempt.
    let first = assignments(&app, "flaky").await;
    assert_eq!(first.len(), 1);
    report(&app, &first[0], false).await;
    let second = assignments(&app, "steady").await;
    assert_eq!(second[0]["payload"]["attempt"], 2);
    assert_eq!(key(&second[0]), key(&first[0]));
    let trail = app.store.trail(id).await.unwrap().unwrap();
    let retry = trail.decisions.iter().find(|d| d.attempt == 2).unwrap();
    let flaky = retry.candidates.as_array().unwrap().iter().find(|c| c["agent_id"] == "flaky").unwrap();
    assert!(flaky["reasons"].to_string().contains("failed an earlier attempt"), "{flaky}");
    report(&app, &second[0], true).await;
    // The rest of the plan goes on.
    for _ in 0..2 {
        for assignment in assignments(&app, "steady").await {
            report(&app, &assignment, true).await;
        }
    }
    app.wait_for(id, |r| r.status.as_str() == "completed").await;
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn a_task_that_fails_every_attempt_fails_the_plan_and_cancels_its_dependents() {
    let app = spawn_app_with(|c| c.tracking.max_attempts = 2).await;
    for agent in ["a1", "a2"] {
        app.register_agent(agent, &["deployment", "shell"], 1, &[]).await;
    }
    let id = app.submit("Deploy Gitea to the homelab", true).await;
    for agent in ["a1", "a2"] {
        let taken = assignments(&app, agent).await;
        report(&app, &taken[0], false).await;
    }
    let report = app.wait_for(id, |r| r.status.as_str() == "failed").await;
    let reason = report.failure_reason.as_deref().unwrap();
    assert!(reason.starts_with("task 1.prepare failed after 2 attempts"), "{reason}");
    let plan = report.plan.as_ref().unwrap();
    let statuses: Vec<(&str, &str)> =
        plan.tasks.iter().map(|t| (t.key.as_str(), t.status.as_str())).collect();
    assert_eq!(statuses, [("1.prepare", "failed"), ("1.deploy", "cancelled"), ("1.verify", "cancelled")]);
    assert_eq!(plan.status.as_str(), "failed");
    let agents = app.store.agents().await.unwrap();
    assert!(agents.iter().all(|a| a.in_flight == 0 && a.failed == 1), "{agents:?}");
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "a failed plan's trail is complete: {}", stdout(&audit));
}

#[tokio::test]
async fn duplicate_and_late_results_change_nothing_and_unknown_tasks_are_dead_lettered() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[]).await;
    let id = app.submit("Deploy Gitea to the homelab", true).await;
    let first = assignments(&app, "homelab-1").await;
    report(&app, &first[0], true).await;
    report(&app, &first[0], true).await;
    let second = assignments(&app, "homelab-1").await;
    assert_eq!(key(&second[0]), "1.deploy");
    // The same result again, and then a contradicting one under another id: both too late.
    report(&app, &first[0], true).await;
    let mut contradicting = first[0].clone();
    contradicting["message_id"] = Value::String(MessageId::random().to_string());
    report(&app, &contradicting, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report_now = app.store.report(id).await.unwrap().unwrap();
    let plan = report_now.plan.as_ref().unwrap();
    assert_eq!(plan.tasks[0].status.as_str(), "succeeded");
    assert_eq!(plan.results.len(), 1, "{:?}", plan.results);
    assert_eq!(app.store.agents().await.unwrap()[0].succeeded, 1);
    assert!(app.drain(&app.agent_queue("homelab-1")).await.is_empty(), "no second wave released");

    let mut unknown = first[0].clone();
    unknown["message_id"] = Value::String(MessageId::random().to_string());
    unknown["payload"]["task"]["id"] = Value::String(uuid::Uuid::new_v4().to_string());
    report(&app, &unknown, true).await;
    let dead = app.wait_dead_letters("track", 1).await;
    assert!(dead[0].reason.contains("does not have"), "{}", dead[0].reason);
    // A stray result says nothing about this request's own tasks: it goes on.
    let report_now = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report_now.status.as_str(), "in_progress", "{:?}", report_now.failure_reason);
}

#[tokio::test]
async fn an_attempt_whose_lease_expires_is_rerouted_and_its_late_result_ignored() {
    let app = spawn_app_with(|c| {
        c.leases.factor = 0.0;
        c.leases.grace_secs = 1;
        c.leases.sweep_every_secs = 1;
    })
    .await;
    app.register_agent("mute", &["maintenance", "shell"], 2, &[]).await;
    app.register_agent("worker", &["maintenance", "shell"], 1, &[]).await;
    let id = app.submit("Restart Jellyfin", true).await;
    let lost = assignments(&app, "mute").await;
    // "mute" never answers; after its lease the task goes to "worker".
    let retried = assignments(&app, "worker").await;
    assert_eq!(retried[0]["payload"]["attempt"], 2);
    let report_now = app.store.report(id).await.unwrap().unwrap();
    let expiry = &report_now.plan.as_ref().unwrap().results[0];
    assert_eq!((expiry.source.as_str(), expiry.success, expiry.agent_id.as_str()), ("lease", false, "mute"));
    let mute = app.store.agents().await.unwrap().into_iter().find(|a| a.id.as_str() == "mute").unwrap();
    assert_eq!(mute.in_flight, 0, "the expired attempt's capacity is given back");
    // The lost attempt's result arrives after all: ignored.
    report(&app, &lost[0], true).await;
    report(&app, &retried[0], true).await;
    for _ in 0..2 {
        for assignment in assignments(&app, "worker").await {
            report(&app, &assignment, true).await;
        }
    }
    let done = app.wait_for(id, |r| r.status.as_str() == "completed").await;
    let first_task = &done.plan.as_ref().unwrap().tasks[0];
    assert_eq!((first_task.attempt, first_task.agent_id.as_deref()), (2, Some("worker")));
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

/// The last two results of a plan arriving together: each decision sees the other task still
/// running, so without a guard neither completes the plan.
#[tokio::test]
async fn the_last_two_results_arriving_together_complete_the_plan() {
    let app = spawn_app().await;
    app.register_agent("scholar", &["research", "web"], 2, &[]).await;
    app.register_agent("deployer", &["deployment", "shell"], 2, &[]).await;
    for _ in 0..3 {
        let id = app
            .submit("Research self-hosted password managers and deploy Vaultwarden to the homelab", true)
            .await;
        let mut held = Vec::new();
        while held.len() < 2 {
            for agent in ["scholar", "deployer"] {
                for assignment in app.drain(&app.agent_queue(agent)).await.into_iter().map(|(m, _)| m) {
                    if matches!(key(&assignment), "1.summarize" | "2.verify") {
                        held.push(assignment);
                    } else {
                        report(&app, &assignment, true).await;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::join!(report(&app, &held[0], true), report(&app, &held[1], true));
        let done = app.wait_for(id, |r| r.status.as_str() != "in_progress").await;
        assert_eq!(done.status.as_str(), "completed", "{done:#?}");
        assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
    }
}

#[tokio::test]
async fn a_failed_task_that_no_other_agent_can_take_fails_the_plan_at_once() {
    // The only deployment agent fails; a monitoring agent cannot take the retry.
    let app = spawn_app().await;
    app.register_agent("deployer", &["deployment", "shell"], 2, &[]).await;
    app.register_agent("watcher", &["monitoring"], 2, &[]).await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", true).await;
    let first = assignments(&app, "deployer").await;
    report(&app, &first[0], false).await;
    let done = app.wait_for(id, |r| r.status.as_str() == "failed").await;
    let reason = done.failure_reason.as_deref().unwrap();
    assert!(reason.contains("failed on deployer and no other agent has what it needs"), "{reason}");
    let plan = done.plan.as_ref().unwrap();
    assert_eq!(plan.status.as_str(), "failed");
    let statuses: Vec<&str> = plan.tasks.iter().map(|t| t.status.as_str()).collect();
    assert_eq!(statuses, ["failed", "cancelled", "cancelled", "cancelled", "cancelled"]);
    // Not routed to a default agent, not dispatched again.
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 1);
    assert!(app.drain(&app.agent_queue("deployer")).await.is_empty());
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

/// Publishes `agent`'s heartbeat every 300 ms until aborted, as a running agent would.
fn beat(app: &TestApp, agent: &str, capabilities: &[&str]) -> tokio::task::JoinHandle<()> {
    let body = serde_json::to_vec(&app.heartbeat(agent, capabilities, 1, &[])).unwrap();
    let (amqp, names) = (app.config.amqp_url.clone(), app.names.clone());
    tokio::spawn(async move {
        let broker = switchyard::broker::Broker::connect(&amqp, names).await.unwrap();
        loop {
            let beat = switchyard::broker::Outgoing::to_queue(broker.names().heartbeats(), body.clone());
            broker.publish(&beat).await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

#[tokio::test]
async fn an_agent_that_goes_silent_loses_its_task_before_the_lease_runs_out() {
    // A lease of minutes, a heartbeat TTL of one second: the silence decides.
    let app = spawn_app_with(|c| {
        c.routing.heartbeat_ttl_secs = 1;
        c.leases.sweep_every_secs = 1;
    })
    .await;
    const CAPABILITIES: [&str; 2] = ["maintenance", "shell"];
    app.declare_agent_queue("mute").await;
    app.declare_agent_queue("worker").await;
    let mute = beat(&app, "mute", &CAPABILITIES);
    let worker = beat(&app, "worker", &CAPABILITIES);
    for agent in ["mute", "worker"] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !app.store.agents().await.unwrap().iter().any(|a| a.id.as_str() == agent) {
            assert!(tokio::time::Instant::now() < deadline, "{agent} did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let id = app.submit("Restart Jellyfin", true).await;
    // Equal agents: the lower id, "mute", gets the task; then it stops beating.
    assignments(&app, "mute").await;
    mute.abort();
    let retried = assignments(&app, "worker").await;
    worker.abort();
    assert_eq!(retried[0]["payload"]["attempt"], 2);
    let report_now = app.store.report(id).await.unwrap().unwrap();
    let given_up = &report_now.plan.as_ref().unwrap().results[0];
    assert_eq!((given_up.source.as_str(), given_up.agent_id.as_str()), ("lease", "mute"));
    assert!(given_up.error.as_deref().unwrap().contains("went silent"), "{given_up:?}");
}
