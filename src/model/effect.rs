//! The state changes that stages decide and the store applies. A stage returns a list of these
//! (pure data); `store` turns them into SQL inside one transaction, together with the message's
//! idempotency marker and an audit-log row per change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::decisions::fallback::{FallbackDecision, Infeasible};
use crate::decisions::routing::{Candidate, Route};
use crate::model::domain::{Decomposition, Plan};
use crate::model::ids::{AgentId, DecisionId, MessageId, PlanId, RequestId, TaskId};
use crate::model::wire::{Heartbeat, RequestMeta, TaskResult, TokenUsage};
use crate::understanding::complexity::Complexity;

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
    Request(RequestMeta),
    Decomposition {
        request_id: RequestId,
        decomposition: Decomposition,
    },
    /// A permanent failure of the request, with its reason.
    RequestFailed {
        request_id: RequestId,
        reason: String,
    },
    /// A new plan, with its complexity term by term, the tasks that no agent could run, and the
    /// basis of each task's estimated duration that did not come from the catalog.
    Plan {
        plan: Plan,
        complexity: Complexity,
        infeasible: Vec<Infeasible>,
        duration_basis: BTreeMap<TaskId, String>,
    },
    /// The plan-level external-AI decision. With a reservation, the store applies it only if the
    /// quota still covers it in the reservation's window (limit - reserved - spent >= amount),
    /// else reports a conflict and the stage decides again. Of two decisions racing for the last
    /// of a quota, exactly one reserves it.
    Fallback {
        request_id: RequestId,
        decision: FallbackDecision,
        reserve: Option<Reservation>,
    },
    AwaitingApproval {
        request_id: RequestId,
        plan_id: PlanId,
        reason: String,
    },
    /// A person's or the policy's verdict on a plan. A rejection settles the plan's quota
    /// reservation at once, all of it going back (audited as `quota.released`).
    Approval {
        request_id: RequestId,
        plan_id: PlanId,
        approved: bool,
        by: String,
        reason: String,
    },
    /// A routing decision. When the route reserves capacity, the store applies it only if the
    /// agent still has room, else reports a conflict and the stage decides again; likewise if the
    /// task is no longer pending or waiting at the attempt before (routed by another decision,
    /// cancelled).
    Route {
        request_id: RequestId,
        plan_id: PlanId,
        attempt: u32,
        decision_id: DecisionId,
        route: Route,
        /// When the attempt became ready: released now, or when it began to wait.
        ready_at: DateTime<Utc>,
    },
    /// A ready task that no agent can take now waits in line for `attempt`: `reason` in a few
    /// words, every candidate's verdict in the audit log. Its place in line (its turn among the
    /// waiting tasks of `priority`) is given by the store. Only a pending task at the attempt
    /// before starts to wait: anything else is a conflict.
    TaskWaiting {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        attempt: u32,
        priority: u8,
        since: DateTime<Utc>,
        reason: String,
        candidates: Vec<Candidate>,
    },
    /// A waiting task gave up: it waited longer than allowed. Recorded as the routing decision of
    /// `attempt`, which chose no agent, with every candidate's verdict; the task fails. Only a
    /// task still waiting: anything else is a conflict.
    WaitExpired {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        attempt: u32,
        decision_id: DecisionId,
        reason: String,
        candidates: Vec<Candidate>,
        ready_at: DateTime<Utc>,
    },
    /// Someone cancelled the request: it and its plan end `cancelled`, its tasks that had not
    /// finished are cancelled (the capacity of those on an agent given back), its quota
    /// reservation is settled. A request cancelled already is left as it is; one that ended
    /// otherwise is a conflict.
    Cancel {
        request_id: RequestId,
        by: String,
        reason: String,
    },
    /// An attempt ended: its agent reported, or its lease expired. Gives back the capacity that
    /// the attempt's routing decision reserved and counts in the agent's record. A second result
    /// for the same attempt is a conflict: the stage decides again and finds it finished. Guarded
    /// by the plan's version as the stage saw it: a result of the same plan recorded meanwhile is
    /// a conflict too, so two results at once are decided one after the other.
    TaskFinished {
        request_id: RequestId,
        result: TaskResult,
        plan_version: i64,
    },
    /// A failed attempt that will be tried again, on another agent: back to pending.
    TaskRetry {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        attempt: u32,
        reason: String,
    },
    /// A task failed for good; the tasks that depend on it (directly or not) are cancelled.
    TaskFailed {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        reason: String,
        cancelled: Vec<TaskId>,
    },
    /// The plan and its request finished: completed, or failed with a reason. Settles the plan's
    /// quota reservation, if it has one: what was reserved and not spent goes back to its window
    /// (audited as `quota.settled`). Once: a second settlement changes nothing. The plan's
    /// `QuotaUsed` writes go before it (a use recorded after settlement still counts as spent).
    PlanFinished {
        request_id: RequestId,
        plan_id: PlanId,
        failure: Option<String>,
    },
    /// What an attempt of a task sent to an external provider really used, as the provider's API
    /// reported it, and what that cost. The cost counts as spent in the window of the plan's
    /// reservation (or, without a reservation of this provider, in the provider's current
    /// window), and as much of it as the reservation still holds is taken off what is reserved:
    /// use beyond the reservation is spent all the same, the reservation's part just reaches 0.
    /// Once per (task, attempt): a redelivered result counts nothing again. Audited as
    /// `quota.used`.
    QuotaUsed {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        attempt: u32,
        provider: String,
        usage: TokenUsage,
        cost_micros: i64,
        /// When the tokens were used: the window it falls in is the one charged without a
        /// reservation, however late (or how many times) the result is recorded.
        used_at: DateTime<Utc>,
    },
    /// The broker confirmed the task into the agent's queue.
    Dispatched {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        attempt: u32,
        decision_id: DecisionId,
        agent_id: AgentId,
        queue: String,
        message_id: MessageId,
        /// How long the agent has to report before the attempt is given up and re-routed.
        lease_secs: u32,
    },
    /// No publish into the agent's queue succeeded; capacity reserved by the decision is released.
    DispatchFailed {
        request_id: RequestId,
        plan_id: PlanId,
        task_id: TaskId,
        attempt: u32,
        decision_id: DecisionId,
        agent_id: AgentId,
        reason: String,
    },
    /// An agent's heartbeat, received at `received_at`.
    Agent {
        heartbeat: Heartbeat,
        received_at: DateTime<Utc>,
    },
}
