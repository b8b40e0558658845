//! Error handling: every message that cannot be processed ends as a dead letter (a row in
//! `dead_letters` and a copy in `<namespace>.dead` with its reason in a header), every request that
//! cannot go on is failed with its reason, and a worker keeps going after bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::model::ids::RequestId;
use switchyard::ops::{self, Progress};
use uuid::Uuid;

use crate::helpers::*;

/// Takes messages from `<namespace>.dead` until `count` arrived; panics after 20 s.
async fn wait_dead_queue(app: &TestApp, count: usize) -> Vec<(Value, BTreeMap<String, String>)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut messages = Vec::new();
    loop {
        messages.extend(app.drain(&app.names.dead_queue()).await);
        if messages.len() >= count {
            return messages;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} messages in the dead queue, expected {count}: {messages:#?}",
            messages.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Takes messages from a queue (full name) for `quiet`, however many arrive.
async fn collect_for(app: &TestApp, queue: &str, quiet: Duration) -> Vec<(Value, BTreeMap<String, String>)> {
    let deadline = tokio::time::Instant::now() + quiet;
    let mut messages = Vec::new();
    while tokio::time::Instant::now() < deadline {
        messages.extend(app.drain(queue).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    messages.extend(app.drain(queue).await);
    messages
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A deployment request body, as any AMQP client could publish it.
fn request_body(text: &str, request_id: Option<RequestId>, auto_approve: bool) -> Vec<u8> {
    let mut body = json!({ "text": text, "auto_approve": auto_approve });
    if let Some(id) = request_id {
        body["request_id"] = json!(id);
    }
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test]
async fn malformed_json_is_dead_lettered_with_its_reason_and_makes_no_request() {
    let app = spawn_app().await;
    app.publish_raw("requests", b"{\"text\": \"deploy nginx\"").await;

    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(dead[0].reason.starts_with("malformed JSON"), "{}", dead[0].reason);
    assert_eq!(dead[0].queue, app.names.requests());

    let rows = dead_rows(&app).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].stage.as_str(), rows[0].queue.as_str()),
        ("decompose", app.names.requests().as_str())
    );
    assert_eq!(rows[0].body, "{\"text\": \"deploy nginx\"", "the row keeps the body as received");
    assert_eq!(rows[0].request_id, None);

    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(messages.len(), 1, "{messages:#?}");
    let (body, headers) = &messages[0];
    assert_eq!(body, &Value::String("{\"text\": \"deploy nginx\"".into()), "the original bytes");
    assert_eq!(headers["x-switchyard-reason"], dead[0].reason);
    assert_eq!(headers["x-switchyard-stage"], "decompose");
    assert_eq!(headers["x-switchyard-queue"], app.names.requests());
    assert_eq!(headers["x-switchyard-message-id"], rows[0].message_id.to_string());

    assert_eq!(request_total(&app).await, 0, "no request row for a message that could not be read");
}

#[tokio::test]
async fn blank_text_is_dead_lettered_as_empty_request_text() {
    let app = spawn_app().await;
    app.publish_raw("requests", br#"{"text":"   "}"#).await;

    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(dead[0].reason, "empty request text");
    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(messages[0].0, json!({ "text": "   " }));
    assert_eq!(messages[0].1["x-switchyard-reason"], "empty request text");
    assert_eq!(request_total(&app).await, 0);
}

#[tokio::test]
async fn a_payload_over_the_default_limit_is_dead_lettered_with_the_limit_in_its_reason() {
    let app = spawn_app().await;
    let text = format!("deploy {}", "x".repeat(300 * 1024));
    let body = request_body(&text, None, true);
    assert!(body.len() > 256 * 1024);
    app.publish_raw("requests", &body).await;

    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(
        dead[0].reason,
        format!("payload of {} bytes exceeds the limit of {} bytes", body.len(), 256 * 1024)
    );
    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(messages[0].1["x-switchyard-reason"], dead[0].reason);
    assert_eq!(messages[0].0["text"], text, "the whole body is kept");
    assert_eq!(request_total(&app).await, 0);
}

#[tokio::test]
async fn a_configured_payload_limit_is_enforced_and_requests_under_it_still_go_through() {
    let app = spawn_app_with(|c| c.worker.max_payload_bytes = 1024).await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    let big = request_body(&format!("deploy {}", "y".repeat(2000)), None, true);
    app.publish_raw("requests", &big).await;
    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(dead[0].reason, format!("payload of {} bytes exceeds the limit of 1024 bytes", big.len()));

    let id = app.submit("Deploy nginx to the homelab", true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{report:#?}");
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 1);
    assert_eq!(request_total(&app).await, 1, "only the small request made a request row");
}

#[tokio::test]
async fn an_envelope_of_an_unknown_schema_version_is_dead_lettered_by_the_plan_stage() {
    let app = spawn_app().await;
    let request_id = RequestId::random();
    let envelope = json!({
        "message_id": Uuid::new_v4(),
        "schema_version": 99,
        "request_id": request_id,
        "causation_id": null,
        "timestamp": "2025-01-01T00:00:00Z",
        "payload": { "whatever": "a future version carries" },
    });
    app.publish_raw("decomposed", &serde_json::to_vec(&envelope).unwrap()).await;

    let dead = app.wait_dead_letters("plan", 1).await;
    assert_eq!(dead[0].reason, "unknown schema version 99 (this worker reads version 1)");
    assert_eq!(dead[0].queue, app.names.queue("decomposed"));
    let rows = dead_rows(&app).await;
    assert_eq!(rows[0].request_id, Some(request_id.as_uuid()), "the request id is read from the envelope");
    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(messages[0].0, envelope);
    assert_eq!(messages[0].1["x-switchyard-stage"], "plan");
    assert!(messages[0].1["x-switchyard-reason"].starts_with("unknown schema version 99"));
}

#[tokio::test]
async fn a_request_whose_message_is_dead_lettered_at_a_later_stage_fails_with_the_reason() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let id = app.submit("Deploy Gitea to the homelab", false).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    let message_id = Uuid::new_v4();
    // A message from a newer Switchyard, say, during a rolling upgrade.
    let envelope = json!({
        "message_id": message_id,
        "schema_version": 2,
        "request_id": id,
        "causation_id": null,
        "timestamp": "2026-01-01T00:00:00Z",
        "payload": { "plan_id": report.plan.as_ref().unwrap().plan_id },
    });
    app.publish_raw("route", &serde_json::to_vec(&envelope).unwrap()).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "failed").await;
    assert_eq!(
        report.failure_reason.as_deref(),
        Some(
            "a message of this request was dead-lettered at route: unknown schema version 2 (this worker reads version 1)"
        )
    );
    assert_eq!(report.dead_letters.len(), 1);
    assert_eq!(report.dead_letters[0].message_id.as_uuid(), message_id, "the envelope's own id is kept");
    let events: Vec<String> =
        app.store.audit_events(id).await.unwrap().into_iter().map(|(_, e, _)| e).collect();
    assert_eq!(events.last().map(String::as_str), Some("request.failed"));
}

#[tokio::test]
async fn schema_violations_are_dead_lettered_and_named() {
    let app = spawn_app().await;
    app.publish_raw("requests", br#"{"text":"deploy nginx","colour":"red"}"#).await;
    app.publish_raw("requests", br#"["deploy nginx"]"#).await;
    app.publish_raw("requests", br#"{"text":"deploy nginx","priority":12}"#).await;

    app.wait_dead_letters("decompose", 3).await;
    let rows = dead_rows(&app).await;
    let reason_of =
        |needle: &str| rows.iter().find(|r| r.body.contains(needle)).map(|r| r.reason.clone()).expect(needle);
    let unknown_field = reason_of("colour");
    assert!(unknown_field.starts_with("schema violation: unknown field `colour`"), "{unknown_field}");
    assert_eq!(reason_of("[\"deploy"), "schema violation: expected a JSON object, found an array");
    assert_eq!(reason_of("priority"), "schema violation: priority 12 is outside 0-9");
    let messages = wait_dead_queue(&app, 3).await;
    assert!(
        messages.iter().all(|(_, h)| h["x-switchyard-reason"].starts_with("schema violation")),
        "{messages:#?}"
    );
    assert_eq!(request_total(&app).await, 0);
}

#[tokio::test]
async fn a_refused_request_keeps_its_id_and_status_shows_why_and_submit_refuses_it_at_once() {
    let app = spawn_app().await;
    let id = RequestId::random();
    app.publish_raw("requests", &request_body("  ", Some(id), true)).await;

    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(dead[0].reason, "empty request text");
    let rows = dead_rows(&app).await;
    assert_eq!(rows[0].request_id, Some(id.as_uuid()));
    assert_eq!(app.store.report(id).await.unwrap().map(|r| r.request_id), None);

    // No request row, but `status` shows the dead letter that refused it: an answer, exit 0.
    let status = app.cli(&["status", &id.to_string()]).await;
    assert_eq!(status.status.code(), Some(0), "{}", stdout(&status));
    let text = stdout(&status);
    assert!(text.contains("refused on arrival"), "{text}");
    assert!(text.contains("dead letter at decompose"), "{text}");
    assert!(text.contains("empty request text"), "{text}");
    let status = app.cli(&["status", &id.to_string(), "--json"]).await;
    let shown: Value = serde_json::from_slice(&status.stdout).expect("one JSON object");
    assert_eq!(shown["status"], "refused");
    assert_eq!(shown["dead_letters"][0]["reason"], "empty request text", "{shown}");

    // `submit` checks the text as the decompose stage does: it refuses at once, and sends nothing.
    for json in [false, true] {
        let mut args = vec!["submit", "   ", "--wait", "--timeout", "20"];
        args.extend(json.then_some("--json"));
        let output = app.cli(&args).await;
        assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
        assert_eq!(stderr(&output).trim(), "error: the request is not valid: empty request text");
    }
    assert!(app.drain(&app.names.requests()).await.is_empty(), "nothing was sent");

    // Of a request nobody has seen there is nothing to show: an error, exit 2.
    let unknown = app.cli(&["status", &RequestId::random().to_string()]).await;
    assert_eq!(unknown.status.code(), Some(2), "{}", stdout(&unknown));
    assert!(stderr(&unknown).contains("no request"), "{}", stderr(&unknown));
}

#[tokio::test]
async fn a_bad_argument_exits_2_and_says_what_is_allowed() {
    let app = spawn_app().await;
    let output = app.cli(&["worker", "--stage", "plan,bogus"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let shown = stderr(&output);
    assert!(shown.contains("bogus"), "{shown}");
    for stage in ["all", "decompose", "plan", "fallback", "route", "dispatch", "heartbeat"] {
        assert!(shown.contains(stage), "{stage} is not listed: {shown}");
    }
    let output = app.cli(&["audit", "not-a-uuid"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}

#[tokio::test]
async fn a_request_id_submitted_again_makes_one_request_one_plan_and_one_task_message() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    let id = RequestId::random();
    let first = request_body("Deploy nginx to the homelab", Some(id), true);
    app.publish_raw("requests", &first).await;
    app.publish_raw("requests", &first).await;
    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{report:#?}");
    app.publish_raw("requests", &request_body("Install grafana on the lab", Some(id), true)).await;

    let queue = app.agent_queue("homelab-1");
    let messages = collect_for(&app, &queue, Duration::from_secs(2)).await;
    assert_eq!(messages.len(), 1, "{messages:#?}");
    assert_eq!(messages[0].0["payload"]["task"]["key"], "1.prepare");
    assert_eq!(request_total(&app).await, 1);
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.text, "Deploy nginx to the homelab", "the first submission wins");
    assert_eq!(report.plan.as_ref().unwrap().tasks.len(), 3);
    assert_eq!(app.store.dispatches(id.plan_id()).await.unwrap().len(), 1);
    // A copy is not an error; another text under the same id is refused, never merged.
    let dead = dead_rows(&app).await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    assert!(dead[0].reason.contains("was submitted before with another text"), "{}", dead[0].reason);
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn with_no_agent_registered_a_task_goes_to_the_default_agent_of_its_work_type() {
    let app = spawn_app().await;
    app.declare_agent_queue("default-deployment").await;
    let id = app.submit("Deploy nginx to the homelab", true).await;

    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{report:#?}");
    let task = &report.plan.as_ref().unwrap().tasks[0];
    assert_eq!((task.key.as_str(), task.status.as_str()), ("1.prepare", "dispatched"));
    assert_eq!(task.agent_id.as_deref(), Some("default-deployment"));
    let reason = task.reason.as_deref().unwrap_or_default();
    assert!(reason.starts_with("no agents available"), "{reason}");
    let messages = app.drain(&app.agent_queue("default-deployment")).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0["payload"]["agent_id"], "default-deployment");
    assert_eq!(messages[0].0["payload"]["task"]["key"], "1.prepare");
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn with_no_agent_and_no_default_agent_the_request_waits_and_says_why() {
    let app = spawn_app_with(|c| c.routing.default_agents.clear()).await;
    let id = app.submit("Deploy nginx to the homelab", true).await;

    let report = app
        .wait_for(id, |r| {
            r.plan.as_ref().is_some_and(|p| p.tasks.iter().any(|t| t.status.as_str() == "waiting"))
        })
        .await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    let task = &report.plan.as_ref().unwrap().tasks[0];
    assert_eq!((task.key.as_str(), task.status.as_str()), ("1.prepare", "waiting"));
    assert_eq!(task.reason.as_deref(), Some("no agent is registered"));
    assert!(task.waiting_since.is_some());
    assert!(matches!(ops::progress(&report), Progress::Waiting(w) if w.contains("1 waiting for an agent")));
    let status = app.cli(&["status", &id.to_string()]).await;
    assert!(status.status.success());
    let shown = stdout(&status);
    assert!(shown.contains("status    in_progress"), "{shown}");
    assert!(shown.contains(" s: no agent is registered"), "{shown}");
    assert!(dead_rows(&app).await.is_empty(), "waiting is not an error");
    // Why it waits is on record, with every candidate (none here).
    let events = app.store.audit_events(id).await.unwrap();
    let waiting = events.iter().find(|(_, e, _)| e == "task.waiting").expect("a task.waiting event");
    assert_eq!(waiting.2["reason"], "no agent is registered");
    assert_eq!(waiting.2["candidates"], serde_json::json!([]));
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn an_agent_without_a_queue_fails_the_dispatch_and_gets_its_capacity_back() {
    let app = spawn_app_with(|c| c.worker.retry_base_delay_ms = 10).await;
    // Registered in the store only: nobody declared its queue.
    let heartbeat = app.heartbeat("ghost-1", &["deployment", "shell"], 2, &[("target", "homelab")]);
    app.store.register_agent("tests", heartbeat).await.unwrap();
    let id = app.submit("Deploy nginx to the homelab", true).await;

    let report = app.wait_for(id, |r| r.status.as_str() == "failed").await;
    let task = &report.plan.as_ref().unwrap().tasks[0];
    assert_eq!((task.key.as_str(), task.status.as_str()), ("1.prepare", "dispatch_failed"), "{report:#?}");
    let reason = task.reason.as_deref().unwrap_or_default();
    assert!(reason.contains("unroutable"), "{reason}");
    assert!(reason.contains(&app.agent_queue("ghost-1")), "{reason}");
    let failure = report.failure_reason.as_deref().unwrap_or_default();
    assert!(failure.starts_with("task 1.prepare could not be dispatched to ghost-1"), "{failure}");
    // The plan cannot go on: it failed, and what was still to run is cancelled.
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.status.as_str(), "failed");
    assert!(plan.tasks[1..].iter().all(|t| t.status.as_str() == "cancelled"), "{:?}", plan.tasks);
    match ops::progress(&report) {
        Progress::Failed(why) => assert!(why.contains("unroutable"), "{why}"),
        other => panic!("progress should say failed: {other:?}"),
    }

    let dead = app.wait_dead_letters("dispatch", 1).await;
    assert!(dead[0].reason.contains("unroutable"), "{}", dead[0].reason);
    assert!(dead[0].reason.ends_with("gave up after 3 attempts"), "{}", dead[0].reason);
    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(messages[0].1["x-switchyard-stage"], "dispatch");
    assert_eq!(messages[0].0["payload"]["agent_id"], "ghost-1");

    let agents = app.store.agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].in_flight, 0, "the reserved slot is given back");
    // The failure is recorded where it happened, with its reason: a complete trail.
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert_eq!(audit.status.code(), Some(0), "{}", stdout(&audit));
    assert!(
        stdout(&audit).contains("complete; the request failed: task 1.prepare could not be dispatched"),
        "{}",
        stdout(&audit)
    );
}

#[tokio::test]
async fn a_delivery_tried_again_holds_back_no_other_dispatch() {
    // Each failed publish into the ghost's queue is tried again after 1 s, 2 s, 4 s: seconds in
    // which other dispatches must go out and be recorded, not wait behind it.
    let app = spawn_app_with(|c| {
        c.worker.retry_base_delay_ms = 1000;
        c.worker.dispatch_attempts = 4;
    })
    .await;
    for ghost in ["ghost-1", "ghost-2"] {
        let heartbeat = app.heartbeat(ghost, &["deployment", "shell"], 2, &[("target", "homelab")]);
        app.store.register_agent("tests", heartbeat).await.unwrap();
    }
    let live = app.heartbeat("live-1", &["deployment", "shell"], 2, &[("target", "lab")]);
    app.store.register_agent("tests", live).await.unwrap();
    app.declare_agent_queue("live-1").await;
    let stuck = [
        app.submit("Deploy nginx to the homelab", true).await,
        app.submit("Deploy redis to the homelab", true).await,
    ];
    let report = |id| {
        let app = &app;
        async move { app.store.report(id).await.unwrap().unwrap() }
    };
    let first_task = |r: &switchyard::store::RequestReport| r.plan.as_ref().map(|p| p.tasks[0].clone());
    for id in stuck {
        app.wait_for(id, |r| first_task(r).is_some_and(|t| t.status.as_str() == "routed")).await;
    }
    let live_request = app.submit("Deploy gitea to the lab", true).await;

    let delivered = app
        .wait_for(live_request, |r| first_task(r).is_some_and(|t| t.status.as_str() == "dispatched"))
        .await;
    assert_eq!(first_task(&delivered).unwrap().agent_id.as_deref(), Some("live-1"));
    for id in stuck {
        let task = first_task(&report(id).await).unwrap();
        assert_eq!(
            task.status.as_str(),
            "routed",
            "the dispatch to the lab was recorded while the ghosts' were still tried: {task:?}"
        );
    }
    let gitea = app.drain(&app.agent_queue("live-1")).await;
    assert_eq!(gitea.len(), 1, "the lab's task went out once");

    for id in stuck {
        let failed = app.wait_for(id, |r| r.status.as_str() == "failed").await;
        assert_eq!(first_task(&failed).unwrap().status.as_str(), "dispatch_failed");
    }
    let dead = app.wait_dead_letters("dispatch", 2).await;
    assert!(dead.iter().all(|d| d.reason.ends_with("gave up after 4 attempts")), "{dead:?}");
}

#[tokio::test]
async fn a_request_no_work_type_matches_fails_with_its_reason() {
    let app = spawn_app().await;
    let id = app.submit("hello there", true).await;

    let report = app.wait_for(id, |r| r.status.as_str() == "failed").await;
    let reason = report.failure_reason.clone().unwrap_or_default();
    assert!(reason.starts_with("decomposition failed"), "{reason}");
    assert!(report.plan.is_none());
    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(dead[0].reason, reason);
    let rows = dead_rows(&app).await;
    assert_eq!(rows[0].request_id, Some(id.as_uuid()));
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.dead_letters.len(), 1, "status shows the dead letter");

    // What `switchyard submit --wait` prints for such a request.
    let submitted = app.cli(&["submit", "--wait", "--timeout", "20", "hello again"]).await;
    assert_eq!(submitted.status.code(), Some(1), "{}{}", stdout(&submitted), stderr(&submitted));
    assert!(stdout(&submitted).contains("failed: decomposition failed"), "{}", stdout(&submitted));
}

#[tokio::test]
async fn a_nul_character_in_the_text_is_refused_with_a_reason_never_lost() {
    let app = spawn_app().await;
    let id = RequestId::random();
    // `\u0000` in JSON is a NUL character in the text, which PostgreSQL text cannot hold.
    let body = format!(r#"{{"text": "deploy \u0000 x", "auto_approve": true, "request_id": "{id}"}}"#);
    app.publish_raw("requests", body.as_bytes()).await;

    let dead = app.wait_dead_letters("decompose", 1).await;
    assert_eq!(dead[0].reason, "schema violation: text and submitted_by cannot contain NUL characters");
    let rows = dead_rows(&app).await;
    assert_eq!(rows[0].request_id, Some(id.as_uuid()));
    assert_eq!(rows[0].body, body, "the body is recorded as received (the escape is plain text)");
    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(messages[0].0["text"], "deploy \u{0} x");
    assert_eq!(request_total(&app).await, 0);
}

#[tokio::test]
async fn a_database_refusal_is_dead_lettered_with_the_database_message() {
    let app = spawn_app().await;
    // The heartbeat parses, but PostgreSQL refuses the NUL in a capability when it is stored.
    let heartbeat = br#"{"agent_id":"a1","capabilities":["deploy\u0000ment"],"capacity":1}"#;
    app.publish_raw("heartbeats", heartbeat).await;

    let dead = app.wait_dead_letters("heartbeat", 1).await;
    let reason = &dead[0].reason;
    assert!(reason.starts_with("database: db error: ERROR: "), "{reason}");
    assert!(reason.contains("0x00"), "the server's own message: {reason}");
    let messages = wait_dead_queue(&app, 1).await;
    assert_eq!(&messages[0].1["x-switchyard-reason"], reason);
    assert!(app.store.agents().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_request_near_the_default_limit_goes_through_every_stage() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    // About 200 KB: under the 256 KiB limit of a request, but every message after decompose
    // carries the text more than once (about 400 KB for plan), which must not be refused.
    let names: Vec<String> = (0..30_000).map(|i| format!("w{i}")).collect();
    let text = format!("Deploy nginx {} to the homelab", names.join(" "));
    assert!(text.len() > 190_000 && text.len() < 256 * 1024);
    let id = app.submit(&text, true).await;

    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{:?}", report.dead_letters);
    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 1);
}

#[tokio::test]
async fn a_worker_keeps_going_after_bad_input() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    app.publish_raw("requests", b"{{{ not json").await;
    app.publish_raw("requests", b"").await;
    app.publish_raw("requests", &[0xff, 0xfe, 0x00]).await;
    app.publish_raw("heartbeats", br#"{"agent_id":"a1","capabilities":[],"capacity":0}"#).await;
    app.wait_dead_letters("decompose", 3).await;
    app.wait_dead_letters("heartbeat", 1).await;

    let id = app.submit("Deploy nginx to the homelab", true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{report:#?}");
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 1);
    let reasons: Vec<String> = dead_rows(&app).await.into_iter().map(|r| r.reason).collect();
    assert!(reasons.iter().filter(|r| r.starts_with("malformed JSON")).count() == 3, "{reasons:#?}");
    assert!(reasons.contains(&"schema violation: capacity must be at least 1".to_owned()), "{reasons:#?}");
    assert_eq!(app.store.agents().await.unwrap().len(), 1, "the bad heartbeat registered nothing");
}
