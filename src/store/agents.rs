//! Registering an agent from outside its heartbeats (the command line, tests): applied as the
//! `Write::Agent` a heartbeat would be; and removing one that is gone for good.

use chrono::Utc;
use serde::Serialize;
use serde_json::json;

use super::apply::Tx;
use super::cached::Cached;
use super::read::agent_from_row;
use super::{Error, Store};
use crate::decisions::plural;
use crate::model::domain::Agent;
use crate::model::effect::{Write, write};
use crate::model::ids::AgentId;
use crate::model::wire::Heartbeat;

/// An agent as `agents list` shows it: its row, and how often it said it heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListedAgent {
    #[serde(flatten)]
    pub agent: Agent,
    /// `None` when it did not say (registered by hand, or an agent of an older version).
    pub heartbeat_every_secs: Option<u32>,
}

/// At most this many of the tasks in flight on an agent are named when its removal is refused.
const TASKS_NAMED: i64 = 3;

impl Store {
    /// Registers (or updates) an agent, as its heartbeat would.
    pub async fn register_agent(&self, actor: &str, heartbeat: Heartbeat) -> Result<(), Error> {
        let write = Write::Agent(write::Agent { heartbeat, received_at: Utc::now() });
        self.apply(actor, None, std::slice::from_ref(&write)).await.map(|_| ())
    }

    /// Every known agent, by id, with the heartbeat interval it announced.
    pub async fn list_agents(&self) -> Result<Vec<ListedAgent>, Error> {
        let client = self.client().await?;
        let rows = client.query_cached("SELECT * FROM agents_now ORDER BY id", &[]).await?;
        rows.iter()
            .map(|row| {
                let every: Option<i32> = row.get("heartbeat_every_secs");
                Ok(ListedAgent {
                    agent: agent_from_row(row)?,
                    heartbeat_every_secs: every.and_then(|secs| u32::try_from(secs).ok()),
                })
            })
            .collect()
    }

    /// Removes an agent's row, audited as `agent.removed` by `by`, and returns it as it was; `None`
    /// if there is no such agent. Refused while it has tasks in flight (capacity reserved on it,
    /// or tasks routed or dispatched to it): their results or expired leases still need the row.
    /// An agent still running registers again with its next heartbeat.
    pub async fn remove_agent(&self, id: &AgentId, by: &str) -> Result<Option<Agent>, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The lock makes routing decisions that reserve capacity on it wait, then find it gone.
        let locked =
            tx.query_opt_cached("SELECT 1 FROM agents WHERE id = $1 FOR UPDATE", &[&id.as_str()]).await?;
        if locked.is_none() {
            return Ok(None);
        }
        let row = tx.query_one_cached("SELECT * FROM agents_now WHERE id = $1", &[&id.as_str()]).await?;
        let agent = agent_from_row(&row)?;
        let tasks = tx
            .query_cached(
                "SELECT count(*) OVER (), t.key, t.status, p.request_id
                 FROM tasks t JOIN plans p ON p.id = t.plan_id
                 WHERE t.agent_id = $1 AND t.status IN ('routed', 'dispatched')
                 ORDER BY t.updated_at, t.id LIMIT $2",
                &[&id.as_str(), &TASKS_NAMED],
            )
            .await?;
        if agent.in_flight > 0 || !tasks.is_empty() {
            let count = tasks.first().map_or(0, |r| r.get::<_, i64>(0)).max(i64::from(agent.in_flight));
            let named: Vec<String> = tasks
                .iter()
                .map(|r| {
                    let request: uuid::Uuid = r.get(3);
                    format!("{} of request {request} ({})", r.get::<_, String>(1), r.get::<_, String>(2))
                })
                .collect();
            let mut reason = format!(
                "agent {id} has {count} {} in flight; remove it once {} finished, or cancel {} {}",
                plural(count as usize, "task", "tasks"),
                plural(count as usize, "it has", "they have"),
                plural(count as usize, "its", "their"),
                plural(count as usize, "request", "requests"),
            );
            if !named.is_empty() {
                reason.push_str(&format!(": {}", named.join(", ")));
            }
            return Err(Error::Refused(reason));
        }
        tx.execute_cached("DELETE FROM agents WHERE id = $1", &[&id.as_str()]).await?;
        tx.execute_cached("DELETE FROM agent_deltas WHERE agent_id = $1", &[&id.as_str()]).await?;
        let detail = json!({
            "agent_id": id.as_str(),
            "capabilities": agent.capabilities,
            "capacity": agent.capacity,
            "labels": agent.labels,
            "last_heartbeat": agent.last_heartbeat,
            "succeeded": agent.succeeded,
            "failed": agent.failed,
        });
        let audited = Tx::new(&tx);
        audited.audit(by, "agent.removed", None, None, None, detail);
        audited.flush().await?;
        tx.commit().await?;
        Ok(Some(agent))
    }
}
