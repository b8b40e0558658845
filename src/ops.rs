//! What the command line does, as a library API: submit a request, approve or reject a plan,
//! cancel a request, follow a request until it settles, say why a task went where it went. The
//! binary only parses arguments and prints.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tracing::Instrument;
use uuid::Uuid;

use crate::broker::{self, Broker, Outgoing};
use crate::decisions::routing::{
    Candidate, Choice, Placement, Router, RoutingPolicy, Terms, Verdict, choice, waiting_reason,
};
use crate::model::domain::{PlanStatus, RequestStatus, TaskStatus};
use crate::model::ids::{AgentId, MessageId, PlanId, RequestId, TaskId};
use crate::model::wire::{Envelope, RouteTasks, SubmitRequest, TaskAbort, Wake};
use crate::pipeline::stages::External;
use crate::pipeline::topology::StageQueue;
use crate::store::{self, ApprovalOutcome, RequestReport, Stopped, Store};
use crate::telemetry::trace;

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
///
/// The request starts a trace (a span `submit`), which its stages and its agents continue.
pub async fn submit(broker: &Broker, mut request: SubmitRequest) -> Result<RequestId, Error> {
    let request_id = *request.request_id.get_or_insert_with(RequestId::random);
    let span = tracing::info_span!("submit", request_id = %request_id, trace_id = tracing::field::Empty);
    if let Some(trace_id) = trace::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    let mut outgoing = Outgoing::json(broker.names().requests(), request_id, &request);
    outgoing.priority = request.priority;
    trace::inject(&span, &mut outgoing.headers);
    publish(broker, &outgoing, "requests").instrument(span).await?;
    Ok(request_id)
}

/// The message id of a plan's approval: the same for every approval of one plan, so that
/// approving twice routes once.
fn approval_message_id(plan_id: PlanId) -> MessageId {
    MessageId::from_uuid(Uuid::new_v5(&plan_id.as_uuid(), b"approved"))
}

/// Approves a plan that awaits approval and sends it to routing. Approving an approved plan
/// again publishes the same message again, which routing ignores: safe to retry. The approval
/// is a span (`approve`) in the request's trace, which its routing continues.
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
    let span = tracing::info_span!(
        "approve",
        request_id = %outcome.request_id,
        plan_id = %plan_id,
        trace_id = tracing::field::Empty
    );
    if let Some(traceparent) = &outcome.traceparent {
        trace::adopt(&span, &BTreeMap::from([(trace::TRACEPARENT.to_owned(), traceparent.clone())]));
    }
    if let Some(trace_id) = trace::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    trace::inject(&span, &mut outgoing.headers);
    publish(broker, &outgoing, "approved plans").instrument(span).await?;
    Ok(outcome)
}

/// Rejects a plan that awaits approval, with a reason.
pub async fn reject(
    store: &Store,
    plan_id: PlanId,
    by: &str,
    reason: &str,
) -> Result<ApprovalOutcome, Error> {
    let outcome = store.decide_approval(plan_id, false, by, reason).await?;
    tracing::info!(request_id = %outcome.request_id, %by, %reason, "request rejected");
    Ok(outcome)
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
    if !cancelled.already {
        tracing::info!(request_id = %request_id, %by, %reason, "request cancelled");
    }
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

/// Why a task went where it went, attempt by attempt (`switchyard why`): every candidate's
/// verdict as recorded, the terms of every score, and what was chosen and why; for the attempt
/// the task is waiting in at present, and with `rescore` for every attempt, the same decision
/// against the fleet as it stands now. Reads only.
#[derive(Debug, Clone, Serialize)]
pub struct TaskWhy {
    pub request_id: RequestId,
    pub plan_id: PlanId,
    pub task_id: TaskId,
    pub key: String,
    pub work_type: String,
    pub status: TaskStatus,
    /// As recorded on the task: its routing reason, why it waits, or why it failed.
    pub reason: Option<String>,
    /// When the fleet was read for the decisions made again now.
    pub now: DateTime<Utc>,
    pub attempts: Vec<AttemptWhy>,
}

/// One attempt of a task.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptWhy {
    pub attempt: u32,
    /// When it began to wait in line for this attempt, if it did, and why.
    pub waited: Option<Waited>,
    /// Its routing decision, once one was made.
    pub decision: Option<DecisionWhy>,
    pub dispatch: Option<store::DispatchRow>,
    pub results: Vec<store::ResultRow>,
    /// The same decision made again against today's fleet, writing nothing: for the attempt the
    /// task is waiting in at present, and for every attempt when asked (`rescore`).
    pub now: Option<Judgement>,
}

/// A task that began to wait in line: why, and every candidate's verdict then.
#[derive(Debug, Clone, Serialize)]
pub struct Waited {
    pub since: DateTime<Utc>,
    pub reason: String,
    #[serde(serialize_with = "with_terms")]
    pub candidates: Vec<Candidate>,
}

/// A recorded routing decision.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionWhy {
    pub decided_at: DateTime<Utc>,
    /// `None` when the task gave up waiting.
    pub agent_id: Option<AgentId>,
    pub score: Option<f64>,
    /// As recorded.
    pub reason: String,
    pub reserved_capacity: bool,
    pub choice: Choice,
    /// False when the decision was recorded before the weights of the scores were kept: its
    /// scored candidates have their terms' values only.
    pub terms_recorded: bool,
    #[serde(serialize_with = "with_terms")]
    pub candidates: Vec<Candidate>,
}

/// What routing makes of the attempt now.
#[derive(Debug, Clone, Serialize)]
pub struct Judgement {
    /// Where it would go; `None`: it would wait.
    pub agent_id: Option<AgentId>,
    /// Why: the route's reason, or why it would wait, in a few words.
    pub reason: String,
    pub choice: Choice,
    #[serde(serialize_with = "with_terms")]
    pub candidates: Vec<Candidate>,
}

/// Candidates as recorded, each scored one with its terms worked out (value, weight,
/// contribution) when its weights are known.
fn with_terms<S: serde::Serializer>(candidates: &[Candidate], serializer: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct WithTerms<'a> {
        #[serde(flatten)]
        candidate: &'a Candidate,
        #[serde(skip_serializing_if = "Option::is_none")]
        terms: Option<Terms>,
    }
    serializer.collect_seq(
        candidates.iter().map(|candidate| WithTerms { candidate, terms: candidate.verdict.terms() }),
    )
}

/// Why `task_id` went where it went (see [`TaskWhy`]); `None` if there is no such task. With
/// `rescore`, every decision is made again against the agents' rows as they are `now` and
/// `policy`; nothing is written.
pub async fn why(
    store: &Store,
    task_id: TaskId,
    policy: &RoutingPolicy,
    now: DateTime<Utc>,
    rescore: bool,
) -> Result<Option<TaskWhy>, Error> {
    let Some(trail) = store.task_trail(task_id).await? else { return Ok(None) };
    let corrupt = |what: String| Error::Store(store::Error::Corrupt(what));
    let waits_now = (trail.state.status == TaskStatus::Waiting).then_some(trail.state.attempt + 1);
    let mut numbers: BTreeSet<u32> = (trail.decisions.iter().map(|d| d.attempt))
        .chain(trail.waits.iter().map(|w| w.attempt))
        .chain(trail.dispatches.iter().map(|d| d.attempt))
        .chain(trail.results.iter().map(|r| r.attempt))
        .chain(waits_now)
        .collect();
    if trail.state.attempt > 0 {
        numbers.insert(trail.state.attempt);
    }
    let agents = if rescore || waits_now.is_some() { store.agents().await? } else { Vec::new() };
    let external = External::of(trail.fallback.as_ref());
    let task = external.as_ref().map_or_else(|| trail.task.clone(), |e| e.adapt(&trail.task));
    let mut attempts = Vec::new();
    for attempt in numbers {
        let parse = |candidates: &serde_json::Value| {
            serde_json::from_value::<Vec<Candidate>>(candidates.clone())
                .map_err(|e| corrupt(format!("the candidates of task {task_id} attempt {attempt}: {e}")))
        };
        let waited = match trail.waits.iter().rfind(|w| w.attempt == attempt) {
            Some(w) => {
                Some(Waited { since: w.since, reason: w.reason.clone(), candidates: parse(&w.candidates)? })
            }
            None => None,
        };
        let decision = match trail.decisions.iter().find(|d| d.attempt == attempt) {
            Some(d) => {
                let agent_id =
                    d.agent_id.as_deref().map(AgentId::parse).transpose().map_err(|e| {
                        corrupt(format!("the agent of task {task_id} attempt {attempt}: {e}"))
                    })?;
                let candidates = parse(&d.candidates)?;
                let terms_recorded =
                    candidates.iter().all(|c| !matches!(c.verdict, Verdict::Scored { weights: None, .. }));
                Some(DecisionWhy {
                    decided_at: d.decided_at,
                    choice: choice(agent_id.as_ref(), &candidates),
                    agent_id,
                    score: d.score,
                    reason: d.reason.clone(),
                    reserved_capacity: d.reserved_capacity,
                    terms_recorded,
                    candidates,
                })
            }
            None => None,
        };
        let judged_now = waits_now == Some(attempt) || (rescore && (decision.is_some() || waited.is_some()));
        let judged = judged_now.then(|| {
            // As routing excludes them: the agents that failed the attempts before this one.
            let failed: BTreeSet<AgentId> = (trail.results.iter())
                .filter(|r| !r.success && r.attempt < attempt)
                .filter_map(|r| AgentId::parse(r.agent_id.as_str()).ok())
                .collect();
            let ask = crate::pipeline::stages::ask(&task, attempt, external.as_ref(), Some(&failed), policy);
            judge_now(&task, ask, &agents, now, policy)
        });
        attempts.push(AttemptWhy {
            attempt,
            waited,
            decision,
            dispatch: trail.dispatches.iter().find(|d| d.attempt == attempt).cloned(),
            results: trail.results.iter().filter(|r| r.attempt == attempt).cloned().collect(),
            now: judged,
        });
    }
    Ok(Some(TaskWhy {
        request_id: trail.request_id,
        plan_id: trail.plan_id,
        task_id,
        key: trail.state.key,
        work_type: trail.state.work_type,
        status: trail.state.status,
        reason: trail.state.reason,
        now,
        attempts,
    }))
}

/// What routing would make of `task` now, over `agents`, writing nothing.
fn judge_now(
    task: &crate::model::domain::Task,
    ask: crate::decisions::routing::Ask<'_>,
    agents: &[crate::model::domain::Agent],
    now: DateTime<Utc>,
    policy: &RoutingPolicy,
) -> Judgement {
    match Router::new(agents, now, policy).place(task, ask) {
        Placement::Routed(route) => Judgement {
            choice: choice(Some(&route.agent_id), &route.candidates),
            agent_id: Some(route.agent_id),
            reason: route.reason,
            candidates: route.candidates,
        },
        Placement::Waits(candidates) => Judgement {
            agent_id: None,
            reason: waiting_reason(&candidates),
            choice: Choice::NoAgent,
            candidates,
        },
    }
}
