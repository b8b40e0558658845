//! The `llm` decomposer against a fake model server over real HTTP, in the whole pipeline (real
//! broker, real database): a request the rules cannot read is read by the model; a model that
//! answers nonsense, too slowly or with an HTTP error leaves the request to the rules, with the
//! reason recorded; the API key goes to the model server and nowhere else.

use std::time::Duration;

use serde_json::{Value, json};
use switchyard::model::ids::RequestId;
use switchyard::understanding::catalog::Catalog;
use switchyard::understanding::decomposer::{Kind, Settings};
use tokio_postgres::types::ToSql;

use crate::fake_model::{FAKE_MODEL, FakeModel, Reply, usage};
use crate::helpers::*;

/// A request that no keyword of the catalog matches.
const UNKNOWN_TO_THE_RULES: &str = "Make my photo library searchable by faces";
/// A request the rules read as one deployment.
const KNOWN_TO_THE_RULES: &str = "Deploy Gitea to the homelab";

/// The `llm` decomposer on `fake`, with short timeouts.
fn llm_settings(fake: &FakeModel, api_key_env: Option<String>) -> Settings {
    Settings {
        kind: Kind::Llm,
        endpoint: Some(fake.base_url()),
        model: Some(FAKE_MODEL.into()),
        api_key_env,
        timeout_secs: 1,
        max_attempts: 2,
        max_retry_after_secs: 2,
    }
}

/// A test app whose decomposer is the model of `fake`, and an agent for deployment and monitoring
/// on the homelab, so that plans get dispatched.
async fn spawn_with_model(settings: Settings) -> TestApp {
    let app = spawn_app_with(|config| config.decomposer = settings).await;
    app.register_agent(
        "homelab-1",
        &["deployment", "monitoring", "shell", "docker"],
        4,
        &[("target", "homelab")],
    )
    .await;
    app
}

/// Runs `query` on the app's database.
async fn sql(app: &TestApp, query: &str, params: &[&(dyn ToSql + Sync)]) -> Vec<tokio_postgres::Row> {
    let (client, connection) = tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls)
        .await
        .expect("the test database");
    let connection = tokio::spawn(connection);
    let rows = client.query(query, params).await.expect("the query runs");
    drop(client);
    let _ = connection.await;
    rows
}

/// A `decompositions` row, as a user would read it.
#[derive(Debug)]
struct DecompositionRow {
    decomposer: String,
    intents: Value,
    confidence: f64,
    fallback_reason: Option<String>,
}

async fn decomposition_row(app: &TestApp, id: RequestId) -> DecompositionRow {
    let rows = sql(
        app,
        "SELECT decomposer, intents, confidence, fallback_reason FROM decompositions WHERE request_id = $1",
        &[&id.as_uuid()],
    )
    .await;
    assert_eq!(rows.len(), 1, "one decomposition of {id}");
    let row = &rows[0];
    DecompositionRow {
        decomposer: row.get(0),
        intents: row.get(1),
        confidence: row.get(2),
        fallback_reason: row.get(3),
    }
}

fn keys(report: &switchyard::store::RequestReport) -> Vec<String> {
    report.plan.as_ref().expect("a plan").tasks.iter().map(|t| t.key.clone()).collect()
}

#[tokio::test]
async fn decomposer_llm_reads_a_request_the_rules_do_not_know_into_a_plan() {
    assert!(Catalog::default().decompose(UNKNOWN_TO_THE_RULES).is_err(), "the rules cannot read it");
    let fake = FakeModel::start().await;
    let answer = json!({
        "intents": [
            {"work_type": "deployment", "text": "Make my photo library searchable by faces",
             "entities": ["Immich"], "targets": ["homelab"]},
            {"work_type": "monitoring", "text": "searchable by faces",
             "entities": ["Immich"], "targets": ["homelab"]},
        ],
        "confidence": 0.85,
    });
    fake.answer_json(&answer, usage(300, 80)).await;
    let app = spawn_with_model(llm_settings(&fake, None)).await;

    let id = app.submit(UNKNOWN_TO_THE_RULES, true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    assert_eq!(report.decomposer.as_deref(), Some("llm"));
    assert_eq!(
        keys(&report),
        ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"]
    );
    let plan = report.plan.as_ref().unwrap();
    let dispatched: Vec<&str> =
        plan.tasks.iter().filter(|t| t.status.as_str() == "dispatched").map(|t| t.key.as_str()).collect();
    assert_eq!(dispatched, ["1.prepare"]);
    assert_eq!(plan.tasks[0].agent_id.as_deref(), Some("homelab-1"), "the model's target is the affinity");

    let row = decomposition_row(&app, id).await;
    assert_eq!(row.decomposer, "llm");
    assert_eq!(row.fallback_reason, None);
    assert_eq!(row.confidence, 0.85);
    assert_eq!(row.intents, answer["intents"]);

    let received = fake.received().await;
    assert_eq!(received.len(), 1, "a valid answer is asked for once");
    assert_eq!(received[0].authorization, None, "no api_key_env, no key");
    assert_eq!(received[0].message("user"), Some(UNKNOWN_TO_THE_RULES));
    assert!(received[0].message("system").unwrap().contains("- deployment: "), "told the work types");
    let format = received[0].response_format().expect("a JSON Schema asked for");
    assert_eq!(format["json_schema"]["name"], "decomposition");
    assert_eq!(format["json_schema"]["strict"], true);
    let work_types =
        &format["json_schema"]["schema"]["properties"]["intents"]["items"]["properties"]["work_type"];
    assert!(work_types["enum"].as_array().unwrap().contains(&json!("monitoring")), "{work_types}");
    assert!(app.cli(&["audit", &id.to_string()]).await.status.success());
}

/// Submits a request the rules know to an app whose model fails as `fake` was told to, and checks
/// that the rules' plan goes on with a fallback reason containing each of `reason_contains`.
async fn falls_back_to_the_rules(fake: &FakeModel, reason_contains: &[&str]) -> DecompositionRow {
    let app = spawn_with_model(llm_settings(fake, None)).await;
    let id = app.submit(KNOWN_TO_THE_RULES, true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    assert_eq!(keys(&report), ["1.prepare", "1.deploy", "1.verify"], "the rules' plan");
    let row = decomposition_row(&app, id).await;
    assert_eq!(row.decomposer, "rules");
    assert_eq!(report.decomposer_fallback, row.fallback_reason, "status shows it");
    let by_rules = Catalog::default().decompose(KNOWN_TO_THE_RULES).unwrap();
    assert_eq!(row.intents, serde_json::to_value(&by_rules.intents).unwrap());
    assert_eq!(row.confidence, by_rules.confidence);
    let reason = row.fallback_reason.as_deref().expect("a fallback reason");
    assert!(reason.starts_with("llm: "), "{reason}");
    for part in reason_contains {
        assert!(reason.contains(part), "{part:?} not in {reason:?}");
    }
    let events = app.store.audit_events(id).await.unwrap();
    let (_, _, detail) = events.iter().find(|(_, event, _)| event == "request.decomposed").expect("audited");
    assert_eq!(detail["fallback_reason"], reason, "the audit log says why too");
    row
}

#[tokio::test]
async fn decomposer_an_answer_that_is_not_json_is_asked_again_then_falls_back_to_the_rules() {
    let fake = FakeModel::start().await;
    fake.answer("Sure! First deploy Gitea, then check it works.", usage(100, 20)).await;
    falls_back_to_the_rules(&fake, &["the model's answer is not valid JSON", "Sure! First deploy Gitea"])
        .await;
    let received = fake.received().await;
    assert_eq!(received.len(), 2, "max_attempts calls");
    let again = received[1].message("system").unwrap();
    assert!(
        again.contains(
            "Your previous answer to this request was not usable: the model's answer is not valid JSON"
        ),
        "{again}"
    );
    assert_eq!(received[1].message("user"), Some(KNOWN_TO_THE_RULES));
}

#[tokio::test]
async fn decomposer_an_answer_that_violates_the_schema_falls_back_to_the_rules() {
    let fake = FakeModel::start().await;
    let answer = json!({
        "intents": [
            {"work_type": "deployment", "text": "Deploy Gitea", "entities": ["Gitea"], "targets": []},
            {"work_type": "cooking", "text": "to the homelab", "entities": [], "targets": ["homelab"]},
        ],
        "confidence": 0.9,
    });
    fake.answer_json(&answer, usage(100, 40)).await;
    falls_back_to_the_rules(
        &fake,
        &["does not match the schema", "intent 2 has work type \"cooking\", which is not in the catalog"],
    )
    .await;
    assert_eq!(fake.received().await.len(), 2, "asked again once");
}

#[tokio::test]
async fn decomposer_a_model_that_times_out_falls_back_to_the_rules() {
    let fake = FakeModel::start().await;
    fake.slow(Duration::from_secs(4)).await;
    falls_back_to_the_rules(&fake, &["no answer within 1s"]).await;
    assert_eq!(fake.received().await.len(), 1, "a timeout is not retried");
}

#[tokio::test]
async fn decomposer_a_429_with_a_long_retry_after_falls_back_to_the_rules_at_once() {
    let fake = FakeModel::start().await;
    fake.rate_limited(30).await;
    let row = falls_back_to_the_rules(&fake, &["rate limited by the model server (Retry-After 30s)"]).await;
    assert_eq!(
        row.fallback_reason.as_deref(),
        Some("llm: rate limited by the model server (Retry-After 30s)")
    );
    assert_eq!(fake.received().await.len(), 1, "beyond max_retry_after: not waited for");
}

#[tokio::test]
async fn decomposer_a_server_error_that_persists_falls_back_to_the_rules() {
    let fake = FakeModel::start().await;
    fake.answer_raw(500, "model crashed").await;
    falls_back_to_the_rules(&fake, &["the model server answered 500 Internal Server Error: model crashed"])
        .await;
    assert_eq!(fake.received().await.len(), 2, "retried up to max_attempts");
}

/// The key goes to the model server as a bearer token, and into no row of the database and no
/// message, even when the server echoes it in an error (a fallback reason, a failed request's
/// reason and its dead letter quote the server).
#[tokio::test]
async fn decomposer_the_api_key_reaches_the_model_server_and_nothing_else() {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let key = format!("sk-test-{id}");
    let variable = format!("SWITCHYARD_TEST_DECOMPOSER_KEY_{}", id.to_uppercase());
    // SAFETY: a variable of this test alone, set before the app starts; no other code reads or
    // writes it (nextest runs each test in a process of its own, and std serialises its own
    // environment accesses).
    unsafe { std::env::set_var(&variable, &key) };
    let fake = FakeModel::start().await;
    let echo =
        |status: u16| Reply::raw(status, &format!(r#"{{"error":"Incorrect API key provided: {key}"}}"#));
    fake.once(echo(401)).await;
    fake.once(echo(400)).await;
    let answer = json!({
        "intents": [{"work_type": "deployment", "text": UNKNOWN_TO_THE_RULES,
                     "entities": ["Immich"], "targets": ["homelab"]}],
        "confidence": 0.7,
    });
    fake.answer_json(&answer, usage(10, 10)).await;
    let settings = Settings { max_attempts: 1, ..llm_settings(&fake, Some(variable.clone())) };
    let app = spawn_with_model(settings).await;

    // The model refuses the key: the rules stand in, and the reason quotes the server.
    let fell_back = app.submit(KNOWN_TO_THE_RULES, true).await;
    app.wait_settled(fell_back).await;
    let reason = decomposition_row(&app, fell_back).await.fallback_reason.expect("a fallback");
    assert!(reason.contains("401 Unauthorized") && reason.contains("[redacted]"), "{reason}");
    // The model refuses again and the rules cannot read it: the request fails and is dead-lettered.
    let failed = app.submit("hello there", true).await;
    let report = app.wait_for(failed, |r| r.status.as_str() == "failed").await;
    let failure = report.failure_reason.unwrap();
    assert!(failure.contains("400 Bad Request") && failure.contains("and the rules:"), "{failure}");
    let dead = app.wait_dead_letters("decompose", 1).await;
    // The model reads it.
    let read = app.submit(UNKNOWN_TO_THE_RULES, true).await;
    let report = app.wait_settled(read).await;
    assert_eq!(report.decomposer.as_deref(), Some("llm"));

    let received = fake.received().await;
    assert_eq!(received.len(), 3);
    for call in &received {
        assert_eq!(call.authorization.as_deref(), Some(format!("Bearer {key}").as_str()));
    }
    let dump = app.dump_rows().await.join("\n");
    for expected in ["Immich", "Incorrect API key provided: [redacted]"] {
        assert!(dump.contains(expected), "the dump has {expected:?}: {dump}");
    }
    assert!(!dump.contains(&key), "the key is in the database: {dump}");
    assert!(!dump.contains(&id), "part of the key is in the database");
    let dead_queue = app.drain(&app.names.dead_queue()).await;
    assert_eq!(dead_queue.len(), 1, "{dead_queue:?}");
    assert_eq!(dead.len(), 1);
    let published = format!("{dead_queue:?} {dead:?}");
    assert!(!published.contains(&id), "the key is in a dead letter: {published}");
    let shown = format!("{:?}", app.config);
    assert!(!shown.contains(&key) && shown.contains(&variable), "{shown}");
}
