//! What the command line does, as a library API: submit a request, approve or reject a plan,
//! follow a request until it settles. The binary only parses arguments and prints.

use std::collections::HashSet;

use chrono::Utc;
use uuid::Uuid;

use crate::broker::{self, Broker, Outgoing};
use crate::domain::{PlanStatus, RequestStatus, TaskStatus};
use crate::ids::{MessageId, PlanId, RequestId};
use crate::store::{self, ApprovalOutcome, RequestReport, Store};
use crate::wire::{Envelope, RouteTasks, SCHEMA_VERSION, SubmitRequest};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Broker(#[from] broker::Error),
    /// A publish came back unroutable: nothing declared the queue in this namespace.
    #[error(
        "no queue {queue} takes {what}: is the namespace right? `switchyard topology` or a worker declares it"
    )]
    NoQueue { queue: String, what: &'static str },
}

/// Publishes `outgoing` (mandatory), naming the queue when it does not exist.
async fn publish(broker: &Broker, outgoing: &Outgoing, what: &'static str) -> Result<(), Error> {
    broker.publish(outgoing).await.map_err(|err| match err {
        broker::Error::Unroutable { .. } => Error::NoQueue { queue: outgoing.routing_key.clone(), what },
        err => err.into(),
    })
}

/// Publishes a request to `<namespace>.requests`, as any client may, and returns its id. A
/// request without an id gets a fresh one, so that the caller can follow it. Fails if the queue
/// does not exist (a wrong namespace, say), instead of letting the broker drop the request.
pub async fn submit(broker: &Broker, mut request: SubmitRequest) -> Result<RequestId, Error> {
    let request_id = *request.request_id.get_or_insert_with(RequestId::random);
    let mut outgoing = Outgoing::to_queue(
        broker.names().requests(),
        serde_json::to_vec(&request).expect("requests serialize"),
    );
    outgoing.priority = request.priority;
    outgoing.message_id = Some(request_id.to_string());
    publish(broker, &outgoing, "requests").await?;
    Ok(request_id)
}

/// The message id of a plan's approval: the same for every approval of one plan, so that
/// approving twice routes once.
fn approval_message_id(plan_id: PlanId) -> MessageId {
    MessageId::from_uuid(Uuid::new_v5(&plan_id.as_uuid(), b"approved"))
}

/// Approves a plan that awaits approval and sends it to routing. Approving an approved plan
/// again publishes the same message again, which routing ignores: safe to retry.
pub async fn approve(
    store: &Store,
    broker: &Broker,
    plan_id: PlanId,
    by: &str,
) -> Result<ApprovalOutcome, Error> {
    let outcome = store.decide_approval(plan_id, true, by, "approved by a person").await?;
    let envelope = Envelope {
        message_id: approval_message_id(plan_id),
        schema_version: SCHEMA_VERSION,
        request_id: outcome.request_id,
        causation_id: None,
        timestamp: Utc::now(),
        payload: RouteTasks { plan_id, priority: outcome.priority, approved_by: by.to_owned() },
    };
    let mut outgoing =
        Outgoing::to_queue(broker.names().queue("route"), serde_json::to_vec(&envelope).expect("serializes"));
    outgoing.message_id = Some(envelope.message_id.to_string());
    outgoing.priority = Some(outcome.priority);
    publish(broker, &outgoing, "approved plans").await?;
    Ok(outcome)
}

/// Rejects a plan that awaits approval, with a reason.
pub async fn reject(
    store: &Store,
    plan_id: PlanId,
    by: &str,
    reason: &str,
) -> Result<ApprovalOutcome, Error> {
    Ok(store.decide_approval(plan_id, false, by, reason).await?)
}

/// Where a request stands for someone waiting on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Still moving (or waiting for a person), with a one-line description.
    Waiting(String),
    /// Every task released so far is confirmed in its agent's queue.
    Dispatched,
    /// Every task succeeded.
    Completed,
    /// It will not go further, and why.
    Failed(String),
}

/// Reads a report as progress. Pure.
pub fn progress(report: &RequestReport) -> Progress {
    match report.status {
        RequestStatus::Failed | RequestStatus::Rejected => {
            return Progress::Failed(
                report.failure_reason.clone().unwrap_or_else(|| report.status.to_string()),
            );
        }
        RequestStatus::Completed => return Progress::Completed,
        RequestStatus::AwaitingApproval => {
            let plan = report.plan.as_ref().map(|p| p.plan_id.to_string()).unwrap_or_default();
            return Progress::Waiting(format!("awaiting approval: switchyard approve {plan}"));
        }
        _ => {}
    }
    let Some(plan) = report.plan.as_ref().filter(|p| p.status == PlanStatus::Approved) else {
        return Progress::Waiting(report.status.to_string());
    };
    let succeeded: HashSet<_> =
        plan.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).map(|t| t.id).collect();
    let waiting_release = plan
        .tasks
        .iter()
        .any(|t| t.status == TaskStatus::Pending && t.depends_on.iter().all(|d| succeeded.contains(d)));
    let routed = plan.tasks.iter().filter(|t| t.status == TaskStatus::Routed).count();
    if let Some(failed) = plan.tasks.iter().find(|t| t.status == TaskStatus::DispatchFailed) {
        return Progress::Failed(format!(
            "task {} could not be dispatched: {}",
            failed.key,
            failed.reason.as_deref().unwrap_or("no reason recorded")
        ));
    }
    if waiting_release || routed > 0 {
        let dispatched = plan.tasks.iter().filter(|t| t.status == TaskStatus::Dispatched).count();
        return Progress::Waiting(format!(
            "routing and dispatching: {dispatched} dispatched, {routed} routed"
        ));
    }
    Progress::Dispatched
}
