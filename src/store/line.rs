//! The line of waiting tasks, and what the scheduler reads besides: whether anything waits, the
//! tasks in the order they are served, those that waited too long; and cancellation.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::cached::Cached;
use super::read::{TASK_COLUMNS, agent_from_row, task_from_row};
use super::{Applied, Cancellation, Error, Store};
use crate::model::domain::{Agent, RequestStatus, Task};
use crate::model::effect::{Write, write};
use crate::model::ids::{AgentId, PlanId, RequestId, TaskId};

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
    /// The agents that failed it before.
    pub failed: BTreeSet<AgentId>,
    /// The provider its plan's fallback decision sends it to, if it goes out.
    pub provider: Option<String>,
    /// The trace context its request was recorded with, which its dispatch continues.
    pub traceparent: Option<String>,
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
        failed: row
            .get::<_, Vec<String>>("failed")
            .into_iter()
            .map(|a| AgentId::parse(a).map_err(|e| Error::Corrupt(e.to_string())))
            .collect::<Result<_, _>>()?,
        provider: row.get("provider"),
        traceparent: row.get("traceparent"),
    })
}

impl Store {
    /// How many tasks wait in line for an agent.
    pub async fn waiting_count(&self) -> Result<i64, Error> {
        let client = self.client().await?;
        let row = client.query_one_cached("SELECT count(*) FROM tasks WHERE status = 'waiting'", &[]).await?;
        Ok(row.get(0))
    }

    /// The agent of this id as stored, and whether any task waits for an agent.
    pub async fn agent_and_line(&self, agent: &AgentId) -> Result<(Option<Agent>, bool), Error> {
        let client = self.client().await?;
        let line: bool = client
            .query_one_cached("SELECT EXISTS (SELECT 1 FROM tasks WHERE status = 'waiting')", &[])
            .await?
            .get(0);
        let row =
            client.query_opt_cached("SELECT * FROM agents_now WHERE id = $1", &[&agent.as_str()]).await?;
        Ok((row.as_ref().map(agent_from_row).transpose()?, line))
    }

    /// The first `limit` tasks of the line that could go somewhere now, in the order they are
    /// served: priority, then turn, then how long they have waited. "Could go somewhere": an
    /// agent with a slot free, a fresh heartbeat (within `heartbeat_ttl_secs`), the capabilities
    /// and the resources, that has not failed it; or a default agent (a first attempt of one of
    /// `defaulted` work types); or a provider (the plan sends it out). The others keep their
    /// place without being read, so that however many of them head the line, the tasks behind
    /// them are seen.
    pub async fn line(
        &self,
        limit: i64,
        defaulted: &[&str],
        heartbeat_ttl_secs: u64,
    ) -> Result<Vec<WaitingTask>, Error> {
        let filter = "(
                (t.attempt = 0 AND t.work_type = ANY($2))
             OR EXISTS (SELECT 1 FROM fallback_decisions f
                        WHERE f.plan_id = t.plan_id AND f.use_external AND t.id = ANY(f.external_tasks))
             OR EXISTS (SELECT 1 FROM agents_now a
                        WHERE a.in_flight < a.capacity
                          AND a.last_heartbeat >= now() - make_interval(secs => $3)
                          AND a.capabilities @> t.capabilities
                          AND a.cpu >= t.cpu AND a.memory_mb >= t.memory_mb AND a.gpu >= t.gpu
                          AND NOT EXISTS (SELECT 1 FROM task_results r
                                          WHERE r.task_id = t.id AND r.agent_id = a.id AND NOT r.success)))
            ORDER BY t.priority DESC, t.wait_turn, t.waiting_since, t.position, t.id LIMIT $1";
        self.waiting_tasks(filter, &[&limit, &defaulted, &(heartbeat_ttl_secs as f64)]).await
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
        // With each task, what judging it needs besides: who failed it, where its plan sends it.
        let sql = format!(
            "SELECT {}, p.request_id, t.plan_id, t.priority,
                    ARRAY(SELECT r.agent_id FROM task_results r WHERE r.task_id = t.id AND NOT r.success)
                        AS failed,
                    (SELECT f.provider FROM fallback_decisions f
                     WHERE f.plan_id = t.plan_id AND f.use_external AND t.id = ANY(f.external_tasks)) AS provider,
                    (SELECT q.traceparent FROM requests q WHERE q.id = p.request_id) AS traceparent
             FROM tasks t JOIN plans p ON p.id = t.plan_id
             WHERE t.status = 'waiting' AND {filter}",
            columns.join(", ")
        );
        let rows = client.query_cached(&sql, params).await?;
        rows.iter().map(waiting_from_row).collect()
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
            let write =
                Write::Cancel(write::Cancel { request_id, by: by.to_owned(), reason: reason.to_owned() });
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
