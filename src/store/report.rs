//! The reports of the command line and the audit: everything known about a request, the trail
//! of rows that its audit checks, its dead letters and its audit events.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;

use super::cached::Cached;
use super::read::{TASK_COLUMNS, parse_status, task_from_row, task_state_from_row};
use super::{Error, ResultRow, Store, StoredPlan, TaskState};
use crate::decisions::fallback::{FallbackDecision, Infeasible};
use crate::model::domain::{PlanStatus, RequestStatus, Task};
use crate::model::ids::{MessageId, PlanId, RequestId, TaskId};
use crate::understanding::complexity::Term;

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
    /// Every attempt's confirmed dispatch, in the order confirmed.
    pub dispatches: Vec<DispatchRow>,
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
    pub decided_at: DateTime<Utc>,
    /// `None` when the task gave up waiting: no agent was chosen.
    pub agent_id: Option<String>,
    pub score: Option<f64>,
    pub reason: String,
    pub candidates: Value,
    pub reserved_capacity: bool,
}

/// A task that began to wait in line for an agent, as the audit log recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct WaitRow {
    /// The attempt it waited for.
    pub attempt: u32,
    pub since: DateTime<Utc>,
    /// Why, in a few words, as the fleet stood then.
    pub reason: String,
    /// Every candidate's verdict then, as a routing decision records them.
    pub candidates: Value,
}

/// Everything recorded about one task's attempts: what `switchyard why` explains.
#[derive(Debug, Clone)]
pub struct TaskTrail {
    pub request_id: RequestId,
    pub plan_id: PlanId,
    pub plan_status: PlanStatus,
    /// The task as planned.
    pub task: Task,
    pub state: TaskState,
    /// The plan's fallback decision: whether the task went to an external provider.
    pub fallback: Option<FallbackDecision>,
    /// Its routing decisions, by attempt.
    pub decisions: Vec<DecisionRow>,
    /// Each time it began to wait in line, oldest first.
    pub waits: Vec<WaitRow>,
    pub dispatches: Vec<DispatchRow>,
    /// Its attempts' results, in the order received.
    pub results: Vec<ResultRow>,
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

impl Store {
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
                    dispatches: self.dispatches(plan_id).await?,
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
                &format!(
                    "SELECT {DECISION_COLUMNS} FROM routing_decisions WHERE plan_id = $1
                          ORDER BY created_at, task_id"
                ),
                &[&plan_id.as_uuid()],
            )
            .await?
            .iter()
            .map(decision_from_row)
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

    /// Everything recorded about one task's attempts, if the task exists.
    pub async fn task_trail(&self, task_id: TaskId) -> Result<Option<TaskTrail>, Error> {
        let client = self.client().await?;
        let Some(row) = client
            .query_opt_cached(
                &format!(
                    "SELECT {TASK_COLUMNS}, plan_id,
                            (SELECT p.request_id FROM plans p WHERE p.id = tasks.plan_id) AS request_id,
                            (SELECT p.status FROM plans p WHERE p.id = tasks.plan_id) AS plan_status
                     FROM tasks WHERE id = $1"
                ),
                &[&task_id.as_uuid()],
            )
            .await?
        else {
            return Ok(None);
        };
        let plan_id = PlanId::from_uuid(row.get("plan_id"));
        let request_id = RequestId::from_uuid(row.get("request_id"));
        let decisions: Vec<DecisionRow> = client
            .query_cached(
                &format!(
                    "SELECT {DECISION_COLUMNS} FROM routing_decisions WHERE task_id = $1 ORDER BY attempt"
                ),
                &[&task_id.as_uuid()],
            )
            .await?
            .iter()
            .map(decision_from_row)
            .collect();
        let waits = client
            .query_cached(
                "SELECT at, detail FROM audit_log
                 WHERE request_id = $1 AND task_id = $2 AND event = 'task.waiting' ORDER BY id",
                &[&request_id.as_uuid(), &task_id.as_uuid()],
            )
            .await?
            .iter()
            .map(|row| {
                let detail: Value = row.get(1);
                let corrupt = || Error::Corrupt(format!("a task.waiting event of task {task_id}: {detail}"));
                Ok(WaitRow {
                    attempt: detail["attempt"]
                        .as_u64()
                        .and_then(|a| u32::try_from(a).ok())
                        .ok_or_else(corrupt)?,
                    since: row.get(0),
                    reason: detail["reason"].as_str().ok_or_else(corrupt)?.to_owned(),
                    candidates: detail.get("candidates").cloned().unwrap_or(Value::Array(Vec::new())),
                })
            })
            .collect::<Result<_, Error>>()?;
        drop(client);
        let mut dispatches = self.dispatches(plan_id).await?;
        dispatches.retain(|d| d.task_id == task_id);
        let mut results = self.results(plan_id).await?;
        results.retain(|r| r.task_id == task_id);
        Ok(Some(TaskTrail {
            request_id,
            plan_id,
            plan_status: parse_status(row.get("plan_status"))?,
            task: task_from_row(&row)?,
            state: task_state_from_row(&row)?,
            fallback: self.fallback_decision(plan_id).await?,
            decisions,
            waits,
            dispatches,
            results,
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

/// The columns of a routing decision that [`decision_from_row`] reads.
const DECISION_COLUMNS: &str =
    "task_id, attempt, created_at, agent_id, score, reason, candidates, reserved_capacity";

fn decision_from_row(row: &Row) -> DecisionRow {
    DecisionRow {
        task_id: TaskId::from_uuid(row.get(0)),
        attempt: row.get::<_, i32>(1) as u32,
        decided_at: row.get(2),
        agent_id: row.get(3),
        score: row.get(4),
        reason: row.get(5),
        candidates: row.get(6),
        reserved_capacity: row.get(7),
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
