//! The whole of understanding and cost, with the real processes: `switchyard worker` with an `llm`
//! decomposer, an `llm` agent and a local agent, each a process of its own, and two model servers
//! speaking the OpenAI API (one standing in for a local model, one for an external provider). A
//! request that the rules do not know is decomposed by the model, the plan goes external within
//! its quota, the reservation settles against the tokens really used, the audit passes, and
//! neither API key appears in any log line, row or message.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::understanding::catalog::Catalog;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};

use crate::fake_model::{FakeModel, usage};
use crate::helpers::*;

const REQUEST: &str = "Make the board meeting recording readable";
const DECOMPOSER_KEY: &str = "sk-local-decomposer-9d41e7";
const PROVIDER_KEY: &str = "sk-external-provider-3b88c2";
/// Two tasks at 2,000 input tokens (1,000 micros per 1,000) and 1,000 output tokens (4,000).
const RESERVED: i64 = 2 * (2_000 + 4_000);
/// Each task really used 800 input and 200 output tokens.
const SPENT: i64 = 2 * (800 + 800);
const LIMIT: i64 = 1_000_000;

fn config(decomposer: &FakeModel, provider: &FakeModel) -> String {
    format!(
        r#"
[decomposer]
kind = "llm"
endpoint = "{decomposer}"
model = "local-small"
api_key_env = "TEST_DECOMPOSER_KEY"
timeout_secs = 10

[fallback]
complexity_threshold = 0.25

[[fallback.providers]]
name = "cloud"
endpoint = "{provider}"
model = "big-1"
api_key_env = "TEST_PROVIDER_KEY"
price_per_1k_input_tokens_micros = 1000
price_per_1k_output_tokens_micros = 4000
input_tokens_per_task = 2000
output_tokens_per_task = 1000
quota_micros = {LIMIT}
window = "monthly"
work_types = ["transcription"]
"#,
        decomposer = decomposer.base_url(),
        provider = provider.base_url(),
    )
}

/// `switchyard ARGS` against the app, with the configuration file, both keys in its environment
/// and its logs at debug level, its output captured.
fn process(app: &TestApp, config: &std::path::Path, args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("AMQP_URL", &app.config.amqp_url)
        .env("DATABASE_URL", &app.config.database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env("SWITCHYARD_CONFIG", config)
        .env("TEST_DECOMPOSER_KEY", DECOMPOSER_KEY)
        .env("TEST_PROVIDER_KEY", PROVIDER_KEY)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts")
}

/// A process started with [`start`]: its output is read as it comes, since a pipe that nobody reads
/// fills up (64 KiB) and blocks a process that logs at debug level.
struct Running {
    child: Child,
    output: tokio::task::JoinHandle<String>,
}

/// `switchyard ARGS` (see [`process`]), its standard output and error read as they come.
fn start(app: &TestApp, config: &std::path::Path, args: &[&str]) -> Running {
    let mut child = process(app, config, args);
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let output = tokio::spawn(async move {
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let _ = tokio::join!(out.read_to_string(&mut stdout), err.read_to_string(&mut stderr));
        stdout + &stderr
    });
    Running { child, output }
}

/// Stops a process with SIGTERM and returns everything it printed.
async fn stop(mut running: Running) -> String {
    if let Some(pid) = running.child.id() {
        // SAFETY: kill(2) on a child of ours that has not been waited for.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), running.child.wait()).await;
    let _ = running.child.start_kill();
    running.output.await.unwrap()
}

#[tokio::test]
async fn a_request_the_rules_do_not_know_is_decomposed_by_the_model_and_goes_external_within_its_quota() {
    assert!(Catalog::default().decompose(REQUEST).is_err(), "the rules must not know the request");
    let decomposer = FakeModel::start().await;
    let answer = json!({
        "intents": [{
            "work_type": "transcription",
            "text": REQUEST,
            "entities": ["Board Meeting"],
            "targets": [],
        }],
        "confidence": 0.55,
    });
    decomposer.answer_json(&answer, usage(310, 60)).await;
    let provider = FakeModel::start().await;
    provider.answer("Transcript: the board approved the budget.", usage(800, 200)).await;

    let app = spawn_bare_app(|_| {}).await;
    app.declare_agent_queue("llm-cloud").await;
    app.declare_agent_queue("scribe").await;
    let dir =
        std::env::temp_dir().join(format!("switchyard-understanding-{}", app.config.namespace.as_str()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_file = dir.join("switchyard.toml");
    std::fs::write(&config_file, config(&decomposer, &provider)).unwrap();

    let worker = start(&app, &config_file, &["worker"]);
    let model_agent = start(
        &app,
        &config_file,
        &[
            "agent",
            "--id",
            "llm-cloud",
            "--capabilities",
            "provider:cloud",
            "--executor",
            "llm",
            "--provider",
            "cloud",
            "--heartbeat-secs",
            "1",
        ],
    );
    let scribe = start(
        &app,
        &config_file,
        &[
            "agent",
            "--id",
            "scribe",
            "--capabilities",
            "transcription",
            "--cpu",
            "4",
            "--memory-mb",
            "16384",
            "--speed",
            "0",
            "--heartbeat-secs",
            "1",
        ],
    );
    wait_registered(&app, "llm-cloud").await;
    wait_registered(&app, "scribe").await;

    let submit =
        process(&app, &config_file, &["submit", REQUEST, "--auto-approve", "--wait", "--timeout", "60"]);
    let output = submit.wait_with_output().await.unwrap();
    let submitted =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{submitted}");
    let id: switchyard::model::ids::RequestId =
        String::from_utf8_lossy(&output.stdout).lines().next().unwrap().trim().parse().unwrap();

    // Decomposed by the model, not the rules.
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    assert_eq!(report.decomposer.as_deref(), Some("llm"));
    assert_eq!(report.decomposer_fallback, None);
    assert_eq!(report.confidence, Some(0.55));
    let asked = decomposer.received().await;
    assert_eq!(asked[0].authorization.as_deref(), Some(format!("Bearer {DECOMPOSER_KEY}").as_str()));
    assert!(asked[0].response_format().is_some(), "the model was asked for the schema");

    // Complex enough (an unknown entity, a hesitant reading) to go external, within quota.
    let plan = report.plan.as_ref().unwrap();
    let decision = plan.fallback.as_ref().unwrap();
    assert!(decision.provider().is_some(), "{decision:#?}");
    assert!(
        decision.reason().starts_with("complexity 0.277 meets the 0.250 threshold"),
        "{}",
        decision.reason()
    );
    assert_eq!(decision.external_tasks().len(), 2);
    assert!(plan.tasks.iter().all(|t| t.agent_id.as_deref() == Some("llm-cloud")), "{:?}", plan.tasks);
    let terms: Vec<&str> = plan.complexity_terms.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(terms, ["work", "size", "depth", "breadth", "unknown", "uncertainty"]);

    // The reservation and its settlement, as `switchyard quota` shows them.
    let reservation = plan.reservation.as_ref().unwrap();
    assert_eq!((reservation.amount_micros, reservation.spent_micros), (RESERVED, SPENT));
    assert_eq!(reservation.released_micros, Some(RESERVED - SPENT));
    let quota = app.cli(&["quota", "--json"]).await;
    assert!(quota.status.success(), "{}", String::from_utf8_lossy(&quota.stderr));
    let quotas: Value = serde_json::from_str(&stdout(&quota)).unwrap();
    let cloud = &quotas.as_array().unwrap()[0];
    assert_eq!(cloud["provider"], "cloud");
    assert_eq!((cloud["reserved_micros"].as_i64(), cloud["spent_micros"].as_i64()), (Some(0), Some(SPENT)));
    assert_eq!(cloud["remaining_micros"].as_i64(), Some(LIMIT - SPENT));
    let text = app.cli(&["quota"]).await;
    assert!(stdout(&text).contains("cloud"), "{}", stdout(&text));

    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}{}", stdout(&audit), String::from_utf8_lossy(&audit.stderr));
    let status = app.cli(&["status", &id.to_string()]).await;
    let status = stdout(&status);
    assert!(status.contains("decomposed by llm into 1 intent(s), confidence 0.55"), "{status}");

    // Neither key in any log line, row or message. The rows include every message a stage
    // published (recorded with its input's idempotency marker) and every result's fields.
    let logs = [stop(worker).await, stop(model_agent).await, stop(scribe).await, submitted];
    assert!(logs[0].contains("DEBUG"), "the worker logged at debug level");
    let rows = app.dump_rows().await;
    assert!(rows.iter().any(|r| r.contains("the board approved the budget")));
    for key in [DECOMPOSER_KEY, PROVIDER_KEY] {
        for (i, log) in logs.iter().enumerate() {
            assert!(!log.contains(key), "a key in the output of process {i}:\n{log}");
        }
        assert!(!rows.iter().any(|r| r.contains(key)), "a key in a row");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
