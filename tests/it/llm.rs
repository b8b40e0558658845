//! The OpenAI-compatible client against a fake model server over real HTTP, and the `llm`
//! executor in an agent against the real broker, in-process and as `switchyard agent`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::agent::{AgentBuilder, Llm};
use switchyard::llm::{ChatRequest, Client, Endpoint, Error, RetryPolicy};
use switchyard::model::ids::AgentId;
use switchyard::model::wire::{self, TaskResult, TokenUsage};

use crate::agents::{Bare, assignment};
use crate::fake_model::{FakeModel, Reply, usage};
use crate::helpers::*;

const KEY: &str = "sk-test-0123456789abcdef";

fn ask(user: &str) -> ChatRequest {
    ChatRequest {
        system: "You answer briefly.".into(),
        user: user.into(),
        json_schema: None,
        max_tokens: Some(64),
        temperature: Some(0.0),
    }
}

fn client(fake: &FakeModel) -> Client {
    Client::new(fake.endpoint(Some(KEY))).expect("a valid endpoint")
}

/// Quick retries: a Retry-After of up to 2 s is waited for.
fn retry() -> RetryPolicy {
    RetryPolicy { max_attempts: 3, max_retry_after: Duration::from_secs(2) }
}

#[tokio::test]
async fn llm_client_returns_the_content_and_usage_and_sends_the_key_as_a_bearer_token() {
    let fake = FakeModel::start().await;
    fake.answer("Paris", usage(21, 3)).await;
    let completion = client(&fake).chat(&ask("The capital of France?")).await.unwrap();
    assert_eq!(completion.content, "Paris");
    assert_eq!(completion.usage, TokenUsage { input_tokens: 21, output_tokens: 3 });
    let received = fake.received().await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(received[0].body["model"], "fake-model");
    assert_eq!(received[0].message("system"), Some("You answer briefly."));
    assert_eq!(received[0].message("user"), Some("The capital of France?"));
    assert_eq!(
        (received[0].body["max_tokens"].as_u64(), received[0].body["temperature"].as_f64()),
        (Some(64), Some(0.0))
    );
}

#[tokio::test]
async fn llm_client_without_a_key_sends_no_authorization_and_asks_for_the_schema() {
    let fake = FakeModel::start().await;
    let answer = json!({"intents": [{"work_type": "research"}]});
    fake.answer_json(&answer, usage(5, 7)).await;
    let client = Client::new(fake.endpoint(None)).unwrap();
    let schema = json!({"type": "object", "required": ["intents"]});
    let request =
        ChatRequest { json_schema: Some(("decomposition".into(), schema.clone())), ..ask("split this") };
    let completion = client.chat(&request).await.unwrap();
    assert_eq!(serde_json::from_str::<serde_json::Value>(&completion.content).unwrap(), answer);
    let received = fake.received().await;
    assert_eq!(received[0].authorization, None);
    assert_eq!(
        received[0].response_format(),
        Some(
            &json!({"type": "json_schema", "json_schema": {"name": "decomposition", "schema": schema, "strict": true}})
        )
    );
}

#[tokio::test]
async fn llm_a_429_with_a_short_retry_after_is_waited_for_and_retried() {
    let fake = FakeModel::start().await;
    fake.once(Reply::rate_limited(1)).await;
    fake.answer("after the wait", usage(1, 2)).await;
    let started = Instant::now();
    let completion = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap();
    assert_eq!(completion.content, "after the wait");
    assert!(started.elapsed() >= Duration::from_secs(1), "waited the Retry-After: {:?}", started.elapsed());
    assert_eq!(fake.received().await.len(), 2);
}

#[tokio::test]
async fn llm_a_429_with_a_long_retry_after_fails_at_once() {
    let fake = FakeModel::start().await;
    fake.rate_limited(30).await;
    let started = Instant::now();
    let error = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap_err();
    assert!(
        matches!(error, Error::RateLimited { retry_after: Some(wait) } if wait == Duration::from_secs(30)),
        "{error:?}"
    );
    assert!(error.is_transient());
    assert_eq!(error.to_string(), "rate limited by the model server (Retry-After 30s)");
    assert!(started.elapsed() < Duration::from_secs(2), "no wait: {:?}", started.elapsed());
    assert_eq!(fake.received().await.len(), 1, "not retried");
}

#[tokio::test]
async fn llm_a_429_with_an_http_date_is_understood() {
    let fake = FakeModel::start().await;
    let in_an_hour = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc2822().replace("+0000", "GMT");
    fake.always(Reply::raw(429, "slow down").header("retry-after", &in_an_hour)).await;
    let error = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap_err();
    let Error::RateLimited { retry_after: Some(wait) } = error else { panic!("{error:?}") };
    assert!(wait > Duration::from_secs(3500) && wait <= Duration::from_secs(3600), "{wait:?}");
}

#[tokio::test]
async fn llm_a_slow_server_is_a_timeout_and_not_retried() {
    let fake = FakeModel::start().await;
    fake.slow(Duration::from_secs(3)).await;
    let endpoint = Endpoint { timeout: Duration::from_millis(300), ..fake.endpoint(Some(KEY)) };
    let started = Instant::now();
    let error = Client::new(endpoint).unwrap().chat_with_retries(&ask("hi"), &retry()).await.unwrap_err();
    assert!(matches!(error, Error::Timeout { after } if after == Duration::from_millis(300)), "{error:?}");
    assert_eq!(error.to_string(), "no answer within 300ms");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(fake.received().await.len(), 1, "not retried");
}

#[tokio::test]
async fn llm_a_server_error_then_an_answer_succeeds() {
    let fake = FakeModel::start().await;
    fake.once(Reply::raw(500, "internal error")).await;
    fake.once(Reply::raw(503, "overloaded")).await;
    fake.answer("third time lucky", usage(3, 4)).await;
    let completion = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap();
    assert_eq!(
        completion,
        switchyard::llm::Completion { content: "third time lucky".into(), usage: usage(3, 4) }
    );
    assert_eq!(fake.received().await.len(), 3);
}

#[tokio::test]
async fn llm_server_errors_that_persist_end_the_retries_with_the_last_one() {
    let fake = FakeModel::start().await;
    fake.answer_raw(503, "  the model is\n loading  ").await;
    let error = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap_err();
    assert_eq!(error.to_string(), "the model server answered 503 Service Unavailable: the model is loading");
    assert_eq!(fake.received().await.len(), 3, "max_attempts");
}

#[tokio::test]
async fn llm_a_client_error_is_not_retried_and_does_not_repeat_the_key() {
    let fake = FakeModel::start().await;
    fake.answer_raw(401, &format!(r#"{{"error":"Incorrect API key provided: {KEY}"}}"#)).await;
    let error = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap_err();
    assert!(matches!(error, Error::Status { status: 401, .. }), "{error:?}");
    assert!(!error.is_transient());
    let text = format!("{error} {error:?}");
    assert!(!text.contains(KEY), "{text}");
    assert!(text.contains("Incorrect API key provided: [redacted]"), "{text}");
    assert_eq!(fake.received().await.len(), 1, "not retried");
}

#[tokio::test]
async fn llm_a_malformed_answer_is_malformed_and_not_retried() {
    let fake = FakeModel::start().await;
    fake.answer_raw(200, "<html>not json</html>").await;
    let error = client(&fake).chat_with_retries(&ask("hi"), &retry()).await.unwrap_err();
    assert!(matches!(error, Error::Malformed(_)), "{error:?}");
    assert!(error.to_string().contains("<html>not json</html>"), "{error}");
    assert_eq!(fake.received().await.len(), 1, "not retried");
    let fake = FakeModel::start().await;
    fake.answer_raw(200, r#"{"choices": []}"#).await;
    let error = client(&fake).chat(&ask("hi")).await.unwrap_err();
    assert_eq!(error.to_string(), "unusable answer from the model server: no choices in the answer");
}

#[tokio::test]
async fn llm_an_unreachable_server_is_a_transport_error_without_credentials() {
    // Nothing listens on port 1.
    let endpoint = Endpoint {
        base_url: "http://alice:hunter2@127.0.0.1:1/v1".into(),
        model: "m".into(),
        api_key: Some(switchyard::llm::Secret::new(KEY.into())),
        timeout: Duration::from_secs(2),
    };
    let retry = RetryPolicy { max_attempts: 2, ..retry() };
    let error = Client::new(endpoint).unwrap().chat_with_retries(&ask("hi"), &retry).await.unwrap_err();
    assert!(matches!(error, Error::Transport(_)), "{error:?}");
    let text = format!("{error} {error:?}");
    assert!(text.contains("http://***@127.0.0.1:1/v1/chat/completions"), "{text}");
    for secret in ["alice", "hunter2", KEY] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// An agent with the `llm` executor runs a task by asking the model, and reports its answer and
/// the tokens it used; the key is nowhere in the result.
#[tokio::test]
async fn llm_agent_reports_the_models_answer_and_usage() {
    let fake = FakeModel::start().await;
    fake.answer("Uptime Kuma is deployed.", usage(120, 45)).await;
    let mut bare = Bare::new().await;
    bare.declare_agent_queue("llm-1").await;
    let builder = AgentBuilder::new(AgentId::parse("llm-1").unwrap())
        .capabilities(["deployment", "provider:fake"])
        .heartbeat_every(Duration::from_millis(500));
    let agent = start_agent(&bare.amqp_url, &bare.names, builder, Llm::new(client(&fake))).await;
    let task = assignment("llm-1", "1.deploy", 5);
    bare.publish_assignment("llm-1", &task, None).await;
    let results = bare.wait_results(1).await;
    let (result, _) = &results[0];
    let payload = &result["payload"];
    assert_eq!(payload["task_id"], task.payload.task.id.to_string());
    assert_eq!(payload["success"], true, "{payload:#}");
    assert_eq!(payload["output"], "Uptime Kuma is deployed.");
    assert_eq!(payload["usage"], json!({"input_tokens": 120, "output_tokens": 45}));
    let body = serde_json::to_vec(result).unwrap();
    let parsed = wire::parse_envelope::<TaskResult>(&body, wire::MAX_ENVELOPE_BYTES).expect("a valid result");
    assert_eq!(parsed.payload.usage, Some(usage(120, 45)));
    assert!(!String::from_utf8_lossy(&body).contains(KEY), "the key in {result:#}");
    // What the model was asked.
    let received = fake.received().await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    let user = received[0].message("user").unwrap();
    assert!(user.contains("1.deploy") && user.contains("deployment"), "{user}");
    assert!(user.contains(&task.payload.task.description), "{user}");
    assert!(received[0].message("system").unwrap().contains("Switchyard"));
    agent.stop().await.unwrap();
}

#[tokio::test]
async fn llm_agent_reports_a_failed_call_as_a_failure_without_the_key() {
    let fake = FakeModel::start().await;
    fake.answer_raw(400, &format!("bad request from the holder of {KEY}")).await;
    let mut bare = Bare::new().await;
    bare.declare_agent_queue("llm-1").await;
    let builder = AgentBuilder::new(AgentId::parse("llm-1").unwrap()).capabilities(["deployment"]);
    let agent = start_agent(&bare.amqp_url, &bare.names, builder, Llm::new(client(&fake))).await;
    bare.publish_assignment("llm-1", &assignment("llm-1", "1.deploy", 5), None).await;
    let results = bare.wait_results(1).await;
    let payload = &results[0].0["payload"];
    assert_eq!(payload["success"], false);
    let error = payload["error"].as_str().unwrap();
    assert!(error.contains("400 Bad Request"), "{error}");
    assert!(!results[0].0.to_string().contains(KEY), "{payload:#}");
    agent.stop().await.unwrap();
}

/// A configuration file with the provider `fake` at `base_url`, its key in `FAKE_MODEL_KEY`.
fn provider_config(base_url: &str) -> std::path::PathBuf {
    let file = std::env::temp_dir().join(format!("switchyard-llm-{}.toml", uuid::Uuid::new_v4().simple()));
    let text = format!(
        r#"
[[fallback.providers]]
name = "fake"
endpoint = "{base_url}"
model = "fake-model"
api_key_env = "FAKE_MODEL_KEY"
price_per_1k_input_tokens_micros = 1000
price_per_1k_output_tokens_micros = 2000
input_tokens_per_task = 1000
output_tokens_per_task = 500
quota_micros = 1000000
work_types = ["deployment"]
"#
    );
    std::fs::write(&file, text).unwrap();
    file
}

#[tokio::test]
async fn llm_agent_command_names_the_missing_provider_or_key_variable() {
    let config = provider_config("http://127.0.0.1:1/v1");
    let config_arg = config.to_str().unwrap();
    let base = [
        "--config",
        config_arg,
        "agent",
        "--id",
        "llm-1",
        "--capabilities",
        "deployment",
        "--executor",
        "llm",
    ];
    let run = |extra: &'static [&'static str], env: &'static [(&'static str, &'static str)]| {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        async move { crate::broker::switchyard(env, &args).await }
    };
    let unknown = run(&["--provider", "nope"], &[("FAKE_MODEL_KEY", KEY)]).await;
    let stderr = String::from_utf8_lossy(&unknown.stderr).into_owned();
    assert_eq!(unknown.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(r#"no provider "nope" in the configuration; its providers are fake"#),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY), "{stderr}");
    let no_key = run(&["--provider", "fake"], &[("FAKE_MODEL_KEY", "")]).await;
    let stderr = String::from_utf8_lossy(&no_key.stderr).into_owned();
    assert_eq!(no_key.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("environment variable FAKE_MODEL_KEY, which is not set or empty"), "{stderr}");
    let no_provider = run(&[], &[]).await;
    assert!(String::from_utf8_lossy(&no_provider.stderr).contains("--executor llm needs --provider NAME"));
    let _ = std::fs::remove_file(&config);
}

/// `switchyard agent --executor llm --provider fake`: the provider's capability in its heartbeat,
/// the key from the environment variable sent to the model, the answer and usage in the result,
/// and the key in none of its logs.
#[tokio::test]
async fn llm_agent_command_serves_a_configured_provider() {
    let fake = FakeModel::start().await;
    fake.answer("done by the model", usage(11, 22)).await;
    let config = provider_config(&fake.base_url());
    let mut bare = Bare::new().await;
    bare.declare_agent_queue("llm-cli").await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("--config")
        .arg(&config)
        .args(["agent", "--id", "llm-cli", "--capabilities", "deployment", "--executor", "llm"])
        .args(["--provider", "fake", "--timeout", "10", "--heartbeat-secs", "1"])
        .env("AMQP_URL", &bare.amqp_url)
        .env("SWITCHYARD_NAMESPACE", bare.names.namespace().as_str())
        .env("FAKE_MODEL_KEY", KEY)
        .env_remove("SWITCHYARD_CONFIG")
        .env("RUST_LOG", "trace")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts");
    // Read as it comes: at trace level the agent writes more than a pipe holds.
    let mut stderr = child.stderr.take().unwrap();
    let logs = tokio::spawn(async move {
        let mut logs = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stderr, &mut logs).await.map(|_| logs)
    });
    let heartbeat = bare.heartbeats().await;
    assert_eq!(heartbeat["agent_id"], "llm-cli");
    assert_eq!(heartbeat["capabilities"], json!(["deployment", "provider:fake"]));
    bare.publish_assignment("llm-cli", &assignment("llm-cli", "1.deploy", 5), None).await;
    let results = bare.wait_results(1).await;
    let payload = &results[0].0["payload"];
    assert_eq!(
        (payload["success"].as_bool(), payload["output"].as_str()),
        (Some(true), Some("done by the model"))
    );
    assert_eq!(payload["usage"], json!({"input_tokens": 11, "output_tokens": 22}));
    assert_eq!(fake.received().await[0].authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));
    // SIGTERM: the agent stops; what it logged (at trace level) is complete.
    let pid = child.id().expect("running");
    std::process::Command::new("kill").arg(pid.to_string()).status().expect("kill runs");
    let status =
        tokio::time::timeout(Duration::from_secs(20), child.wait()).await.expect("the agent stops").unwrap();
    assert!(status.success(), "{status}");
    let logs = logs.await.unwrap().unwrap();
    let logs = String::from_utf8_lossy(&logs);
    assert!(logs.contains("llm executor"), "{logs}");
    assert!(!logs.contains(KEY), "the key in the logs");
    let _ = std::fs::remove_file(&config);
}
