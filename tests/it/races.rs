//! Races between copies of a message and between people: each ends with one decision.

use switchyard::model::ids::MessageId;
use switchyard::ops;
use switchyard::store::{self, Applied, Marker};

use crate::helpers::*;

/// Two route messages for one plan that both decided before either committed: the second
/// decision's write must not pass as done, or its dispatch would reach the agent a second time.
/// The runner then decides again and finds the task routed.
#[tokio::test]
async fn a_second_routing_decision_for_the_same_attempt_is_a_conflict_not_a_success() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[]).await;
    let id = app.submit("Deploy Gitea to the homelab", false).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    let plan_id = report.plan.as_ref().unwrap().plan_id;
    let task_id = report.plan.as_ref().unwrap().tasks[0].id;
    let route = |agent: &str| route_to(agent, id, plan_id, task_id);
    let marker = |id: MessageId| Marker { stage: "route", message_id: id, outputs: serde_json::json!([]) };
    let first =
        app.store.apply("route", Some(marker(MessageId::random())), &[route("homelab-1")]).await.unwrap();
    assert_eq!(first, Applied::Done);
    let second =
        app.store.apply("route", Some(marker(MessageId::random())), &[route("homelab-1")]).await.unwrap();
    assert!(
        matches!(second, Applied::Conflict(ref reason) if reason.contains("routed already")),
        "{second:?}"
    );
    let agents = app.store.agents().await.unwrap();
    assert_eq!(agents[0].in_flight, 1, "capacity reserved once");
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 1);
}

#[tokio::test]
async fn approve_and_reject_at_once_leave_one_verdict_and_one_loser_told_so() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[]).await;
    for _ in 0..3 {
        let id = app.submit("Deploy Gitea to the homelab", false).await;
        let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
        let plan_id = report.plan.as_ref().unwrap().plan_id;
        let (approved, rejected) = tokio::join!(
            ops::approve(&app.store, &app.broker, plan_id, "alice"),
            ops::reject(&app.store, plan_id, "bob", "not now"),
        );
        assert!(approved.is_ok() != rejected.is_ok(), "exactly one wins: {approved:?} / {rejected:?}");
        let loser = approved.err().or(rejected.err()).unwrap();
        assert!(loser.to_string().contains("already"), "{loser}");
        let expected =
            if loser.to_string().contains("already approved") { "in_progress" } else { "rejected" };
        let report = app.wait_for(id, |r| r.status.as_str() == expected).await;
        let approval = report.plan.as_ref().unwrap().approval.as_ref().unwrap();
        assert_eq!(approval.approved, expected == "in_progress");
    }
}

#[tokio::test]
async fn a_failed_request_cannot_be_approved_back_to_life() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[]).await;
    let id = app.submit("Deploy Gitea to the homelab", false).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    let plan_id = report.plan.as_ref().unwrap().plan_id;
    // One of its messages is dead-lettered: the request fails.
    app.publish_raw("route", format!(r#"{{"schema_version": 9, "request_id": "{id}"}}"#).as_bytes()).await;
    app.wait_for(id, |r| r.status.as_str() == "failed").await;
    let err = app.store.decide_approval(plan_id, true, "alice", "go").await.unwrap_err();
    assert!(matches!(err, store::Error::Refused(_)), "{err:?}");
    assert!(err.to_string().contains("has failed"), "{err}");
    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "failed");
    assert!(app.drain(&app.agent_queue("homelab-1")).await.is_empty());
}
