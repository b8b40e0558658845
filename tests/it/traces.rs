//! Traces and logs as an operator gets them: the `switchyard` binaries (a worker, an agent,
//! `submit --wait`) export their spans to an OTLP/HTTP receiver that the test runs, and log JSON.
//! One request's spans, from `submit` through every stage and the agent's task, share one trace
//! and chain each to the one before; a client's own `traceparent` is continued; every JSON log
//! line parses, those inside a message's handling name its request, stage and trace, and the
//! request's state changes are said once each. The configuration file's log format counts, and
//! `--log-format` wins over it.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use switchyard::broker::Outgoing;
use switchyard::model::ids::RequestId;
use switchyard::model::wire::SubmitRequest;
use tokio::process::{Child, Command};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// A trace and a span of a client's own, on the request it publishes.
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

fn switchyard(app: &TestApp, collector: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args(args)
        .env("AMQP_URL", &app.config.amqp_url)
        .env("DATABASE_URL", &app.config.database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env("SWITCHYARD_LOG_FORMAT", "json")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
        // Batches sent within a tenth of a second, so that nothing waits long for the export.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("SWITCHYARD_CONFIG")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Stops a worker or agent as an operator would (SIGTERM: finish, send the last spans, exit);
/// what it logged.
async fn stop(name: &str, child: Child) -> String {
    // SAFETY: kill(2) on a child of ours that has not been waited for.
    assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) }, 0);
    let output = child.wait_with_output().await.unwrap();
    let logged = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(0), "{name}: {logged}");
    logged
}

/// Every span the receiver got.
async fn received_spans(collector: &MockServer) -> Vec<Span> {
    let requests = collector.received_requests().await.expect("requests are recorded");
    let mut spans = Vec::new();
    for request in requests {
        assert_eq!(request.url.path(), "/v1/traces");
        let export = ExportTraceServiceRequest::decode(request.body.as_slice()).expect("OTLP protobuf");
        for resource in export.resource_spans {
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    spans
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()?;
    Some(match value {
        AnyValue::StringValue(s) => s.clone(),
        AnyValue::IntValue(n) => n.to_string(),
        AnyValue::BoolValue(b) => b.to_string(),
        other => format!("{other:?}"),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The spans of one trace, checked to chain: each the child of another of them, but one, the
/// root, which has no parent or the parent `outside` (a client's span).
fn chained<'a>(spans: &'a [Span], trace: &str, outside: Option<&str>) -> Vec<&'a Span> {
    let ours: Vec<&Span> = spans.iter().filter(|s| hex(&s.trace_id) == trace).collect();
    let ids: HashMap<String, &Span> = ours.iter().map(|s| (hex(&s.span_id), *s)).collect();
    let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
    let roots: Vec<&&Span> = ours.iter().filter(|s| !ids.contains_key(&hex(&s.parent_span_id))).collect();
    assert_eq!(roots.len(), 1, "one root in trace {trace}: {names:?}");
    assert_eq!(hex(&roots[0].parent_span_id), outside.unwrap_or(""), "the root of {trace}: {names:?}");
    ours
}

/// The log lines, each parsed.
fn json_lines(name: &str, logged: &str) -> Vec<Value> {
    logged
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{name} logged a line that is not JSON ({e}): {line}"))
        })
        .collect()
}

#[tokio::test]
async fn one_request_is_one_trace_from_submit_through_every_stage_and_the_agent() {
    let app = spawn_bare_app(|_| {}).await;
    let collector = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let endpoint = collector.uri();
    app.declare_agent_queue("traced-1").await;
    let worker = switchyard(&app, &endpoint, &["worker", "--stage", "all"]).spawn().unwrap();

    // A request whose tasks wait in line, no agent being there yet: a wake-up places them.
    let waited = switchyard(&app, &endpoint, &["submit", "Deploy Gitea to the homelab", "--auto-approve"])
        .stdout(Stdio::piped())
        .output()
        .await
        .unwrap();
    assert_eq!(waited.status.code(), Some(0), "{}", String::from_utf8_lossy(&waited.stderr));
    let waited: RequestId = String::from_utf8_lossy(&waited.stdout).trim().parse().unwrap();
    app.wait_for(waited, |r| {
        r.plan.as_ref().is_some_and(|p| p.tasks.iter().any(|t| t.status.as_str() == "waiting"))
    })
    .await;

    let agent = switchyard(
        &app,
        &endpoint,
        &["agent", "--id", "traced-1", "--capabilities", "deployment,shell", "--speed", "0"],
    )
    .spawn()
    .unwrap();
    wait_registered(&app, "traced-1").await;
    app.wait_for(waited, |r| r.status.is_terminal()).await;

    // A request from `submit`, followed to its end.
    let submitted = switchyard(
        &app,
        &endpoint,
        &["submit", "Deploy Gitea to the homelab", "--auto-approve", "--wait", "--timeout", "60"],
    )
    .stdout(Stdio::piped())
    .output()
    .await
    .unwrap();
    let said = String::from_utf8_lossy(&submitted.stdout);
    assert_eq!(submitted.status.code(), Some(0), "{said} {}", String::from_utf8_lossy(&submitted.stderr));
    let request_id: RequestId = said.lines().next().unwrap().trim().parse().unwrap();

    // A request from a client that traces its own work.
    let client_request = RequestId::random();
    let request = SubmitRequest {
        text: "Deploy Gitea to the homelab".into(),
        request_id: Some(client_request),
        submitted_by: Some("tests".into()),
        priority: None,
        auto_approve: Some(true),
    };
    let mut outgoing = Outgoing::json(app.names.requests(), client_request, &request);
    outgoing.headers =
        BTreeMap::from([("traceparent".to_owned(), format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))]);
    app.broker.publish(&outgoing).await.unwrap();
    app.wait_for(client_request, |r| r.status.is_terminal()).await;

    let worker_log = stop("worker", worker).await;
    let agent_log = stop("agent", agent).await;
    let spans = received_spans(&collector).await;

    // submit's span starts the request's trace.
    let submit = spans
        .iter()
        .find(|s| s.name == "submit" && attribute(s, "request_id") == Some(request_id.to_string()))
        .unwrap_or_else(|| {
            panic!("no submit span among {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>())
        });
    assert!(submit.parent_span_id.is_empty(), "submit starts the trace");
    let trace = hex(&submit.trace_id);
    let ours = chained(&spans, &trace, None);
    let names: Vec<&str> = ours.iter().map(|s| s.name.as_str()).collect();
    for stage in ["submit", "decompose", "plan", "fallback", "route", "dispatch", "task", "track"] {
        assert!(names.contains(&stage), "no {stage} span in the request's trace: {names:?}");
    }
    for span in &ours {
        assert_eq!(attribute(span, "request_id"), Some(request_id.to_string()), "{}", span.name);
    }
    let stage_names = ["decompose", "plan", "fallback", "route", "place", "dispatch", "track"];
    for span in ours.iter().filter(|s| stage_names.contains(&s.name.as_str())) {
        assert_eq!(attribute(span, "stage").as_deref(), Some(span.name.as_str()));
        assert_eq!(attribute(span, "trace_id").as_deref(), Some(trace.as_str()));
    }
    // An agent's task is the child of its dispatch, and its result's tracking the child of the task.
    let by_id: HashMap<String, &Span> = ours.iter().map(|s| (hex(&s.span_id), *s)).collect();
    let parent_of = |span: &Span| by_id.get(&hex(&span.parent_span_id)).map(|p| p.name.clone());
    for task in ours.iter().filter(|s| s.name == "task") {
        assert_eq!(parent_of(task).as_deref(), Some("dispatch"));
        for key in ["plan_id", "task_id", "attempt", "agent"] {
            assert!(attribute(task, key).is_some(), "the task span has no {key}");
        }
        let dispatch = by_id[&hex(&task.parent_span_id)];
        assert_eq!(attribute(dispatch, "task_id"), attribute(task, "task_id"));
        assert_eq!(attribute(dispatch, "attempt"), attribute(task, "attempt"));
    }
    let tracks: Vec<&&Span> = ours.iter().filter(|s| s.name == "track").collect();
    assert!(!tracks.is_empty());
    for track in tracks {
        assert_eq!(parent_of(track).as_deref(), Some("task"), "a result is tracked in its task's trace");
        assert!(attribute(track, "task_id").is_some() && attribute(track, "attempt").is_some());
    }

    // Tasks placed from the line by a wake-up are dispatched in their request's trace: from a
    // span of the place stage there, the child of the request's decomposition, linked to the
    // wake-up's handling (whose own span is in the trace of whatever woke it: a heartbeat, a
    // periodic look, or this request's routing, which woke place as its tasks joined the line).
    let submit = spans
        .iter()
        .find(|s| s.name == "submit" && attribute(s, "request_id") == Some(waited.to_string()))
        .expect("the submit span of the request that waited");
    let ours = chained(&spans, &hex(&submit.trace_id), None);
    let by_id: HashMap<String, &Span> = ours.iter().map(|s| (hex(&s.span_id), *s)).collect();
    let parent_of = |span: &Span| by_id.get(&hex(&span.parent_span_id)).map(|p| p.name.clone());
    let placed: Vec<&&Span> = ours.iter().filter(|s| s.name == "place" && !s.links.is_empty()).collect();
    assert!(!placed.is_empty(), "no place span in the trace of the request that waited");
    for place in placed {
        assert_eq!(parent_of(place).as_deref(), Some("decompose"));
        assert_eq!(attribute(place, "request_id"), Some(waited.to_string()));
        assert!(attribute(place, "task_id").is_some());
        let wake = &place.links.first().expect("linked to the wake-up's handling").span_id;
        let woken = spans.iter().find(|s| &s.span_id == wake).expect("the wake-up's span was exported");
        assert_eq!(woken.name, "place");
        assert!(woken.links.is_empty(), "a handling of a wake-up");
        let dispatched = ours.iter().find(|s| s.parent_span_id == place.span_id).expect("its dispatch");
        assert_eq!(dispatched.name, "dispatch");
        assert_eq!(attribute(dispatched, "task_id"), attribute(place, "task_id"));
    }
    assert!(ours.iter().any(|s| s.name == "task") && ours.iter().any(|s| s.name == "track"));

    // The client's trace goes on: its request's decomposition is the child of the client's span.
    let theirs = chained(&spans, CLIENT_TRACE, Some(CLIENT_SPAN));
    let decompose = theirs.iter().find(|s| s.name == "decompose").expect("the client's trace continues");
    assert_eq!(hex(&decompose.parent_span_id), CLIENT_SPAN);
    assert_eq!(attribute(decompose, "request_id"), Some(client_request.to_string()));
    assert!(theirs.iter().any(|s| s.name == "task"), "through to the agent");

    // The logs: JSON, each line; inside a message's handling, with its request, stage and trace.
    let lines = json_lines("worker", &worker_log);
    json_lines("agent", &agent_log);
    let handled: Vec<&Value> = lines
        .iter()
        .filter(|l| l["span"]["request_id"].as_str() == Some(request_id.to_string().as_str()))
        .collect();
    assert!(!handled.is_empty(), "no line inside the request's handling: {worker_log}");
    for line in &handled {
        assert_eq!(line["span"]["trace_id"].as_str(), Some(trace.as_str()), "{line}");
        assert!(line["span"]["stage"].is_string(), "{line}");
    }
    // At info, one line per change of the request's state, once each.
    let said_of = |message: &str, request: RequestId| {
        lines
            .iter()
            .filter(|l| {
                l["message"].as_str() == Some(message)
                    && (l["request_id"].as_str() == Some(request.to_string().as_str()))
            })
            .count()
    };
    for request in [waited, request_id, client_request] {
        for change in ["request received", "request planned", "request completed"] {
            assert_eq!(said_of(change, request), 1, "{change} of {request}: {worker_log}");
        }
    }
    let received = lines.iter().find(|l| l["message"] == "request received").unwrap();
    assert_eq!(received["level"], "INFO");
    assert_eq!(received["span"]["stage"], "decompose");
}

/// The first line a command logs: an agent whose broker does not answer says so at once, and
/// again after each pause, until it is stopped.
async fn first_logged_line(config: &std::path::Path, args: &[&str]) -> String {
    use tokio::io::AsyncBufReadExt;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env("AMQP_URL", format!("amqp://guest:guest@127.0.0.1:{closed}"))
        .env("SWITCHYARD_CONFIG", config)
        .env_remove("SWITCHYARD_LOG_FORMAT")
        .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(agent.stderr.take().unwrap()).lines();
    let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("a line within 30 s")
        .unwrap()
        .expect("a line before the end");
    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    line
}

#[tokio::test]
async fn the_configuration_file_sets_the_log_format_and_the_flag_wins_over_it() {
    let config = std::env::temp_dir().join(format!("switchyard-logs-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&config, "[telemetry]\nlog_format = \"json\"\n").unwrap();
    let agent = ["agent", "--id", "patient-2", "--capabilities", "deployment"];
    let json = first_logged_line(&config, &agent).await;
    let text = first_logged_line(&config, &[&["--log-format", "text"][..], &agent[..]].concat()).await;
    std::fs::remove_file(&config).unwrap();

    let line: Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("not JSON ({e}): {json}"));
    assert_eq!(line["level"], "ERROR", "{json}");
    assert!(line["message"].as_str().unwrap().contains("not connected to the broker"), "{json}");
    assert!(line["timestamp"].is_string() && line["target"].is_string(), "{json}");
    assert!(serde_json::from_str::<Value>(&text).is_err(), "text: {text}");
    assert!(text.contains("ERROR") && text.contains("not connected to the broker"), "{text}");
    assert!(!text.contains('\u{1b}'), "no colour in a pipe: {text:?}");
}
