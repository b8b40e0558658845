//! Routing against the real store and broker: the filter on hard requirements, the score, the
//! tie-break, capacity under concurrent route workers, and the agents' own ways in (heartbeats
//! over AMQP, `switchyard agents`).

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use switchyard::model::ids::RequestId;
use switchyard::pipeline::worker::StageName;
use switchyard::store::{DecisionRow, RequestReport};

use crate::helpers::*;

/// Maintenance: three tasks, of which only `1.snapshot` (needing `maintenance` and `shell`) has
/// no dependency; complexity 0.35, so the policy approves it.
const RESTART: &str = "Restart Jellyfin";
/// The same with a target: its tasks prefer agents labelled `target=homelab`.
const RESTART_ON_HOMELAB: &str = "Restart Jellyfin on the homelab";
const MAINTENANCE: &[&str] = &["maintenance", "shell"];
const DEFAULT_AGENT: &str = "default-maintenance";

/// Submits `text` (auto-approved) and waits until its released task is dispatched.
async fn route_one(app: &TestApp, text: &str) -> (RequestId, RequestReport) {
    let id = app.submit(text, true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    (id, report)
}

/// The one routing decision of a request.
async fn routing_decision(app: &TestApp, id: RequestId) -> DecisionRow {
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 1, "{:#?}", trail.decisions);
    trail.decisions.into_iter().next().unwrap()
}

/// The candidate entry of `agent` in a decision.
fn candidate<'a>(decision: &'a DecisionRow, agent: &str) -> &'a Value {
    decision
        .candidates
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["agent_id"] == agent)
        .unwrap_or_else(|| panic!("{agent} is no candidate: {:#}", decision.candidates))
}

fn candidate_ids(decision: &DecisionRow) -> Vec<&str> {
    decision.candidates.as_array().unwrap().iter().map(|c| c["agent_id"].as_str().unwrap()).collect()
}

/// The task keys of the messages in an agent's queue, taking them.
async fn drain_keys(app: &TestApp, agent: &str) -> Vec<String> {
    app.drain(&app.agent_queue(agent))
        .await
        .iter()
        .map(|(m, _)| m["payload"]["task"]["key"].as_str().unwrap().to_owned())
        .collect()
}

async fn in_flight(app: &TestApp, agent: &str) -> u32 {
    let agents = app.store.agents().await.unwrap();
    agents
        .iter()
        .find(|a| a.id.as_str() == agent)
        .unwrap_or_else(|| panic!("{agent} not registered"))
        .in_flight
}

#[tokio::test]
async fn only_an_agent_with_every_capability_is_chosen() {
    let app = spawn_app().await;
    app.register_agent("a-no-shell", &["maintenance"], 4, &[]).await;
    app.register_agent("b-shell", MAINTENANCE, 4, &[]).await;
    let (id, _) = route_one(&app, RESTART).await;

    let decision = routing_decision(&app, id).await;
    assert_eq!(decision.agent_id.as_deref(), Some("b-shell"));
    assert!(decision.reserved_capacity);
    assert!(decision.reason.starts_with("best of 1 eligible agent ("), "{}", decision.reason);
    assert_eq!(candidate_ids(&decision), ["a-no-shell", "b-shell"]);
    let rejected = candidate(&decision, "a-no-shell");
    assert_eq!(rejected["verdict"], "rejected");
    assert_eq!(rejected["reasons"], json!(["missing capabilities: shell"]));
    assert_eq!(candidate(&decision, "b-shell")["verdict"], "scored");

    assert_eq!(drain_keys(&app, "b-shell").await, ["1.snapshot"]);
    assert!(drain_keys(&app, "a-no-shell").await.is_empty());
    assert_eq!(in_flight(&app, "b-shell").await, 1);
    assert_eq!(in_flight(&app, "a-no-shell").await, 0);
}

#[tokio::test]
async fn an_agent_with_a_stale_heartbeat_is_passed_over_until_it_beats_again() {
    let app = spawn_app().await;
    app.declare_agent_queue(DEFAULT_AGENT).await;
    let mut heartbeat = app.heartbeat("sleepy", MAINTENANCE, 4, &[]);
    heartbeat.sent_at = Some(Utc::now() - TimeDelta::minutes(5));
    app.declare_agent_queue("sleepy").await;
    app.store.register_agent("tests", heartbeat).await.unwrap();

    let (id, _) = route_one(&app, RESTART).await;
    let decision = routing_decision(&app, id).await;
    assert_eq!(decision.agent_id.as_deref(), Some(DEFAULT_AGENT));
    assert_eq!(decision.score, None);
    assert!(!decision.reserved_capacity);
    assert_eq!(decision.reason, "no agents available: 1 candidate rejected; default agent for maintenance");
    let reasons = candidate(&decision, "sleepy")["reasons"].as_array().unwrap().clone();
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    let reason = reasons[0].as_str().unwrap();
    let age: f64 = reason
        .strip_prefix("heartbeat ")
        .and_then(|r| r.strip_suffix("s old exceeds the 30s TTL"))
        .and_then(|age| age.parse().ok())
        .unwrap_or_else(|| panic!("{reason}"));
    assert!((300.0..330.0).contains(&age), "{reason}");
    assert_eq!(drain_keys(&app, DEFAULT_AGENT).await, ["1.snapshot"]);
    assert!(drain_keys(&app, "sleepy").await.is_empty());
    assert_eq!(in_flight(&app, "sleepy").await, 0);

    // A fresh heartbeat over AMQP brings it back.
    let fresh = serde_json::to_vec(&app.heartbeat("sleepy", MAINTENANCE, 4, &[])).unwrap();
    app.publish_raw("heartbeats", &fresh).await;
    wait_until(|| async {
        let agents = app.store.agents().await.unwrap();
        agents
            .iter()
            .any(|a| a.id.as_str() == "sleepy" && Utc::now() - a.last_heartbeat < TimeDelta::seconds(30))
    })
    .await;
    let (id, _) = route_one(&app, RESTART).await;
    assert_eq!(routing_decision(&app, id).await.agent_id.as_deref(), Some("sleepy"));
    assert_eq!(drain_keys(&app, "sleepy").await, ["1.snapshot"]);
}

#[tokio::test]
async fn an_agent_registers_by_publishing_a_heartbeat() {
    let app = spawn_app().await;
    let body = json!({
        "agent_id": "amqp-agent",
        "capabilities": ["maintenance", "shell", "docker"],
        "capacity": 3,
        "labels": {"target": "homelab"},
        "resources": {"cpu": 2.0, "memory_mb": 4096, "gpu": 0}
    });
    app.declare_agent_queue("amqp-agent").await;
    app.publish_raw("heartbeats", body.to_string().as_bytes()).await;
    wait_until(|| async { app.store.agents().await.unwrap().iter().any(|a| a.id.as_str() == "amqp-agent") })
        .await;

    let agents = app.store.agents().await.unwrap();
    let agent = agents.iter().find(|a| a.id.as_str() == "amqp-agent").unwrap();
    assert_eq!(agent.capacity, 3);
    assert_eq!(agent.in_flight, 0);
    assert_eq!(agent.labels.get("target").map(String::as_str), Some("homelab"));
    assert_eq!(agent.resources.memory_mb, 4096);
    assert!(agent.capabilities.contains("docker"));
    assert!(Utc::now() - agent.last_heartbeat < TimeDelta::seconds(30), "stamped on receipt");

    let (id, report) = route_one(&app, RESTART_ON_HOMELAB).await;
    let snapshot = report.plan.unwrap().tasks.into_iter().find(|t| t.key == "1.snapshot").unwrap();
    assert_eq!(snapshot.status.as_str(), "dispatched");
    assert_eq!(snapshot.agent_id.as_deref(), Some("amqp-agent"));
    assert_eq!(drain_keys(&app, "amqp-agent").await, ["1.snapshot"]);
    assert_eq!(in_flight(&app, "amqp-agent").await, 1);
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn the_less_loaded_of_two_equal_agents_is_preferred() {
    let app = spawn_app().await;
    app.register_agent("alpha", MAINTENANCE, 4, &[]).await;
    app.register_agent("bravo", MAINTENANCE, 4, &[]).await;

    // Equal: the first goes to alpha by id, which then has one task in flight.
    let (first, _) = route_one(&app, RESTART).await;
    assert_eq!(routing_decision(&app, first).await.agent_id.as_deref(), Some("alpha"));
    assert_eq!(in_flight(&app, "alpha").await, 1);

    let (second, _) = route_one(&app, RESTART).await;
    let decision = routing_decision(&app, second).await;
    assert_eq!(decision.agent_id.as_deref(), Some("bravo"), "{}", decision.reason);
    assert!(!decision.reason.contains("tied"), "{}", decision.reason);
    assert_eq!(candidate(&decision, "alpha")["load"], 0.75);
    assert_eq!(candidate(&decision, "bravo")["load"], 1.0);
    let score = |agent| candidate(&decision, agent)["score"].as_f64().unwrap();
    assert!(score("bravo") > score("alpha"), "{:#}", decision.candidates);
    assert_eq!(decision.score, Some(score("bravo")));
    assert_eq!(drain_keys(&app, "alpha").await, ["1.snapshot"]);
    assert_eq!(drain_keys(&app, "bravo").await, ["1.snapshot"]);
}

#[tokio::test]
async fn an_agent_labelled_with_the_requested_target_wins_over_an_equal_one() {
    let app = spawn_app().await;
    app.register_agent("a-elsewhere", MAINTENANCE, 4, &[("target", "office")]).await;
    app.register_agent("b-homelab", MAINTENANCE, 4, &[("target", "homelab")]).await;
    let (id, _) = route_one(&app, RESTART_ON_HOMELAB).await;

    let homelab = routing_decision(&app, id).await;
    assert_eq!(
        homelab.agent_id.as_deref(),
        Some("b-homelab"),
        "affinity beats the id order: {}",
        homelab.reason
    );
    assert_eq!(candidate(&homelab, "a-elsewhere")["affinity"], 0.0);
    assert_eq!(candidate(&homelab, "b-homelab")["affinity"], 1.0);
    assert_eq!(drain_keys(&app, "b-homelab").await, ["1.snapshot"]);
    assert!(drain_keys(&app, "a-elsewhere").await.is_empty());

    // Without a target, no label counts: both score the same on affinity, and a-elsewhere, not
    // loaded yet, wins on load.
    let (id, _) = route_one(&app, RESTART).await;
    let anywhere = routing_decision(&app, id).await;
    assert_eq!(anywhere.agent_id.as_deref(), Some("a-elsewhere"), "{}", anywhere.reason);
    assert_eq!(candidate(&anywhere, "a-elsewhere")["affinity"], 1.0);
    assert_eq!(candidate(&anywhere, "b-homelab")["affinity"], 1.0);
}

#[tokio::test]
async fn equal_agents_are_tied_broken_by_agent_id_whatever_the_registration_order() {
    let app = spawn_app().await;
    for agent in ["charlie", "alpha", "bravo"] {
        app.register_agent(agent, MAINTENANCE, 4, &[]).await;
    }
    let (id, _) = route_one(&app, RESTART).await;

    let decision = routing_decision(&app, id).await;
    assert_eq!(decision.agent_id.as_deref(), Some("alpha"));
    assert!(
        decision.reason.ends_with("; tied with bravo, charlie, chosen by agent id"),
        "{}",
        decision.reason
    );
    assert_eq!(candidate_ids(&decision), ["alpha", "bravo", "charlie"]);
    let scores: Vec<f64> =
        decision.candidates.as_array().unwrap().iter().map(|c| c["score"].as_f64().unwrap()).collect();
    assert!(scores.iter().all(|s| *s == scores[0]), "{scores:?}");
    assert_eq!(drain_keys(&app, "alpha").await, ["1.snapshot"]);
}

#[tokio::test]
async fn two_route_workers_never_overfill_an_agent() {
    let mut app = spawn_app().await;
    app.start_worker(&[StageName::Route]).await;
    app.declare_agent_queue(DEFAULT_AGENT).await;
    app.register_agent("pool-1", MAINTENANCE, 2, &[]).await;

    let ids = futures::future::join_all((0..6).map(|_| app.submit(RESTART, true))).await;
    let mut decisions = Vec::new();
    for id in &ids {
        app.wait_settled(*id).await;
        decisions.push(routing_decision(&app, *id).await);
    }

    assert_eq!(in_flight(&app, "pool-1").await, 2, "capacity 2, never more");
    let chosen: Vec<_> = decisions.iter().filter(|d| d.agent_id.as_deref() == Some("pool-1")).collect();
    assert_eq!(chosen.len(), 2, "{decisions:#?}");
    assert!(chosen.iter().all(|d| d.reserved_capacity));
    let defaulted: Vec<_> = decisions.iter().filter(|d| d.agent_id.as_deref() != Some("pool-1")).collect();
    assert_eq!(defaulted.len(), 4);
    for d in &defaulted {
        assert_eq!(d.agent_id.as_deref(), Some(DEFAULT_AGENT));
        assert!(d.reason.starts_with("no agents available"), "{}", d.reason);
        assert!(!d.reserved_capacity);
        assert_eq!(candidate(d, "pool-1")["reasons"], json!(["no spare capacity (2/2 in flight)"]));
    }
    assert_eq!(drain_keys(&app, "pool-1").await.len(), 2);
    assert_eq!(drain_keys(&app, DEFAULT_AGENT).await.len(), 4);
    for id in &ids {
        let audit = app.cli(&["audit", &id.to_string()]).await;
        assert!(audit.status.success(), "{}", stdout(&audit));
    }
}

#[tokio::test]
async fn agents_list_shows_health_and_load() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", MAINTENANCE, 4, &[("target", "homelab")]).await;
    let mut stale = app.heartbeat("old-box", MAINTENANCE, 2, &[]);
    stale.sent_at = Some(Utc::now() - TimeDelta::minutes(5));
    app.store.register_agent("tests", stale).await.unwrap();
    route_one(&app, RESTART_ON_HOMELAB).await;

    let list = app.cli(&["agents", "list"]).await;
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let out = stdout(&list);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    let columns = |line: &str| {
        line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect::<Vec<_>>()
    };
    // SLOTS: in use out of the capacity.
    assert_eq!(
        columns(lines[0]),
        ["AGENT", "HEALTH", "HEARTBEAT", "SLOTS", "SUCCEEDED", "ROUTED AS", "CAPABILITIES"]
    );
    // Sorted by id.
    let mut homelab = columns(lines[1]);
    // How long ago it beat: seconds, however slow the machine.
    assert!(homelab.remove(2).ends_with(" s ago"), "{out}");
    assert_eq!(homelab, ["homelab-1", "online", "1/4", "-", "50%", "maintenance,shell"]);
    assert_eq!(
        columns(lines[2]),
        ["old-box", "offline", "5 min ago", "0/2", "-", "50%", "maintenance,shell"]
    );

    let json = app.cli(&["agents", "list", "--json"]).await;
    assert!(json.status.success());
    let agents: Value = serde_json::from_str(&stdout(&json)).unwrap();
    assert_eq!(agents[0]["id"], "homelab-1");
    assert_eq!(agents[0]["in_flight"], 1);
    assert_eq!(agents[0]["capacity"], 4);
}

#[tokio::test]
async fn agents_register_declares_the_queue_that_tasks_then_reach() {
    let app = spawn_app().await;
    let register = app
        .cli(&[
            "agents",
            "register",
            "--id",
            "cli-agent",
            "--capabilities",
            "maintenance,shell",
            "--capacity",
            "2",
            "--label",
            "target=homelab",
        ])
        .await;
    assert!(register.status.success(), "{}", String::from_utf8_lossy(&register.stderr));
    let queue = app.agent_queue("cli-agent");
    assert_eq!(stdout(&register).trim(), format!("agent cli-agent registered; its queue is {queue}"));
    // The command declared the queue (a passive declare fails on a missing one).
    assert_eq!(app.broker.queue_len(&queue).await.expect("the queue exists"), 0);
    app.declare_agent_queue("cli-agent").await; // only so that the test deletes it afterwards

    let agents = app.store.agents().await.unwrap();
    let agent = agents.iter().find(|a| a.id.as_str() == "cli-agent").expect("registered");
    assert_eq!(agent.capacity, 2);
    assert_eq!(agent.labels.get("target").map(String::as_str), Some("homelab"));

    let (id, _) = route_one(&app, RESTART_ON_HOMELAB).await;
    assert_eq!(routing_decision(&app, id).await.agent_id.as_deref(), Some("cli-agent"));
    let messages = app.drain(&queue).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0["payload"]["agent_id"], "cli-agent");
    assert_eq!(messages[0].0["payload"]["task"]["key"], "1.snapshot");
    let events = app.store.audit_events(id).await.unwrap();
    assert!(
        events
            .iter()
            .any(|(_, event, detail)| event == "task.dispatched" && detail["queue"] == queue.as_str())
    );
}

/// Polls `check` until it holds; panics after 20 s.
async fn wait_until<F, Fut>(check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "condition not met in time");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
