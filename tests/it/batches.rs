//! Messages committed together: each message's writes stand or fall alone, and a batch delivers
//! each input once.

use std::sync::atomic::{AtomicUsize, Ordering};

use switchyard::decisions::routing::Route;
use switchyard::model::effect::{Attempt, Write, write};
use switchyard::model::ids::{AgentId, MessageId, RequestId};
use switchyard::model::wire::RequestMeta;
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
    let route = |position: usize| vec![route_to("homelab-1", id, plan.plan_id, plan.tasks[position].id)];
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

/// Requests under way (awaiting approval), to fail in a batch.
async fn requests_under_way(app: &TestApp, n: usize) -> Vec<RequestId> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = app.submit(&format!("Deploy Gitea {i} to the homelab"), false).await;
        app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
        ids.push(id);
    }
    ids
}

fn fail(request_id: RequestId, reason: &str) -> Vec<Write> {
    vec![Write::RequestFailed(write::RequestFailed { request_id, reason: reason.into() })]
}

async fn failed_events(app: &TestApp, id: RequestId) -> usize {
    let events = app.store.audit_events(id).await.unwrap();
    events.iter().filter(|(_, event, _)| event == "request.failed").count()
}

#[tokio::test]
async fn a_message_the_database_refuses_is_left_out_alone_and_the_rest_of_its_batch_commits() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let requests = requests_under_way(&app, 3).await;
    // PostgreSQL takes no NUL character in a text column: the second message's write is refused.
    let writes = [fail(requests[0], "gave up"), fail(requests[1], "gave\0up"), fail(requests[2], "gave up")];
    let ids = [MessageId::random(), MessageId::random(), MessageId::random()];
    let markers = ids.map(|id| marker("track", id));
    let batch: Vec<(Option<&Marker<'_>>, &[Write])> =
        markers.iter().zip(&writes).map(|(m, w)| (Some(m), w.as_slice())).collect();

    let outcomes = app.store.apply_batch("track", &batch).await.expect("the batch commits");

    assert!(matches!(outcomes[0], Ok(Applied::Done)), "{outcomes:?}");
    assert!(matches!(&outcomes[1], Err(err) if !err.is_transient()), "{outcomes:?}");
    assert!(matches!(outcomes[2], Ok(Applied::Done)), "{outcomes:?}");
    for (i, (id, request)) in ids.iter().zip(&requests).enumerate() {
        let status = app.store.request_status(*request).await.unwrap().unwrap();
        let marked = app.store.processed("track", *id).await.unwrap().is_some();
        let audited = failed_events(&app, *request).await;
        if i == 1 {
            assert_eq!((status.as_str(), marked, audited), ("awaiting_approval", false, 0), "nothing of it");
        } else {
            assert_eq!((status.as_str(), marked, audited), ("failed", true, 1), "message {i}, once");
        }
    }
}

#[tokio::test]
async fn a_marker_the_database_refuses_is_found_among_its_batch_and_fails_alone() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let requests = requests_under_way(&app, 3).await;
    let writes: Vec<Vec<Write>> = requests.iter().map(|r| fail(*r, "gave up")).collect();
    let ids = [MessageId::random(), MessageId::random(), MessageId::random()];
    let mut markers = ids.map(|id| marker("track", id));
    // The markers of a batch go in as one statement; a NUL in one message's outputs (JSON's
    // \u0000, which PostgreSQL refuses in jsonb) makes the server refuse all of it.
    markers[1].outputs = serde_json::json!(["gave\u{0}up"]);
    let batch: Vec<(Option<&Marker<'_>>, &[Write])> =
        markers.iter().zip(&writes).map(|(m, w)| (Some(m), w.as_slice())).collect();

    let outcomes = app.store.apply_batch("track", &batch).await.expect("the batch commits");

    assert!(matches!(&outcomes[1], Err(err) if !err.is_transient()), "{outcomes:?}");
    assert!(matches!(outcomes[..], [Ok(Applied::Done), _, Ok(Applied::Done)]), "{outcomes:?}");
    for (i, (id, request)) in ids.iter().zip(&requests).enumerate() {
        let status = app.store.request_status(*request).await.unwrap().unwrap();
        let marked = app.store.processed("track", *id).await.unwrap().is_some();
        let audited = failed_events(&app, *request).await;
        let expected = if i == 1 { ("awaiting_approval", false, 0) } else { ("failed", true, 1) };
        assert_eq!((status.as_str(), marked, audited), expected, "message {i}");
    }
}

#[tokio::test]
async fn copies_of_a_message_in_one_batch_are_applied_once() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    let requests = requests_under_way(&app, 2).await;
    let writes = [fail(requests[0], "gave up"), fail(requests[0], "gave up"), fail(requests[1], "gave up")];
    let (copied, other) = (MessageId::random(), MessageId::random());
    let mut markers = [marker("track", copied), marker("track", copied), marker("track", other)];
    markers[0].outputs = serde_json::json!(["the first copy's outputs"]);
    let batch: Vec<(Option<&Marker<'_>>, &[Write])> =
        markers.iter().zip(&writes).map(|(m, w)| (Some(m), w.as_slice())).collect();

    let outcomes = app.store.apply_batch("track", &batch).await.expect("the batch commits");

    assert!(matches!(outcomes[0], Ok(Applied::Done)), "{outcomes:?}");
    assert_eq!(outcomes[1].as_ref().ok(), Some(&Applied::Duplicate(markers[0].outputs.clone())));
    assert!(matches!(outcomes[2], Ok(Applied::Done)), "{outcomes:?}");
    assert_eq!(failed_events(&app, requests[0]).await, 1, "one failure, audited once");

    // Again, as a redelivery would: both copies are duplicates now, with what was recorded.
    let again = app.store.apply_batch("track", &batch[..2]).await.unwrap();
    for outcome in &again {
        assert_eq!(outcome.as_ref().ok(), Some(&Applied::Duplicate(markers[0].outputs.clone())));
    }
    assert_eq!(failed_events(&app, requests[0]).await, 1);
}

#[tokio::test]
async fn a_delivered_input_whose_marker_is_refused_leaves_the_rest_of_its_batch_recorded() {
    let app = spawn_app().await;
    let deliver = |_: usize| std::future::ready(Ok::<(), String>(()));
    let (good, bad, other) = (MessageId::random(), MessageId::random(), MessageId::random());
    let mut markers = [marker("dispatch", good), marker("dispatch", bad), marker("dispatch", other)];
    markers[1].outputs = serde_json::json!(["a\u{0}b"]);
    let batch: Vec<(Marker<'_>, &[Write])> = markers.iter().map(|m| (m.clone(), &[][..])).collect();

    let outcomes = app.store.deliver_batch("dispatch", &batch, deliver).await.expect("the batch commits");

    assert!(matches!(outcomes[..], [Delivery::Done, Delivery::Refused(_), Delivery::Done]), "{outcomes:?}");
    for (id, recorded) in [(good, true), (bad, false), (other, true)] {
        assert_eq!(app.store.processed("dispatch", id).await.unwrap().is_some(), recorded, "{id}");
    }
}

#[tokio::test]
async fn messages_that_conflict_together_are_left_out_together_and_the_rest_commits() {
    let app = spawn_app().await;
    let request = |request_id: RequestId, text: &str| {
        vec![Write::Request(write::Request {
            meta: RequestMeta {
                request_id,
                text: text.into(),
                submitted_by: None,
                priority: 5,
                auto_approve: false,
            },
            traceparent: None,
        })]
    };
    let taken = [RequestId::random(), RequestId::random()];
    for id in taken {
        let recorded = app.store.apply("decompose", None, &request(id, "Deploy Gitea")).await.unwrap();
        assert_eq!(recorded, Applied::Done);
    }
    // Two messages reuse a recorded id with another text (each a conflict), between three new ones;
    // their statements reach the server together.
    let fresh = [RequestId::random(), RequestId::random(), RequestId::random()];
    let writes = [
        request(fresh[0], "Deploy Uptime Kuma"),
        request(taken[0], "Deploy Jellyfin"),
        request(fresh[1], "Deploy Vaultwarden"),
        request(taken[1], "Deploy Nextcloud"),
        request(fresh[2], "Deploy Immich"),
    ];
    let ids: Vec<MessageId> = writes.iter().map(|_| MessageId::random()).collect();
    let markers: Vec<Marker<'_>> = ids.iter().map(|id| marker("decompose", *id)).collect();
    let batch: Vec<(Option<&Marker<'_>>, &[Write])> =
        markers.iter().zip(&writes).map(|(m, w)| (Some(m), w.as_slice())).collect();

    let outcomes = app.store.apply_batch("decompose", &batch).await.expect("the batch commits");

    for (i, outcome) in outcomes.iter().enumerate() {
        let conflict = i == 1 || i == 3;
        match outcome {
            Ok(Applied::Conflict(reason)) if conflict => assert!(reason.contains("another text"), "{reason}"),
            Ok(Applied::Done) if !conflict => {}
            other => panic!("message {i}: {other:?}"),
        }
        let marked = app.store.processed("decompose", ids[i]).await.unwrap().is_some();
        assert_eq!(marked, !conflict, "marker of message {i}");
    }
    for id in fresh {
        assert_eq!(app.store.request_status(id).await.unwrap().map(|s| s.as_str()), Some("received"));
        let events = app.store.audit_events(id).await.unwrap();
        assert_eq!(events.iter().filter(|(_, e, _)| e == "request.received").count(), 1, "{events:?}");
    }
    for id in taken {
        let report = app.store.report(id).await.unwrap().unwrap();
        assert_eq!(report.text, "Deploy Gitea", "the recorded text stays");
    }
}

#[tokio::test]
async fn capacity_is_given_back_without_waiting_for_a_reservation_that_holds_the_agent() {
    let app = spawn_app_with(|c| c.approval.auto_approve_below = None).await;
    app.register_agent("homelab-1", &["deployment", "shell", "monitoring", "notify"], 2, &[]).await;
    let mut routed = Vec::new();
    for text in ["Deploy Gitea to the homelab", "Deploy Jellyfin to the homelab"] {
        let id = app.submit(text, false).await;
        let report = app.wait_for(id, |r| r.status.as_str() == "awaiting_approval").await;
        let plan = report.plan.as_ref().unwrap();
        let write = route_to("homelab-1", id, plan.plan_id, plan.tasks[0].id);
        assert_eq!(app.store.apply("route", None, &[write]).await.unwrap(), Applied::Done);
        routed.push((id, plan.plan_id, plan.tasks[1].id));
    }
    let in_flight = |agents: Vec<switchyard::model::domain::Agent>| agents[0].in_flight;
    assert_eq!(in_flight(app.store.agents().await.unwrap()), 2, "both slots taken");

    // Another transaction holds the agent's row, as a reservation does until its commit.
    let (mut client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let holder = client.transaction().await.unwrap();
    holder.execute("SELECT 1 FROM agents WHERE id = 'homelab-1' FOR UPDATE", &[]).await.unwrap();

    // Cancelling a request gives its slot back; it must not wait for the row.
    let cancel =
        Write::Cancel(write::Cancel { request_id: routed[0].0, by: "tests".into(), reason: "no".into() });
    let applied =
        tokio::time::timeout(std::time::Duration::from_secs(30), app.store.apply("cancel", None, &[cancel]))
            .await
            .expect("giving capacity back waits for no reservation");
    assert_eq!(applied.unwrap(), Applied::Done);
    assert_eq!(in_flight(app.store.agents().await.unwrap()), 1, "readers see the slot given back");
    holder.rollback().await.unwrap();

    // The next reservation folds it in: one slot free, then none, then a conflict.
    let (id, plan_id, task_id) = routed[1];
    let again = app.store.apply("route", None, &[route_to("homelab-1", id, plan_id, task_id)]).await.unwrap();
    assert_eq!(again, Applied::Done);
    assert_eq!(in_flight(app.store.agents().await.unwrap()), 2);
    let third = app.submit("Deploy Vaultwarden to the homelab", false).await;
    let report = app.wait_for(third, |r| r.status.as_str() == "awaiting_approval").await;
    let plan = report.plan.as_ref().unwrap();
    let write = route_to("homelab-1", third, plan.plan_id, plan.tasks[0].id);
    let full = app.store.apply("route", None, &[write]).await.unwrap();
    assert!(matches!(full, Applied::Conflict(reason) if reason.contains("no spare capacity")));
    assert_eq!(in_flight(app.store.agents().await.unwrap()), 2, "never more than its capacity");
}
