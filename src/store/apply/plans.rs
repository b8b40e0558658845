//! The writes that move a plan on: its creation with its tasks, its fallback decision, its
//! approval, and its end.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use uuid::Uuid;

use super::requests::set_request_status;
use super::tasks::cancel_pending;
use super::{Step, Tx};
use crate::decisions::fallback::FallbackDecision;
use crate::model::domain::{Plan, PlanStatus, RequestStatus, TaskStatus};
use crate::model::effect::write;
use crate::model::ids::{PlanId, TaskId};
use crate::store::Error;
use crate::store::cached::Cached;
use crate::store::quota;

/// A new plan and its tasks (`Write::Plan`), unless its request was cancelled meanwhile.
pub(super) async fn plan(tx: &Tx<'_, '_>, actor: &str, w: &write::Plan) -> Result<Step, Error> {
    let write::Plan { plan, complexity, infeasible, duration_basis } = w;
    // Shared with a cancellation, which locks the request for update: a plan is never
    // made for a request cancelled meanwhile.
    let request = tx
        .query_opt_cached(
            "SELECT status FROM requests WHERE id = $1 FOR SHARE",
            &[&plan.request_id.as_uuid()],
        )
        .await?;
    if request.is_some_and(|row| row.get::<_, &str>(0) == RequestStatus::Cancelled.as_str()) {
        return Ok(Step::Conflict(format!("request {} is cancelled", plan.request_id)));
    }
    let terms = serde_json::to_value(&complexity.terms).expect("terms serialize");
    let inserted = tx
        .execute_cached(
            "INSERT INTO plans (id, request_id, status, complexity, complexity_terms, infeasible)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                &plan.id.as_uuid(),
                &plan.request_id.as_uuid(),
                &PlanStatus::Planned.as_str(),
                &complexity.score,
                &terms,
                &serde_json::to_value(infeasible).expect("infeasible tasks serialize"),
            ],
        )
        .await?;
    if inserted == 1 {
        insert_tasks(tx, plan, duration_basis).await?;
        set_request_status(tx, plan.request_id, RequestStatus::Planned, &[RequestStatus::Decomposed]).await?;
        let keys: Vec<&str> = plan.tasks().iter().map(|t| t.key.as_str()).collect();
        let detail = json!({ "tasks": keys, "complexity": complexity.score, "terms": terms,
                             "infeasible": infeasible, "learnt_durations": duration_basis });
        tx.audit(actor, "plan.created", Some(plan.request_id), Some(plan.id), None, detail);
    }
    Ok(Step::Ok)
}

/// The tasks of a new plan, all in one statement. A task's capabilities and dependencies are
/// lists of their own, which arrays of arrays cannot carry (they must be rectangular): each goes
/// as a JSON array and is made an array again.
async fn insert_tasks(
    tx: &Tx<'_, '_>,
    plan: &Plan,
    duration_basis: &BTreeMap<TaskId, String>,
) -> Result<(), Error> {
    let tasks = plan.tasks();
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id.as_uuid()).collect();
    let positions: Vec<i32> = (0..tasks.len() as i32).collect();
    let keys: Vec<&str> = tasks.iter().map(|t| t.key.as_str()).collect();
    let work_types: Vec<&str> = tasks.iter().map(|t| t.work_type.as_str()).collect();
    let descriptions: Vec<&str> = tasks.iter().map(|t| t.description.as_str()).collect();
    let durations: Vec<i32> = tasks.iter().map(|t| t.estimated_duration_secs as i32).collect();
    let cpus: Vec<f64> = tasks.iter().map(|t| t.resources.cpu).collect();
    let memory: Vec<i64> = tasks.iter().map(|t| t.resources.memory_mb as i64).collect();
    let gpus: Vec<i32> = tasks.iter().map(|t| t.resources.gpu as i32).collect();
    let capabilities: Vec<Value> = tasks.iter().map(|t| json!(t.capabilities)).collect();
    let depends_on: Vec<Value> = tasks.iter().map(|t| json!(t.depends_on)).collect();
    let affinities: Vec<Value> =
        tasks.iter().map(|t| serde_json::to_value(&t.affinity).expect("affinity serializes")).collect();
    let bases: Vec<&str> =
        tasks.iter().map(|t| duration_basis.get(&t.id).map_or("catalog", String::as_str)).collect();
    tx.execute_cached(
        "INSERT INTO tasks (id, plan_id, position, key, work_type, description,
             estimated_duration_secs, cpu, memory_mb, gpu, capabilities, depends_on,
             affinity, status, duration_basis)
         SELECT t.id, $2, t.position, t.key, t.work_type, t.description, t.duration, t.cpu, t.memory,
                t.gpu, ARRAY(SELECT jsonb_array_elements_text(t.capabilities)),
                ARRAY(SELECT jsonb_array_elements_text(t.depends_on)::uuid), t.affinity, $3, t.basis
         FROM unnest($1::uuid[], $4::int[], $5::text[], $6::text[], $7::text[], $8::int[],
                     $9::float8[], $10::bigint[], $11::int[], $12::jsonb[], $13::jsonb[],
                     $14::jsonb[], $15::text[])
              AS t (id, position, key, work_type, description, duration, cpu, memory, gpu,
                    capabilities, depends_on, affinity, basis)",
        &[
            &ids,
            &plan.id.as_uuid(),
            &TaskStatus::Pending.as_str(),
            &positions,
            &keys,
            &work_types,
            &descriptions,
            &durations,
            &cpus,
            &memory,
            &gpus,
            &capabilities,
            &depends_on,
            &affinities,
            &bases,
        ],
    )
    .await?;
    Ok(())
}

/// A plan's external-AI decision (`Write::Fallback`), with its quota reservation if it has one.
pub(super) async fn fallback(tx: &Tx<'_, '_>, actor: &str, w: &write::Fallback) -> Result<Step, Error> {
    let write::Fallback { request_id, decision, reserve } = w;
    let plan_id = decision.plan_id();
    if plan_cancelled(tx, plan_id).await? {
        return Ok(Step::Conflict(format!("plan {plan_id} is cancelled")));
    }
    let (external, quota_left) = match decision {
        FallbackDecision::External { quota_left_micros, .. } => (true, Some(*quota_left_micros)),
        _ => (false, None),
    };
    let inserted = tx
        .execute_cached(
            "INSERT INTO fallback_decisions (plan_id, use_external, provider, reason,
                 complexity, estimated_cost_micros, quota_left_micros, external_tasks, infeasible,
                 complexity_terms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                     (SELECT complexity_terms FROM plans WHERE id = $1))
             ON CONFLICT DO NOTHING",
            &[
                &plan_id.as_uuid(),
                &external,
                &decision.provider(),
                &decision.reason(),
                &decision.complexity(),
                &decision.cost_micros(),
                &quota_left,
                &decision.external_tasks().iter().map(|t| t.as_uuid()).collect::<Vec<_>>(),
                &matches!(decision, FallbackDecision::Infeasible { .. }),
            ],
        )
        .await?;
    if inserted == 0 {
        // Another message of the same plan decided first: decide again on its decision.
        return Ok(Step::Conflict(format!("plan {plan_id} already has a fallback decision")));
    }
    if let Some(reservation) = reserve {
        let left = match quota::reserve(tx, plan_id, reservation).await? {
            Ok(left) => left,
            Err(conflict) => return Ok(Step::Conflict(conflict)),
        };
        // The figure that counts is the one after this reservation, under the row lock.
        tx.execute_cached(
            "UPDATE fallback_decisions SET quota_left_micros = $2 WHERE plan_id = $1",
            &[&plan_id.as_uuid(), &left],
        )
        .await?;
    }
    let detail = serde_json::to_value(decision).expect("decision serializes");
    tx.audit(actor, "fallback.decided", Some(*request_id), Some(plan_id), None, detail);
    Ok(Step::Ok)
}

/// A plan that waits for a verdict (`Write::AwaitingApproval`).
pub(super) async fn awaiting_approval(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::AwaitingApproval,
) -> Result<Step, Error> {
    let write::AwaitingApproval { request_id, plan_id, reason } = w;
    let updated = tx
        .execute_cached(
            "UPDATE plans SET status = $2, updated_at = now() WHERE id = $1 AND status = $3",
            &[&plan_id.as_uuid(), &PlanStatus::AwaitingApproval.as_str(), &PlanStatus::Planned.as_str()],
        )
        .await?;
    if updated == 1 {
        set_request_status(tx, *request_id, RequestStatus::AwaitingApproval, &[RequestStatus::Planned])
            .await?;
        let detail = json!({ "reason": reason });
        tx.audit(actor, "plan.awaiting_approval", Some(*request_id), Some(*plan_id), None, detail);
    }
    Ok(Step::Ok)
}

/// A verdict on a plan (`Write::Approval`); a rejection gives the plan's quota back.
pub(super) async fn approval(tx: &Tx<'_, '_>, actor: &str, w: &write::Approval) -> Result<Step, Error> {
    let write::Approval { request_id, plan_id, approved, by, reason } = w;
    if plan_cancelled(tx, *plan_id).await? {
        return Ok(Step::Conflict(format!("plan {plan_id} is cancelled")));
    }
    let inserted = tx
        .execute_cached(
            "INSERT INTO approvals (plan_id, approved, decided_by, reason) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            &[&plan_id.as_uuid(), approved, by, reason],
        )
        .await?;
    if inserted == 0 {
        // A verdict is final. The same one again is a replay; the opposite one lost a race
        // (approve and reject at once) and must not be reported as done.
        let recorded: bool = tx
            .query_one_cached("SELECT approved FROM approvals WHERE plan_id = $1", &[&plan_id.as_uuid()])
            .await?
            .get(0);
        if recorded != *approved {
            let verdict = if recorded { "approved" } else { "rejected" };
            return Ok(Step::Conflict(format!("plan {plan_id} is already {verdict}")));
        }
        return Ok(Step::Ok);
    }
    let (plan_status, request_status, event) = if *approved {
        (PlanStatus::Approved, RequestStatus::InProgress, "plan.approved")
    } else {
        (PlanStatus::Rejected, RequestStatus::Rejected, "plan.rejected")
    };
    let before_approval: Vec<&str> =
        [PlanStatus::Planned, PlanStatus::AwaitingApproval].iter().map(|s| s.as_str()).collect();
    tx.execute_cached(
        "UPDATE plans SET status = $2, updated_at = now() WHERE id = $1 AND status = ANY($3)",
        &[&plan_id.as_uuid(), &plan_status.as_str(), &before_approval],
    )
    .await?;
    // Only a request still waiting moves on: an approval never revives a failed request.
    let waiting: Vec<&str> =
        [RequestStatus::Planned, RequestStatus::AwaitingApproval].iter().map(|s| s.as_str()).collect();
    tx.execute_cached(
        "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
         WHERE id = $1 AND status = ANY($4)",
        &[&request_id.as_uuid(), &request_status.as_str(), &(!approved).then_some(reason.as_str()), &waiting],
    )
    .await?;
    let detail = json!({ "by": by, "reason": reason });
    tx.audit(actor, event, Some(*request_id), Some(*plan_id), None, detail);
    if !approved {
        cancel_pending(tx, *plan_id, &format!("cancelled: the plan was rejected ({reason})")).await?;
        // A rejected plan will not use the external model: give its quota back.
        quota::settle(tx, actor, *request_id, *plan_id, "quota.released").await?;
    }
    Ok(Step::Ok)
}

/// A plan and its request that finished (`Write::PlanFinished`); settles the plan's quota.
pub(super) async fn plan_finished(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::PlanFinished,
) -> Result<Step, Error> {
    let write::PlanFinished { request_id, plan_id, failure } = w;
    let (plan_status, request_status, event) = match failure {
        None => (PlanStatus::Completed, RequestStatus::Completed, "request.completed"),
        Some(_) => (PlanStatus::Failed, RequestStatus::Failed, "request.failed"),
    };
    let updated = tx
        .execute_cached(
            "UPDATE plans SET status = $2, updated_at = now() WHERE id = $1 AND status = $3",
            &[&plan_id.as_uuid(), &plan_status.as_str(), &PlanStatus::Approved.as_str()],
        )
        .await?;
    if updated == 1 {
        if let Some(reason) = failure {
            // Nothing else of a failed plan will run.
            cancel_pending(tx, *plan_id, &format!("cancelled: the plan failed ({reason})")).await?;
        }
        tx.execute_cached(
            "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
             WHERE id = $1 AND status = $4",
            &[&request_id.as_uuid(), &request_status.as_str(), failure, &RequestStatus::InProgress.as_str()],
        )
        .await?;
        let detail = json!({ "reason": failure });
        tx.audit(actor, event, Some(*request_id), Some(*plan_id), None, detail);
    }
    // Whatever the plan's reservation still holds goes back; once, even if the plan
    // was finished before.
    quota::settle(tx, actor, *request_id, *plan_id, "quota.settled").await?;
    Ok(Step::Ok)
}

/// Whether `status` is the plan's (locked until the end of the transaction): writes that move a
/// plan on must not touch one that was cancelled meanwhile.
async fn plan_cancelled(tx: &Tx<'_, '_>, plan_id: PlanId) -> Result<bool, Error> {
    let row = tx
        .query_opt_cached("SELECT status FROM plans WHERE id = $1 FOR UPDATE", &[&plan_id.as_uuid()])
        .await?;
    Ok(row.is_some_and(|row| row.get::<_, &str>(0) == PlanStatus::Cancelled.as_str()))
}
