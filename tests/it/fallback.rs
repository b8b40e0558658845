//! Quota and fallback: the plan-level decision on an external AI model, the quota it reserves,
//! and the approval gate that follows it (policy, `approve`, `reject`).

use chrono::Utc;
use switchyard::config::Config;
use switchyard::decisions::fallback::FallbackDecision;
use switchyard::decisions::providers::{Provider, Window};
use switchyard::model::ids::{MessageId, RequestId, WorkType};
use switchyard::model::wire::{self, Envelope, Planned, RequestMeta, SCHEMA_VERSION, SubmitRequest};
use switchyard::ops;
use switchyard::store::RequestReport;
use switchyard::understanding::catalog::Catalog;

use crate::helpers::*;

/// Code generation with an entity no work type knows (Postgres) and a clause folded in:
/// complexity 0.296 (see `complexity`), over the tests' 0.25 threshold; three code_generation tasks.
const COMPLEX: &str = "Write a Python script that exports Postgres, Redis and Nextcloud metrics to the NAS";
const COMPLEX_COMPLEXITY: f64 = 0.296;
/// Maintenance of one known entity: complexity 0.160, below the default auto-approval limit of 0.20.
const SIMPLE: &str = "Restart Jellyfin";
/// Code generation without mentions, a keyword of another work type in its object (confidence
/// 0.9): complexity 0.228, not below the auto-approval limit.
const MEDIUM: &str = "Write a backup script";

const PROVIDER: &str = "bigmodel";
/// 1,500 tokens per task at 1,001 micros per 1,000 tokens: 3 × 1,500 × 1,001 / 1,000 = 4,504.5,
/// rounded up to 4,505 micros for the three tasks of [`COMPLEX`].
const PLAN_COST: i64 = 4505;

fn provider(quota_micros: i64) -> Provider {
    Provider {
        name: PROVIDER.into(),
        endpoint: "http://127.0.0.1:9/v1".into(),
        model: "big-1".into(),
        api_key_env: None,
        price_per_1k_input_tokens_micros: 1001,
        price_per_1k_output_tokens_micros: 0,
        input_tokens_per_task: 1500,
        output_tokens_per_task: 0,
        quota_micros,
        window: Window::Monthly,
        work_types: [WorkType::parse("code_generation").unwrap()].into(),
    }
}

fn with_provider(quota_micros: i64) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.fallback.providers = vec![provider(quota_micros)];
        c.fallback.complexity_threshold = 0.25;
    }
}

fn has_fallback(report: &RequestReport) -> bool {
    report.plan.as_ref().is_some_and(|p| p.fallback.is_some())
}

async fn remaining(app: &TestApp) -> i64 {
    app.store.quota(PROVIDER, Utc::now()).await.unwrap().expect("the provider's quota row").remaining_micros
}

/// Registers an agent able to take every task of [`COMPLEX`].
/// The agent that serves [`PROVIDER`]: external tasks go to it, never to a local coder.
const MODEL_AGENT: &str = "llm-bigmodel";

async fn register_model_agent(app: &TestApp) {
    app.register_agent(MODEL_AGENT, &["provider:bigmodel"], 4, &[]).await;
}

/// Submits `text` under a chosen request id, as `switchyard submit --request-id` does.
async fn submit_as(app: &TestApp, request_id: RequestId, text: &str, auto_approve: bool) {
    let request = SubmitRequest {
        text: text.into(),
        request_id: Some(request_id),
        submitted_by: Some("tests".into()),
        priority: None,
        auto_approve: Some(auto_approve),
    };
    assert_eq!(ops::submit(&app.broker, request).await.unwrap(), request_id);
}

/// The `planned` message of a request, built as the pipeline builds it, with `message_id`.
fn planned_envelope(request_id: RequestId, text: &str, message_id: MessageId) -> Vec<u8> {
    let catalog = Catalog::default();
    let decomposition = catalog.decompose(text).unwrap();
    let plan = catalog.plan(request_id, &decomposition).unwrap();
    let envelope = Envelope {
        message_id,
        schema_version: SCHEMA_VERSION,
        request_id,
        causation_id: None,
        timestamp: Utc::now(),
        payload: Planned {
            request: RequestMeta {
                request_id,
                text: text.into(),
                submitted_by: Some("tests".into()),
                priority: 0,
                auto_approve: false,
            },
            complexity: switchyard::understanding::complexity::assess(
                &plan,
                &switchyard::understanding::complexity::Inputs {
                    work: 0.5,
                    unknown_entities: catalog.unknown_entities(&decomposition).len(),
                    confidence: decomposition.confidence,
                },
            ),
            plan,
            infeasible: Vec::new(),
        },
    };
    serde_json::to_vec(&envelope).unwrap()
}

/// Waits until the fallback stage recorded that it processed `message_id`.
async fn wait_processed_by_fallback(app: &TestApp, message_id: MessageId) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.store.processed("fallback", message_id).await.unwrap().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "fallback did not process {message_id}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_complex_plan_with_quota_left_goes_external_and_reserves_its_cost() {
    let app = spawn_app_with(with_provider(100_000)).await;
    let id = app.submit(COMPLEX, false).await;
    let report = app.wait_for(id, has_fallback).await;

    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.plan_id, id.plan_id(), "the decision belongs to the request's plan");
    assert_eq!(plan.complexity, COMPLEX_COMPLEXITY);
    let fallback = plan.fallback.as_ref().unwrap();
    assert!(fallback.provider().is_some(), "{fallback:#?}");
    assert_eq!(fallback.provider(), Some(PROVIDER));
    assert_eq!(fallback.complexity(), COMPLEX_COMPLEXITY);
    assert_eq!(fallback.cost_micros(), PLAN_COST);
    assert_eq!(fallback.quota_left_micros(), Some(100_000 - PLAN_COST));
    assert_eq!(
        fallback.reason(),
        format!(
            "complexity 0.296 meets the 0.250 threshold; 3 of 3 tasks go to {PROVIDER} for an estimated \
             {PLAN_COST} micros, leaving {} micros of quota",
            100_000 - PLAN_COST
        )
    );
    assert_eq!(remaining(&app).await, 100_000 - PLAN_COST, "the cost is reserved on the quota");

    let events = app.store.audit_events(id).await.unwrap();
    let decided: Vec<_> = events.iter().filter(|(_, event, _)| event == "fallback.decided").collect();
    assert_eq!(decided.len(), 1, "{events:#?}");
    let (actor, _, detail) = decided[0];
    assert_eq!(actor, "fallback");
    assert_eq!(detail["plan_id"], id.plan_id().to_string());
    assert_eq!(detail["goes"], "external");
    assert_eq!(detail["cost_micros"], PLAN_COST);

    // External work is never approved by the complexity rule: it waits for a person.
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "awaiting_approval");
    assert!(report.plan.unwrap().tasks.iter().all(|t| t.status.as_str() == "pending"));
}

#[tokio::test]
async fn an_exhausted_quota_keeps_the_plan_local_and_reserves_nothing() {
    let limit = PLAN_COST - 1;
    let app = spawn_app_with(with_provider(limit)).await;
    let id = app.submit(COMPLEX, false).await;
    let report = app.wait_for(id, has_fallback).await;

    let fallback = report.plan.as_ref().unwrap().fallback.clone().unwrap();
    assert!(fallback.provider().is_none(), "{fallback:#?}");
    assert_eq!(fallback.provider(), None);
    assert!(fallback.reason().contains("quota exhausted"), "{}", fallback.reason());
    assert_eq!(
        fallback.reason(),
        format!(
            "complexity 0.296 meets the 0.250 threshold, but the work stays local: quota exhausted: \
             {PROVIDER} has {limit} micros left, and the plan would cost {PLAN_COST} micros"
        )
    );
    assert_eq!(fallback.cost_micros(), 0, "nothing reserved");
    assert_eq!(fallback.quota_left_micros(), None);
    assert_eq!(remaining(&app).await, limit, "nothing reserved");

    // Local, but at 0.296 too complex for the policy to approve on its own.
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "awaiting_approval");
}

#[tokio::test]
async fn a_plan_gets_exactly_one_fallback_decision_however_often_it_is_planned() {
    let app = spawn_app_with(with_provider(100_000)).await;
    let id = RequestId::random();
    submit_as(&app, id, COMPLEX, false).await;
    app.wait_for(id, has_fallback).await;
    // The same request again: the pipeline replays the same messages.
    submit_as(&app, id, COMPLEX, false).await;
    // An exact copy of the `planned` message the pipeline published for it.
    let planned_id = wire::request_message_id(id, COMPLEX).derive("decomposed").derive("planned");
    assert!(
        app.store.processed("fallback", planned_id).await.unwrap().is_some(),
        "the pipeline's message id"
    );
    app.publish_raw("planned", &planned_envelope(id, COMPLEX, planned_id)).await;
    // The same plan in a message of its own, with another id: still the same plan.
    let replay_id = MessageId::random();
    app.publish_raw("planned", &planned_envelope(id, COMPLEX, replay_id)).await;
    wait_processed_by_fallback(&app, replay_id).await;

    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.fallback_decisions, 1);
    assert_eq!(remaining(&app).await, 100_000 - PLAN_COST, "reserved once");
    let events = app.store.audit_events(id).await.unwrap();
    let decided = events.iter().filter(|(_, event, _)| event == "fallback.decided").count();
    assert_eq!(decided, 1, "{events:#?}");
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "awaiting_approval");
    let fallback = report.plan.unwrap().fallback.unwrap();
    assert!(fallback.provider().is_some());
    assert_eq!(fallback.quota_left_micros(), Some(100_000 - PLAN_COST));
}

#[tokio::test]
async fn a_replayed_plan_keeps_its_first_decision_when_the_quota_has_run_out_since() {
    // Research of two entities: complexity 0.162, under the 0.20 auto-approval limit, and over a
    // threshold of 0.15. The quota covers its two tasks exactly once.
    const RESEARCH: &str = "Research Traefik and Caddy";
    let app = spawn_app_with(|c| {
        c.fallback.providers =
            vec![Provider { work_types: [WorkType::parse("research").unwrap()].into(), ..provider(3003) }];
        c.fallback.complexity_threshold = 0.15;
    })
    .await;
    let id = RequestId::random();
    submit_as(&app, id, RESEARCH, false).await;
    let report = app.wait_settled(id).await;
    let fallback = report.plan.as_ref().unwrap().fallback.clone().unwrap();
    assert!(fallback.provider().is_some(), "{fallback:#?}");
    assert_eq!(fallback.cost_micros(), 3003);
    assert_eq!(remaining(&app).await, 0);
    assert_eq!(report.status.as_str(), "awaiting_approval");

    // Decided afresh, the replay would stay local for want of quota, and a local plan this simple
    // would be approved by the policy: the external plan would run without a person's approval.
    let replay_id = MessageId::random();
    app.publish_raw("planned", &planned_envelope(id, RESEARCH, replay_id)).await;
    wait_processed_by_fallback(&app, replay_id).await;

    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "awaiting_approval", "{report:#?}");
    let plan = report.plan.unwrap();
    assert!(plan.approval.is_none(), "{:#?}", plan.approval);
    assert!(plan.fallback.unwrap().provider().is_some());
    assert!(plan.tasks.iter().all(|t| t.status.as_str() == "pending"));
    assert!(app.store.trail(id).await.unwrap().unwrap().decisions.is_empty());
}

#[tokio::test]
async fn two_plans_racing_for_the_last_quota_get_one_external_decision() {
    let app = spawn_app_with(with_provider(PLAN_COST + PLAN_COST / 2)).await;
    let (a, b) = tokio::join!(app.submit(COMPLEX, false), app.submit(COMPLEX, false));
    let a = app.wait_for(a, has_fallback).await;
    let b = app.wait_for(b, has_fallback).await;

    let decisions: Vec<_> = [&a, &b].map(|r| r.plan.as_ref().unwrap().fallback.clone().unwrap()).into();
    let external: Vec<_> = decisions.iter().filter(|f| f.provider().is_some()).collect();
    let local: Vec<_> = decisions.iter().filter(|f| f.provider().is_none()).collect();
    assert_eq!(external.len(), 1, "{decisions:#?}");
    assert_eq!(local.len(), 1, "{decisions:#?}");
    assert_eq!(external[0].quota_left_micros(), Some(PLAN_COST / 2));
    assert!(
        local[0].reason().ends_with(&format!(
            "{PROVIDER} has {} micros left, and the plan would cost {PLAN_COST} micros",
            PLAN_COST / 2
        )),
        "decided on the quota left by the other: {}",
        local[0].reason()
    );
    assert_eq!(remaining(&app).await, PLAN_COST / 2, "one reservation only");
}

#[tokio::test]
async fn approving_an_external_plan_releases_its_first_task() {
    let app = spawn_app_with(with_provider(100_000)).await;
    register_model_agent(&app).await;
    let id = app.submit(COMPLEX, false).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "awaiting_approval");
    assert!(report.plan.as_ref().unwrap().fallback.as_ref().unwrap().provider().is_some());
    assert!(app.drain(&app.agent_queue(MODEL_AGENT)).await.is_empty(), "nothing routed before approval");
    let plan_id = id.plan_id().to_string();

    let approve = app.cli(&["approve", &plan_id, "--by", "alice"]).await;
    assert!(approve.status.success(), "{}{}", stdout(&approve), String::from_utf8_lossy(&approve.stderr));
    assert_eq!(stdout(&approve).trim(), format!("plan {plan_id} approved by alice"));

    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    let plan = report.plan.unwrap();
    let approval = plan.approval.unwrap();
    assert!(approval.approved);
    assert_eq!(approval.decided_by, "alice");
    let messages = app.drain(&app.agent_queue(MODEL_AGENT)).await;
    let keys: Vec<&str> =
        messages.iter().map(|(m, _)| m["payload"]["task"]["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["1.design"], "only the task without dependencies is released");
    assert_eq!(messages[0].0["payload"]["plan_id"], plan_id);

    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(
        stdout(&audit).contains(
            "complete; the request is under way (in_progress: 3 tasks, 1 routing decisions, 1 dispatches)"
        ),
        "{}",
        stdout(&audit)
    );
}

#[tokio::test]
async fn cancelling_an_external_plan_settles_its_reservation_and_says_who_cannot_be_told() {
    let app = spawn_app_with(with_provider(100_000)).await;
    register_model_agent(&app).await;
    let id = app.submit(COMPLEX, false).await;
    assert_eq!(app.wait_settled(id).await.status.as_str(), "awaiting_approval");
    let approve = app.cli(&["approve", &id.plan_id().to_string()]).await;
    assert!(approve.status.success());
    app.wait_for(id, |r| r.plan.as_ref().is_some_and(|p| p.tasks[0].status.as_str() == "dispatched")).await;
    assert_eq!(remaining(&app).await, 100_000 - PLAN_COST);

    let cancel = app.cli(&["cancel", &id.to_string(), "--reason", "budget freeze", "--by", "carol"]).await;
    assert!(cancel.status.success(), "{}{}", stdout(&cancel), String::from_utf8_lossy(&cancel.stderr));
    // The model agent was registered but never ran: it has no control queue to be told through.
    assert!(
        stdout(&cancel).contains(&format!("task 1.design attempt 1 on {MODEL_AGENT}: cannot be told")),
        "{}",
        stdout(&cancel)
    );
    assert_eq!(remaining(&app).await, 100_000, "what was reserved and not spent went back");
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "cancelled");
    let reservation = report.plan.unwrap().reservation.unwrap();
    assert_eq!(reservation.released_micros, Some(PLAN_COST));
    let events = app.store.audit_events(id).await.unwrap();
    assert!(events.iter().any(|(actor, e, _)| actor == "carol" && e == "request.cancelled"), "{events:#?}");
    assert!(events.iter().any(|(_, e, _)| e == "quota.settled"), "{events:#?}");
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}

#[tokio::test]
async fn rejecting_a_plan_records_the_reason_routes_nothing_and_gives_its_quota_back() {
    let app = spawn_app_with(with_provider(100_000)).await;
    register_model_agent(&app).await;
    let id = app.submit(COMPLEX, false).await;
    assert_eq!(app.wait_settled(id).await.status.as_str(), "awaiting_approval");
    let plan_id = id.plan_id().to_string();

    let reject = app.cli(&["reject", &plan_id, "--reason", "too costly", "--by", "bob"]).await;
    assert!(reject.status.success(), "{}{}", stdout(&reject), String::from_utf8_lossy(&reject.stderr));
    assert_eq!(stdout(&reject).trim(), format!("plan {plan_id} rejected by bob: too costly"));

    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "rejected");
    assert_eq!(report.failure_reason.as_deref(), Some("too costly"));
    let plan = report.plan.unwrap();
    assert_eq!(plan.status.as_str(), "rejected");
    let approval = plan.approval.unwrap();
    assert!(!approval.approved);
    assert_eq!((approval.decided_by.as_str(), approval.reason.as_str()), ("bob", "too costly"));
    assert!(plan.tasks.iter().all(|t| t.status.as_str() == "cancelled"), "{:?}", plan.tasks);
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert!(trail.decisions.is_empty() && trail.dispatches.is_empty());
    assert!(app.drain(&app.agent_queue(MODEL_AGENT)).await.is_empty());
    let events = app.store.audit_events(id).await.unwrap();
    assert!(events.iter().any(|(actor, event, _)| actor == "bob" && event == "plan.rejected"), "{events:#?}");
    // The external model will not be used: its reservation is given back, and said so.
    assert_eq!(remaining(&app).await, 100_000, "the quota is whole again");
    let released =
        events.iter().find(|(_, event, _)| event == "quota.released").expect("a quota.released event");
    assert_eq!(released.2["amount_micros"], PLAN_COST);

    // A rejected plan is a complete trail: nothing was released, so nothing is missing.
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert_eq!(
        stdout(&audit).trim(),
        format!("audit of {id}: complete; the request was rejected by bob: too costly")
    );
}

#[tokio::test]
async fn a_simple_local_plan_is_approved_by_the_policy() {
    let app = spawn_app().await;
    app.declare_agent_queue("default-maintenance").await;
    let id = app.submit(SIMPLE, false).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    let plan = report.plan.unwrap();
    assert_eq!(plan.fallback.unwrap().reason(), "complexity 0.160 is below the 0.300 threshold");
    let approval = plan.approval.unwrap();
    assert!(approval.approved);
    assert_eq!(approval.decided_by, "policy");
    assert_eq!(approval.reason, "complexity 0.160 is below 0.200 and the work stays local");
    let messages = app.drain(&app.agent_queue("default-maintenance")).await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].0["payload"]["task"]["key"], "1.snapshot");
}

#[tokio::test]
async fn without_an_auto_approval_limit_even_a_simple_plan_waits() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.declare_agent_queue("default-maintenance").await;
    let id = app.submit(SIMPLE, false).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "awaiting_approval", "{report:#?}");
    let plan = report.plan.unwrap();
    assert_eq!(plan.status.as_str(), "awaiting_approval");
    assert!(plan.approval.is_none());
    let events = app.store.audit_events(id).await.unwrap();
    let (_, _, detail) = events.iter().find(|(_, event, _)| event == "plan.awaiting_approval").unwrap();
    assert_eq!(detail["reason"], "the policy does not auto-approve by complexity");
    assert!(app.drain(&app.agent_queue("default-maintenance")).await.is_empty());
}

#[tokio::test]
async fn the_policy_can_refuse_what_a_request_asks_for_with_auto_approve() {
    let app = spawn_app_with(|c| c.approval.allow_request_auto_approve = false).await;
    app.declare_agent_queue("default-code-generation").await;
    let submit = app.cli(&["submit", "--auto-approve", MEDIUM]).await;
    assert!(submit.status.success(), "{}", String::from_utf8_lossy(&submit.stderr));
    let id: RequestId = stdout(&submit).trim().parse().unwrap();

    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "awaiting_approval", "{report:#?}");
    assert!(report.plan.unwrap().approval.is_none());
    let events = app.store.audit_events(id).await.unwrap();
    let (_, _, received) = events.iter().find(|(_, event, _)| event == "request.received").unwrap();
    assert_eq!(received["auto_approve"], true, "the request did ask");
    let (_, _, detail) = events.iter().find(|(_, event, _)| event == "plan.awaiting_approval").unwrap();
    assert_eq!(
        detail["reason"],
        "the request asked for auto-approval but the policy does not allow it; complexity 0.228 is not below 0.200"
    );
    assert!(app.drain(&app.agent_queue("default-code-generation")).await.is_empty());
}

#[tokio::test]
async fn approving_twice_is_idempotent_and_a_rejected_plan_cannot_be_approved() {
    let app = spawn_app_with(with_provider(100_000)).await;
    register_model_agent(&app).await;
    let (approved, rejected) = tokio::join!(app.submit(COMPLEX, false), app.submit(COMPLEX, false));
    app.wait_settled(approved).await;
    app.wait_settled(rejected).await;
    let plan_id = approved.plan_id().to_string();

    let first = app.cli(&["approve", &plan_id]).await;
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    app.wait_settled(approved).await;
    let second = app.cli(&["approve", &plan_id]).await;
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));
    assert!(stdout(&second).contains("already approved"), "{}", stdout(&second));
    // The second approval re-sends the same message to routing; wait for it to be consumed.
    let route = app.names.queue("route");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.broker.queue_len(&route).await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "route queue not drained");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let report = app.wait_settled(approved).await;
    assert_eq!(report.status.as_str(), "in_progress");
    let trail = app.store.trail(approved).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 1, "one routing decision per released task: {:#?}", trail.decisions);
    assert_eq!(trail.dispatches.len(), 1);
    assert_eq!(app.drain(&app.agent_queue(MODEL_AGENT)).await.len(), 1);
    let audit = app.cli(&["audit", &approved.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));

    let other = rejected.plan_id().to_string();
    let reject = app.cli(&["reject", &other, "--reason", "not now"]).await;
    assert!(reject.status.success(), "{}", String::from_utf8_lossy(&reject.stderr));
    let approve = app.cli(&["approve", &other]).await;
    assert!(!approve.status.success(), "approving a rejected plan must fail: {}", stdout(&approve));
    let stderr = String::from_utf8_lossy(&approve.stderr);
    assert_eq!(stderr.trim(), format!("error: plan {other} is already rejected"));
    let report = app.store.report(rejected).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "rejected");
    assert!(app.store.trail(rejected).await.unwrap().unwrap().decisions.is_empty());
}

#[tokio::test]
async fn a_stored_decision_no_decision_could_have_written_is_an_error_not_a_guess() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let id = app.submit(SIMPLE, false).await;
    app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    assert!(matches!(
        app.store.fallback_decision(id.plan_id()).await.unwrap(),
        Some(FallbackDecision::Local { .. })
    ));
    // Going out, but to no provider: tampered with, or written by something else.
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "UPDATE fallback_decisions SET use_external = true WHERE plan_id = $1",
            &[&id.plan_id().as_uuid()],
        )
        .await
        .unwrap();

    let err = app.store.fallback_decision(id.plan_id()).await.unwrap_err();
    assert!(!err.is_transient(), "{err}");
    let message = err.to_string();
    assert!(message.starts_with("stored data is inconsistent"), "{message}");
    assert!(message.contains(&id.plan_id().to_string()), "{message}");
    let status = app.cli(&["status", &id.to_string()]).await;
    assert_eq!(status.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&status.stderr).contains("use_external = true"), "{status:?}");
}
