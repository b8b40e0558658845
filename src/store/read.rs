//! Queries: the context that stages decide on, and the reports of the command line and the audit.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use super::cached::Cached;
use super::{Applied, Error, Store};
use crate::decisions::fallback::{FallbackDecision, Infeasible};
use crate::model::domain::{Agent, Plan, PlanStatus, RequestStatus, Resources, Task, TaskStatus};
use crate::model::effect::Write;
use crate::model::ids::{AgentId, DecisionId, MessageId, PlanId, RequestId, TaskId, WorkType};
use crate::model::wire::Heartbeat;
use crate::understanding::complexity::Term;
use crate::understanding::fleet::DurationStats;

/// A plan as stored, with its state.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredPlan {
    pub plan: Plan,
    pub status: PlanStatus,
    /// Bumped by every recorded result; see `Write::TaskFinished`.
    pub version: i64,
}

/// What a routing decision chose: an agent for one attempt of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutedAttempt {
    pub task_id: TaskId,
    pub attempt: u32,
    /// `None` for a task that gave up waiting: no agent was chosen.
    pub agent_id: Option<String>,
}

/// Where one task stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskState {
    pub id: TaskId,
    pub key: String,
    pub work_type: String,
    pub description: String,
    pub status: TaskStatus,
    pub attempt: u32,
    pub agent_id: Option<String>,
    /// The routing reason, why it waits, or why dispatch failed.
    pub reason: Option<String>,
    pub depends_on: Vec<TaskId>,
    /// Since when it waits for an agent, while it does.
    pub waiting_since: Option<DateTime<Utc>>,
}

#[cfg(test)]
impl TaskState {
    /// A task as planned: pending, never attempted. For the tests of the stages and the audit.
    pub(crate) fn pending(task: &Task) -> Self {
        TaskState {
            id: task.id,
            key: task.key.clone(),
            work_type: task.work_type.to_string(),
            description: task.description.clone(),
            status: TaskStatus::Pending,
            attempt: 0,
            agent_id: None,
            reason: None,
            depends_on: task.depends_on.clone(),
            waiting_since: None,
        }
    }
}

/// Everything `switchyard status` shows about a request.
#[derive(Debug, Clone, Serialize)]
pub struct RequestReport {
    pub request_id: RequestId,
    pub text: String,
    pub submitted_by: Option<String>,
    pub status: RequestStatus,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub decomposer: Option<String>,
    pub intents: Option<Value>,
    /// How sure the decomposer was.
    pub confidence: Option<f64>,
    /// Why the configured decomposer's reading was not used, when the rules stood in.
    pub decomposer_fallback: Option<String>,
    pub plan: Option<PlanReport>,
    pub dead_letters: Vec<DeadLetter>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    pub plan_id: PlanId,
    pub status: PlanStatus,
    pub complexity: f64,
    /// The terms of the complexity formula, as computed when the plan was made.
    pub complexity_terms: Vec<Term>,
    /// The tasks that no agent could run when the plan was made.
    pub infeasible: Vec<Infeasible>,
    pub fallback: Option<FallbackDecision>,
    /// The quota its fallback decision reserved, and how it was used and settled.
    pub reservation: Option<super::StoredReservation>,
    pub approval: Option<ApprovalRow>,
    pub tasks: Vec<TaskState>,
    /// Every attempt's result, in the order received.
    pub results: Vec<ResultRow>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApprovalRow {
    pub approved: bool,
    pub decided_by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub message_id: MessageId,
    pub stage: String,
    pub queue: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// Who cancelled a request, why and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cancellation {
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// What [`Store::lookup`] found.
#[derive(Debug, Clone)]
pub enum Lookup {
    Request(Box<RequestReport>),
    /// No request row: the request was refused on arrival, for these reasons.
    Refused(Refusal),
}

/// Why a request was refused on arrival: its dead letters, of which there is at least one.
#[derive(Debug, Clone)]
pub struct Refusal {
    first: DeadLetter,
    later: Vec<DeadLetter>,
}

impl Refusal {
    /// The refusal that `dead_letters`, oldest first, make; none if there are none.
    pub fn new(dead_letters: Vec<DeadLetter>) -> Option<Self> {
        let mut dead_letters = dead_letters.into_iter();
        Some(Refusal { first: dead_letters.next()?, later: dead_letters.collect() })
    }

    /// The first dead letter: what refused the request.
    pub fn first(&self) -> &DeadLetter {
        &self.first
    }

    /// Every dead letter, the first first.
    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetter> {
        std::iter::once(&self.first).chain(&self.later)
    }
}

impl Serialize for Refusal {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.dead_letters())
    }
}

/// A routing decision as stored.
#[derive(Debug, Clone, Serialize)]
pub struct DecisionRow {
    pub task_id: TaskId,
    pub attempt: u32,
    /// `None` when the task gave up waiting: no agent was chosen.
    pub agent_id: Option<String>,
    pub score: Option<f64>,
    pub reason: String,
    pub candidates: Value,
    pub reserved_capacity: bool,
}

/// A confirmed dispatch as stored.
#[derive(Debug, Clone, Serialize)]
pub struct DispatchRow {
    pub task_id: TaskId,
    pub attempt: u32,
    pub agent_id: String,
    pub queue: String,
    pub message_id: MessageId,
    pub confirmed_at: DateTime<Utc>,
}

/// What the audit checks: every row about one request.
#[derive(Debug, Clone)]
pub struct Trail {
    pub status: RequestStatus,
    /// Why it failed, was rejected or cancelled.
    pub failure_reason: Option<String>,
    /// Who cancelled it, and why, if someone did.
    pub cancellation: Option<Cancellation>,
    /// Its messages that a stage refused, with why.
    pub dead_letters: Vec<DeadLetter>,
    pub has_decomposition: bool,
    /// Which decomposer's reading the plan was made from.
    pub decomposer: Option<String>,
    pub plan: Option<StoredPlan>,
    /// The plan's complexity and its terms.
    pub complexity: Option<(f64, Vec<Term>)>,
    pub fallback_decisions: usize,
    pub fallback: Option<FallbackDecision>,
    pub reservation: Option<super::StoredReservation>,
    /// The external use recorded for each attempt: (task, attempt, cost in micros).
    pub usage: Vec<(TaskId, u32, i64)>,
    pub approval: Option<ApprovalRow>,
    pub tasks: Vec<TaskState>,
    pub decisions: Vec<DecisionRow>,
    pub dispatches: Vec<DispatchRow>,
    pub results: Vec<ResultRow>,
}

/// A dispatched attempt whose lease ran out without a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredLease {
    pub request_id: RequestId,
    pub plan_id: PlanId,
    pub task_id: TaskId,
    pub attempt: u32,
    pub agent_id: AgentId,
    pub dispatched_at: DateTime<Utc>,
    pub expired_at: DateTime<Utc>,
    /// The lease may still run, but the agent stopped heartbeating: it is gone.
    pub agent_silent: bool,
}

/// How one attempt of a task ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResultRow {
    pub task_id: TaskId,
    pub attempt: u32,
    pub agent_id: String,
    pub success: bool,
    pub output: String,
    pub error: Option<String>,
    /// "agent", or "lease" when the lease expired without a result.
    pub source: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
}

/// What `approve` or `reject` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalOutcome {
    pub request_id: RequestId,
    pub priority: u8,
    /// The plan already had this verdict: nothing was changed.
    pub already: bool,
}

pub(super) fn parse_status<T: std::str::FromStr>(value: &str) -> Result<T, Error> {
    value.parse().map_err(|_| Error::Corrupt(format!("unknown status {value:?}")))
}

pub(super) fn task_from_row(row: &Row) -> Result<Task, Error> {
    let capabilities: Vec<String> = row.get("capabilities");
    let depends_on: Vec<Uuid> = row.get("depends_on");
    let affinity: Value = row.get("affinity");
    Ok(Task {
        id: TaskId::from_uuid(row.get("id")),
        key: row.get("key"),
        work_type: WorkType::parse(row.get::<_, String>("work_type"))
            .map_err(|e| Error::Corrupt(e.to_string()))?,
        description: row.get("description"),
        estimated_duration_secs: row.get::<_, i32>("estimated_duration_secs") as u32,
        resources: Resources {
            cpu: row.get("cpu"),
            memory_mb: row.get::<_, i64>("memory_mb") as u64,
            gpu: row.get::<_, i32>("gpu") as u32,
        },
        capabilities: capabilities.into_iter().collect(),
        depends_on: depends_on.into_iter().map(TaskId::from_uuid).collect(),
        affinity: serde_json::from_value(affinity).map_err(|e| Error::Corrupt(e.to_string()))?,
    })
}

fn task_state_from_row(row: &Row) -> Result<TaskState, Error> {
    let depends_on: Vec<Uuid> = row.get("depends_on");
    Ok(TaskState {
        id: TaskId::from_uuid(row.get("id")),
        key: row.get("key"),
        work_type: row.get("work_type"),
        description: row.get("description"),
        status: parse_status(row.get("status"))?,
        attempt: row.get::<_, i32>("attempt") as u32,
        agent_id: row.get("agent_id"),
        reason: row.get("status_reason"),
        depends_on: depends_on.into_iter().map(TaskId::from_uuid).collect(),
        waiting_since: row.get("waiting_since"),
    })
}

pub(super) fn agent_from_row(row: &Row) -> Result<Agent, Error> {
    let capabilities: Vec<String> = row.get("capabilities");
    let labels: Value = row.get("labels");
    Ok(Agent {
        id: AgentId::parse(row.get::<_, String>("id")).map_err(|e| Error::Corrupt(e.to_string()))?,
        capabilities: capabilities.into_iter().collect(),
        capacity: row.get::<_, i32>("capacity") as u32,
        in_flight: row.get::<_, i32>("in_flight") as u32,
        labels: serde_json::from_value(labels).map_err(|e| Error::Corrupt(e.to_string()))?,
        resources: Resources {
            cpu: row.get("cpu"),
            memory_mb: row.get::<_, i64>("memory_mb") as u64,
            gpu: row.get::<_, i32>("gpu") as u32,
        },
        last_heartbeat: row.get("last_heartbeat"),
        succeeded: row.get::<_, i64>("succeeded") as u64,
        failed: row.get::<_, i64>("failed") as u64,
    })
}

/// Rows of (task id, agent id) as the agents that failed each task.
fn failed_by_task(rows: &[Row]) -> Result<HashMap<TaskId, BTreeSet<AgentId>>, Error> {
    let mut failed: HashMap<TaskId, BTreeSet<AgentId>> = HashMap::new();
    for row in rows {
        let agent = AgentId::parse(row.get::<_, String>(1)).map_err(|e| Error::Corrupt(e.to_string()))?;
        failed.entry(TaskId::from_uuid(row.get(0))).or_default().insert(agent);
    }
    Ok(failed)
}

/// The columns of a fallback decision that [`fallback_from_row`] reads.
const FALLBACK_COLUMNS: &str = "plan_id, use_external, provider, reason, complexity,
     estimated_cost_micros, quota_left_micros, external_tasks, infeasible";

fn fallback_from_row(r: &Row) -> FallbackDecision {
    FallbackDecision {
        plan_id: PlanId::from_uuid(r.get(0)),
        use_external: r.get(1),
        provider: r.get(2),
        reason: r.get(3),
        complexity: r.get(4),
        estimated_cost_micros: r.get(5),
        quota_left_micros: r.get(6),
        external_tasks: r.get::<_, Vec<uuid::Uuid>>(7).into_iter().map(TaskId::from_uuid).collect(),
        infeasible: r.get(8),
    }
}

/// The most recently finished tasks of a work type that its learnt durations are taken from.
pub const DURATION_SAMPLES: i64 = 200;

pub(super) const TASK_COLUMNS: &str =
    "id, key, work_type, description, estimated_duration_secs, cpu, memory_mb, gpu,
     capabilities, depends_on, affinity, status, attempt, agent_id, status_reason, waiting_since";

impl Store {
    /// Where a request stands, if it was recorded.
    pub async fn request_status(&self, request_id: RequestId) -> Result<Option<RequestStatus>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached("SELECT status FROM requests WHERE id = $1", &[&request_id.as_uuid()])
            .await?;
        row.map(|row| parse_status(row.get(0))).transpose()
    }

    /// Where a plan stands, if it was recorded; without its tasks.
    pub async fn plan_status(&self, plan_id: PlanId) -> Result<Option<PlanStatus>, Error> {
        let client = self.client().await?;
        let row =
            client.query_opt_cached("SELECT status FROM plans WHERE id = $1", &[&plan_id.as_uuid()]).await?;
        row.map(|row| parse_status(row.get(0))).transpose()
    }

    /// What the routing decision of this id chose, if it was recorded, and where its task stands
    /// now.
    pub async fn routed_attempt(
        &self,
        decision_id: DecisionId,
    ) -> Result<Option<(RoutedAttempt, TaskStatus)>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT d.task_id, d.attempt, d.agent_id, t.status
                 FROM routing_decisions d JOIN tasks t ON t.id = d.task_id WHERE d.id = $1",
                &[&decision_id.as_uuid()],
            )
            .await?;
        row.map(|row| {
            let routed = RoutedAttempt {
                task_id: TaskId::from_uuid(row.get(0)),
                attempt: row.get::<_, i32>(1) as u32,
                agent_id: row.get(2),
            };
            Ok((routed, parse_status(row.get(3))?))
        })
        .transpose()
    }

    /// A plan with its tasks, rebuilt and checked.
    pub async fn plan(&self, plan_id: PlanId) -> Result<Option<StoredPlan>, Error> {
        Ok(self.plan_states_and_line(plan_id).await?.0)
    }

    /// A plan, where each of its tasks stands (in plan order), and whether any task (of any
    /// plan) waits for an agent: what the stages that route and track decide on, in two round
    /// trips.
    pub async fn plan_states_and_line(
        &self,
        plan_id: PlanId,
    ) -> Result<(Option<StoredPlan>, Vec<TaskState>, bool), Error> {
        let client = self.client().await?;
        let row = client
            .query_one_cached(
                "SELECT p.request_id, p.status, p.version,
                        EXISTS (SELECT 1 FROM tasks WHERE status = 'waiting')
                 FROM (SELECT 1) AS one LEFT JOIN plans p ON p.id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?;
        let line: bool = row.get(3);
        let Some(request_id) = row.get::<_, Option<Uuid>>(0) else {
            return Ok((None, Vec::new(), line));
        };
        let rows = client
            .query_cached(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE plan_id = $1 ORDER BY position"),
                &[&plan_id.as_uuid()],
            )
            .await?;
        let tasks = rows.iter().map(task_from_row).collect::<Result<Vec<_>, _>>()?;
        let states = rows.iter().map(task_state_from_row).collect::<Result<Vec<_>, _>>()?;
        let request_id = RequestId::from_uuid(request_id);
        let plan = Plan::new(plan_id, request_id, tasks).map_err(|e| Error::Corrupt(e.to_string()))?;
        let stored = StoredPlan { plan, status: parse_status(row.get(1))?, version: row.get(2) };
        Ok((Some(stored), states, line))
    }

    /// The state of every task of a plan, in plan order.
    pub async fn task_states(&self, plan_id: PlanId) -> Result<Vec<TaskState>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE plan_id = $1 ORDER BY position"),
                &[&plan_id.as_uuid()],
            )
            .await?;
        rows.iter().map(task_state_from_row).collect()
    }

    /// Dispatched attempts whose lease has expired, or whose agent has not heartbeaten for
    /// `heartbeat_ttl_secs` (it is gone: waiting out the lease would only delay the retry),
    /// oldest first, at most `limit`. Compared by the database's clock, which also set them.
    pub async fn expired_leases(
        &self,
        heartbeat_ttl_secs: u64,
        limit: i64,
    ) -> Result<Vec<ExpiredLease>, Error> {
        let client = self.client().await?;
        let ttl = heartbeat_ttl_secs as f64;
        let rows = client
            .query_cached(
                "SELECT p.request_id, t.plan_id, t.id, t.attempt, t.agent_id, d.confirmed_at,
                        LEAST(t.lease_expires_at, a.last_heartbeat + make_interval(secs => $2)),
                        t.lease_expires_at >= now()
                 FROM tasks t JOIN plans p ON p.id = t.plan_id
                 JOIN dispatches d ON d.task_id = t.id AND d.attempt = t.attempt
                 LEFT JOIN agents a ON a.id = t.agent_id
                 WHERE t.status = 'dispatched'
                   AND (t.lease_expires_at < now()
                        OR a.last_heartbeat < now() - make_interval(secs => $2))
                 ORDER BY t.lease_expires_at LIMIT $1",
                &[&limit, &ttl],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(ExpiredLease {
                    request_id: RequestId::from_uuid(row.get(0)),
                    plan_id: PlanId::from_uuid(row.get(1)),
                    task_id: TaskId::from_uuid(row.get(2)),
                    attempt: row.get::<_, i32>(3) as u32,
                    agent_id: AgentId::parse(row.get::<_, String>(4))
                        .map_err(|e| Error::Corrupt(e.to_string()))?,
                    dispatched_at: row.get(5),
                    expired_at: row.get(6),
                    agent_silent: row.get(7),
                })
            })
            .collect()
    }

    /// The agents that failed each task of a plan (a failed attempt or an expired lease).
    pub async fn failed_agents(&self, plan_id: PlanId) -> Result<HashMap<TaskId, BTreeSet<AgentId>>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT r.task_id, r.agent_id FROM task_results r JOIN tasks t ON t.id = r.task_id
                 WHERE t.plan_id = $1 AND NOT r.success",
                &[&plan_id.as_uuid()],
            )
            .await?;
        failed_by_task(&rows)
    }

    /// Every attempt's result for a plan, in the order they were received.
    pub async fn results(&self, plan_id: PlanId) -> Result<Vec<ResultRow>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT r.task_id, r.attempt, r.agent_id, r.success, r.output, r.error, r.source,
                        r.started_at, r.finished_at, r.received_at
                 FROM task_results r JOIN tasks t ON t.id = r.task_id
                 WHERE t.plan_id = $1 ORDER BY r.received_at, r.task_id, r.attempt",
                &[&plan_id.as_uuid()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| ResultRow {
                task_id: TaskId::from_uuid(row.get(0)),
                attempt: row.get::<_, i32>(1) as u32,
                agent_id: row.get(2),
                success: row.get(3),
                output: row.get(4),
                error: row.get(5),
                source: row.get(6),
                started_at: row.get(7),
                finished_at: row.get(8),
                received_at: row.get(9),
            })
            .collect())
    }

    /// Every known agent, by id.
    pub async fn agents(&self) -> Result<Vec<Agent>, Error> {
        let client = self.client().await?;
        let rows = client.query_cached("SELECT * FROM agents ORDER BY id", &[]).await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// Registers (or updates) an agent, as its heartbeat would.
    pub async fn register_agent(&self, actor: &str, heartbeat: Heartbeat) -> Result<(), Error> {
        let write = Write::Agent { heartbeat, received_at: Utc::now() };
        self.apply(actor, None, std::slice::from_ref(&write)).await.map(|_| ())
    }

    /// How long the tasks of `work_types` that succeeded most recently took (the last
    /// [`DURATION_SAMPLES`] of each work type within 30 days), by work type and step (the 90th
    /// percentile): what the planner learns estimated durations from. Recent history only, so
    /// that the estimate follows the fleet as it changes and planning costs the same however
    /// much history is kept; local work only, since a model's speed says nothing of how long an
    /// agent takes.
    pub async fn duration_history(&self, work_types: &[&str]) -> Result<Vec<DurationStats>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT t.work_type, split_part(t.key, '.', 2) AS step, count(*)::bigint,
                        percentile_cont(0.9) WITHIN GROUP (
                            ORDER BY extract(epoch FROM r.finished_at - r.started_at))::float8
                 FROM unnest($1::text[]) AS w (work_type)
                 CROSS JOIN LATERAL (
                     SELECT id, plan_id, key, work_type, attempt FROM tasks
                     WHERE status = 'succeeded' AND work_type = w.work_type
                       AND finished_at > now() - interval '30 days'
                     ORDER BY finished_at DESC LIMIT $2) AS t
                 JOIN task_results r ON r.task_id = t.id AND r.attempt = t.attempt
                 WHERE r.success AND r.source = 'agent'
                   AND NOT EXISTS (SELECT 1 FROM fallback_decisions f
                                   WHERE f.plan_id = t.plan_id AND t.id = ANY(f.external_tasks))
                 GROUP BY 1, 2",
                &[&work_types, &DURATION_SAMPLES],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let work_type: String = r.get(0);
                Ok(DurationStats {
                    work_type: WorkType::parse(&work_type)
                        .map_err(|e| Error::Corrupt(format!("work type {work_type:?}: {e}")))?,
                    step: r.get(1),
                    samples: u32::try_from(r.get::<_, i64>(2)).unwrap_or(u32::MAX),
                    p90_secs: r.get(3),
                })
            })
            .collect()
    }

    /// The fallback decision recorded for a plan, if one was made.
    pub async fn fallback_decision(&self, plan_id: PlanId) -> Result<Option<FallbackDecision>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                &format!("SELECT {FALLBACK_COLUMNS} FROM fallback_decisions WHERE plan_id = $1"),
                &[&plan_id.as_uuid()],
            )
            .await?;
        Ok(row.as_ref().map(fallback_from_row))
    }

    /// The verdict recorded for a plan: approved (true), rejected (false), or none yet.
    pub async fn approval_verdict(&self, plan_id: PlanId) -> Result<Option<bool>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached("SELECT approved FROM approvals WHERE plan_id = $1", &[&plan_id.as_uuid()])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Records a dead letter; a second record of the same message at the same stage is ignored.
    /// With `fail_request`, the request it belongs to, if it exists and is still under way, fails
    /// with the same reason: whoever follows the request sees why it stopped instead of waiting
    /// for ever.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_dead_letter(
        &self,
        stage: &str,
        queue: &str,
        message_id: MessageId,
        request_id: Option<RequestId>,
        reason: &str,
        body: &str,
        fail_request: bool,
    ) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let inserted = tx
            .execute_cached(
                "INSERT INTO dead_letters (message_id, stage, queue, request_id, reason, body)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[&message_id.as_uuid(), &stage, &queue, &request_id.map(Uuid::from), &reason, &body],
            )
            .await?;
        if let (1, Some(request_id), true) = (inserted, request_id, fail_request) {
            let under_way: Vec<&str> = RequestStatus::UNDER_WAY.map(|s| s.as_str()).to_vec();
            let failure = format!("a message of this request was dead-lettered at {stage}: {reason}");
            let failed = tx
                .execute_cached(
                    "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
                     WHERE id = $1 AND status = ANY($4)",
                    &[&request_id.as_uuid(), &RequestStatus::Failed.as_str(), &failure, &under_way],
                )
                .await?;
            if failed == 1 {
                let detail =
                    serde_json::json!({ "reason": failure, "stage": stage, "message_id": message_id });
                super::apply::audit(&tx, stage, "request.failed", Some(request_id), None, None, detail)
                    .await?;
                // Its plan, if it has one under way, ends with it: nothing more of it will run,
                // and what it reserved of a provider's quota goes back.
                let ended = tx
                    .query_opt_cached(
                        "UPDATE plans SET status = $2, updated_at = now()
                         WHERE request_id = $1 AND status = ANY($3) RETURNING id",
                        &[
                            &request_id.as_uuid(),
                            &PlanStatus::Failed.as_str(),
                            &[PlanStatus::Planned, PlanStatus::AwaitingApproval, PlanStatus::Approved]
                                .map(|s| s.as_str())
                                .as_slice(),
                        ],
                    )
                    .await?;
                if let Some(row) = ended {
                    let plan_id = PlanId::from_uuid(row.get(0));
                    super::apply::cancel_pending(&tx, plan_id, "cancelled: the request failed").await?;
                    super::quota::settle(&tx, stage, request_id, plan_id, "quota.settled").await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Dead letters recorded for messages of `request_id`, oldest first. A request refused on
    /// arrival has these and no request row.
    pub async fn dead_letters_of_request(&self, request_id: RequestId) -> Result<Vec<DeadLetter>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT message_id, stage, queue, reason, created_at FROM dead_letters
                 WHERE request_id = $1 ORDER BY id",
                &[&request_id.as_uuid()],
            )
            .await?;
        Ok(rows.iter().map(dead_letter_from_row).collect())
    }

    /// Dead letters recorded for `stage`, newest first.
    pub async fn dead_letters_of_stage(&self, stage: &str) -> Result<Vec<DeadLetter>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT message_id, stage, queue, reason, created_at FROM dead_letters
                 WHERE stage = $1 ORDER BY id DESC",
                &[&stage],
            )
            .await?;
        Ok(rows.iter().map(dead_letter_from_row).collect())
    }

    /// Approves (`approved`) or rejects a plan that awaits approval. Idempotent: the same verdict
    /// again changes nothing; the opposite verdict is refused.
    pub async fn decide_approval(
        &self,
        plan_id: PlanId,
        approved: bool,
        by: &str,
        reason: &str,
    ) -> Result<ApprovalOutcome, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT p.request_id, p.status, r.priority, a.approved, r.status, r.failure_reason
                 FROM plans p JOIN requests r ON r.id = p.request_id
                 LEFT JOIN approvals a ON a.plan_id = p.id WHERE p.id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("no plan {plan_id}")))?;
        let request_id = RequestId::from_uuid(row.get(0));
        let status: PlanStatus = parse_status(row.get(1))?;
        let priority = row.get::<_, i16>(2) as u8;
        let existing: Option<bool> = row.get(3);
        let request_status: RequestStatus = parse_status(row.get(4))?;
        if existing.is_none() && request_status == RequestStatus::Failed {
            let why: Option<String> = row.get(5);
            return Err(Error::Refused(format!(
                "request {request_id} has failed ({}); its plan can no longer be decided",
                why.as_deref().unwrap_or("no reason recorded")
            )));
        }
        match existing {
            Some(verdict) if verdict == approved => {
                return Ok(ApprovalOutcome { request_id, priority, already: true });
            }
            Some(_) => {
                return Err(Error::Refused(format!("plan {plan_id} is already {status}")));
            }
            None if status != PlanStatus::AwaitingApproval => {
                return Err(Error::Refused(format!("plan {plan_id} is {status}, not awaiting approval")));
            }
            None => {}
        }
        drop(client);
        let write =
            Write::Approval { request_id, plan_id, approved, by: by.to_owned(), reason: reason.to_owned() };
        match self.apply(by, None, std::slice::from_ref(&write)).await? {
            Applied::Done => Ok(ApprovalOutcome { request_id, priority, already: false }),
            // The opposite verdict was recorded between the check above and this write.
            Applied::Conflict(reason) => Err(Error::Refused(reason)),
            other => Err(Error::Corrupt(format!("approval of {plan_id} applied as {other:?}"))),
        }
    }

    /// What is known of a request: its report, or, for a request refused on arrival (it has no
    /// row), the dead letters that say why. Dead letters are read first: a stage records a
    /// request, if at all, before it dead-letters its message, so a dead letter read first and no
    /// request read after means a refusal, not a request about to appear.
    pub async fn lookup(&self, request_id: RequestId) -> Result<Option<Lookup>, Error> {
        let dead_letters = self.dead_letters_of_request(request_id).await?;
        Ok(match self.report(request_id).await? {
            Some(report) => Some(Lookup::Request(Box::new(report))),
            None => Refusal::new(dead_letters).map(Lookup::Refused),
        })
    }

    /// Everything known about a request.
    pub async fn report(&self, request_id: RequestId) -> Result<Option<RequestReport>, Error> {
        let client = self.client().await?;
        let Some(request) = client
            .query_opt_cached(
                "SELECT r.text, r.submitted_by, r.status, r.failure_reason, r.created_at, d.decomposer, d.intents,
                        d.confidence, d.fallback_reason
                 FROM requests r LEFT JOIN decompositions d ON d.request_id = r.id WHERE r.id = $1",
                &[&request_id.as_uuid()],
            )
            .await?
        else {
            return Ok(None);
        };
        let plan_row = client
            .query_opt_cached(
                "SELECT p.id, p.status, p.complexity, a.approved, a.decided_by, a.reason, a.created_at,
                        p.complexity_terms, p.infeasible
                 FROM plans p LEFT JOIN approvals a ON a.plan_id = p.id WHERE p.request_id = $1",
                &[&request_id.as_uuid()],
            )
            .await?;
        drop(client);
        let plan = match plan_row {
            None => None,
            Some(row) => {
                let plan_id = PlanId::from_uuid(row.get(0));
                let approval = row.get::<_, Option<bool>>(3).map(|approved| ApprovalRow {
                    approved,
                    decided_by: row.get(4),
                    reason: row.get(5),
                    at: row.get(6),
                });
                Some(PlanReport {
                    plan_id,
                    status: parse_status(row.get(1))?,
                    complexity: row.get(2),
                    complexity_terms: serde_json::from_value(row.get(7))
                        .map_err(|e| Error::Corrupt(format!("complexity terms of plan {plan_id}: {e}")))?,
                    infeasible: serde_json::from_value(row.get(8))
                        .map_err(|e| Error::Corrupt(format!("infeasible tasks of plan {plan_id}: {e}")))?,
                    fallback: self.fallback_decision(plan_id).await?,
                    reservation: self.reservation(plan_id).await?,
                    approval,
                    tasks: self.task_states(plan_id).await?,
                    results: self.results(plan_id).await?,
                })
            }
        };
        Ok(Some(RequestReport {
            request_id,
            text: request.get(0),
            submitted_by: request.get(1),
            status: parse_status(request.get(2))?,
            failure_reason: request.get(3),
            created_at: request.get(4),
            decomposer: request.get(5),
            intents: request.get(6),
            confidence: request.get(7),
            decomposer_fallback: request.get(8),
            plan,
            dead_letters: self.dead_letters_of_request(request_id).await?,
        }))
    }

    /// Every row that the audit of a request checks.
    pub async fn trail(&self, request_id: RequestId) -> Result<Option<Trail>, Error> {
        let client = self.client().await?;
        let Some(request) = client
            .query_opt_cached(
                "SELECT EXISTS (SELECT 1 FROM decompositions d WHERE d.request_id = r.id),
                        (SELECT decomposer FROM decompositions d WHERE d.request_id = r.id),
                        (SELECT complexity FROM plans p WHERE p.request_id = r.id),
                        (SELECT complexity_terms FROM plans p WHERE p.request_id = r.id),
                        r.status, r.failure_reason
                 FROM requests r WHERE r.id = $1",
                &[&request_id.as_uuid()],
            )
            .await?
        else {
            return Ok(None);
        };
        let plan_id = request_id.plan_id();
        let fallback_decisions: i64 = client
            .query_one_cached(
                "SELECT count(*) FROM fallback_decisions WHERE plan_id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?
            .get(0);
        let approval = client
            .query_opt_cached(
                "SELECT approved, decided_by, reason, created_at FROM approvals WHERE plan_id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?
            .map(|row| ApprovalRow {
                approved: row.get(0),
                decided_by: row.get(1),
                reason: row.get(2),
                at: row.get(3),
            });
        let decisions = client
            .query_cached(
                "SELECT task_id, attempt, agent_id, score, reason, candidates, reserved_capacity
                 FROM routing_decisions WHERE plan_id = $1 ORDER BY created_at, task_id",
                &[&plan_id.as_uuid()],
            )
            .await?
            .iter()
            .map(|row| DecisionRow {
                task_id: TaskId::from_uuid(row.get(0)),
                attempt: row.get::<_, i32>(1) as u32,
                agent_id: row.get(2),
                score: row.get(3),
                reason: row.get(4),
                candidates: row.get(5),
                reserved_capacity: row.get(6),
            })
            .collect();
        let dispatches = self.dispatches(plan_id).await?;
        let usage = client
            .query_cached(
                "SELECT task_id, attempt, cost_micros FROM quota_usage WHERE plan_id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?
            .iter()
            .map(|row| (TaskId::from_uuid(row.get(0)), row.get::<_, i32>(1) as u32, row.get::<_, i64>(2)))
            .collect();
        drop(client);
        let complexity = match (request.get::<_, Option<f64>>(2), request.get::<_, Option<Value>>(3)) {
            (Some(score), Some(terms)) => Some((
                score,
                serde_json::from_value(terms)
                    .map_err(|e| Error::Corrupt(format!("complexity terms of plan {plan_id}: {e}")))?,
            )),
            _ => None,
        };
        Ok(Some(Trail {
            status: parse_status(request.get(4))?,
            failure_reason: request.get(5),
            cancellation: self.cancellation(request_id).await?,
            dead_letters: self.dead_letters_of_request(request_id).await?,
            has_decomposition: request.get(0),
            decomposer: request.get(1),
            plan: self.plan(plan_id).await?,
            complexity,
            fallback_decisions: fallback_decisions as usize,
            fallback: self.fallback_decision(plan_id).await?,
            reservation: self.reservation(plan_id).await?,
            usage,
            approval,
            tasks: self.task_states(plan_id).await?,
            decisions,
            dispatches,
            results: self.results(plan_id).await?,
        }))
    }

    /// The confirmed dispatches of a plan, in order of confirmation.
    pub async fn dispatches(&self, plan_id: PlanId) -> Result<Vec<DispatchRow>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT d.task_id, d.attempt, d.agent_id, d.queue, d.message_id, d.confirmed_at
                 FROM dispatches d JOIN tasks t ON t.id = d.task_id WHERE t.plan_id = $1
                 ORDER BY d.confirmed_at, d.task_id",
                &[&plan_id.as_uuid()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| DispatchRow {
                task_id: TaskId::from_uuid(row.get(0)),
                attempt: row.get::<_, i32>(1) as u32,
                agent_id: row.get(2),
                queue: row.get(3),
                message_id: MessageId::from_uuid(row.get(4)),
                confirmed_at: row.get(5),
            })
            .collect())
    }

    /// Audit-log events of a request, oldest first: (actor, event, detail).
    pub async fn audit_events(&self, request_id: RequestId) -> Result<Vec<(String, String, Value)>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT actor, event, detail FROM audit_log WHERE request_id = $1 ORDER BY id",
                &[&request_id.as_uuid()],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// How many requests the store holds per status (for tools and tests).
    pub async fn request_counts(&self) -> Result<BTreeMap<String, i64>, Error> {
        let client = self.client().await?;
        let rows = client.query_cached("SELECT status, count(*) FROM requests GROUP BY status", &[]).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}

fn dead_letter_from_row(row: &Row) -> DeadLetter {
    DeadLetter {
        message_id: MessageId::from_uuid(row.get(0)),
        stage: row.get(1),
        queue: row.get(2),
        reason: row.get(3),
        at: row.get(4),
    }
}
