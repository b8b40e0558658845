//! The state changes that stages decide and the store applies. A stage returns a list of these
//! (pure data); `store` turns them into SQL inside one transaction, together with the message's
//! idempotency marker and an audit-log row per change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::decisions::fallback::{FallbackDecision, Infeasible};
use crate::decisions::routing::Candidate;
use crate::model::ids::{AgentId, DecisionId, MessageId, PlanId, RequestId, TaskId};
use crate::model::wire::{Heartbeat, RequestMeta, TaskResult, TokenUsage};
use crate::understanding::complexity::Complexity;

/// One attempt of a task, with the plan and the request it belongs to: the key of the writes about
/// an attempt that would otherwise repeat these four (a routing decision names its task in its
/// route, a result in the result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Attempt {
    pub request_id: RequestId,
    pub plan_id: PlanId,
    pub task_id: TaskId,
    /// 1 for the first attempt.
    pub number: u32,
}

/// Quota to take from a provider, atomically, or not at all, in the window that `window_start`
/// falls in (of the provider's window kind as stored: normally the window that starts there).
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub provider: String,
    pub amount_micros: i64,
    pub window_start: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A new request; nothing happens if one with its id exists.
    Request(write::Request),
    Decomposition(write::Decomposition),
    /// A permanent failure of the request, with its reason.
    RequestFailed(write::RequestFailed),
    /// A new plan, with its complexity term by term, the tasks that no agent could run, and the
    /// basis of each task's estimated duration that did not come from the catalog.
    Plan(write::Plan),
    /// The plan-level external-AI decision. With a reservation, the store applies it only if the
    /// quota still covers it in the reservation's window (limit - reserved - spent >= amount),
    /// else reports a conflict and the stage decides again. Of two decisions racing for the last
    /// of a quota, exactly one reserves it.
    Fallback(write::Fallback),
    AwaitingApproval(write::AwaitingApproval),
    /// A person's or the policy's verdict on a plan. A rejection settles the plan's quota
    /// reservation at once, all of it going back (audited as `quota.released`).
    Approval(write::Approval),
    /// A routing decision. When the route reserves capacity, the store applies it only if the
    /// agent still has room, else reports a conflict and the stage decides again; likewise if the
    /// task is no longer pending or waiting at the attempt before (routed by another decision,
    /// cancelled).
    Route(write::Route),
    /// A ready task that no agent can take now waits in line for `attempt`: `reason` in a few
    /// words, every candidate's verdict in the audit log. Its place in line (its turn among the
    /// waiting tasks of `priority`) is given by the store. Only a pending task at the attempt
    /// before starts to wait: anything else is a conflict.
    TaskWaiting(write::TaskWaiting),
    /// A waiting task gave up: it waited longer than allowed. Recorded as the routing decision of
    /// `attempt`, which chose no agent, with every candidate's verdict; the task fails. Only a
    /// task still waiting: anything else is a conflict.
    WaitExpired(write::WaitExpired),
    /// Someone cancelled the request: it and its plan end `cancelled`, its tasks that had not
    /// finished are cancelled (the capacity of those on an agent given back), its quota
    /// reservation is settled. A request cancelled already is left as it is; one that ended
    /// otherwise is a conflict.
    Cancel(write::Cancel),
    /// An attempt ended: its agent reported, or its lease expired. Gives back the capacity that
    /// the attempt's routing decision reserved and counts in the agent's record. A second result
    /// for the same attempt is a conflict: the stage decides again and finds it finished. Guarded
    /// by the plan's version as the stage saw it: a result of the same plan recorded meanwhile is
    /// a conflict too, so two results at once are decided one after the other.
    TaskFinished(write::TaskFinished),
    /// A failed attempt that will be tried again, on another agent: back to pending.
    TaskRetry(write::TaskRetry),
    /// A task failed for good; the tasks that depend on it (directly or not) are cancelled.
    TaskFailed(write::TaskFailed),
    /// The plan and its request finished: completed, or failed with a reason. Settles the plan's
    /// quota reservation, if it has one: what was reserved and not spent goes back to its window
    /// (audited as `quota.settled`). Once: a second settlement changes nothing. The plan's
    /// `QuotaUsed` writes go before it (a use recorded after settlement still counts as spent).
    PlanFinished(write::PlanFinished),
    /// What an attempt of a task sent to an external provider really used, as the provider's API
    /// reported it, and what that cost. The cost counts as spent in the window of the plan's
    /// reservation (or, without a reservation of this provider, in the provider's window that
    /// `used_at` falls in), and as much of it as the reservation still holds is taken off what is reserved:
    /// use beyond the reservation is spent all the same, the reservation's part just reaches 0.
    /// Once per (task, attempt): a redelivered result counts nothing again. Audited as
    /// `quota.used`.
    QuotaUsed(write::QuotaUsed),
    /// The broker confirmed the task into the agent's queue.
    Dispatched(write::Dispatched),
    /// No publish into the agent's queue succeeded; capacity reserved by the decision is released.
    DispatchFailed(write::DispatchFailed),
    /// An agent's heartbeat, received at `received_at`.
    Agent(write::Agent),
}

impl Write {
    /// A new request keeps `traceparent` (see [`write::Request::traceparent`]); other writes
    /// have none to keep.
    pub fn keep_trace(&mut self, traceparent: &str) {
        if let Write::Request(request) = self {
            request.traceparent = Some(traceparent.to_owned());
        }
    }
}

/// The data of each kind of [`Write`], one type each, so that the store's function for a kind
/// of write takes exactly that kind.
pub mod write {
    use super::*;
    use crate::decisions::routing;
    use crate::model::domain;

    #[derive(Debug, Clone, PartialEq)]
    pub struct Request {
        pub meta: RequestMeta,
        /// The trace context (a W3C `traceparent`) of the handling that records the request: what
        /// is done for it later on another message's behalf continues its trace. Not the
        /// stage's to decide: the runner keeps its handling's here ([`Write::keep_trace`]).
        pub traceparent: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Decomposition {
        pub request_id: RequestId,
        pub decomposition: domain::Decomposition,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct RequestFailed {
        pub request_id: RequestId,
        pub reason: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Plan {
        pub plan: domain::Plan,
        pub complexity: Complexity,
        pub infeasible: Vec<Infeasible>,
        pub duration_basis: BTreeMap<TaskId, String>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Fallback {
        pub request_id: RequestId,
        pub decision: FallbackDecision,
        pub reserve: Option<Reservation>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct AwaitingApproval {
        pub request_id: RequestId,
        pub plan_id: PlanId,
        pub reason: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Approval {
        pub request_id: RequestId,
        pub plan_id: PlanId,
        pub approved: bool,
        pub by: String,
        pub reason: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Route {
        pub request_id: RequestId,
        pub plan_id: PlanId,
        pub attempt: u32,
        pub decision_id: DecisionId,
        pub route: routing::Route,
        /// When the attempt became ready: released now, or when it began to wait.
        pub ready_at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct TaskWaiting {
        pub attempt: Attempt,
        pub priority: u8,
        pub since: DateTime<Utc>,
        pub reason: String,
        pub candidates: Vec<Candidate>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct WaitExpired {
        pub attempt: Attempt,
        pub decision_id: DecisionId,
        pub reason: String,
        pub candidates: Vec<Candidate>,
        pub ready_at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Cancel {
        pub request_id: RequestId,
        pub by: String,
        pub reason: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct TaskFinished {
        pub request_id: RequestId,
        pub result: TaskResult,
        pub plan_version: i64,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct TaskRetry {
        pub attempt: Attempt,
        pub reason: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct TaskFailed {
        pub request_id: RequestId,
        pub plan_id: PlanId,
        pub task_id: TaskId,
        pub reason: String,
        pub cancelled: Vec<TaskId>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct PlanFinished {
        pub request_id: RequestId,
        pub plan_id: PlanId,
        pub failure: Option<String>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct QuotaUsed {
        pub attempt: Attempt,
        pub provider: String,
        pub usage: TokenUsage,
        pub cost_micros: i64,
        /// When the tokens were used: the window it falls in is the one charged without a
        /// reservation, however late (or how many times) the result is recorded.
        pub used_at: DateTime<Utc>,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Dispatched {
        pub attempt: Attempt,
        pub decision_id: DecisionId,
        pub agent_id: AgentId,
        pub queue: String,
        pub message_id: MessageId,
        /// How long the agent has to report before the attempt is given up and re-routed.
        pub lease_secs: u32,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct DispatchFailed {
        pub attempt: Attempt,
        pub decision_id: DecisionId,
        pub agent_id: AgentId,
        pub reason: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    pub struct Agent {
        pub heartbeat: Heartbeat,
        pub received_at: DateTime<Utc>,
    }
}
