//! What has ended stays as it ended: a failure that arrives late (a write decided before the
//! request ended, a message dead-lettered after it) leaves a completed, rejected or cancelled
//! request, and its plan, as they were, and writes no `request.failed` to the audit.

use std::time::Duration;

use switchyard::agent::{AgentBuilder, Simulate};
use switchyard::model::domain::Resources;
use switchyard::model::effect::{Write, write};
use switchyard::model::ids::{AgentId, MessageId, RequestId};
use switchyard::store::Applied;

use crate::helpers::*;

const MONITOR: &str = "Monitor the NAS and notify me on Telegram when it is down";

async fn ended(app: &TestApp, id: RequestId, status: &str) {
    let report = app.wait_for(id, |r| r.status.as_str() == status).await;
    assert_eq!(report.status.as_str(), status, "{report:#?}");
}

/// Fails `id` late, both ways a request fails, and checks that it stayed `status`.
async fn fail_late_and_check(app: &TestApp, id: RequestId, status: &str) {
    let before = app.store.report(id).await.unwrap().unwrap();
    let late = Write::RequestFailed(write::RequestFailed { request_id: id, reason: "a late failure".into() });
    assert_eq!(app.store.apply("tests", None, &[late]).await.unwrap(), Applied::Done);
    app.store
        .record_dead_letter("track", "q", MessageId::random(), Some(id), "a late poison message", "{}", true)
        .await
        .unwrap();

    let report = app.store.report(id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), status, "{report:#?}");
    assert_eq!(report.failure_reason, before.failure_reason, "the reason it ended with");
    assert_eq!(report.plan.map(|p| p.status), before.plan.map(|p| p.status), "the plan as it was");
    let events = app.store.audit_events(id).await.unwrap();
    assert!(!events.iter().any(|(_, event, _)| event == "request.failed"), "{events:#?}");
    assert_eq!(report.dead_letters.len(), 1, "the dead letter itself is recorded");
}

#[tokio::test]
async fn a_late_failure_leaves_a_completed_request_completed() {
    let app = spawn_app().await;
    let watcher = AgentBuilder::new(AgentId::parse("watcher").unwrap())
        .capabilities(["monitoring"])
        .capacity(2)
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500));
    let _watcher = app.start_agent(watcher, Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "watcher").await;
    let id = app.submit(MONITOR, true).await;
    ended(&app, id, "completed").await;

    fail_late_and_check(&app, id, "completed").await;
}

#[tokio::test]
async fn a_late_failure_leaves_a_rejected_or_cancelled_request_as_it_ended() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let rejected = app.submit(MONITOR, false).await;
    let cancelled = app.submit(MONITOR, false).await;
    let report = app.wait_for(rejected, |r| r.status.as_str() == "awaiting_approval").await;
    let reject = Write::Approval(write::Approval {
        request_id: rejected,
        plan_id: report.plan.unwrap().plan_id,
        approved: false,
        by: "ops".into(),
        reason: "not today".into(),
    });
    assert_eq!(app.store.apply("tests", None, &[reject]).await.unwrap(), Applied::Done);
    app.wait_for(cancelled, |r| r.status.as_str() == "awaiting_approval").await;
    let cancel =
        Write::Cancel(write::Cancel { request_id: cancelled, by: "ops".into(), reason: "wrong host".into() });
    assert_eq!(app.store.apply("tests", None, &[cancel]).await.unwrap(), Applied::Done);
    ended(&app, rejected, "rejected").await;
    ended(&app, cancelled, "cancelled").await;

    fail_late_and_check(&app, rejected, "rejected").await;
    fail_late_and_check(&app, cancelled, "cancelled").await;
}

#[tokio::test]
async fn both_ways_a_request_under_way_fails_end_its_plan_alike() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let by_write = app.submit(MONITOR, false).await;
    let by_dead_letter = app.submit(MONITOR, false).await;
    for id in [by_write, by_dead_letter] {
        app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    }
    let failed =
        Write::RequestFailed(write::RequestFailed { request_id: by_write, reason: "it broke".into() });
    assert_eq!(app.store.apply("tests", None, &[failed]).await.unwrap(), Applied::Done);
    app.store
        .record_dead_letter("route", "q", MessageId::random(), Some(by_dead_letter), "it broke", "{}", true)
        .await
        .unwrap();

    for id in [by_write, by_dead_letter] {
        let report = app.store.report(id).await.unwrap().unwrap();
        assert_eq!(report.status.as_str(), "failed", "{report:#?}");
        let plan = report.plan.as_ref().unwrap();
        assert_eq!(plan.status.as_str(), "failed", "the plan ends with its request");
        assert!(plan.tasks.iter().all(|t| t.status.as_str() == "cancelled"), "{:?}", plan.tasks);
        let events = app.store.audit_events(id).await.unwrap();
        assert_eq!(events.iter().filter(|(_, e, _)| e == "request.failed").count(), 1, "{events:#?}");
        let audit = app.cli(&["audit", &id.to_string()]).await;
        assert_eq!(audit.status.code(), Some(0), "{}", String::from_utf8_lossy(&audit.stdout));
    }
}
