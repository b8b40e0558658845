//! External AI as a scheduled resource, end to end: a task that no agent could run goes to an
//! external model within its quota, an `llm` agent does it against a model server speaking the
//! OpenAI API, and the tokens it really used settle the plan's reservation. Without the quota,
//! the task waits for an agent that can run it, and says why.

use std::time::Duration;

use serde_json::Value;
use switchyard::agent::{AgentBuilder, Llm, Simulate};
use switchyard::config::Config;
use switchyard::decisions::fallback::FallbackDecision;
use switchyard::decisions::providers::{Provider, Window};
use switchyard::llm::Client;
use switchyard::model::domain::Resources;
use switchyard::model::ids::{AgentId, WorkType};

use crate::fake_model::{FakeModel, usage};
use crate::helpers::*;

/// Two tasks: 1.transcribe needs a GPU, 1.review does not.
const TRANSCRIBE: &str = "Transcribe the Whisper meeting recordings";
const KEY: &str = "sk-external-test-5f1c0b1e";
/// Per task: 2,000 input tokens at 1,000 micros per 1,000 and 1,000 output tokens at 4,000.
const ESTIMATE: i64 = 2_000 + 4_000;
/// The model server reports 1,200 input and 300 output tokens.
const COST: i64 = 1_200 + 1_200;

fn provider(endpoint: String, quota_micros: i64) -> Provider {
    Provider {
        name: "cloud".into(),
        endpoint,
        model: "big-1".into(),
        api_key_env: None,
        price_per_1k_input_tokens_micros: 1_000,
        price_per_1k_output_tokens_micros: 4_000,
        input_tokens_per_task: 2_000,
        output_tokens_per_task: 1_000,
        quota_micros,
        window: Window::Daily,
        work_types: [WorkType::parse("transcription").unwrap()].into(),
    }
}

fn with_provider(endpoint: String, quota_micros: i64) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| c.fallback.providers = vec![provider(endpoint, quota_micros)]
}

/// A local agent that can review transcripts but has no GPU.
fn scribe() -> AgentBuilder {
    AgentBuilder::new(AgentId::parse("scribe").unwrap())
        .capabilities(["transcription"])
        .capacity(2)
        .resources(Resources { cpu: 4.0, memory_mb: 16_384, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500))
}

#[tokio::test]
async fn a_gpu_task_goes_to_the_external_model_and_its_real_use_settles_the_reservation() {
    let fake = FakeModel::start().await;
    fake.answer("[00:00] Welcome, everyone.", usage(1_200, 300)).await;
    let app = spawn_app_with(with_provider(fake.base_url(), 100_000)).await;
    let _scribe = app.start_agent(scribe(), Simulate::new(0.0, 0.0).unwrap()).await;
    let model = AgentBuilder::new(AgentId::parse("llm-cloud").unwrap())
        .capabilities(["provider:cloud"])
        .heartbeat_every(Duration::from_millis(500));
    let client = Client::new(fake.endpoint(Some(KEY))).unwrap();
    let _model = app.start_agent(model, Llm::new(client)).await;
    wait_registered(&app, "scribe").await;
    wait_registered(&app, "llm-cloud").await;

    let id = app.submit(TRANSCRIBE, true).await;
    let report = app.wait_for(id, |r| r.status.is_terminal()).await;
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    let plan = report.plan.as_ref().unwrap();
    assert_eq!(plan.infeasible.len(), 1, "{:?}", plan.infeasible);
    assert_eq!(plan.infeasible[0].key, "1.transcribe");
    assert!(plan.infeasible[0].reason.starts_with("needs 1 GPU"), "{}", plan.infeasible[0].reason);

    let decision = plan.fallback.as_ref().unwrap();
    let transcribe = plan.tasks.iter().find(|t| t.key == "1.transcribe").unwrap();
    let review = plan.tasks.iter().find(|t| t.key == "1.review").unwrap();
    assert!(decision.provider().is_some(), "{decision:#?}");
    assert_eq!(decision.external_tasks(), [transcribe.id], "only the task no agent could run");
    assert_eq!(decision.cost_micros(), ESTIMATE);
    assert!(decision.reason().starts_with("task 1.transcribe needs 1 GPU"), "{}", decision.reason());
    assert_eq!(transcribe.agent_id.as_deref(), Some("llm-cloud"));
    assert_eq!(review.agent_id.as_deref(), Some("scribe"));
    let answer = plan.results.iter().find(|r| r.task_id == transcribe.id).unwrap();
    assert_eq!(answer.output, "[00:00] Welcome, everyone.");

    // Reserved at the decision, settled at completion against what the model really used.
    let reservation = plan.reservation.as_ref().unwrap();
    assert_eq!((reservation.amount_micros, reservation.spent_micros), (ESTIMATE, COST));
    assert_eq!((reservation.input_tokens, reservation.output_tokens), (1_200, 300));
    assert!(reservation.settled_at.is_some());
    assert_eq!(reservation.released_micros, Some(ESTIMATE - COST));

    let quota = app.cli(&["quota", "--json"]).await;
    assert!(quota.status.success(), "{}", String::from_utf8_lossy(&quota.stderr));
    let quotas: Value = serde_json::from_str(&stdout(&quota)).unwrap();
    let cloud = quotas.as_array().unwrap().iter().find(|q| q["provider"] == "cloud").unwrap();
    assert_eq!(cloud["limit_micros"], 100_000);
    assert_eq!(cloud["reserved_micros"], 0);
    assert_eq!(cloud["spent_micros"], COST);
    assert_eq!(cloud["remaining_micros"], 100_000 - COST);

    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}{}", stdout(&audit), String::from_utf8_lossy(&audit.stderr));
    let status = app.cli(&["status", &id.to_string()]).await;
    let text = stdout(&status);
    assert!(text.contains("no agent can run 1.transcribe: needs 1 GPU"), "{text}");
    assert!(text.contains("complexity 0.177 = 0.35×0.450 work"), "{text}");

    // The model server got the key; nothing Switchyard recorded holds it.
    let received = fake.received().await;
    assert_eq!(received[0].authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    let rows = app.dump_rows().await;
    assert!(rows.iter().any(|r| r.contains("Welcome, everyone")), "the dump sees the results");
    assert!(!rows.iter().any(|r| r.contains(KEY)), "the key in a row");
}

#[tokio::test]
async fn without_quota_a_gpu_task_waits_for_an_agent_with_a_gpu_and_says_why() {
    let fake = FakeModel::start().await;
    let app = spawn_app_with(with_provider(fake.base_url(), ESTIMATE - 1)).await;
    let _scribe = app.start_agent(scribe(), Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "scribe").await;

    let id = app.submit(TRANSCRIBE, true).await;
    let report = app
        .wait_for(id, |r| {
            r.plan.as_ref().is_some_and(|p| p.tasks.iter().any(|t| t.status.as_str() == "waiting"))
        })
        .await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    let plan = report.plan.as_ref().unwrap();
    let fallback = plan.fallback.as_ref().unwrap();
    assert!(matches!(fallback, FallbackDecision::Local { .. }));
    assert_eq!(
        fallback.reason(),
        format!(
            "task 1.transcribe needs 1 GPU (the most any of the 1 known agent or machine has is 0); and no \
             provider can take it (quota exhausted: cloud has {} micros left, and the plan would cost \
             {ESTIMATE} micros): it waits for an agent that can run it",
            ESTIMATE - 1
        )
    );
    assert!(plan.reservation.is_none(), "nothing reserved");
    let task = &plan.tasks[0];
    assert_eq!((task.key.as_str(), task.status.as_str()), ("1.transcribe", "waiting"));
    assert_eq!(task.reason.as_deref(), Some("no agent has 1 GPU (the most any has is 0)"));
    let status = app.cli(&["status", &id.to_string()]).await;
    assert!(
        stdout(&status).contains(" s: no agent has 1 GPU (the most any has is 0)"),
        "{}",
        stdout(&status)
    );
    assert!(fake.received().await.is_empty(), "the model was never called");

    // Nobody brings a GPU: cancelled, with nothing to stop, and a complete trail.
    let cancel = app.cli(&["cancel", &id.to_string(), "--reason", "no GPU this week", "--by", "ops"]).await;
    assert!(cancel.status.success(), "{}{}", stdout(&cancel), String::from_utf8_lossy(&cancel.stderr));
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "cancelled");
    assert!(report.plan.unwrap().tasks.iter().all(|t| t.status.as_str() == "cancelled"));
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
    assert!(
        stdout(&audit).contains("the request was cancelled by ops: no GPU this week"),
        "{}",
        stdout(&audit)
    );
}
