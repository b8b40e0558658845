//! Messages committed together: each message's writes stand or fall alone, and a batch delivers
//! each input once.

use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard::decisions::routing::Route;
use switchyard::model::effect::{Attempt, Write, write};
use switchyard::model::ids::{AgentId, MessageId, RequestId};
use switchyard::store::{Applied, Delivery, Marker};

use crate::helpers::*;

fn marker(stage: &'static str, id: MessageId) -> Marker<'static> {
    Marker { stage, message_id: id, outputs: serde_json::json!([]) }
}

#[tokio::test]
async fn a_message_whose_reservation_no_longer_fits_is_undone_alone_in_its_batch() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.register_agent("homelab-1", &["deployment", "shell", "monitoring", "notify"], 2, &[]).await;
    let id = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", false).await;
    let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
    let plan = report.plan.as_ref().unwrap();
    assert!(plan.tasks.len() >= 3, "{:?}", plan.tasks);
    let route = |position: usize| {
        let task_id = plan.tasks[position].id;
        vec![Write::Route(write::Route {
            request_id: id,
            plan_id: plan.plan_id,
            attempt: 1,
            decision_id: task_id.decision_id(1),
            ready_at: chrono::Utc::now(),
            route: Route {
                task_id,
                agent_id: AgentId::parse("homelab-1").unwrap(),
                score: Some(0.9),
                reason: "best".into(),
                candidates: vec![],
                reserves_capacity: true,
            },
        })]
    };
    let ids = [MessageId::random(), MessageId::random(), MessageId::random()];
    let markers = ids.map(|id| marker("route", id));
    let writes = [route(0), route(1), route(2)];
    let batch: Vec<(Option<&Marker<'_>>, &[Write])> =
        markers.iter().zip(&writes).map(|(m, w)| (Some(m), w.as_slice())).collect();

    let outcomes = app.store.apply_batch("route", &batch).await.expect("the batch commits");

    let done = outcomes.iter().filter(|o| matches!(o, Ok(Applied::Done))).count();
    let full: Vec<_> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Ok(Applied::Conflict(reason)) if reason.contains("no spare capacity")))
        .map(|(i, _)| i)
        .collect();
    assert_eq!((done, full.len()), (2, 1), "{outcomes:?}");
    let agents = app.store.agents().await.unwrap();
    assert_eq!(agents[0].in_flight, 2, "the agent's capacity, not more");
    let trail = app.store.trail(id).await.unwrap().unwrap();
    assert_eq!(trail.decisions.len(), 2, "the message that did not fit wrote no decision");
    for (i, id) in ids.iter().enumerate() {
        let recorded = app.store.processed("route", *id).await.unwrap();
        assert_eq!(recorded.is_some(), !full.contains(&i), "marker of message {i}");
    }
}

#[tokio::test]
async fn a_batch_delivers_each_input_once_even_with_two_copies_of_it() {
    let app = spawn_app().await;
    let delivered = AtomicUsize::new(0);
    let deliver = |_: usize| {
        delivered.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<(), String>(()))
    };
    let (first, second) = (MessageId::random(), MessageId::random());

    let outcomes =
        app.store.deliver_batch("dispatch", &[(marker("dispatch", first), &[])], deliver).await.unwrap();
    assert!(matches!(outcomes[..], [Delivery::Done]), "{outcomes:?}");

    let batch = [
        (marker("dispatch", second), &[][..]),
        (marker("dispatch", second), &[][..]),
        (marker("dispatch", first), &[][..]),
    ];
    let outcomes = app.store.deliver_batch("dispatch", &batch, deliver).await.unwrap();
    assert!(matches!(outcomes[..], [Delivery::Done, Delivery::Busy, Delivery::Already]), "{outcomes:?}");
    assert_eq!(delivered.load(Ordering::SeqCst), 2, "one delivery per distinct input");
    assert!(app.store.processed("dispatch", second).await.unwrap().is_some());
}

#[tokio::test]
async fn a_delivered_message_whose_writes_are_refused_fails_alone_and_is_never_sent_again() {
    let app = spawn_app().await;
    let delivered = AtomicUsize::new(0);
    let deliver = |_: usize| {
        delivered.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<(), String>(()))
    };
    // The dispatch of a task that was never planned: the database refuses to record it.
    let request_id = RequestId::random();
    let task_id = request_id.plan_id().task_id("1.prepare");
    let stray = [Write::Dispatched(write::Dispatched {
        attempt: Attempt { request_id, plan_id: request_id.plan_id(), task_id, number: 1 },
        decision_id: task_id.decision_id(1),
        agent_id: AgentId::parse("homelab-1").unwrap(),
        queue: app.agent_queue("homelab-1"),
        message_id: MessageId::random(),
        lease_secs: 60,
    })];
    let (good, bad) = (MessageId::random(), MessageId::random());
    let batch = [(marker("dispatch", good), &[][..]), (marker("dispatch", bad), &stray[..])];

    let outcomes = app.store.deliver_batch("dispatch", &batch, deliver).await.expect("the batch commits");

    assert_eq!(delivered.load(Ordering::SeqCst), 2);
    assert!(matches!(outcomes[0], Delivery::Done), "{outcomes:?}");
    let Delivery::Refused(err) = &outcomes[1] else { panic!("{outcomes:?}") };
    assert!(!err.is_transient() && err.to_string().starts_with("database"), "{err}");
    assert!(app.store.processed("dispatch", good).await.unwrap().is_some(), "the other one is recorded");
    assert!(app.store.processed("dispatch", bad).await.unwrap().is_some(), "recorded as delivered");
    assert!(app.store.trail(request_id).await.unwrap().is_none(), "its writes were left out");

    let again = app.store.deliver_batch("dispatch", &batch[1..], deliver).await.unwrap();
    assert!(matches!(again[..], [Delivery::Already]), "{again:?}");
    assert_eq!(delivered.load(Ordering::SeqCst), 2, "a copy sends nothing again");
}

#[tokio::test]
async fn a_delivered_message_whose_writes_lost_a_race_is_recorded_and_never_sent_again() {
    let app = spawn_app().await;
    let delivered = AtomicUsize::new(0);
    let deliver = |_: usize| {
        delivered.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<(), String>(()))
    };
    // A guarded write that loses: the request it cancels is not there.
    let stale = [Write::Cancel(write::Cancel {
        request_id: RequestId::random(),
        by: "ops".into(),
        reason: "late".into(),
    })];
    let id = MessageId::random();
    let batch = [(marker("dispatch", id), &stale[..])];

    let outcomes = app.store.deliver_batch("dispatch", &batch, deliver).await.unwrap();
    assert!(
        matches!(&outcomes[..], [Delivery::Conflict(reason)] if reason.starts_with("no request")),
        "{outcomes:?}"
    );
    assert!(app.store.processed("dispatch", id).await.unwrap().is_some(), "recorded as delivered");

    // The runner once decided such an input again, which sent it a second time.
    let again = app.store.deliver_batch("dispatch", &batch, deliver).await.unwrap();
    assert!(matches!(again[..], [Delivery::Already]), "{again:?}");
    assert_eq!(delivered.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_delivery_that_would_reserve_capacity_is_refused_before_it_is_sent() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment"], 1, &[]).await;
    let delivered = AtomicUsize::new(0);
    let deliver = |_: usize| {
        delivered.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok::<(), String>(()))
    };
    let request_id = RequestId::random();
    let task_id = request_id.plan_id().task_id("1.prepare");
    let reserving = [Write::Route(write::Route {
        request_id,
        plan_id: request_id.plan_id(),
        attempt: 1,
        decision_id: task_id.decision_id(1),
        ready_at: chrono::Utc::now(),
        route: Route {
            task_id,
            agent_id: AgentId::parse("homelab-1").unwrap(),
            score: Some(0.9),
            reason: "best".into(),
            candidates: vec![],
            reserves_capacity: true,
        },
    })];
    let id = MessageId::random();

    let outcomes = app
        .store
        .deliver_batch("dispatch", &[(marker("dispatch", id), &reserving[..])], deliver)
        .await
        .unwrap();

    let [Delivery::Refused(err)] = &outcomes[..] else { panic!("{outcomes:?}") };
    assert!(err.to_string().contains("cannot reserve capacity"), "{err}");
    assert_eq!(delivered.load(Ordering::SeqCst), 0, "nothing sent");
    assert!(app.store.processed("dispatch", id).await.unwrap().is_none());
    assert_eq!(app.store.agents().await.unwrap()[0].in_flight, 0);
}
