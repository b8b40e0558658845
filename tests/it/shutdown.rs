//! Stopping a worker process: on SIGTERM it finishes the message it holds, publishes what that
//! message leads to and exits 0; on a second signal it exits at once, and the message it held goes
//! back to its queue. The message in hand is a request whose decomposition waits for a slow model.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::{Child, Command};

use crate::fake_model::{FakeModel, Reply, usage};
use crate::helpers::*;

const REQUEST: &str = "Deploy Gitea to the homelab";

/// A model that answers every decomposition correctly, after `delay`.
async fn slow_model(delay: Duration) -> FakeModel {
    let model = FakeModel::start().await;
    let answer = json!({
        "intents": [{ "work_type": "deployment", "text": REQUEST, "entities": ["Gitea"], "targets": ["homelab"] }],
        "confidence": 0.9,
    });
    model.always(Reply::json(&answer, usage(100, 20)).delayed(delay)).await;
    model
}

/// `switchyard worker --stage decompose` against the app, decomposing with `model`.
fn decompose_worker(app: &TestApp, model: &FakeModel, dir: &std::path::Path) -> Child {
    let config = dir.join("switchyard.toml");
    let toml = format!(
        "[decomposer]\nkind = \"llm\"\nendpoint = \"{}\"\nmodel = \"small\"\ntimeout_secs = 120\n",
        model.base_url()
    );
    std::fs::write(&config, toml).unwrap();
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["worker", "--stage", "decompose"])
        .env("AMQP_URL", &app.config.amqp_url)
        .env("DATABASE_URL", &app.config.database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env("SWITCHYARD_CONFIG", &config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the switchyard binary starts")
}

fn signal(child: &Child, signal: i32) {
    let pid = child.id().expect("still running") as i32;
    // SAFETY: kill(2) on a child of ours that has not been waited for.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

/// Waits until the model has been asked once: the worker holds the request.
async fn wait_asked(model: &FakeModel) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while model.received().await.is_empty() {
        assert!(Instant::now() < deadline, "the worker never asked the model");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn on_sigterm_a_worker_finishes_the_message_it_holds_then_exits_0() {
    let app = spawn_bare_app(|_| {}).await;
    let model = slow_model(Duration::from_millis(1500)).await;
    let dir = tempfile_dir();
    let mut worker = decompose_worker(&app, &model, &dir);
    let id = app.submit(REQUEST, true).await;
    wait_asked(&model).await;

    signal(&worker, libc::SIGTERM);
    let status =
        tokio::time::timeout(Duration::from_secs(20), worker.wait()).await.expect("it exits").unwrap();

    assert_eq!(status.code(), Some(0), "{status:?}");
    let report = app.store.report(id).await.unwrap().expect("the request");
    assert_eq!(report.status.as_str(), "decomposed", "{report:#?}");
    assert_eq!(report.decomposer.as_deref(), Some("llm"));
    // What the request led to waits for the plan stage; nothing went back to the requests queue.
    let planned = app.drain(&app.names.queue("decomposed")).await;
    assert_eq!(planned.len(), 1, "{planned:?}");
    assert_eq!(planned[0].0["request_id"], json!(id.to_string()));
    let left = app.drain(&app.names.queue("requests")).await;
    assert!(left.is_empty(), "{left:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn on_a_second_signal_a_worker_exits_at_once_and_its_message_goes_back_to_the_queue() {
    let app = spawn_bare_app(|_| {}).await;
    let model = slow_model(Duration::from_secs(60)).await;
    let dir = tempfile_dir();
    let mut worker = decompose_worker(&app, &model, &dir);
    let id = app.submit(REQUEST, true).await;
    wait_asked(&model).await;

    signal(&worker, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(worker.try_wait().unwrap().is_none(), "the first signal waits for the message in hand");
    signal(&worker, libc::SIGTERM);
    let status =
        tokio::time::timeout(Duration::from_secs(10), worker.wait()).await.expect("it exits").unwrap();

    assert_eq!(status.code(), Some(130), "{status:?}");
    let report = app.store.report(id).await.unwrap();
    assert!(report.is_none(), "nothing was recorded: {report:#?}");
    // The broker put the unacknowledged request back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let requests = loop {
        let requests = app.drain(&app.names.queue("requests")).await;
        if !requests.is_empty() || Instant::now() > deadline {
            break requests;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].0["request_id"], json!(id.to_string()));
    let _ = std::fs::remove_dir_all(dir);
}

/// A directory of this test's own.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("switchyard-shutdown-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
