//! Complete workflows: a request goes through every stage to its agents' queues.

use crate::helpers::*;

#[tokio::test]
async fn uptime_kuma_is_deployed_to_the_homelab_agent_with_alerts_planned() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "monitoring", "shell", "docker"], 4, &[("target", "homelab")])
        .await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
    let plan = report.plan.as_ref().unwrap();
    let keys: Vec<&str> = plan.tasks.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"]);
    let dispatched: Vec<&str> =
        plan.tasks.iter().filter(|t| t.status.as_str() == "dispatched").map(|t| t.key.as_str()).collect();
    assert_eq!(dispatched, ["1.prepare"], "only the tasks without dependencies are released");
    let messages = app.drain(&app.agent_queue("homelab-1")).await;
    assert_eq!(messages.len(), 1);
    let (task, _) = &messages[0];
    assert_eq!(task["payload"]["task"]["key"], "1.prepare");
    assert_eq!(task["payload"]["agent_id"], "homelab-1");
    assert_eq!(task["schema_version"], 1);
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));
}
