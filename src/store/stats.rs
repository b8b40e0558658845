//! What a benchmark reads of a run: how many requests ended, when each request's last task was
//! dispatched and when it completed, and how many deliveries the pipeline consumed.

use chrono::{DateTime, Utc};

use super::{Error, Store};
use crate::model::domain::RequestStatus;
use crate::model::ids::RequestId;

/// When a completed request's last task was dispatched, and when it completed.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTiming {
    pub request_id: RequestId,
    pub last_dispatched_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

impl Store {
    /// For every dispatched attempt, how long it took from ready (released, or in line) to
    /// confirmed in its agent's queue, in milliseconds.
    pub async fn waits_to_dispatch(&self) -> Result<Vec<f64>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT extract(epoch FROM p.confirmed_at - d.ready_at)::float8 * 1000
                 FROM routing_decisions d JOIN dispatches p ON p.task_id = d.task_id AND p.attempt = d.attempt
                 WHERE d.ready_at IS NOT NULL",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, f64>(0).max(0.0)).collect())
    }

    /// When each task that waited in line began to wait and was placed: work waited for a
    /// slot during the union of these.
    pub async fn waits(&self) -> Result<Vec<(DateTime<Utc>, DateTime<Utc>)>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT w.at, d.created_at FROM audit_log w
                 JOIN routing_decisions d ON d.task_id = w.task_id AND d.attempt = (w.detail->>'attempt')::int
                 WHERE w.event = 'task.waiting'",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// When agents ran tasks, as they reported it.
    pub async fn runs(&self) -> Result<Vec<(DateTime<Utc>, DateTime<Utc>)>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT started_at, finished_at FROM task_results WHERE source IN ('agent', 'simulated')",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// How many requests completed, and how many ended otherwise (failed, rejected, cancelled).
    pub async fn ended_requests(&self) -> Result<(u64, u64), Error> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = $1), count(*) FILTER (WHERE status = ANY($2))
                 FROM requests",
                &[
                    &RequestStatus::Completed.as_str(),
                    &[RequestStatus::Failed, RequestStatus::Rejected, RequestStatus::Cancelled]
                        .map(|s| s.as_str())
                        .as_slice(),
                ],
            )
            .await?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    /// The reason of the first request that failed, if one did.
    pub async fn first_failure(&self) -> Result<Option<String>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT failure_reason FROM requests WHERE status = $1 ORDER BY updated_at LIMIT 1",
                &[&RequestStatus::Failed.as_str()],
            )
            .await?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// The timings of every completed request.
    pub async fn request_timings(&self) -> Result<Vec<RequestTiming>, Error> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT r.id, max(d.confirmed_at), r.updated_at
                 FROM requests r JOIN plans p ON p.request_id = r.id
                      JOIN tasks t ON t.plan_id = p.id JOIN dispatches d ON d.task_id = t.id
                 WHERE r.status = $1 GROUP BY r.id, r.updated_at",
                &[&RequestStatus::Completed.as_str()],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| RequestTiming {
                request_id: RequestId::from_uuid(r.get(0)),
                last_dispatched_at: r.get(1),
                completed_at: r.get(2),
            })
            .collect())
    }

    /// The deliveries the pipeline consumed: one per input a stage processed (its idempotency
    /// marker) and one per task an agent was given (its dispatch). Heartbeats are not counted.
    pub async fn deliveries(&self) -> Result<u64, Error> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM processed_messages WHERE stage <> 'heartbeat')
                      + (SELECT count(*) FROM dispatches)",
                &[],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}
