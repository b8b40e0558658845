//! Queries: the context that stages decide on (requests, plans and their tasks, agents, leases,
//! learnt durations), and the readers of stored rows that the other queries share.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::Row;
use uuid::Uuid;

use super::cached::Cached;
use super::{Error, Store};
use crate::decisions::fallback::FallbackDecision;
use crate::model::domain::{Agent, Plan, PlanStatus, RequestStatus, Resources, Task, TaskStatus};
use crate::model::ids::{AgentId, DecisionId, PlanId, RequestId, TaskId, WorkType};
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
    /// "agent"; "simulated" when a simulated agent made it up; "lease" when the lease expired
    /// without a result.
    pub source: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub received_at: DateTime<Utc>,
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

pub(super) fn task_state_from_row(row: &Row) -> Result<TaskState, Error> {
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

/// A stored decision, as it was written (see `apply::plans::fallback`): a row that no decision
/// could have written (going out without a provider, infeasible yet going out) is an error, not
/// something to read as the nearest decision.
fn fallback_from_row(r: &Row) -> Result<FallbackDecision, Error> {
    let (plan_id, reason, complexity) = (PlanId::from_uuid(r.get(0)), r.get(3), r.get(4));
    let (infeasible, external, provider) =
        (r.get::<_, bool>(8), r.get::<_, bool>(1), r.get::<_, Option<String>>(2));
    Ok(match (infeasible, external, provider) {
        (true, false, None) => FallbackDecision::Infeasible { plan_id, complexity, reason },
        (false, false, None) => FallbackDecision::Local { plan_id, complexity, reason },
        (false, true, Some(provider)) => FallbackDecision::External {
            plan_id,
            complexity,
            reason,
            provider,
            tasks: r.get::<_, Vec<uuid::Uuid>>(7).into_iter().map(TaskId::from_uuid).collect(),
            cost_micros: r.get(5),
            quota_left_micros: r.get::<_, Option<i64>>(6).unwrap_or_default(),
        },
        (infeasible, external, provider) => {
            return Err(Error::Corrupt(format!(
                "the fallback decision of plan {plan_id} says infeasible = {infeasible}, \
                 use_external = {external}, provider = {provider:?}"
            )));
        }
    })
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

    /// The text a request was recorded with, if it was.
    pub async fn request_text(&self, request_id: RequestId) -> Result<Option<String>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached("SELECT text FROM requests WHERE id = $1", &[&request_id.as_uuid()])
            .await?;
        Ok(row.map(|row| row.get(0)))
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
        let rows = client.query_cached("SELECT * FROM agents_now ORDER BY id", &[]).await?;
        rows.iter().map(agent_from_row).collect()
    }

    /// How long the tasks of `work_types` that succeeded most recently took (the last
    /// [`DURATION_SAMPLES`] of each work type within 30 days), by work type and step (the 90th
    /// percentile): what the planner learns estimated durations from. Recent history only, so
    /// that the estimate follows the fleet as it changes and planning costs the same however
    /// much history is kept; local work only, since a model's speed says nothing of how long an
    /// agent takes; and work that really ran, since a simulated agent's speed is made up.
    pub async fn duration_history(&self, work_types: &[&str]) -> Result<Vec<DurationStats>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT s.work_type, split_part(s.key, '.', 2) AS step, count(*)::bigint,
                        percentile_cont(0.9) WITHIN GROUP (
                            ORDER BY extract(epoch FROM s.finished_at - s.started_at))::float8
                 FROM unnest($1::text[]) AS w (work_type)
                 CROSS JOIN LATERAL (
                     SELECT t.id, t.plan_id, t.key, t.work_type, r.started_at, r.finished_at
                     FROM tasks t
                     JOIN task_results r ON r.task_id = t.id AND r.attempt = t.attempt
                     WHERE t.status = 'succeeded' AND t.work_type = w.work_type
                       AND t.finished_at > now() - interval '30 days'
                       AND r.success AND r.source = 'agent'
                     ORDER BY t.finished_at DESC LIMIT $2) AS s
                 WHERE NOT EXISTS (SELECT 1 FROM fallback_decisions f
                                   WHERE f.plan_id = s.plan_id AND s.id = ANY(f.external_tasks))
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
        row.as_ref().map(fallback_from_row).transpose()
    }

    /// The verdict recorded for a plan: approved (true), rejected (false), or none yet.
    pub async fn approval_verdict(&self, plan_id: PlanId) -> Result<Option<bool>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached("SELECT approved FROM approvals WHERE plan_id = $1", &[&plan_id.as_uuid()])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }
}

impl Store {
    /// How the requests of `ids` that have ended ended, and how long after their receipt: for
    /// the metrics, read once a stage has committed their end.
    pub async fn request_ends(
        &self,
        ids: &[RequestId],
    ) -> Result<Vec<(RequestStatus, std::time::Duration)>, Error> {
        let ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT status, EXTRACT(EPOCH FROM updated_at - created_at)::float8 FROM requests \
                 WHERE id = ANY($1) AND status IN ('completed', 'failed', 'rejected', 'cancelled')",
                &[&ids],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let status: RequestStatus = row.get::<_, &str>(0).parse().ok()?;
                let seconds: f64 = row.get(1);
                Some((status, std::time::Duration::from_secs_f64(seconds.max(0.0))))
            })
            .collect())
    }
}
