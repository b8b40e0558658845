//! The state changes that stages decide and the store applies. A stage returns a list of these
//! (pure data); `store` turns them into SQL inside one transaction, together with the message's
//! idempotency marker and an audit-log row per change.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::complexity::Complexity;
use crate::domain::{Decomposition, Plan};
use crate::ids::{AgentId, DecisionId, MessageId, PlanId, RequestId, TaskId};
use crate::policy::{FallbackDecision, Infeasible};
use crate::routing::Route;
use crate::wire::{Heartbeat, RequestMeta, TaskResult};

/// Quota to take from a provider, atomically, or not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub provider: String,
    pub amount_micros: i64,
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
    /// The plan cannot run (see [`crate::policy::FallbackDecision::infeasible`]): it and its
    /// request end with `reason`, and its tasks are cancelled.
    PlanInfeasible {
        request_id: RequestId,
        plan_id: PlanId,
        reason: String,
    },
    /// The plan-level external-AI decision. With a reservation, the store applies it only if the
    /// quota still covers it, else reports a conflict and the stage decides again.
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
    Approval {
        request_id: RequestId,
        plan_id: PlanId,
        approved: bool,
        by: String,
        reason: String,
    },
    /// A routing decision. When the route reserves capacity, the store applies it only if the
    /// agent still has room, else reports a conflict and the stage decides again.
    Route {
        request_id: RequestId,
        plan_id: PlanId,
        attempt: u32,
        decision_id: DecisionId,
        route: Route,
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
    /// The plan and its request finished: completed, or failed with a reason.
    PlanFinished {
        request_id: RequestId,
        plan_id: PlanId,
        failure: Option<String>,
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
