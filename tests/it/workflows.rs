//! Complete workflows: a request goes through every stage to its agents' queues.

use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn uptime_kuma_is_deployed_to_the_homelab_agent_with_alerts_planned() {
    let app = spawn_app().await;
    app.register_agent(
        "homelab-1",
        &["deployment", "monitoring", "shell", "docker"],
        4,
        &[("target", "homelab")],
    )
    .await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    let plan = report.plan.as_ref().unwrap();
    let keys: Vec<&str> = plan.tasks.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"]);
    let dispatched: Vec<&str> =
        plan.tasks.iter().filter(|t| t.status.as_str() == "dispatched").map(|t| t.key.as_str()).collect();
    assert_eq!(dispatched, ["1.prepare"], "only the tasks without dependencies are released");
    let messages = app.drain(&app.agent_queue("homelab-1")).await;
    assert_eq!(messages.len(), 1);
    let (task, _) = &messages[0];
    assert_eq!(task["payload"]["task"]["key"], "1.prepare");
    assert_eq!(task["payload"]["agent_id"], "homelab-1");
    assert_eq!(task["schema_version"], 1);
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn a_code_generation_request_goes_to_the_coding_agent() {
    let app = spawn_app().await;
    app.register_agent("coder", &["code_generation", "code"], 2, &[]).await;
    app.register_agent("homelab-1", &["deployment", "shell"], 2, &[]).await;
    let id = app.submit("Write a Python script that exports Grafana dashboards", true).await;
    let report = app.wait_settled(id).await;
    let plan = report.plan.as_ref().expect("a plan");
    assert!(plan.tasks.iter().all(|t| t.work_type == "code_generation"), "{plan:#?}");
    let keys: Vec<&str> = plan.tasks.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["1.design", "1.implement", "1.test"]);
    let design = &plan.tasks[0];
    assert_eq!(design.status.as_str(), "dispatched");
    assert_eq!(design.agent_id.as_deref(), Some("coder"));
    let coder = app.drain(&app.agent_queue("coder")).await;
    assert_eq!(coder.len(), 1);
    assert_eq!(coder[0].0["payload"]["task"]["work_type"], "code_generation");
    assert!(app.drain(&app.agent_queue("homelab-1")).await.is_empty());
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 1);
    assert_eq!(trail.decisions[0].agent_id.as_deref(), Some("coder"));
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn a_monitoring_setup_configures_checks_first() {
    let app = spawn_app().await;
    app.register_agent("watcher", &["monitoring"], 3, &[]).await;
    let id = app.submit("Monitor the NAS and notify me on Telegram when it is down", true).await;
    let report = app.wait_settled(id).await;
    let plan = report.plan.as_ref().unwrap();
    let types: Vec<&str> = plan.tasks.iter().map(|t| t.work_type.as_str()).collect();
    assert!(types.iter().all(|t| *t == "monitoring"), "{types:?}");
    let messages = app.drain(&app.agent_queue("watcher")).await;
    let keys: Vec<&str> =
        messages.iter().map(|(m, _)| m["payload"]["task"]["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["1.configure_checks"]);
    let alerts = plan.tasks.iter().find(|t| t.key == "1.configure_alerts").unwrap();
    assert_eq!(alerts.status.as_str(), "pending", "alerts wait for the checks");
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn two_independent_intents_are_released_together_to_their_agents() {
    let app = spawn_app().await;
    app.register_agent("scholar", &["research", "web"], 1, &[]).await;
    app.register_agent("deployer", &["deployment", "shell"], 1, &[]).await;
    let id = app
        .submit("Research self-hosted password managers and deploy Vaultwarden to the homelab", true)
        .await;
    let report = app.wait_settled(id).await;
    let plan = report.plan.as_ref().unwrap();
    let decomposition = report.intents.as_ref().unwrap().as_array().unwrap();
    let intents: Vec<&str> = decomposition.iter().map(|i| i["work_type"].as_str().unwrap()).collect();
    assert_eq!(intents, ["research", "deployment"]);
    let dispatched: Vec<(&str, &str)> = plan
        .tasks
        .iter()
        .filter(|t| t.status.as_str() == "dispatched")
        .map(|t| (t.key.as_str(), t.agent_id.as_deref().unwrap()))
        .collect();
    assert_eq!(dispatched, [("1.gather", "scholar"), ("2.prepare", "deployer")]);
    assert_eq!(app.drain(&app.agent_queue("scholar")).await.len(), 1);
    assert_eq!(app.drain(&app.agent_queue("deployer")).await.len(), 1);
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn a_request_from_a_plain_amqp_client_goes_the_same_way() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "monitoring", "shell"], 4, &[("target", "homelab")])
        .await;
    // No request id, no AMQP message id: the bytes are the idempotency key.
    let body = br#"{"text": "Deploy Uptime Kuma to the homelab and send alerts to Discord", "auto_approve": true, "submitted_by": "amqp-client", "priority": 5}"#;
    app.publish_raw("requests", body).await;
    let id = switchyard::model::ids::RequestId::from_uuid(
        switchyard::model::wire::entry_message_id(None, body).as_uuid(),
    );
    let report = app.wait_settled(id).await;
    assert_eq!(report.submitted_by.as_deref(), Some("amqp-client"));
    assert_eq!(report.status.as_str(), "in_progress");
    let messages = app.drain(&app.agent_queue("homelab-1")).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0["payload"]["task"]["key"], "1.prepare");
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn submit_wait_ends_when_the_released_tasks_are_in_their_queues() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "monitoring", "shell"], 4, &[("target", "homelab")])
        .await;
    let output = app
        .cli(&[
            "submit",
            "Deploy Uptime Kuma to the homelab and send alerts to Discord",
            "--auto-approve",
            "--wait",
        ])
        .await;
    let text = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(3),
        "not completed: {text}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let id = text.lines().next().unwrap().trim().to_owned();
    assert!(text.contains("1.prepare=dispatched"), "{text}");
    // No agent process consumes homelab-1's queue here: the wait ends there, and says so.
    assert!(text.contains("every released task is confirmed in its agent's queue\n"), "{text}");
    assert!(
        text.ends_with(&format!(
            "no agent consumes {}: the tasks wait there for one\n",
            app.agent_queue("homelab-1")
        )),
        "{text}"
    );
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 1);
    let audit = app.cli(&["audit", &id]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(
        stdout(&audit).contains(
            "complete; the request is under way (in_progress: 5 tasks, 1 routing decisions, 1 dispatches)"
        ),
        "{}",
        stdout(&audit)
    );
    let status = app.cli(&["status", &id, "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["status"], "in_progress");
    assert_eq!(json["plan"]["tasks"][0]["agent_id"], "homelab-1");
    assert_eq!(json["plan"]["fallback"]["goes"], "local");
    assert_eq!(json["plan"]["approval"]["decided_by"], "policy");
}

#[tokio::test]
async fn a_plan_waits_for_approval_then_is_dispatched_once_approved() {
    let app = spawn_app_with(|c| c.approval.allow_request_auto_approve = false).await;
    app.register_agent("homelab-1", &["deployment", "monitoring", "shell"], 4, &[]).await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", true).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    let plan_id = report.plan.as_ref().unwrap().plan_id.to_string();
    assert!(app.drain(&app.agent_queue("homelab-1")).await.is_empty(), "nothing dispatched before approval");
    // Awaiting a person is a trail complete so far, and said so.
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(
        stdout(&audit).contains("the request is under way (awaiting_approval: 5 tasks"),
        "{}",
        stdout(&audit)
    );
    let approve = app.cli(&["approve", &plan_id, "--by", "alice"]).await;
    assert!(approve.status.success(), "{}", String::from_utf8_lossy(&approve.stderr));
    let report = app.wait_settled(id).await;
    let approval = report.plan.as_ref().unwrap().approval.as_ref().unwrap();
    assert_eq!(approval.decided_by, "alice");
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 1);
    let events: Vec<String> =
        app.store.audit_events(id).await.unwrap().into_iter().map(|(_, e, _)| e).collect();
    assert!(
        events.contains(&"plan.awaiting_approval".to_owned()) && events.contains(&"plan.approved".to_owned())
    );
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn a_rejected_plan_dispatches_nothing() {
    let app = spawn_app_with(|c| c.approval.allow_request_auto_approve = false).await;
    app.register_agent("homelab-1", &["deployment", "monitoring", "shell"], 4, &[]).await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", false).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    let plan_id = report.plan.as_ref().unwrap().plan_id.to_string();
    let reject = app.cli(&["reject", &plan_id, "--reason", "not during the freeze", "--by", "bob"]).await;
    assert!(reject.status.success());
    let report = app.wait_for(id, |r| r.status.as_str() == "rejected").await;
    assert_eq!(report.failure_reason.as_deref(), Some("not during the freeze"));
    let tasks = &report.plan.as_ref().unwrap().tasks;
    assert!(tasks.iter().all(|t| t.status.as_str() == "cancelled"), "{tasks:?}");
    assert!(tasks[0].reason.as_deref().unwrap().contains("the plan was rejected (not during the freeze)"));
    let approve = app.cli(&["approve", &plan_id]).await;
    assert!(!approve.status.success(), "a rejected plan cannot be approved");
    assert!(String::from_utf8_lossy(&approve.stderr).contains("already rejected"));
    assert!(app.drain(&app.agent_queue("homelab-1")).await.is_empty());
}

#[tokio::test]
async fn a_redelivered_stage_message_produces_no_second_row_or_dispatch() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[]).await;
    let id = app.submit("Deploy Gitea to the homelab", true).await;
    app.wait_settled(id).await;
    // Replay the plan stage's input as a redelivery would: same message id, same payload.
    let catalog = switchyard::understanding::catalog::Catalog::default();
    let report = app.store.report(id).await.unwrap().unwrap();
    let decomposition = catalog.decompose(&report.text).unwrap();
    let request = switchyard::model::wire::RequestMeta {
        request_id: id,
        text: report.text.clone(),
        submitted_by: Some("tests".into()),
        priority: 0,
        auto_approve: true,
    };
    let envelope = switchyard::model::wire::Envelope::derived(
        switchyard::model::ids::MessageId::random(),
        "decomposed",
        id,
        chrono::Utc::now(),
        switchyard::model::wire::Decomposed { request, decomposition },
    );
    let body = serde_json::to_vec(&envelope).unwrap();
    app.publish_raw("decomposed", &body).await;
    app.publish_raw("decomposed", &body).await;
    // Let the copies go through plan → fallback → route.
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.fallback_decisions, 1);
    assert_eq!(trail.decisions.len(), 1, "{:?}", trail.decisions);
    assert_eq!(trail.dispatches.len(), 1);
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 1);
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

#[tokio::test]
async fn submit_wait_json_on_timeout_prints_where_the_request_stands() {
    // Nobody approves: the request waits for a person until the timeout.
    let app = spawn_app_with(|c| {
        c.approval.auto_approve_below = None;
        c.approval.allow_request_auto_approve = false;
    })
    .await;
    let output =
        app.cli(&["submit", "Deploy Uptime Kuma to the homelab", "--wait", "--json", "--timeout", "3"]).await;
    assert_eq!(
        output.status.code(),
        Some(3),
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&output.stdout).expect("one JSON object");
    assert_eq!(shown["status"], "timeout");
    assert_eq!(shown["last_status"], "awaiting_approval", "{shown}");
    assert!(shown["waiting_for"].as_str().unwrap().starts_with("awaiting approval: switchyard approve"));
    let id: switchyard::model::ids::RequestId = shown["request_id"].as_str().unwrap().parse().unwrap();
    assert!(app.store.report(id).await.unwrap().is_some());
}

#[tokio::test]
async fn migrate_creates_a_missing_database_then_finds_it() {
    let database = format!("switchyard_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let url = switchyard::store::with_database(&database_url(), &database);
    for _ in 0..2 {
        let output = crate::broker::switchyard(&[("DATABASE_URL", &url)], &["migrate"]).await;
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        assert_eq!(stdout(&output), "database migrated\n");
    }
    let store = switchyard::store::Store::connect(&url, 1).await.expect("the database exists");
    assert!(store.agents().await.unwrap().is_empty(), "and is migrated");
    drop(store);
    switchyard::store::admin::drop_database(&database_url(), &database).await.unwrap();
}

/// Starts `switchyard agent` with the simulate executor, as a separate process.
fn agent_process(app: &TestApp, id: &str, speed: &str) -> tokio::process::Child {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args([
            "agent",
            "--id",
            id,
            "--capabilities",
            "deployment,monitoring,shell,docker",
            "--capacity",
            "2",
        ])
        .args(["--executor", "simulate", "--speed", speed, "--heartbeat-secs", "1"])
        .env("AMQP_URL", &app.config.amqp_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env_remove("SWITCHYARD_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts")
}

async fn wait_until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn with_two_agent_processes_a_request_completes_even_when_one_is_killed_mid_task() {
    let app = spawn_app_with(|c| {
        // Short leases and a short heartbeat TTL, so that the test sees the killed agent's task
        // re-routed within seconds; the agents heartbeat every second.
        c.leases.factor = 0.05;
        c.leases.grace_secs = 2;
        c.leases.sweep_every_secs = 1;
        c.routing.heartbeat_ttl_secs = 3;
    })
    .await;
    // Declared here too, so that the test's teardown deletes them.
    app.declare_agent_queue("agent-a").await;
    app.declare_agent_queue("agent-b").await;
    // Each simulated task takes a fiftieth of its estimate: 1.2 s to 3 s.
    let mut doomed = agent_process(&app, "agent-a", "0.02");
    let _survivor = agent_process(&app, "agent-b", "0.02");
    wait_until("both agents to register", async || app.store.agents().await.unwrap().len() == 2).await;

    let submit = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["submit", "Deploy Uptime Kuma to the homelab and send alerts to Discord", "--auto-approve"])
        .args(["--wait", "--timeout", "90"])
        .env("AMQP_URL", &app.config.amqp_url)
        .env("DATABASE_URL", &app.config.database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env_remove("SWITCHYARD_CONFIG")
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .output();
    let submit = tokio::spawn(submit);

    // Ties go to the lower id: agent-a takes the first task. Kill it while it runs.
    wait_until("agent-a to hold a task", async || {
        app.store.agents().await.unwrap().iter().any(|a| a.id.as_str() == "agent-a" && a.in_flight > 0)
    })
    .await;
    doomed.kill().await.unwrap();

    let output = submit.await.unwrap().unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "{text}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(text.ends_with("completed: every task succeeded\n"), "{text}");
    let id: switchyard::model::ids::RequestId = text.lines().next().unwrap().trim().parse().unwrap();
    let report = app.store.report(id).await.unwrap().unwrap();
    let plan = report.plan.as_ref().unwrap();
    let lost: Vec<_> = plan.results.iter().filter(|r| r.source == "lease").collect();
    assert!(!lost.is_empty(), "the killed agent's attempt ended by its lease: {:?}", plan.results);
    assert!(lost.iter().all(|r| r.agent_id == "agent-a"));
    let retried = plan.tasks.iter().find(|t| t.id == lost[0].task_id).unwrap();
    assert_eq!((retried.status.as_str(), retried.agent_id.as_deref()), ("succeeded", Some("agent-b")));
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

/// A migration cut off half-way (its connection killed while it waits for a lock) reports the
/// migration's error, not the failed unlock's, and leaves nothing in the pool that holds the
/// migrations' lock: the next migration, on the same pool, runs to the end.
#[tokio::test]
async fn a_migration_cut_off_reports_its_own_error_and_leaves_the_lock_free() {
    let database = format!("switchyard_t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16]);
    let url = switchyard::store::with_database(&database_url(), &database);
    switchyard::store::ensure_database(&url).await.unwrap();
    let (mut blocker, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    // The first migration creates `requests`: it waits for this transaction to end.
    let holding = blocker.transaction().await.unwrap();
    holding.batch_execute("CREATE TABLE requests (id int)").await.unwrap();
    let store = switchyard::store::Store::connect(&url, 1).await.unwrap();
    let migrating = tokio::spawn({
        let store = store.clone();
        async move { store.migrate().await }
    });
    let mut killed = false;
    for _ in 0..200 {
        let rows = holding
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap();
        if !rows.is_empty() {
            killed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(killed, "the migration never waited for the table");
    let err = migrating.await.unwrap().expect_err("the migration was cut off");
    assert!(err.to_string().starts_with("database migration:"), "{err}");
    assert!(err.is_transient(), "{err}");

    holding.rollback().await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), store.migrate())
        .await
        .expect("the lock is free")
        .expect("the next migration runs");
    assert!(store.agents().await.unwrap().is_empty(), "and the database is migrated");
    drop((store, blocker));
    switchyard::store::admin::drop_database(&database_url(), &database).await.unwrap();
}
