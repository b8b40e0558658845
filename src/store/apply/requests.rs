//! The writes that a request's own rows take: its arrival, its decomposition, its failure and
//! its cancellation.

use serde_json::json;
use uuid::Uuid;

use super::agents::AgentLedger;
use super::tasks::{NOT_STARTED, ON_AN_AGENT};
use super::{Step, Tx};
use crate::model::domain::{PlanStatus, RequestStatus};
use crate::model::effect::write;
use crate::model::ids::{PlanId, RequestId};
use crate::store::Error;
use crate::store::cached::Cached;
use crate::store::quota;
use crate::store::read::parse_status;

/// A new request (`Write::Request`); nothing if one with its id exists.
pub(super) async fn request(tx: &Tx<'_, '_>, actor: &str, w: &write::Request) -> Result<Step, Error> {
    let meta = &w.meta;
    let inserted = tx
        .execute_cached(
            "INSERT INTO requests (id, text, submitted_by, priority, auto_approve, status, traceparent)
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
            &[
                &meta.request_id.as_uuid(),
                &meta.text,
                &meta.submitted_by,
                &i16::from(meta.priority),
                &meta.auto_approve,
                &RequestStatus::Received.as_str(),
                &w.traceparent,
            ],
        )
        .await?;
    if inserted == 1 {
        let detail = json!({ "submitted_by": meta.submitted_by, "priority": meta.priority,
                             "auto_approve": meta.auto_approve });
        tx.audit(actor, "request.received", Some(meta.request_id), None, None, detail);
        return Ok(Step::Ok);
    }
    // Two texts under one id decided at once: the one recorded first is the request, and the
    // other decides again, to be refused.
    let recorded: Option<String> = tx
        .query_opt_cached("SELECT text FROM requests WHERE id = $1", &[&meta.request_id.as_uuid()])
        .await?
        .map(|row| row.get(0));
    match recorded {
        Some(text) if text != meta.text => {
            Ok(Step::Conflict(format!("request {} was recorded with another text", meta.request_id)))
        }
        _ => Ok(Step::Ok),
    }
}

/// A request's decomposition (`Write::Decomposition`), which moves it on to decomposed.
pub(super) async fn decomposition(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::Decomposition,
) -> Result<Step, Error> {
    let write::Decomposition { request_id, decomposition } = w;
    let inserted = tx
        .execute_cached(
            "INSERT INTO decompositions (request_id, decomposer, intents, confidence, fallback_reason)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            &[
                &request_id.as_uuid(),
                &decomposition.decomposer,
                &serde_json::to_value(&decomposition.intents).expect("intents serialize"),
                &decomposition.confidence.clamp(0.0, 1.0),
                &decomposition.fallback_reason,
            ],
        )
        .await?;
    if inserted == 1 {
        set_request_status(tx, *request_id, RequestStatus::Decomposed, &[RequestStatus::Received]).await?;
        let work_types: Vec<&str> = decomposition.intents.iter().map(|i| i.work_type.as_str()).collect();
        let detail = json!({ "decomposer": decomposition.decomposer, "work_types": work_types,
                             "confidence": decomposition.confidence,
                             "fallback_reason": decomposition.fallback_reason });
        tx.audit(actor, "request.decomposed", Some(*request_id), None, None, detail);
    }
    Ok(Step::Ok)
}

/// A permanent failure of a request under way (`Write::RequestFailed`).
pub(super) async fn request_failed(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::RequestFailed,
) -> Result<Step, Error> {
    let write::RequestFailed { request_id, reason } = w;
    fail_request(tx, actor, *request_id, reason, json!({ "reason": reason })).await?;
    Ok(Step::Ok)
}

/// Fails a request with `reason`, the one way a request fails outside its plan's end: only one
/// under way (one that ended, completed, rejected, cancelled or failed already, keeps how it
/// ended), audited with `detail`. Its plan, if it has one under way, fails with it: what had not
/// started is cancelled, and what it reserved of a provider's quota goes back. Whether it failed.
pub(in crate::store) async fn fail_request(
    tx: &Tx<'_, '_>,
    actor: &str,
    request_id: RequestId,
    reason: &str,
    detail: serde_json::Value,
) -> Result<bool, Error> {
    let under_way: Vec<&str> = RequestStatus::UNDER_WAY.map(|s| s.as_str()).to_vec();
    let failed = tx
        .execute_cached(
            "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
             WHERE id = $1 AND status = ANY($4)",
            &[&request_id.as_uuid(), &RequestStatus::Failed.as_str(), &reason, &under_way],
        )
        .await?;
    if failed == 0 {
        return Ok(false);
    }
    tx.audit(actor, "request.failed", Some(request_id), None, None, detail);
    let plan_under_way =
        [PlanStatus::Planned, PlanStatus::AwaitingApproval, PlanStatus::Approved].map(|s| s.as_str());
    let ended = tx
        .query_opt_cached(
            "UPDATE plans SET status = $2, updated_at = now()
             WHERE request_id = $1 AND status = ANY($3) RETURNING id",
            &[&request_id.as_uuid(), &PlanStatus::Failed.as_str(), &plan_under_way.as_slice()],
        )
        .await?;
    if let Some(row) = ended {
        let plan_id = PlanId::from_uuid(row.get(0));
        super::tasks::cancel_pending(tx, plan_id, "cancelled: the request failed").await?;
        quota::settle(tx, actor, request_id, plan_id, "quota.settled").await?;
    }
    Ok(true)
}

/// A request cancelled by `by`: see [`Write::Cancel`].
pub(super) async fn cancel(
    tx: &Tx<'_, '_>,
    actor: &str,
    request_id: RequestId,
    by: &str,
    reason: &str,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    // The plan first, then the request, as a plan that finishes takes them: two such
    // transactions never wait for each other in a cycle. Locked for update, the request makes a
    // plan being made for it (which shares the lock) wait, and find it cancelled.
    tx.query_cached("SELECT 1 FROM plans WHERE request_id = $1 FOR UPDATE", &[&request_id.as_uuid()]).await?;
    let Some(row) = tx
        .query_opt_cached("SELECT status FROM requests WHERE id = $1 FOR UPDATE", &[&request_id.as_uuid()])
        .await?
    else {
        return Ok(Step::Conflict(format!("no request {request_id}")));
    };
    let status: RequestStatus = parse_status(row.get(0))?;
    if status == RequestStatus::Cancelled {
        return Ok(Step::Ok);
    }
    if status.is_terminal() {
        return Ok(Step::Conflict(format!("request {request_id} is {status}")));
    }
    let why = format!("cancelled by {by}: {reason}");
    tx.execute_cached(
        "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now() WHERE id = $1",
        &[&request_id.as_uuid(), &RequestStatus::Cancelled.as_str(), &why],
    )
    .await?;
    tx.execute_cached(
        "INSERT INTO cancellations (request_id, cancelled_by, reason) VALUES ($1, $2, $3)",
        &[&request_id.as_uuid(), &by, &reason],
    )
    .await?;
    let under_way: Vec<&str> = [PlanStatus::Planned, PlanStatus::AwaitingApproval, PlanStatus::Approved]
        .map(|s| s.as_str())
        .to_vec();
    // The version too: a result decided on the plan as it was is decided again, and ignored.
    let plan = tx
        .query_opt_cached(
            "UPDATE plans SET status = $2, version = version + 1, updated_at = now()
             WHERE request_id = $1 AND status = ANY($3) RETURNING id",
            &[&request_id.as_uuid(), &PlanStatus::Cancelled.as_str(), &under_way],
        )
        .await?;
    let mut stopped = Vec::new();
    if let Some(row) = plan {
        let plan_id = PlanId::from_uuid(row.get(0));
        let unfinished: Vec<&str> = NOT_STARTED.iter().chain(&ON_AN_AGENT).copied().collect();
        let rows = tx
            .query_cached(
                "WITH hit AS (SELECT id, status FROM tasks WHERE plan_id = $1 AND status = ANY($2) FOR UPDATE)
                 UPDATE tasks t SET status = 'cancelled', status_reason = $3, waiting_since = NULL,
                     wait_turn = NULL, lease_expires_at = NULL, updated_at = now()
                 FROM hit WHERE t.id = hit.id
                 RETURNING t.id, t.attempt, hit.status, t.agent_id",
                &[&plan_id.as_uuid(), &unfinished, &why],
            )
            .await?;
        for row in &rows {
            let was: &str = row.get(2);
            if !ON_AN_AGENT.contains(&was) {
                continue;
            }
            let (task_id, attempt): (Uuid, i32) = (row.get(0), row.get(1));
            // What the attempt's routing decision reserved goes back now: its result, if it
            // comes, is late and ignored.
            let reserved = tx
                .query_opt_cached(
                    "SELECT agent_id FROM routing_decisions
                     WHERE task_id = $1 AND attempt = $2 AND reserved_capacity",
                    &[&task_id, &attempt],
                )
                .await?;
            if let Some(reserved) = reserved {
                agents.release(reserved.get(0));
            }
            let agent: Option<String> = row.get(3);
            stopped.push(json!({ "task_id": task_id, "attempt": attempt, "agent_id": agent, "was": was }));
        }
        quota::settle(tx, actor, request_id, plan_id, "quota.settled").await?;
        let detail = json!({ "by": by, "reason": reason, "tasks_cancelled": rows.len(), "stopped": stopped });
        tx.audit(actor, "request.cancelled", Some(request_id), Some(plan_id), None, detail);
    } else {
        let detail = json!({ "by": by, "reason": reason, "tasks_cancelled": 0, "stopped": stopped });
        tx.audit(actor, "request.cancelled", Some(request_id), None, None, detail);
    }
    Ok(Step::Ok)
}

pub(super) async fn set_request_status(
    tx: &Tx<'_, '_>,
    id: RequestId,
    status: RequestStatus,
    from: &[RequestStatus],
) -> Result<(), Error> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    tx.execute_cached(
        "UPDATE requests SET status = $2, updated_at = now() WHERE id = $1 AND status = ANY($3)",
        &[&id.as_uuid(), &status.as_str(), &from],
    )
    .await?;
    Ok(())
}
