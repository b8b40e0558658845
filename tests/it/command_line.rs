//! The command line as a new user meets it: a reader that closes, logs written to a file, a
//! wrong password, an unknown host, a service that does not answer, a clean stop. Each runs the
//! real `switchyard` binary against the real broker and database.

use std::process::Stdio;
use std::time::Duration;

use switchyard::agent::{AgentBuilder, Simulate};
use switchyard::model::domain::Resources;
use switchyard::model::ids::AgentId;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::helpers::*;

/// The binary, with the test's services and nothing of the environment's configuration.
fn switchyard(amqp_url: &str, database_url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .env("AMQP_URL", amqp_url)
        .env("DATABASE_URL", database_url)
        .env("SWITCHYARD_NAMESPACE", "cli-tests")
        .env_remove("SWITCHYARD_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// A port on which nothing listens.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn lines(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes).lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_reader_that_closes_ends_a_command_quietly_with_0() {
    let app = spawn_app().await;
    let id = app.submit("Deploy Gitea to the homelab", true).await;
    app.wait_settled(id).await;
    // The reader is gone before the command writes its first line, as `| head -0` would be.
    let mut child = switchyard(&app.config.amqp_url, &app.config.database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .args(["status", &id.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.is_empty(), "nothing to say: {stderr}");
}

#[tokio::test]
async fn a_refused_password_fails_at_once_in_one_line_without_the_password() {
    let url = amqp_url().replacen("guest:guest@", "guest:not-the-password@", 1);
    assert_ne!(url, amqp_url(), "the test's broker URL carries guest's password");
    let output = switchyard(&url, &database_url()).args(["submit", "Deploy Gitea"]).output().await.unwrap();
    let stderr = lines(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr:?}");
    assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
    let line = &stderr[0];
    assert!(line.starts_with("error: cannot connect to the broker at amqp://guest:***@"), "{line}");
    assert_eq!(line.matches("ACCESS_REFUSED - Login was refused").count(), 1, "its cause once: {line}");
    assert!(!line.contains("not-the-password"), "{line}");
    assert!(!line.contains("within"), "refused at once, not retried until the timeout: {line}");
}

#[tokio::test]
async fn a_worker_refused_by_the_broker_names_the_broker_and_exits_2() {
    let app = spawn_bare_app(|_| {}).await;
    let url = app.config.amqp_url.replacen("guest:guest@", "guest:not-the-password@", 1);
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        switchyard(&url, &app.config.database_url)
            .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
            .args(["worker", "--stage", "route"])
            .output(),
    )
    .await
    .expect("a refused login ends the worker")
    .unwrap();
    let stderr = lines(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr:?}");
    let last = stderr.last().unwrap();
    assert!(last.starts_with("error: cannot connect to the broker at amqp://guest:***@"), "{last}");
    assert!(last.contains("ACCESS_REFUSED"), "{last}");
    assert!(!stderr.iter().any(|l| l.contains("not-the-password")), "{stderr:?}");
}

#[tokio::test]
async fn a_database_that_refuses_the_login_fails_at_once_in_one_line() {
    // A role the server does not know (trust authentication still names its role).
    let database = "postgres://switchyard-nobody@127.0.0.1:5432/test".to_owned();
    let output = switchyard(&amqp_url(), &database)
        .args(["status", "5d3ae7f6-08d4-4ff7-9e9c-5e1f3c0d7a11"])
        .output()
        .await
        .unwrap();
    let stderr = lines(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr:?}");
    assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
    assert!(stderr[0].starts_with("error: cannot connect to the database at postgres://"), "{stderr:?}");
    assert!(stderr[0].contains("switchyard-nobody"), "names whom it was refused: {stderr:?}");
    assert!(!stderr[0].contains("within"), "refused at once, not retried: {stderr:?}");
}

#[tokio::test]
async fn an_unknown_host_fails_at_once_in_one_line() {
    let nowhere_broker = "amqp://guest:guest@switchyard-nowhere.invalid:5672".to_owned();
    let nowhere_database = "postgres://postgres@switchyard-nowhere.invalid:5432/test".to_owned();
    for (amqp, database, args, what) in [
        (nowhere_broker, database_url(), ["submit", "Deploy Gitea"], "broker at amqp://"),
        (
            amqp_url(),
            nowhere_database,
            ["status", "5d3ae7f6-08d4-4ff7-9e9c-5e1f3c0d7a11"],
            "database at postgres://",
        ),
    ] {
        // The lookup itself goes to the machine's resolver, which may take
        // seconds to say no; a generous timeout keeps its latency out of the
        // verdict, while a retried lookup would still show as "within".
        let output =
            switchyard(&amqp, &database).args(["--connect-timeout", "60"]).args(args).output().await.unwrap();
        let stderr = lines(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr:?}");
        assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
        let line = &stderr[0];
        assert!(line.starts_with(&format!("error: cannot connect to the {what}")), "{line}");
        assert_eq!(line.matches("failed to lookup address information").count(), 1, "{line}");
        assert!(!line.contains("within"), "not retried until the timeout: {line}");
    }
}

#[tokio::test]
async fn a_service_that_does_not_answer_is_given_up_after_the_connect_timeout() {
    let broker = format!("amqp://guest:guest@127.0.0.1:{}", closed_port());
    let output = switchyard(&broker, &database_url())
        .args(["--connect-timeout", "1", "submit", "Deploy Gitea"])
        .output()
        .await
        .unwrap();
    let stderr = lines(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr:?}");
    assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
    let line = &stderr[0];
    assert!(line.starts_with("error: cannot reach the broker at amqp://guest:***@127.0.0.1:"), "{line}");
    assert!(line.contains(" within 1 s ("), "says how long it tried: {line}");
    assert_eq!(line.matches("Connection refused").count(), 1, "{line}");

    let database = format!("postgres://postgres@127.0.0.1:{}/test", closed_port());
    let output = switchyard(&amqp_url(), &database)
        .args(["--connect-timeout", "1", "status", "5d3ae7f6-08d4-4ff7-9e9c-5e1f3c0d7a11"])
        .output()
        .await
        .unwrap();
    let stderr = lines(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr:?}");
    assert_eq!(stderr.len(), 1, "one line: {stderr:?}");
    assert!(
        stderr[0].starts_with("error: cannot reach the database at postgres://postgres@127.0.0.1:"),
        "{stderr:?}"
    );
    assert!(stderr[0].contains(" within 1 s ("), "{stderr:?}");

    let bad = switchyard(&amqp_url(), &database_url())
        .args(["--connect-timeout", "0", "status", "5d3ae7f6-08d4-4ff7-9e9c-5e1f3c0d7a11"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "a timeout must be a positive number");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"0\" is not a number of seconds"), "{bad:?}");
}

#[tokio::test]
async fn an_agent_waiting_for_its_broker_logs_one_line_per_attempt_without_colour() {
    let broker = format!("amqp://guest:guest@127.0.0.1:{}", closed_port());
    let mut agent = switchyard(&broker, &database_url())
        .args(["agent", "--id", "patient-1", "--capabilities", "deployment"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = agent.stderr.take().unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.start_kill().unwrap();
    agent.wait().await.unwrap();
    let mut logged = String::new();
    stderr.read_to_string(&mut logged).await.unwrap();
    assert!(!logged.contains('\u{1b}'), "no colour codes in a file or a pipe: {logged:?}");
    let attempts: Vec<&str> = logged.lines().filter(|l| l.contains("not connected to the broker")).collect();
    assert!(!attempts.is_empty(), "{logged}");
    assert!(attempts.iter().all(|l| l.contains("pause=") && l.contains("Connection refused")), "{logged}");
    assert_eq!(logged.lines().count(), attempts.len(), "nothing but one line per attempt: {logged}");
}

#[tokio::test]
async fn a_worker_and_an_agent_stopped_cleanly_log_no_error() {
    let app = spawn_app().await;
    app.declare_agent_queue("tidy-1").await;
    let start = |args: &[&str]| {
        switchyard(&app.config.amqp_url, &app.config.database_url)
            .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let worker = start(&["worker", "--stage", "all"]);
    let agent = start(&["agent", "--id", "tidy-1", "--capabilities", "deployment,shell", "--speed", "0"]);
    wait_registered(&app, "tidy-1").await;
    let id = app.submit("Deploy Gitea to the homelab", true).await;
    app.wait_for(id, |r| r.status.is_terminal()).await;
    for child in [&worker, &agent] {
        // SAFETY: kill(2) on a child of ours that has not been waited for.
        assert_eq!(unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) }, 0);
    }
    for (name, child) in [("worker", worker), ("agent", agent)] {
        let output = child.wait_with_output().await.unwrap();
        let logged = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(0), "{name}: {logged}");
        assert!(!logged.contains("ERROR") && !logged.contains("WARN"), "{name}: {logged}");
    }
}

#[tokio::test]
async fn submit_refuses_an_empty_or_oversized_text_and_sends_nothing() {
    let app = spawn_bare_app(|_| {}).await;
    let empty = app.cli(&["submit", "  "]).await;
    assert_eq!(empty.status.code(), Some(2), "{empty:?}");
    assert_eq!(lines(&empty.stderr), ["error: the request is not valid: empty request text"]);
    // Over the configured limit of what clients send (a command-line argument cannot hold the
    // default 256 KiB).
    let config = std::env::temp_dir().join(format!("switchyard-cli-{}.toml", uuid::Uuid::new_v4().simple()));
    std::fs::write(&config, "[worker]\nmax_payload_bytes = 4096\n").unwrap();
    let huge = "Deploy Gitea ".repeat(400);
    let oversized = switchyard(&app.config.amqp_url, &app.config.database_url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .env("SWITCHYARD_CONFIG", &config)
        .args(["submit", &huge])
        .output()
        .await
        .unwrap();
    std::fs::remove_file(&config).unwrap();
    assert_eq!(oversized.status.code(), Some(2));
    let said = lines(&oversized.stderr);
    assert!(said.len() == 1 && said[0].contains("exceeds the limit of 4096 bytes"), "{said:?}");
    assert!(app.drain(&app.names.requests()).await.is_empty(), "nothing was sent");
}

#[tokio::test]
async fn a_request_id_submitted_again_with_another_text_is_refused_not_merged() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    let id = switchyard::model::ids::RequestId::random().to_string();
    let first =
        app.cli(&["submit", "Deploy Gitea to the homelab", "--request-id", &id, "--auto-approve"]).await;
    assert_eq!(first.status.code(), Some(0), "{first:?}");
    let request_id = id.parse().unwrap();
    let before = app.wait_settled(request_id).await;
    let events_before = app.store.audit_events(request_id).await.unwrap().len();

    let again = app.cli(&["submit", "Monitor the NAS", "--request-id", &id]).await;
    assert_eq!(again.status.code(), Some(2), "{again:?}");
    let said = lines(&again.stderr);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("was submitted before with another text (\"Deploy Gitea to the homelab\")"),
        "{said:?}"
    );
    assert!(said[0].ends_with("nothing was sent"), "{said:?}");
    // The same text again is the same request: idempotent.
    let same = app.cli(&["submit", "Deploy Gitea to the homelab", "--request-id", &id]).await;
    assert_eq!(same.status.code(), Some(0), "{same:?}");

    // A client that publishes it anyway has it dead-lettered with the reason.
    let body = serde_json::json!({ "text": "Monitor the NAS", "request_id": id });
    app.publish_raw("requests", body.to_string().as_bytes()).await;
    let dead = app.wait_dead_letters("decompose", 1).await;
    assert!(dead[0].reason.contains("was submitted before with another text"), "{}", dead[0].reason);
    let after = app.store.report(request_id).await.unwrap().unwrap();
    assert_eq!(after.text, "Deploy Gitea to the homelab", "never merged");
    assert_eq!(after.status, before.status, "the request goes on as it was");
    let events = app.store.audit_events(request_id).await.unwrap();
    assert_eq!(events.len(), events_before, "nothing recorded of the refused one: {events:#?}");
}

#[tokio::test]
async fn a_plan_awaiting_approval_is_decided_by_its_request_id_as_submit_wait_says() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    let waited = app.cli(&["submit", "Deploy Gitea to the homelab", "--wait", "--timeout", "3"]).await;
    assert_eq!(waited.status.code(), Some(3), "it waits for a person: {waited:?}");
    let shown = String::from_utf8_lossy(&waited.stdout);
    let id = shown.lines().next().unwrap().to_owned();
    assert!(shown.contains(&format!("to run it: switchyard approve {id}")), "{shown}");
    assert!(shown.contains(&format!("switchyard reject {id} --reason")), "{shown}");

    let approved = app.cli(&["approve", &id]).await;
    assert_eq!(approved.status.code(), Some(0), "{approved:?}");
    let plan_id = id.parse::<switchyard::model::ids::RequestId>().unwrap().plan_id();
    let said = String::from_utf8_lossy(&approved.stdout);
    assert!(said.starts_with(&format!("plan {plan_id} approved by ")), "{said}");
    app.wait_for(id.parse().unwrap(), |r| r.status.as_str() == "in_progress").await;

    let other = app.submit("Deploy Gitea to the homelab", false).await;
    app.wait_for(other, |r| r.status.as_str() == "awaiting_approval").await;
    let rejected = app.cli(&["reject", &other.to_string(), "--reason", "not today"]).await;
    assert_eq!(rejected.status.code(), Some(0), "{rejected:?}");
    assert_eq!(app.store.report(other).await.unwrap().unwrap().status.as_str(), "rejected");

    let unknown = switchyard::model::ids::RequestId::random();
    let missing = app.cli(&["approve", &unknown.to_string()]).await;
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(lines(&missing.stderr), [format!("error: no plan {unknown}, and no request {unknown}")]);
}

#[tokio::test]
async fn status_says_each_reason_once_with_descriptions_and_times() {
    let app = spawn_app_with(|c| c.worker.retry_base_delay_ms = 10).await;
    // Registered in the store only: nobody declared its queue, so the dispatch fails.
    let ghost = app.heartbeat("ghost-1", &["deployment", "shell"], 2, &[("target", "homelab")]);
    app.store.register_agent("tests", ghost).await.unwrap();
    let failed = app.submit("Deploy nginx to the homelab", true).await;
    app.wait_for(failed, |r| r.status.as_str() == "failed").await;
    let shown = String::from_utf8_lossy(&app.cli(&["status", &failed.to_string()]).await.stdout).into_owned();
    assert_eq!(shown.matches("gave up after 3 attempts").count(), 1, "the reason once:\n{shown}");
    assert!(shown.contains("(as above)"), "repeats point up:\n{shown}");
    assert!(shown.lines().any(|l| l.starts_with("created   ") && l.ends_with(" UTC")), "{shown}");
    assert!(shown.contains("Prepare homelab for the request"), "task descriptions:\n{shown}");
    let complexity = shown.lines().find(|l| l.starts_with("plan ")).unwrap();
    assert!(
        complexity.split("complexity ").nth(1).is_some_and(|c| c
            .trim_end_matches(')')
            .split('.')
            .nth(1)
            .unwrap()
            .len()
            == 3),
        "three decimals: {complexity}"
    );

    let watcher = AgentBuilder::new(AgentId::parse("watcher").unwrap())
        .capabilities(["monitoring"])
        .capacity(2)
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500));
    let _watcher = app.start_agent(watcher, Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "watcher").await;
    let done = app.submit("Monitor the NAS and notify me on Telegram when it is down", true).await;
    app.wait_for(done, |r| r.status.as_str() == "completed").await;
    let shown = String::from_utf8_lossy(&app.cli(&["status", &done.to_string()]).await.stdout).into_owned();
    assert!(shown.contains("dispatched to watcher at "), "{shown}");
    assert!(shown.contains(", finished at "), "{shown}");
}
