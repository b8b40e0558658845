//! Work waits for the fleet instead of failing: tasks that no agent can take now wait in line,
//! and are placed as soon as there is room, by priority, then in turns across plans, then by how
//! long they waited; a task that waits too long gives up; a request can be cancelled.

use std::time::Duration;

use chrono::{DateTime, Utc};
use switchyard::agent::{AgentBuilder, Exec, ExecCommand, Simulate};
use switchyard::config::Config;
use switchyard::model::domain::Resources;
use switchyard::model::ids::{AgentId, RequestId, WorkType};
use switchyard::model::wire::SubmitRequest;
use switchyard::ops;
use uuid::Uuid;

use crate::helpers::*;

const SAMPLE: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";

/// The `bench` work type of `tasks` independent steps (capability `bench`, a second each),
/// and no default agent: what the fleet cannot take waits.
fn with_bench_catalog(tasks: usize) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        // The same content for every test that asks for it: written once, atomically.
        let path = std::env::temp_dir().join(format!("switchyard-tests-bench-{tasks}.toml"));
        if !path.exists() {
            let scratch = path.with_extension(format!("{}.tmp", Uuid::new_v4().simple()));
            std::fs::write(&scratch, switchyard::bench::catalog(tasks)).unwrap();
            std::fs::rename(&scratch, &path).unwrap();
        }
        c.catalog = Some(path);
        c.routing.default_agents.clear();
        c.routing.recheck_secs = 1;
    }
}

/// A bench agent of `capacity` whose tasks take `secs` × their estimate (one second).
fn bench_agent(id: &str, capacity: u32) -> AgentBuilder {
    AgentBuilder::new(AgentId::parse(id).unwrap())
        .capabilities(["bench"])
        .capacity(capacity)
        .resources(Resources { cpu: 4.0, memory_mb: 4096, gpu: 0 })
        .heartbeat_every(Duration::from_millis(300))
}

async fn submit_with_priority(app: &TestApp, text: &str, priority: u8) -> RequestId {
    let request = SubmitRequest {
        text: text.into(),
        request_id: None,
        submitted_by: Some("tests".into()),
        priority: Some(priority),
        auto_approve: Some(true),
    };
    ops::submit(&app.broker, request).await.expect("submitted")
}

async fn query(app: &TestApp, sql: &str) -> Vec<tokio_postgres::Row> {
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.query(sql, &[]).await.unwrap()
}

/// Waits until `count` tasks wait in line.
async fn wait_waiting(app: &TestApp, count: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let rows = query(app, "SELECT count(*) FROM tasks WHERE status = 'waiting'").await;
        let waiting: i64 = rows[0].get(0);
        if waiting == count {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{waiting} tasks wait, not {count}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every request in `ids` completed.
async fn wait_completed(app: &TestApp, ids: &[RequestId]) {
    for id in ids {
        let report = app.wait_for(*id, |r| r.status.is_terminal()).await;
        assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    }
}

/// The routing decisions in the order they were made (the audit log's order), with the plan,
/// the request's priority and when the task became ready.
async fn placements(app: &TestApp) -> Vec<(Uuid, i16, DateTime<Utc>, Option<String>)> {
    query(
        app,
        "SELECT d.plan_id, t.priority, d.ready_at, d.agent_id FROM audit_log a
         JOIN routing_decisions d ON d.task_id = a.task_id AND d.attempt = (a.detail->>'attempt')::int
         JOIN tasks t ON t.id = d.task_id
         WHERE a.event = 'task.routed' ORDER BY a.id",
    )
    .await
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// The most tasks `agent` ever held at once, from the recorded times: a slot is taken when its
/// routing decision is committed and given back when the attempt's result is.
async fn most_held_at_once(app: &TestApp, agent: &str) -> usize {
    let rows = query(
        app,
        &format!(
            "SELECT d.created_at, r.received_at FROM routing_decisions d
             LEFT JOIN task_results r ON r.task_id = d.task_id AND r.attempt = d.attempt
             WHERE d.agent_id = '{agent}' AND d.reserved_capacity"
        ),
    )
    .await;
    let spans: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    spans
        .iter()
        .map(|(taken, _)| {
            spans.iter().filter(|(t, given)| t <= taken && given.is_none_or(|g| g > *taken)).count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn fifty_requests_on_one_agent_of_two_slots_all_complete_by_priority_then_age() {
    let app = spawn_app_with(with_bench_catalog(1)).await;
    let mut ids = Vec::new();
    for i in 0..50u8 {
        ids.push(submit_with_priority(&app, &format!("benchmark request {i}"), (i % 3) * 4).await);
    }
    // No agent yet: every task waits, and says why.
    wait_waiting(&app, 50).await;
    let report = app.store.report(ids[0]).await.unwrap().unwrap();
    assert_eq!(report.plan.unwrap().tasks[0].reason.as_deref(), Some("no agent is registered"));

    let _agent = app.start_agent(bench_agent("busy-1", 2), Simulate::new(0.02, 0.0).unwrap()).await;
    wait_completed(&app, &ids).await;

    let placed = placements(&app).await;
    assert_eq!(placed.len(), 50, "one decision per task, none failed or given up");
    assert!(placed.iter().all(|p| p.3.as_deref() == Some("busy-1")));
    // Highest priority first, then the longest waiting.
    let order: Vec<(i16, DateTime<Utc>)> = placed.iter().map(|p| (-p.1, p.2)).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "placed out of order");
    assert_eq!(most_held_at_once(&app, "busy-1").await, 2, "never more than its two slots");
    for id in ids.iter().take(3) {
        let audit = app.cli(&["audit", &id.to_string()]).await;
        assert!(audit.status.success(), "{}", stdout(&audit));
    }
}

#[tokio::test]
async fn tasks_that_no_agent_can_take_do_not_hold_back_those_behind_them() {
    let app = spawn_app_with(|c| {
        with_bench_catalog(1)(c);
        // Besides `bench`, `render`: a work type that needs what no agent here offers.
        let path = std::env::temp_dir().join(format!("switchyard-tests-render-{}.toml", Uuid::new_v4().simple()));
        let render = "[[work_type]]\nname = \"render\"\ndescription = \"Rendering\"\nkeywords = [\"render\"]\n\
                      capabilities = [\"gpu-render\"]\nbase_complexity = 0.1\n\n[[work_type.step]]\nkey = \"r\"\n\
                      description = \"Render {text}\"\nduration_secs = 1\n";
        let mut catalog = switchyard::bench::catalog(1);
        catalog.push('\n');
        catalog.push_str(render);
        std::fs::write(&path, catalog).unwrap();
        c.catalog = Some(path);
    })
    .await;
    let _agent = app.start_agent(bench_agent("bench-only", 1), Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "bench-only").await;
    // Forty tasks no agent can run head the line, at the highest priority.
    for i in 0..40 {
        submit_with_priority(&app, &format!("render frame {i}"), 9).await;
    }
    wait_waiting(&app, 40).await;
    let behind = submit_with_priority(&app, "benchmark request behind them", 0).await;
    wait_completed(&app, &[behind]).await;
    let _ = std::fs::remove_file(app.config.catalog.as_ref().unwrap());
}

#[tokio::test]
async fn a_request_submitted_before_any_agent_runs_completes_once_one_starts() {
    let app = spawn_app_with(|c| {
        c.routing.default_agents.clear();
        c.routing.recheck_secs = 1;
    })
    .await;
    let id = app.submit(SAMPLE, true).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    assert_eq!(report.plan.as_ref().unwrap().tasks[0].status.as_str(), "waiting");

    let homelab = AgentBuilder::new(AgentId::parse("late-1").unwrap())
        .capabilities(["deployment", "monitoring", "shell"])
        .capacity(2)
        .heartbeat_every(Duration::from_millis(300));
    let _agent = app.start_agent(homelab, Simulate::new(0.0, 0.0).unwrap()).await;
    let report = app.wait_for(id, |r| r.status.is_terminal()).await;
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(stdout(&audit).contains("the request completed (5 tasks, 5 routing decisions, 5 dispatches)"));
}

#[tokio::test]
async fn a_slot_freed_on_a_full_agent_goes_to_a_task_of_another_plan_promptly() {
    let app = spawn_app_with(with_bench_catalog(1)).await;
    // Each task takes a second; one slot.
    let _agent = app.start_agent(bench_agent("single", 1), Simulate::new(1.0, 0.0).unwrap()).await;
    wait_registered(&app, "single").await;
    let first = app.submit("benchmark request first", true).await;
    app.wait_for(first, |r| r.plan.as_ref().is_some_and(|p| p.tasks[0].status.as_str() == "dispatched"))
        .await;
    let second = app.submit("benchmark request second", true).await;
    let waiting = app
        .wait_for(second, |r| r.plan.as_ref().is_some_and(|p| p.tasks[0].status.as_str() == "waiting"))
        .await;
    assert_eq!(waiting.plan.unwrap().tasks[0].reason.as_deref(), Some("1 capable agent busy (1/1)"));
    wait_completed(&app, &[first, second]).await;

    let rows = query(
        &app,
        &format!(
            "SELECT extract(epoch FROM (SELECT d.created_at FROM routing_decisions d WHERE d.plan_id = '{}')
                 - (SELECT r.received_at FROM task_results r JOIN tasks t ON t.id = r.task_id WHERE t.plan_id = '{}'))::float8",
            second.plan_id(),
            first.plan_id()
        ),
    )
    .await;
    let gap: f64 = rows[0].get(0);
    assert!(gap > 0.0 && gap < 5.0, "placed {gap} s after the slot was freed");
}

#[tokio::test]
async fn two_plans_on_one_slot_take_turns_the_older_first() {
    let app = spawn_app_with(with_bench_catalog(10)).await;
    let older = app.submit("benchmark request older", true).await;
    wait_waiting(&app, 10).await;
    let newer = app.submit("benchmark request newer", true).await;
    wait_waiting(&app, 20).await;
    let _agent = app.start_agent(bench_agent("one-slot", 1), Simulate::new(0.01, 0.0).unwrap()).await;
    wait_completed(&app, &[older, newer]).await;

    let plans: Vec<Uuid> = placements(&app).await.iter().map(|p| p.0).collect();
    let expected: Vec<Uuid> = (0..20)
        .map(|i| if i % 2 == 0 { older.plan_id().as_uuid() } else { newer.plan_id().as_uuid() })
        .collect();
    assert_eq!(plans, expected, "the plans' tasks are placed in turns, the older plan first");
}

#[tokio::test]
async fn a_task_that_waits_longer_than_allowed_fails_with_its_decision_and_every_verdict() {
    let app = spawn_app_with(|c| {
        with_bench_catalog(1)(c);
        c.routing.max_wait_secs = 2;
    })
    .await;
    app.register_agent("no-bench", &["deployment"], 2, &[]).await;
    let id = app.submit("benchmark request that nobody takes", true).await;
    let report = app.wait_for(id, |r| r.status.is_terminal()).await;
    assert_eq!(report.status.as_str(), "failed", "{report:#?}");
    let reason = report.failure_reason.clone().unwrap();
    assert!(reason.starts_with("task 1.s1 waited "), "{reason}");
    assert!(
        reason
            .ends_with("longer than the 2 s allowed (routing.max_wait_secs): no agent has capability bench"),
        "{reason}"
    );

    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 1);
    let decision = &trail.decisions[0];
    assert_eq!((decision.agent_id.as_deref(), decision.attempt, decision.score), (None, 1, None));
    assert_eq!(decision.candidates[0]["agent_id"], "no-bench");
    assert_eq!(decision.candidates[0]["verdict"], "rejected");
    assert_eq!(decision.candidates[0]["reasons"][0], "missing capabilities: bench");
    assert!(trail.dispatches.is_empty());
    assert_eq!(trail.tasks[0].status.as_str(), "failed");

    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(stdout(&audit).contains("complete; the request failed: task 1.s1 waited"), "{}", stdout(&audit));
}

#[tokio::test]
async fn cancelling_a_waiting_request_cancels_its_tasks_and_is_safe_to_repeat() {
    let app = spawn_app_with(with_bench_catalog(3)).await;
    let id = app.submit("benchmark request to cancel", true).await;
    wait_waiting(&app, 3).await;

    let cancel = app.cli(&["cancel", &id.to_string(), "--reason", "changed my mind", "--by", "alice"]).await;
    assert_eq!(
        cancel.status.code(),
        Some(0),
        "{}{}",
        stdout(&cancel),
        String::from_utf8_lossy(&cancel.stderr)
    );
    assert_eq!(stdout(&cancel).trim(), format!("request {id} cancelled by alice: changed my mind"));
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "cancelled");
    let plan = report.plan.unwrap();
    assert_eq!(plan.status.as_str(), "cancelled");
    assert!(plan.tasks.iter().all(|t| t.status.as_str() == "cancelled" && t.waiting_since.is_none()));
    let events = app.store.audit_events(id).await.unwrap();
    let cancelled = events.iter().find(|(_, e, _)| e == "request.cancelled").expect("audited");
    assert_eq!((cancelled.0.as_str(), cancelled.2["reason"].as_str()), ("alice", Some("changed my mind")));

    let again = app.cli(&["cancel", &id.to_string(), "--reason", "changed my mind", "--by", "alice"]).await;
    assert_eq!(again.status.code(), Some(0));
    assert_eq!(stdout(&again).trim(), format!("request {id} was cancelled already"));
    assert_eq!(
        app.store.audit_events(id).await.unwrap().iter().filter(|(_, e, _)| e == "request.cancelled").count(),
        1
    );
    // An agent that comes now gets none of it.
    let _agent = app.start_agent(bench_agent("latecomer", 2), Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "latecomer").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(app.store.dispatches(id.plan_id()).await.unwrap().is_empty());

    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(
        stdout(&audit).contains("the request was cancelled by alice: changed my mind"),
        "{}",
        stdout(&audit)
    );
    let unknown = app.cli(&["cancel", &RequestId::random().to_string(), "--reason", "x"]).await;
    assert_eq!(unknown.status.code(), Some(2));

    // A request that ended is left as it is, and the command says why.
    let done = app.submit("benchmark request quick", true).await;
    wait_completed(&app, &[done]).await;
    let late = app.cli(&["cancel", &done.to_string(), "--reason", "too late"]).await;
    assert_eq!(late.status.code(), Some(1), "{}", stdout(&late));
    assert_eq!(
        stdout(&late).trim(),
        format!("request {done} is completed already: there is nothing left to cancel")
    );
    assert_eq!(app.store.report(done).await.unwrap().unwrap().status.as_str(), "completed");
}

#[tokio::test]
async fn cancelling_a_running_request_kills_its_command_and_frees_the_slot() {
    let app = spawn_app_with(with_bench_catalog(1)).await;
    let pid_file = std::env::temp_dir().join(format!("switchyard-cancel-{}.pid", Uuid::new_v4().simple()));
    let script = format!("echo $$ > {}; exec sleep 60", pid_file.display());
    let exec = Exec::new(Duration::from_secs(120)).command(
        WorkType::parse("bench").unwrap(),
        ExecCommand::from_argv(["/bin/sh".to_owned(), "-c".to_owned(), script]).unwrap(),
    );
    let _agent = app.start_agent(bench_agent("runner", 1), exec).await;
    wait_registered(&app, "runner").await;
    let id = app.submit("benchmark request that runs long", true).await;

    // The command runs: its process is there.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|p| p.trim().parse().ok()) {
            break pid;
        }
        assert!(tokio::time::Instant::now() < deadline, "the command never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // SAFETY: kill(2) with signal 0 only asks whether the process exists.
    let alive = || unsafe { libc::kill(pid, 0) } == 0;
    assert!(alive());

    let cancel = app.cli(&["cancel", &id.to_string(), "--reason", "wrong host", "--by", "ops"]).await;
    assert!(cancel.status.success(), "{}{}", stdout(&cancel), String::from_utf8_lossy(&cancel.stderr));
    assert!(
        stdout(&cancel).contains("task 1.s1 attempt 1 on runner: told to stop it"),
        "{}",
        stdout(&cancel)
    );
    let cancelled_at = tokio::time::Instant::now();
    while alive() {
        assert!(
            cancelled_at.elapsed() < Duration::from_secs(5),
            "the command still runs 5 s after the cancel"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(&pid_file);

    // The slot is free at once; the agent's late report changes nothing.
    let agents = app.store.agents().await.unwrap();
    assert_eq!(agents[0].in_flight, 0);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "cancelled");
    let plan = report.plan.unwrap();
    assert_eq!(plan.tasks[0].status.as_str(), "cancelled");
    assert!(plan.results.is_empty(), "a cancelled attempt's result is ignored: {:?}", plan.results);
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn requests_that_arrive_while_every_agent_is_silent_complete_once_they_return() {
    let app = spawn_app_with(|c| {
        with_bench_catalog(1)(c);
        c.routing.heartbeat_ttl_secs = 2;
    })
    .await;
    let agent = app.start_agent(bench_agent("flaky", 2), Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "flaky").await;
    agent.stop().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(app.submit(&format!("benchmark request {i} while silent"), true).await);
    }
    wait_waiting(&app, 20).await;
    let report = app.store.report(ids[0]).await.unwrap().unwrap();
    let reason = report.plan.unwrap().tasks[0].reason.clone().unwrap();
    assert!(reason.starts_with("1 capable agent silent (flaky for "), "{reason}");

    let _back = app.start_agent(bench_agent("flaky", 2), Simulate::new(0.0, 0.0).unwrap()).await;
    wait_completed(&app, &ids).await;
    assert_eq!(most_held_at_once(&app, "flaky").await, 2);
}

#[tokio::test]
async fn an_agent_registered_without_resources_offers_this_machine_s() {
    let app = spawn_app().await;
    app.declare_agent_queue("host-1").await;
    let register = app.cli(&["agents", "register", "--id", "host-1", "--capabilities", "code"]).await;
    assert!(register.status.success(), "{}", String::from_utf8_lossy(&register.stderr));
    let agent = wait_registered(&app, "host-1").await;
    assert_eq!(agent.resources.cpu, std::thread::available_parallelism().unwrap().get() as f64);
    assert!(agent.resources.memory_mb >= 2048, "{:?}", agent.resources);
    // Enough for the built-in code-generation steps (2 CPUs, 2 GiB) on any machine with them.
    let given = app
        .cli(&[
            "agents",
            "register",
            "--id",
            "host-1",
            "--capabilities",
            "code",
            "--cpu",
            "0.5",
            "--gpu",
            "2",
        ])
        .await;
    assert!(given.status.success());
    let agent = app.store.agents().await.unwrap().into_iter().find(|a| a.id.as_str() == "host-1").unwrap();
    assert_eq!((agent.resources.cpu, agent.resources.gpu), (0.5, 2));
}
