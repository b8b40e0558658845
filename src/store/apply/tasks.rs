//! The writes that move a task through its attempts: routing, waiting in line, dispatch, its
//! result, a retry or its failure.

use serde_json::json;
use uuid::Uuid;

use super::agents::AgentLedger;
use super::{Step, Tx};
use crate::model::domain::TaskStatus;
use crate::model::effect::{Attempt, write};
use crate::model::ids::PlanId;
use crate::store::Error;
use crate::store::cached::Cached;

/// A routing decision (`Write::Route`): the task is routed, and capacity reserved if it says so.
pub(super) async fn route(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::Route,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    let write::Route { request_id, plan_id, attempt, decision_id, route, ready_at } = w;
    let inserted = tx
        .execute_cached(
            "INSERT INTO routing_decisions (id, task_id, plan_id, attempt, agent_id, score, reason,
                 candidates, reserved_capacity, ready_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            &[
                &decision_id.as_uuid(),
                &route.task_id.as_uuid(),
                &plan_id.as_uuid(),
                &(*attempt as i32),
                &route.agent_id.as_str(),
                &route.score,
                &route.reason,
                &serde_json::to_value(&route.candidates).expect("candidates serialize"),
                &route.reserves_capacity,
                ready_at,
            ],
        )
        .await?;
    if inserted == 0 {
        // Another decision routed this attempt first. Going on would publish a second
        // dispatch of it: decide again instead, and find the task routed.
        return Ok(Step::Conflict(format!("task {} attempt {attempt} is routed already", route.task_id)));
    }
    let updated = tx
        .execute_cached(
            "UPDATE tasks SET status = $2, attempt = $3, agent_id = $4, status_reason = $5,
                 waiting_since = NULL, wait_turn = NULL, updated_at = now()
             WHERE id = $1 AND attempt = $3 - 1 AND status = ANY($6)",
            &[
                &route.task_id.as_uuid(),
                &TaskStatus::Routed.as_str(),
                &(*attempt as i32),
                &route.agent_id.as_str(),
                &route.reason,
                &NOT_STARTED.as_slice(),
            ],
        )
        .await?;
    if updated == 0 {
        // Cancelled, or moved on, since the decision.
        return Ok(Step::Conflict(format!(
            "task {} is no longer ready for attempt {attempt}",
            route.task_id
        )));
    }
    if route.reserves_capacity {
        agents.reserve(route.agent_id.as_str());
    }
    let detail = json!({ "attempt": attempt, "agent_id": route.agent_id, "score": route.score,
                         "reason": route.reason });
    tx.audit(actor, "task.routed", Some(*request_id), Some(*plan_id), Some(route.task_id), detail);
    Ok(Step::Ok)
}

/// A ready task that waits in line for an agent (`Write::TaskWaiting`).
pub(super) async fn task_waiting(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::TaskWaiting,
) -> Result<Step, Error> {
    let write::TaskWaiting {
        attempt: Attempt { request_id, plan_id, task_id, number: attempt },
        priority,
        since,
        reason,
        candidates,
    } = w;
    // Its turn: the next of its plan's in line, but never before the head of the line
    // of its priority, so that a plan joining late takes turns with the others from
    // where they are instead of going first until it catches up.
    let updated = tx
        .execute_cached(
            "UPDATE tasks SET status = 'waiting', waiting_since = $3, status_reason = $4,
                 priority = $5, updated_at = now(),
                 wait_turn = GREATEST(
                     COALESCE((SELECT min(w.wait_turn) FROM tasks w
                               WHERE w.status = 'waiting' AND w.priority = $5), 0),
                     COALESCE((SELECT max(w.wait_turn) + 1 FROM tasks w
                               WHERE w.status = 'waiting' AND w.plan_id = $2), 0))
             WHERE id = $1 AND status = 'pending' AND attempt = $6 - 1",
            &[
                &task_id.as_uuid(),
                &plan_id.as_uuid(),
                since,
                reason,
                &i16::from(*priority),
                &(*attempt as i32),
            ],
        )
        .await?;
    if updated == 0 {
        return Ok(Step::Conflict(format!("task {task_id} is no longer pending for attempt {attempt}")));
    }
    let detail = json!({ "attempt": attempt, "reason": reason, "candidates": candidates });
    tx.audit(actor, "task.waiting", Some(*request_id), Some(*plan_id), Some(*task_id), detail);
    Ok(Step::Ok)
}

/// A waiting task that gave up waiting (`Write::WaitExpired`): it fails.
pub(super) async fn wait_expired(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::WaitExpired,
) -> Result<Step, Error> {
    let write::WaitExpired {
        attempt: Attempt { request_id, plan_id, task_id, number: attempt },
        decision_id,
        reason,
        candidates,
        ready_at,
    } = w;
    let inserted = tx
        .execute_cached(
            "INSERT INTO routing_decisions (id, task_id, plan_id, attempt, agent_id, score, reason,
                 candidates, reserved_capacity, ready_at)
             VALUES ($1, $2, $3, $4, NULL, NULL, $5, $6, false, $7) ON CONFLICT DO NOTHING",
            &[
                &decision_id.as_uuid(),
                &task_id.as_uuid(),
                &plan_id.as_uuid(),
                &(*attempt as i32),
                reason,
                &serde_json::to_value(candidates).expect("candidates serialize"),
                ready_at,
            ],
        )
        .await?;
    let updated = if inserted == 1 {
        tx.execute_cached(
            "UPDATE tasks SET status = $2, attempt = $3, status_reason = $4, waiting_since = NULL,
                 wait_turn = NULL, finished_at = now(), updated_at = now()
             WHERE id = $1 AND status = 'waiting' AND attempt = $3 - 1",
            &[&task_id.as_uuid(), &TaskStatus::Failed.as_str(), &(*attempt as i32), reason],
        )
        .await?
    } else {
        0
    };
    if updated == 0 {
        return Ok(Step::Conflict(format!("task {task_id} no longer waits for attempt {attempt}")));
    }
    let detail = json!({ "attempt": attempt, "reason": reason, "gave_up_waiting": true });
    tx.audit(actor, "task.failed", Some(*request_id), Some(*plan_id), Some(*task_id), detail);
    Ok(Step::Ok)
}

/// A task confirmed into its agent's queue (`Write::Dispatched`), with its lease.
pub(super) async fn dispatched(tx: &Tx<'_, '_>, actor: &str, w: &write::Dispatched) -> Result<Step, Error> {
    let write::Dispatched {
        attempt: Attempt { request_id, plan_id, task_id, number: attempt },
        decision_id,
        agent_id,
        queue,
        message_id,
        lease_secs,
    } = w;
    let inserted = tx
        .execute_cached(
            "INSERT INTO dispatches (task_id, attempt, decision_id, agent_id, queue, message_id)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
            &[
                &task_id.as_uuid(),
                &(*attempt as i32),
                &decision_id.as_uuid(),
                &agent_id.as_str(),
                queue,
                &message_id.as_uuid(),
            ],
        )
        .await?;
    if inserted == 1 {
        // Only a routed task becomes dispatched: a fast agent's result may have been
        // recorded before this confirm, and a finished task stays finished.
        tx.execute_cached(
            "UPDATE tasks SET status = $2, lease_expires_at = now() + make_interval(secs => $5),
                 updated_at = now()
             WHERE id = $1 AND attempt = $3 AND status = $4",
            &[
                &task_id.as_uuid(),
                &TaskStatus::Dispatched.as_str(),
                &(*attempt as i32),
                &TaskStatus::Routed.as_str(),
                &f64::from(*lease_secs),
            ],
        )
        .await?;
        let detail = json!({ "attempt": attempt, "agent_id": agent_id, "queue": queue,
                             "message_id": message_id, "lease_secs": lease_secs });
        tx.audit(actor, "task.dispatched", Some(*request_id), Some(*plan_id), Some(*task_id), detail);
    }
    Ok(Step::Ok)
}

/// A task that could not be dispatched (`Write::DispatchFailed`); its capacity goes back.
pub(super) async fn dispatch_failed(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::DispatchFailed,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    let write::DispatchFailed {
        attempt: Attempt { request_id, plan_id, task_id, number: attempt },
        decision_id,
        agent_id,
        reason,
    } = w;
    let updated = tx
        .execute_cached(
            "UPDATE tasks SET status = $2, status_reason = $3, updated_at = now()
             WHERE id = $1 AND attempt = $4 AND status = $5",
            &[
                &task_id.as_uuid(),
                &TaskStatus::DispatchFailed.as_str(),
                reason,
                &(*attempt as i32),
                &TaskStatus::Routed.as_str(),
            ],
        )
        .await?;
    if updated == 1 {
        // Give back the capacity that the routing decision reserved.
        let reserved = tx
            .query_opt_cached(
                "SELECT 1 FROM routing_decisions WHERE id = $1 AND reserved_capacity",
                &[&decision_id.as_uuid()],
            )
            .await?;
        if reserved.is_some() {
            agents.release(agent_id.as_str());
        }
        let detail = json!({ "attempt": attempt, "agent_id": agent_id, "reason": reason });
        tx.audit(actor, "task.dispatch_failed", Some(*request_id), Some(*plan_id), Some(*task_id), detail);
    }
    Ok(Step::Ok)
}

/// An attempt that ended (`Write::TaskFinished`), guarded by the plan's version.
pub(super) async fn task_finished(
    tx: &Tx<'_, '_>,
    actor: &str,
    w: &write::TaskFinished,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    let write::TaskFinished { request_id, result, plan_version } = w;
    let bumped = tx
        .execute_cached(
            "UPDATE plans SET version = version + 1 WHERE id = $1 AND version = $2",
            &[&result.plan_id.as_uuid(), plan_version],
        )
        .await?;
    if bumped == 0 {
        return Ok(Step::Conflict(format!(
            "plan {} recorded another result since this decision",
            result.plan_id
        )));
    }
    let source = match (result.lease_expired, result.simulated) {
        (true, _) => "lease",
        (false, true) => "simulated",
        (false, false) => "agent",
    };
    let inserted = tx
        .execute_cached(
            "INSERT INTO task_results (task_id, attempt, agent_id, success, output, error, source,
                 started_at, finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
            &[
                &result.task_id.as_uuid(),
                &(result.attempt as i32),
                &result.agent_id.as_str(),
                &result.success,
                &result.output,
                &result.error,
                &source,
                &result.started_at,
                &result.finished_at,
            ],
        )
        .await?;
    if inserted == 0 {
        // Another result of this attempt was recorded first (an agent's and its lease's
        // expiry, say): decide again, and find the attempt finished.
        return Ok(Step::Conflict(format!(
            "task {} attempt {} has a result already",
            result.task_id, result.attempt
        )));
    }
    let status = if result.success { TaskStatus::Succeeded } else { TaskStatus::Failed };
    // With the agent that the attempt's routing decision reserved capacity on, if it did: what
    // to give back, and where.
    let updated = tx
        .query_opt_cached(
            "UPDATE tasks SET status = $3, finished_at = $4, lease_expires_at = NULL,
                 status_reason = COALESCE($5, status_reason), updated_at = now()
             WHERE id = $1 AND attempt = $2 AND status = ANY($6)
             RETURNING (SELECT agent_id FROM routing_decisions
                        WHERE task_id = $1 AND attempt = $2 AND reserved_capacity)",
            &[
                &result.task_id.as_uuid(),
                &(result.attempt as i32),
                &status.as_str(),
                &result.finished_at,
                &result.error,
                &ON_AN_AGENT.as_slice(),
            ],
        )
        .await?;
    let Some(updated) = updated else {
        // Cancelled since the decision: its result is late, and its slot was given back.
        return Ok(Step::Conflict(format!(
            "task {} attempt {} is no longer on its agent",
            result.task_id, result.attempt
        )));
    };
    if let Some(reserved_on) = updated.get::<_, Option<&str>>(0) {
        agents.release(reserved_on);
    }
    agents.finished(result.agent_id.as_str(), result.success);
    let event = if result.success { "task.succeeded" } else { "task.attempt_failed" };
    let detail = json!({ "attempt": result.attempt, "agent_id": result.agent_id, "source": source,
                         "error": result.error });
    tx.audit(actor, event, Some(*request_id), Some(result.plan_id), Some(result.task_id), detail);
    Ok(Step::Ok)
}

/// A failed attempt that will be tried again (`Write::TaskRetry`): back to pending.
pub(super) async fn task_retry(tx: &Tx<'_, '_>, actor: &str, w: &write::TaskRetry) -> Result<Step, Error> {
    let write::TaskRetry { attempt: Attempt { request_id, plan_id, task_id, number: attempt }, reason } = w;
    tx.execute_cached(
        "UPDATE tasks SET status = $3, status_reason = $4, finished_at = NULL, updated_at = now()
         WHERE id = $1 AND attempt = $2",
        &[&task_id.as_uuid(), &(*attempt as i32), &TaskStatus::Pending.as_str(), reason],
    )
    .await?;
    let detail = json!({ "failed_attempt": attempt, "reason": reason });
    tx.audit(actor, "task.retry", Some(*request_id), Some(*plan_id), Some(*task_id), detail);
    Ok(Step::Ok)
}

/// A task that failed for good (`Write::TaskFailed`), and its dependents cancelled.
pub(super) async fn task_failed(tx: &Tx<'_, '_>, actor: &str, w: &write::TaskFailed) -> Result<Step, Error> {
    let write::TaskFailed { request_id, plan_id, task_id, reason, cancelled } = w;
    tx.execute_cached(
        "UPDATE tasks SET status = $2, status_reason = $3, waiting_since = NULL, wait_turn = NULL,
             updated_at = now()
         WHERE id = $1",
        &[&task_id.as_uuid(), &TaskStatus::Failed.as_str(), reason],
    )
    .await?;
    let cancelled_ids: Vec<Uuid> = cancelled.iter().map(|t| t.as_uuid()).collect();
    let why = format!("cancelled: a task it depends on failed ({reason})");
    tx.execute_cached(
        "UPDATE tasks SET status = $2, status_reason = $3, waiting_since = NULL, wait_turn = NULL,
             updated_at = now()
         WHERE id = ANY($1) AND status = ANY($4)",
        &[&cancelled_ids, &TaskStatus::Cancelled.as_str(), &why, &NOT_STARTED.as_slice()],
    )
    .await?;
    let detail = json!({ "reason": reason, "cancelled": cancelled });
    tx.audit(actor, "task.failed", Some(*request_id), Some(*plan_id), Some(*task_id), detail);
    Ok(Step::Ok)
}

/// Cancels the tasks of `plan_id` that never started (pending, or waiting for an agent), with
/// `reason`: nothing more of the plan will run.
pub(super) async fn cancel_pending(tx: &Tx<'_, '_>, plan_id: PlanId, reason: &str) -> Result<(), Error> {
    tx.execute_cached(
        "UPDATE tasks SET status = $2, status_reason = $3, waiting_since = NULL, wait_turn = NULL,
             updated_at = now()
         WHERE plan_id = $1 AND status = ANY($4)",
        &[&plan_id.as_uuid(), &TaskStatus::Cancelled.as_str(), &reason, &NOT_STARTED.as_slice()],
    )
    .await?;
    Ok(())
}

/// The statuses of a task that has not gone to an agent.
pub(super) const NOT_STARTED: [&str; 2] = ["pending", "waiting"];

/// The statuses of a task whose attempt an agent holds (or is about to).
pub(super) const ON_AN_AGENT: [&str; 2] = ["routed", "dispatched"];
