//! What a benchmark reads of a run: how many requests ended, when each request's last task was
//! dispatched and when it completed, and how many deliveries the pipeline consumed.

use chrono::{DateTime, Utc};

use super::{Error, Store};
use crate::domain::RequestStatus;
use crate::ids::RequestId;

/// When a completed request's last task was dispatched, and when it completed.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTiming {
    pub request_id: RequestId,
    pub last_dispatched_at: DateTime<Utc>,
    pub completed_at: DateTime<Utc>,
}

impl Store {
    /// How many requests completed, and how many ended otherwise (failed or rejected).
    pub async fn ended_requests(&self) -> Result<(u64, u64), Error> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*) FILTER (WHERE status = $1), count(*) FILTER (WHERE status = ANY($2))
                 FROM requests",
                &[
                    &RequestStatus::Completed.as_str(),
                    &[RequestStatus::Failed.as_str(), RequestStatus::Rejected.as_str()].as_slice(),
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
