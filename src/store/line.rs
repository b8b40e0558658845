//! The line of waiting tasks, and what the scheduler reads besides: whether anything waits, the
//! tasks in the order they are served, those that waited too long; and cancellation.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::cached::Cached;
use super::read::{
    FALLBACK_COLUMNS, TASK_COLUMNS, agent_from_row, failed_by_task, fallback_from_row, task_from_row,
};
use super::{Applied, Cancellation, Error, Store};
use crate::domain::{Agent, RequestStatus, Task};
use crate::effect::Write;
use crate::ids::{AgentId, PlanId, RequestId, TaskId};
use crate::policy::FallbackDecision;

/// A task waiting in line for an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct WaitingTask {
    pub request_id: RequestId,
    pub plan_id: PlanId,
    pub task: Task,
    /// The attempt it waits to make.
    pub attempt: u32,
    pub priority: u8,
    pub waiting_since: DateTime<Utc>,
}

/// What a cancellation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cancelled {
    /// It was cancelled before: nothing was changed.
    pub already: bool,
    /// The attempts that agents held (or were about to) when it was cancelled, and hold still as
    /// far as the store knows: to be aborted on their agents.
    pub stopped: Vec<Stopped>,
}

/// An attempt of a cancelled request that went to an agent and has not reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    pub plan_id: PlanId,
    pub task_id: TaskId,
    pub key: String,
    pub attempt: u32,
    pub agent_id: AgentId,
}

fn waiting_from_row(row: &tokio_postgres::Row) -> Result<WaitingTask, Error> {
    Ok(WaitingTask {
        request_id: RequestId::from_uuid(row.get("request_id")),
        plan_id: PlanId::from_uuid(row.get("plan_id")),
        task: task_from_row(row)?,
        attempt: row.get::<_, i32>("attempt") as u32 + 1,
        priority: row.get::<_, i16>("priority").clamp(0, 9) as u8,
        waiting_since: row.get("waiting_since"),
    })
}

impl Store {
    /// Whether any task waits for an agent.
    pub async fn waiting_exists(&self) -> Result<bool, Error> {
        let client = self.client().await?;
        let row = client
            .query_one_cached("SELECT EXISTS (SELECT 1 FROM tasks WHERE status = 'waiting')", &[])
            .await?;
        Ok(row.get(0))
    }

    /// The agent of this id as stored, and whether any task waits for an agent.
    pub async fn agent_and_line(&self, agent: &AgentId) -> Result<(Option<Agent>, bool), Error> {
        let client = self.client().await?;
        let line: bool = client
            .query_one_cached("SELECT EXISTS (SELECT 1 FROM tasks WHERE status = 'waiting')", &[])
            .await?
            .get(0);
        let row = client.query_opt_cached("SELECT * FROM agents WHERE id = $1", &[&agent.as_str()]).await?;
        Ok((row.as_ref().map(agent_from_row).transpose()?, line))
    }

    /// The first `limit` tasks of the line, in the order they are served: priority, then turn,
    /// then how long they have waited.
    pub async fn line(&self, limit: i64) -> Result<Vec<WaitingTask>, Error> {
        let order = "ORDER BY t.priority DESC, t.wait_turn, t.waiting_since, t.position, t.id LIMIT $1";
        self.waiting_tasks(&format!("TRUE {order}"), &[&limit]).await
    }

    /// Tasks that have waited longer than `max_wait_secs`, the longest first, at most `limit`.
    pub async fn expired_waits(&self, max_wait_secs: u64, limit: i64) -> Result<Vec<WaitingTask>, Error> {
        let filter = "t.waiting_since < now() - make_interval(secs => $1) ORDER BY t.waiting_since LIMIT $2";
        self.waiting_tasks(filter, &[&(max_wait_secs as f64), &limit]).await
    }

    /// The waiting tasks that `filter` (a condition, and its order and limit) selects.
    async fn waiting_tasks(
        &self,
        filter: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<WaitingTask>, Error> {
        let client = self.client().await?;
        let columns: Vec<String> = TASK_COLUMNS.split(',').map(|c| format!("t.{}", c.trim())).collect();
        let sql = format!(
            "SELECT {}, p.request_id, t.plan_id, t.priority FROM tasks t JOIN plans p ON p.id = t.plan_id
             WHERE t.status = 'waiting' AND {filter}",
            columns.join(", ")
        );
        let rows = client.query_cached(&sql, params).await?;
        rows.iter().map(waiting_from_row).collect()
    }

    /// The agents that failed each of `tasks` before.
    pub async fn failed_agents_of(
        &self,
        tasks: &[TaskId],
    ) -> Result<HashMap<TaskId, BTreeSet<AgentId>>, Error> {
        let client = self.client().await?;
        let ids: Vec<Uuid> = tasks.iter().map(|t| t.as_uuid()).collect();
        let rows = client
            .query_cached(
                "SELECT task_id, agent_id FROM task_results WHERE task_id = ANY($1) AND NOT success",
                &[&ids],
            )
            .await?;
        failed_by_task(&rows)
    }

    /// The fallback decisions of `plans` that send work to an external provider.
    pub async fn external_decisions(&self, plans: &[PlanId]) -> Result<Vec<FallbackDecision>, Error> {
        let client = self.client().await?;
        let ids: Vec<Uuid> = plans.iter().map(|p| p.as_uuid()).collect();
        let rows = client
            .query_cached(
                &format!(
                    "SELECT {FALLBACK_COLUMNS} FROM fallback_decisions WHERE plan_id = ANY($1) AND use_external"
                ),
                &[&ids],
            )
            .await?;
        Ok(rows.iter().map(fallback_from_row).collect())
    }

    /// Cancels a request (see [`Write::Cancel`]), as `by`, with `reason`. A request cancelled
    /// before is left as it was (`already`); one that ended otherwise is refused, saying how it
    /// ended; an unknown one is not found. Either way, what agents may still hold of it is
    /// returned, to be aborted there.
    pub async fn cancel(&self, request_id: RequestId, by: &str, reason: &str) -> Result<Cancelled, Error> {
        let status = self
            .request_status(request_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no request {request_id}")))?;
        let already = status == RequestStatus::Cancelled;
        if !already {
            if status.is_terminal() {
                return Err(Error::Refused(format!(
                    "request {request_id} is {status} already: there is nothing left to cancel"
                )));
            }
            let write = Write::Cancel { request_id, by: by.to_owned(), reason: reason.to_owned() };
            match self.apply(by, None, std::slice::from_ref(&write)).await? {
                Applied::Done => {}
                // It ended between the look above and the write.
                Applied::Conflict(why) => {
                    return Err(Error::Refused(format!("{why} already: there is nothing left to cancel")));
                }
                other => {
                    return Err(Error::Corrupt(format!("cancellation of {request_id} applied as {other:?}")));
                }
            }
        }
        Ok(Cancelled { already, stopped: self.stopped_attempts(request_id.plan_id()).await? })
    }

    /// The attempts of a cancelled plan that went to an agent and have not reported.
    async fn stopped_attempts(&self, plan_id: PlanId) -> Result<Vec<Stopped>, Error> {
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT t.id, t.attempt, d.agent_id, t.key FROM tasks t
                 JOIN routing_decisions d ON d.task_id = t.id AND d.attempt = t.attempt
                 WHERE t.plan_id = $1 AND t.status = 'cancelled' AND d.agent_id IS NOT NULL
                   AND NOT EXISTS (SELECT 1 FROM task_results r WHERE r.task_id = t.id AND r.attempt = t.attempt)
                 ORDER BY t.position",
                &[&plan_id.as_uuid()],
            )
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Stopped {
                    plan_id,
                    task_id: TaskId::from_uuid(row.get(0)),
                    key: row.get(3),
                    attempt: row.get::<_, i32>(1) as u32,
                    agent_id: AgentId::parse(row.get::<_, String>(2))
                        .map_err(|e| Error::Corrupt(e.to_string()))?,
                })
            })
            .collect()
    }

    /// Who cancelled the request, why and when, if it was.
    pub async fn cancellation(&self, request_id: RequestId) -> Result<Option<Cancellation>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT cancelled_by, reason, created_at FROM cancellations WHERE request_id = $1",
                &[&request_id.as_uuid()],
            )
            .await?;
        Ok(row.map(|r| Cancellation { by: r.get(0), reason: r.get(1), at: r.get(2) }))
    }
}
