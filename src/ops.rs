//! What the command line does, as a library API: submit a request, approve or reject a plan,
//! cancel a request, follow a request until it settles. The binary only parses arguments and
//! prints.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::broker::{self, Broker, Outgoing};
use crate::model::domain::{PlanStatus, RequestStatus, TaskStatus};
use crate::model::ids::{AgentId, MessageId, PlanId, RequestId};
use crate::model::wire::{Envelope, RouteTasks, SubmitRequest, TaskAbort, Wake};
use crate::pipeline::topology::StageQueue;
use crate::store::{self, ApprovalOutcome, RequestReport, Stopped, Store};

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
    let mut outgoing = Outgoing::json(broker.names().requests(), request_id, &request);
    outgoing.priority = request.priority;
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
    let route = RouteTasks { plan_id, priority: outcome.priority, approved_by: by.to_owned() };
    let envelope = Envelope::new(approval_message_id(plan_id), outcome.request_id, Utc::now(), route);
    let mut outgoing = Outgoing::json(broker.names().of(StageQueue::Route), envelope.message_id, &envelope);
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

/// What a cancellation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancellation {
    /// It was cancelled before; nothing was changed (the stops were sent again).
    pub already: bool,
    /// The attempts that agents held, told to stop.
    pub stopped: Vec<Stopped>,
    /// The agents that could not be told, having no control queue (not started yet, or started
    /// before agents had one): their attempts run to their end, and their results are ignored.
    pub unreachable: Vec<AgentId>,
}

/// Cancels a request, as `by`, with `reason` (see [`Store::cancel`]): what it had not started
/// never runs, and each attempt that an agent holds is stopped there, through the agent's
/// control queue. Safe to repeat: a request cancelled already is left as it is and its stops are
/// sent again; one that ended otherwise is refused ([`store::Error::Refused`]), saying how.
pub async fn cancel(
    store: &Store,
    broker: &Broker,
    request_id: RequestId,
    by: &str,
    reason: &str,
) -> Result<Cancellation, Error> {
    let cancelled = store.cancel(request_id, by, reason).await?;
    let mut unreachable = Vec::new();
    for stop in &cancelled.stopped {
        let abort = TaskAbort {
            plan_id: stop.plan_id,
            task_id: stop.task_id,
            attempt: stop.attempt,
            agent_id: stop.agent_id.clone(),
            reason: format!("request {request_id} cancelled by {by}: {reason}"),
        };
        let key = format!("abort:{}:{}", stop.task_id, stop.attempt);
        let message_id = MessageId::from_uuid(Uuid::new_v5(&request_id.as_uuid(), key.as_bytes()));
        let envelope = Envelope::new(message_id, request_id, Utc::now(), abort);
        let queue = broker.names().agent_control_queue(&stop.agent_id);
        let outgoing = Outgoing::json(queue, envelope.message_id, &envelope);
        match broker.publish(&outgoing).await {
            Ok(()) => {}
            Err(broker::Error::Unroutable { .. }) => unreachable.push(stop.agent_id.clone()),
            Err(err) => return Err(err.into()),
        }
    }
    // Their slots are free: tasks waiting in line may take them.
    let wake = Wake { message_id: MessageId::random(), cause: "cancel".into(), at: Utc::now() };
    let outgoing = Outgoing::json(broker.names().of(StageQueue::Place), wake.message_id, &wake);
    publish(broker, &outgoing, "wake-ups of the scheduler").await?;
    unreachable.sort();
    unreachable.dedup();
    Ok(Cancellation { already: cancelled.already, stopped: cancelled.stopped, unreachable })
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
        RequestStatus::Failed | RequestStatus::Rejected | RequestStatus::Cancelled => {
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
    let waiting = plan.tasks.iter().filter(|t| t.status == TaskStatus::Waiting).count();
    if let Some(failed) = plan.tasks.iter().find(|t| t.status == TaskStatus::DispatchFailed) {
        return Progress::Failed(format!(
            "task {} could not be dispatched: {}",
            failed.key,
            failed.reason.as_deref().unwrap_or("no reason recorded")
        ));
    }
    if waiting_release || routed > 0 || waiting > 0 {
        let dispatched = plan.tasks.iter().filter(|t| t.status == TaskStatus::Dispatched).count();
        return Progress::Waiting(format!(
            "routing and dispatching: {dispatched} dispatched, {routed} routed, {waiting} waiting for an agent"
        ));
    }
    Progress::Dispatched
}

/// Why each waiting task of `report` waits, as things stand now: its verdict on every candidate
/// agent of the fleet, summed up in a few words ("2 capable agents busy (2/2, 2/2)"). What was
/// stored when it began to wait may be out of date by now.
pub async fn waiting_reasons(
    store: &Store,
    report: &RequestReport,
    policy: &crate::decisions::routing::RoutingPolicy,
    now: DateTime<Utc>,
) -> Result<HashMap<crate::model::ids::TaskId, String>, Error> {
    let Some(plan) = &report.plan else { return Ok(HashMap::new()) };
    let waiting: Vec<&store::TaskState> =
        plan.tasks.iter().filter(|t| t.status == TaskStatus::Waiting).collect();
    if waiting.is_empty() {
        return Ok(HashMap::new());
    }
    let Some(stored) = store.plan(plan.plan_id).await? else { return Ok(HashMap::new()) };
    let agents = store.agents().await?;
    let failed = store.failed_agents(plan.plan_id).await?;
    let external = crate::pipeline::stages::External::of(plan.fallback.as_ref());
    let router = crate::decisions::routing::Router::new(&agents, now, policy);
    let mut reasons = HashMap::new();
    for state in waiting {
        let Some(task) = stored.plan.task(state.id) else { continue };
        let task = external.as_ref().map_or_else(|| task.clone(), |e| e.adapt(task));
        let ask = crate::pipeline::stages::ask(
            &task,
            state.attempt + 1,
            external.as_ref(),
            failed.get(&task.id),
            policy,
        );
        reasons.insert(task.id, crate::decisions::routing::waiting_reason(&router.judge(&task, ask)));
    }
    Ok(reasons)
}
