//! Least privilege on the broker: an agent whose account may configure and read its own queues
//! only (its tasks and its control queue), and write only through the default exchange, still
//! registers, runs its tasks, reports them and listens for stops; it cannot read any other queue.

use std::process::Stdio;

use switchyard::broker::Broker;

use crate::helpers::*;

/// A broker account of its own, removed when dropped.
struct BrokerUser {
    name: String,
}

impl BrokerUser {
    fn create(name: &str, password: &str, configure: &str, write: &str, read: &str) -> Self {
        rabbitmqctl(&["add_user", name, password]);
        let user = BrokerUser { name: name.to_owned() };
        rabbitmqctl(&["set_permissions", "-p", "/", name, configure, write, read]);
        user
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["-q", "delete_user", &self.name]).status();
    }
}

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}: {status}");
}

#[tokio::test]
async fn an_agent_allowed_only_its_own_queue_runs_its_tasks_and_reads_nothing_else() {
    let app = spawn_app().await;
    let agent = format!("lp-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    // Declared here too, so that the test removes it afterwards.
    let own_queue = app.declare_agent_queue(&agent).await;
    // As the README grants: `^prod\.agent\.homelab-1(\.control)?$`.
    let own_queue = format!("^{}(\\.control)?$", regex_quote(&own_queue));
    let user = BrokerUser::create(&agent, "agent-password", &own_queue, "^amq\\.default$", &own_queue);
    let url = app.config.amqp_url.replacen("guest:guest", &format!("{}:agent-password", user.name), 1);
    assert_ne!(url, app.config.amqp_url, "the test broker URL names the guest account");

    let mut process = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["agent", "--id", &agent, "--capabilities", "deployment,shell,docker", "--capacity", "2"])
        .args(["--executor", "simulate", "--speed", "0.01", "--heartbeat-secs", "1"])
        .env("AMQP_URL", &url)
        .env("SWITCHYARD_NAMESPACE", app.config.namespace.as_str())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the agent starts");
    wait_registered(&app, &agent).await;
    let id = app.submit("Deploy Gitea to the homelab", true).await;
    let report = app.wait_for(id, |r| r.status.is_terminal()).await;
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    let plan = report.plan.expect("a plan");
    assert!(plan.tasks.iter().all(|t| t.agent_id.as_deref() == Some(agent.as_str())), "{plan:#?}");

    // It listens for stops on its control queue.
    let control = app.names.agent_control_queue(&switchyard::model::ids::AgentId::parse(&agent).unwrap());
    assert_eq!(app.broker.consumer_count(&control).await.unwrap(), 1);

    let restricted = Broker::connect(&url, app.names.clone()).await.expect("the agent's account connects");
    let err = restricted.get(&app.names.queue("requests")).await.expect_err("another queue is not readable");
    assert!(err.is_access_refused(), "{err}");
    let _ = process.start_kill();
    let _ = process.wait().await;
}

/// `text` with the characters that mean something in a regular expression escaped.
fn regex_quote(text: &str) -> String {
    text.replace('.', "\\.").replace('-', "\\-")
}
