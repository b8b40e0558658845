//! `switchyard list`: the requests, newest first, each in one line of figures and a short reason.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::cached::Cached;
use super::read::parse_status;
use super::{Error, Store};
use crate::model::domain::RequestStatus;
use crate::model::ids::{PlanId, RequestId};

/// Which requests to list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFilter {
    pub status: Option<RequestStatus>,
    /// Only requests received at or after this instant.
    pub since: Option<DateTime<Utc>>,
    pub limit: u32,
}

/// A request in one line: where it stands, its tasks, and in a few words why it stands there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestSummary {
    pub request_id: RequestId,
    pub status: RequestStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub text: String,
    pub submitted_by: Option<String>,
    pub plan_id: Option<PlanId>,
    /// Tasks that succeeded, of `tasks_total` (0 before the request is planned).
    pub tasks_done: u32,
    pub tasks_total: u32,
    /// Tasks routed or dispatched to an agent and not finished: running, or about to.
    pub tasks_running: u32,
    /// Tasks waiting in line for an agent.
    pub tasks_waiting: u32,
    /// Why it failed, what it waits for, who cancelled it…; `None` when there is nothing to say.
    pub reason: Option<String>,
}

impl Store {
    /// The requests that `filter` selects, newest first.
    pub async fn list_requests(&self, filter: &RequestFilter) -> Result<Vec<RequestSummary>, Error> {
        let client = self.client().await?;
        let status = filter.status.map(|s| s.as_str());
        let rows = client
            .query_cached(
                "SELECT r.id, r.status, r.created_at, r.updated_at, r.text, r.submitted_by,
                        r.failure_reason, p.id,
                        count(t.id) FILTER (WHERE t.status = 'succeeded'),
                        count(t.id),
                        count(t.id) FILTER (WHERE t.status IN ('routed', 'dispatched')),
                        count(t.id) FILTER (WHERE t.status = 'waiting'),
                        (array_agg(t.key || ': ' || t.status_reason ORDER BY t.waiting_since, t.position)
                            FILTER (WHERE t.status = 'waiting' AND t.status_reason IS NOT NULL))[1],
                        c.cancelled_by, c.reason, a.decided_by, a.reason
                 FROM requests r
                 LEFT JOIN plans p ON p.request_id = r.id
                 LEFT JOIN tasks t ON t.plan_id = p.id
                 LEFT JOIN cancellations c ON c.request_id = r.id
                 LEFT JOIN approvals a ON a.plan_id = p.id AND NOT a.approved
                 WHERE ($1::text IS NULL OR r.status = $1)
                   AND ($2::timestamptz IS NULL OR r.created_at >= $2)
                 GROUP BY r.id, p.id, c.request_id, a.plan_id
                 ORDER BY r.created_at DESC, r.id DESC
                 LIMIT $3",
                &[&status, &filter.since, &i64::from(filter.limit)],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let count = |i: usize| u32::try_from(row.get::<_, i64>(i)).unwrap_or(u32::MAX);
                let status: RequestStatus = parse_status(row.get(1))?;
                let plan_id: Option<uuid::Uuid> = row.get(7);
                let (tasks_running, tasks_waiting) = (count(10), count(11));
                let why = Why {
                    failure: row.get(6),
                    plan_id: plan_id.map(PlanId::from_uuid),
                    running: tasks_running,
                    waiting: tasks_waiting,
                    first_wait: row.get(12),
                    cancelled: row.get::<_, Option<String>>(13).zip(row.get(14)),
                    rejected: row.get::<_, Option<String>>(15).zip(row.get(16)),
                };
                Ok(RequestSummary {
                    request_id: RequestId::from_uuid(row.get(0)),
                    status,
                    created_at: row.get(2),
                    updated_at: row.get(3),
                    text: row.get(4),
                    submitted_by: row.get(5),
                    plan_id: why.plan_id,
                    tasks_done: count(8),
                    tasks_total: count(9),
                    tasks_running,
                    tasks_waiting,
                    reason: why.reason(status),
                })
            })
            .collect()
    }
}

/// What a request's row and its plan's say about why it stands where it does.
struct Why {
    failure: Option<String>,
    plan_id: Option<PlanId>,
    running: u32,
    waiting: u32,
    first_wait: Option<String>,
    /// Who cancelled it, and why.
    cancelled: Option<(String, String)>,
    /// Who rejected its plan, and why.
    rejected: Option<(String, String)>,
}

impl Why {
    fn reason(self, status: RequestStatus) -> Option<String> {
        match status {
            RequestStatus::Received => Some("to be decomposed".into()),
            RequestStatus::Decomposed => Some("to be planned".into()),
            RequestStatus::Planned => Some("to be decided: local or external, approval".into()),
            RequestStatus::AwaitingApproval => Some(match self.plan_id {
                Some(plan) => format!("awaits approval: switchyard approve {plan}"),
                None => "awaits approval".into(),
            }),
            RequestStatus::InProgress => match (self.waiting, self.first_wait) {
                (0, _) if self.running > 0 => Some(with_agents(self.running)),
                (0, _) => None,
                (waiting, first) => {
                    let mut line = format!("{waiting} waiting for an agent");
                    if let Some(first) = first {
                        line.push_str(&format!(" ({first})"));
                    }
                    if self.running > 0 {
                        line.push_str(&format!(", {}", with_agents(self.running)));
                    }
                    Some(line)
                }
            },
            RequestStatus::Rejected => match self.rejected {
                Some((by, why)) => Some(format!("rejected by {by}: {why}")),
                None => self.failure,
            },
            RequestStatus::Cancelled => match self.cancelled {
                Some((by, why)) => Some(format!("cancelled by {by}: {why}")),
                None => self.failure,
            },
            RequestStatus::Failed | RequestStatus::Completed => self.failure,
        }
    }
}

/// Tasks routed or dispatched to agents: Switchyard cannot tell whether they started yet.
fn with_agents(n: u32) -> String {
    format!("{n} with {}", if n == 1 { "an agent" } else { "agents" })
}
