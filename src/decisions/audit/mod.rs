//! The audit of a request: is its trail complete and consistent? A pure check over the rows
//! that `store::Store::trail` reads, naming everything that is missing or contradictory.
//!
//! The audit judges the trail, not the outcome: a request that failed, was rejected, cancelled or
//! refused on arrival passes when every record of it is there and agrees with the others (its
//! failure recorded where it happened, with its reason). A request still under way passes as far
//! as it has gone.

use std::collections::{HashMap, HashSet};

use crate::model::domain::{Plan, PlanStatus, RequestStatus, Task, TaskStatus};
use crate::store::{DecisionRow, DispatchRow, Refusal, StoredPlan, TaskState, Trail};

mod cost;

use self::cost::understanding_and_cost;

/// How the request ended (or where it stands), to follow "the request": what the audit names
/// first.
pub fn outcome(trail: &Trail) -> String {
    let reason = trail.failure_reason.as_deref().unwrap_or("no reason recorded");
    match trail.status {
        RequestStatus::Completed => format!(
            "completed ({} tasks, {} routing decisions, {} dispatches)",
            trail.tasks.len(),
            trail.decisions.len(),
            trail.dispatches.len()
        ),
        RequestStatus::Failed => format!("failed: {reason}"),
        RequestStatus::Rejected => match &trail.approval {
            Some(a) => format!("was rejected by {}: {}", a.decided_by, a.reason),
            None => format!("was rejected: {reason}"),
        },
        RequestStatus::Cancelled => match &trail.cancellation {
            Some(c) => format!("was cancelled by {}: {}", c.by, c.reason),
            None => format!("was cancelled: {reason}"),
        },
        under_way => format!(
            "is under way ({under_way}: {} tasks, {} routing decisions, {} dispatches)",
            trail.tasks.len(),
            trail.decisions.len(),
            trail.dispatches.len()
        ),
    }
}

/// The outcome of a request refused on arrival: it has no row, only the dead letters that say
/// why. Such a trail is complete when each of them has a reason.
pub fn refused(refusal: &Refusal) -> (String, Vec<String>) {
    let findings = refusal
        .dead_letters()
        .filter(|d| d.reason.trim().is_empty())
        .map(|d| format!("the dead letter of message {} at {} has no reason", d.message_id, d.stage))
        .collect();
    let first = refusal.first();
    (format!("was refused on arrival at {}: {}", first.stage, first.reason), findings)
}

/// Everything wrong with a trail; empty when it is complete and consistent.
pub fn check(trail: &Trail) -> Vec<String> {
    let mut findings = Vec::new();
    let status = trail.status;
    request_end(trail, &mut findings);
    // A request may end before it is decomposed or planned (refused by a stage, cancelled); one
    // that has gone further has every record up to there.
    let stopped_early = matches!(status, RequestStatus::Failed | RequestStatus::Cancelled);
    if !trail.has_decomposition {
        if !stopped_early && status != RequestStatus::Received {
            findings.push("no decomposition recorded".to_owned());
        }
        if trail.plan.is_some() {
            findings.push("a plan without a decomposition".to_owned());
        }
    }
    let Some(stored) = &trail.plan else {
        let planned = !matches!(status, RequestStatus::Received | RequestStatus::Decomposed);
        if planned && !stopped_early {
            findings.push("no plan recorded".to_owned());
        }
        return findings;
    };
    plan_end(trail, stored, stopped_early, &mut findings);
    understanding_and_cost(trail, &mut findings);
    let plan = &stored.plan;
    if stored.status == PlanStatus::Infeasible {
        if !trail.decisions.is_empty() || !trail.dispatches.is_empty() {
            findings.push(format!("infeasible plan {} has routing decisions or dispatches", plan.id));
        }
        return findings;
    }
    let approved = trail.approval.as_ref().is_some_and(|a| a.approved);
    if trail.approval.is_none() {
        if !trail.decisions.is_empty() || !trail.dispatches.is_empty() {
            findings.push(format!("plan {} was routed without an approval decision", plan.id));
        }
        if matches!(stored.status, PlanStatus::Approved | PlanStatus::Completed) {
            findings.push(format!("plan {} has no approval decision (status {})", plan.id, stored.status));
        }
        return findings;
    }
    task_trails(trail, plan, approved, &mut findings);
    findings
}

/// Why the request ended, recorded where it ended; and every dead letter with its reason.
fn request_end(trail: &Trail, findings: &mut Vec<String>) {
    let status = trail.status;
    let reason_given = trail.failure_reason.as_deref().is_some_and(|r| !r.trim().is_empty());
    match status {
        RequestStatus::Failed if !reason_given => {
            findings.push("the request failed without a reason".to_owned())
        }
        RequestStatus::Cancelled if trail.cancellation.is_none() => {
            findings.push("the request is cancelled, but no cancellation is recorded".to_owned())
        }
        RequestStatus::Rejected if trail.approval.as_ref().is_none_or(|a| a.approved) => {
            findings.push("the request is rejected, but no rejection is recorded".to_owned())
        }
        _ => {}
    }
    if trail.cancellation.is_some() && status != RequestStatus::Cancelled {
        findings.push(format!("a cancellation is recorded, but the request is {status}"));
    }
    if let Some(dead) = trail.dead_letters.iter().find(|d| d.reason.trim().is_empty()) {
        findings
            .push(format!("the dead letter of message {} at {} has no reason", dead.message_id, dead.stage));
    }
}

/// The plan and its request agree on how it ended; an ended plan has no task left to start; and
/// the plan has its one fallback decision.
fn plan_end(trail: &Trail, stored: &StoredPlan, stopped_early: bool, findings: &mut Vec<String>) {
    let status = trail.status;
    let plan = &stored.plan;
    if plan.tasks().is_empty() {
        findings.push(format!("plan {} has no task", plan.id));
    }
    // The plan and its request agree on how it ended.
    let agrees = match stored.status {
        PlanStatus::Completed => status == RequestStatus::Completed,
        PlanStatus::Rejected => status == RequestStatus::Rejected,
        PlanStatus::Cancelled => status == RequestStatus::Cancelled,
        PlanStatus::Failed | PlanStatus::Infeasible => status == RequestStatus::Failed,
        PlanStatus::Planned | PlanStatus::AwaitingApproval | PlanStatus::Approved => {
            !matches!(status, RequestStatus::Completed | RequestStatus::Rejected | RequestStatus::Cancelled)
        }
    };
    if !agrees {
        findings.push(format!("plan {} is {}, but its request is {status}", plan.id, stored.status));
    }
    // A completed plan's tasks all succeeded; an ended one has none left to start.
    for task in &trail.tasks {
        let unfinished = match stored.status {
            PlanStatus::Completed => task.status != TaskStatus::Succeeded,
            // Before cancellation, a rejected plan's tasks were left pending. A failed plan's
            // running tasks finish; a cancelled plan's were stopped.
            PlanStatus::Failed => matches!(task.status, TaskStatus::Pending | TaskStatus::Waiting),
            PlanStatus::Cancelled => matches!(
                task.status,
                TaskStatus::Pending | TaskStatus::Waiting | TaskStatus::Routed | TaskStatus::Dispatched
            ),
            _ => false,
        };
        if unfinished {
            findings.push(format!(
                "plan {} is {}, but task {} is {}",
                plan.id, stored.status, task.key, task.status
            ));
        }
    }
    // The plan can end before its fallback decision only by its request ending.
    let decided_before_end = !(stopped_early && trail.approval.is_none());
    match trail.fallback_decisions {
        1 => {}
        0 if !decided_before_end || stored.status == PlanStatus::Planned => {}
        0 => findings.push(format!("no fallback decision for plan {}", plan.id)),
        n => findings.push(format!("{n} fallback decisions for plan {} (expected one)", plan.id)),
    }
}

/// Each task of an approved plan: released before it was routed, and each of its attempts
/// routed once, sent to the agent it was routed to, and ended as the next attempt implies.
fn task_trails(trail: &Trail, plan: &Plan, approved: bool, findings: &mut Vec<String>) {
    let state: HashMap<_, _> = trail.tasks.iter().map(|t| (t.id, t)).collect();
    let succeeded: HashSet<_> =
        trail.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).map(|t| t.id).collect();
    let mut decisions: HashMap<_, Vec<_>> = HashMap::new();
    for d in &trail.decisions {
        decisions.entry(d.task_id).or_default().push(d);
    }
    let mut dispatches: HashMap<_, Vec<_>> = HashMap::new();
    for d in &trail.dispatches {
        dispatches.entry(d.task_id).or_default().push(d);
    }
    // When each task's success was recorded: nothing that depends on it may go out before.
    let succeeded_at: HashMap<_, _> =
        trail.results.iter().filter(|r| r.success).map(|r| (r.task_id, r.received_at)).collect();
    for task in plan.tasks() {
        for dispatch in dispatches.get(&task.id).map(Vec::as_slice).unwrap_or_default() {
            for dep in &task.depends_on {
                match succeeded_at.get(dep) {
                    Some(at) if *at <= dispatch.confirmed_at => {}
                    _ => findings.push(format!(
                        "task {} attempt {} was dispatched before its dependency {} succeeded",
                        task.key,
                        dispatch.attempt,
                        plan.task(*dep).map_or("?", |d| d.key.as_str())
                    )),
                }
            }
        }
        let Some(task_state) = state.get(&task.id) else {
            findings.push(format!("task {} has no row", task.key));
            continue;
        };
        let task_decisions = decisions.get(&task.id).map(Vec::as_slice).unwrap_or_default();
        let task_dispatches = dispatches.get(&task.id).map(Vec::as_slice).unwrap_or_default();
        let released = approved && task.depends_on.iter().all(|d| succeeded.contains(d));
        if !released {
            if !task_decisions.is_empty() || !task_dispatches.is_empty() {
                findings.push(format!("task {} was routed or dispatched before it was released", task.key));
            }
            continue;
        }
        let last = task_state.attempt;
        if let Some(extra) = task_decisions.iter().find(|d| d.attempt > last) {
            findings.push(format!(
                "task {} has a routing decision for attempt {} beyond its attempt {last}",
                task.key, extra.attempt
            ));
        }
        for attempt in 1..=last {
            let decided: Vec<_> = task_decisions.iter().copied().filter(|d| d.attempt == attempt).collect();
            let sent: Vec<_> = task_dispatches.iter().copied().filter(|d| d.attempt == attempt).collect();
            attempt_trail(trail, task, task_state, attempt, &decided, &sent, findings);
        }
    }
}

/// One attempt of a released task: its routing decision, its dispatch and its result.
fn attempt_trail(
    trail: &Trail,
    task: &Task,
    task_state: &TaskState,
    attempt: u32,
    decided: &[&DecisionRow],
    sent: &[&DispatchRow],
    findings: &mut Vec<String>,
) {
    let last = task_state.attempt;
    let result = trail.results.iter().find(|r| r.task_id == task.id && r.attempt == attempt);
    if decided.len() != 1 {
        findings.push(format!(
            "task {} attempt {attempt} has {} routing decisions (expected one)",
            task.key,
            decided.len()
        ));
    }
    let Some(decision) = decided.first() else { return };
    let Some(agent) = &decision.agent_id else {
        // It gave up waiting: no agent, so nothing sent; and it is the task's end.
        if !sent.is_empty() || attempt != last || task_state.status != TaskStatus::Failed {
            findings.push(format!(
                "task {} attempt {attempt} chose no agent, yet it was dispatched or went on",
                task.key
            ));
        }
        return;
    };
    // The last attempt may not have reached its agent: still on its way (routed), not
    // deliverable, or stopped by a cancellation before or after it went out.
    let on_its_way = attempt == last
        && matches!(
            task_state.status,
            TaskStatus::Routed | TaskStatus::DispatchFailed | TaskStatus::Cancelled
        );
    match sent.len() {
        1 => {}
        0 if on_its_way => {}
        n => findings
            .push(format!("task {} attempt {attempt} has {n} confirmed dispatches (expected one)", task.key)),
    }
    if task_state.status == TaskStatus::DispatchFailed && attempt == last && !sent.is_empty() {
        findings.push(format!("task {} attempt {attempt} was dispatched, yet failed to be", task.key));
    }
    if let Some(dispatch) = sent.first()
        && &dispatch.agent_id != agent
    {
        findings.push(format!(
            "task {} attempt {attempt} was routed to {agent} but dispatched to {}",
            task.key, dispatch.agent_id
        ));
    }
    // An attempt before the last failed, or the task would not have been tried again;
    // the last one of a finished task has its result.
    let finished = matches!(task_state.status, TaskStatus::Succeeded | TaskStatus::Failed);
    match result {
        Some(r) if attempt < last && r.success => findings
            .push(format!("task {} attempt {attempt} succeeded, yet the task was tried again", task.key)),
        None if attempt < last => {
            findings.push(format!("task {} attempt {attempt} was retried without a result", task.key))
        }
        None if finished => {
            findings.push(format!("task {} finished without a result for attempt {attempt}", task.key))
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::model::domain::PlanStatus;
    use crate::model::ids::{MessageId, RequestId};
    use crate::store::DeadLetter;
    use crate::store::{ApprovalRow, DecisionRow, DispatchRow, StoredPlan, TaskState};
    use crate::understanding::catalog::Catalog;

    /// The trail of an approved Uptime Kuma request whose first task went to `homelab-1`.
    pub(super) fn complete() -> Trail {
        let catalog = Catalog::default();
        let d = catalog.decompose("Deploy Uptime Kuma to the homelab and send alerts to Discord").unwrap();
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        let first = plan.tasks()[0].id;
        let tasks = plan
            .tasks()
            .iter()
            .map(|t| match t.id == first {
                true => TaskState {
                    status: TaskStatus::Dispatched,
                    attempt: 1,
                    agent_id: Some("homelab-1".to_owned()),
                    ..TaskState::pending(t)
                },
                false => TaskState::pending(t),
            })
            .collect();
        let complexity = crate::understanding::complexity::assess(
            &plan,
            &crate::understanding::complexity::Inputs { work: 0.4, unknown_entities: 0, confidence: 1.0 },
        );
        Trail {
            status: RequestStatus::InProgress,
            failure_reason: None,
            cancellation: None,
            dead_letters: Vec::new(),
            has_decomposition: true,
            decomposer: Some("rules".into()),
            complexity: Some((complexity.score, complexity.terms)),
            fallback: None,
            reservation: None,
            usage: Vec::new(),
            plan: Some(StoredPlan { plan, status: PlanStatus::Approved, version: 0 }),
            fallback_decisions: 1,
            approval: Some(ApprovalRow {
                approved: true,
                decided_by: "policy".into(),
                reason: "low complexity".into(),
                at: Utc::now(),
            }),
            tasks,
            decisions: vec![DecisionRow {
                task_id: first,
                attempt: 1,
                decided_at: Utc::now(),
                agent_id: Some("homelab-1".into()),
                score: Some(0.9),
                reason: "best".into(),
                candidates: serde_json::json!([]),
                reserved_capacity: true,
            }],
            dispatches: vec![DispatchRow {
                task_id: first,
                attempt: 1,
                agent_id: "homelab-1".into(),
                queue: "switchyard.agent.homelab-1".into(),
                message_id: MessageId::random(),
                confirmed_at: Utc::now(),
            }],
            results: vec![],
        }
    }

    #[test]
    fn a_complete_trail_passes() {
        assert_eq!(check(&complete()), Vec::<String>::new());
    }

    #[test]
    fn missing_records_are_named() {
        let mut trail = complete();
        trail.has_decomposition = false;
        trail.fallback_decisions = 0;
        trail.dispatches.clear();
        let findings = check(&trail);
        assert!(findings.iter().any(|f| f == "no decomposition recorded"), "{findings:?}");
        assert!(findings.iter().any(|f| f.starts_with("no fallback decision for plan")), "{findings:?}");
        assert!(
            findings.iter().any(|f| f.contains("1.prepare attempt 1 has 0 confirmed dispatches")),
            "{findings:?}"
        );
    }

    #[test]
    fn routing_without_an_approval_is_flagged() {
        let mut trail = complete();
        trail.approval = None;
        let findings = check(&trail);
        assert!(
            findings.iter().any(|f| f.contains("was routed without an approval decision")),
            "{findings:?}"
        );
        assert!(
            findings.iter().any(|f| f.contains("has no approval decision (status approved)")),
            "{findings:?}"
        );
        // Awaiting approval, with nothing routed: consistent, and under way.
        trail.plan.as_mut().unwrap().status = PlanStatus::AwaitingApproval;
        trail.status = RequestStatus::AwaitingApproval;
        trail.decisions.clear();
        trail.dispatches.clear();
        trail
            .tasks
            .iter_mut()
            .for_each(|t| *t = TaskState { status: TaskStatus::Pending, attempt: 0, ..t.clone() });
        assert_eq!(check(&trail), Vec::<String>::new());
        assert_eq!(
            outcome(&trail),
            "is under way (awaiting_approval: 5 tasks, 0 routing decisions, 0 dispatches)"
        );
    }

    #[test]
    fn a_request_that_ended_early_passes_with_its_reason_and_names_its_outcome() {
        // Matched no work type: failed at decompose, with nothing after it.
        let mut trail = complete();
        trail.status = RequestStatus::Failed;
        trail.failure_reason = Some("decomposition failed: no work type matches".into());
        trail.has_decomposition = false;
        trail.plan = None;
        trail.complexity = None;
        trail.fallback_decisions = 0;
        trail.approval = None;
        trail.tasks.clear();
        trail.decisions.clear();
        trail.dispatches.clear();
        assert_eq!(check(&trail), Vec::<String>::new());
        assert_eq!(outcome(&trail), "failed: decomposition failed: no work type matches");
        trail.failure_reason = None;
        assert_eq!(check(&trail), ["the request failed without a reason"]);

        // Cancelled while a task ran: its last attempt has no result, and that is consistent.
        let mut trail = complete();
        trail.status = RequestStatus::Cancelled;
        trail.failure_reason = Some("cancelled by ops: wrong host".into());
        trail.plan.as_mut().unwrap().status = PlanStatus::Cancelled;
        for task in &mut trail.tasks {
            task.status = TaskStatus::Cancelled;
        }
        assert_eq!(check(&trail), ["the request is cancelled, but no cancellation is recorded"]);
        trail.cancellation = Some(crate::store::Cancellation {
            by: "ops".into(),
            reason: "wrong host".into(),
            at: Utc::now(),
        });
        assert_eq!(check(&trail), Vec::<String>::new());
        assert_eq!(outcome(&trail), "was cancelled by ops: wrong host");
        trail.tasks[1].status = TaskStatus::Waiting;
        assert_eq!(check(&trail).len(), 1, "a cancelled plan's task still waits: {:?}", check(&trail));
        trail.tasks[1].status = TaskStatus::Cancelled;
        trail.tasks[0].status = TaskStatus::Dispatched;
        assert_eq!(check(&trail).len(), 1, "a cancelled plan's task still runs: {:?}", check(&trail));
    }

    #[test]
    fn a_task_that_gave_up_waiting_has_a_decision_without_an_agent() {
        let mut trail = complete();
        trail.status = RequestStatus::Failed;
        trail.failure_reason = Some("task 1.prepare waited 24 h".into());
        trail.plan.as_mut().unwrap().status = PlanStatus::Failed;
        trail.dispatches.clear();
        trail.decisions[0].agent_id = None;
        trail.decisions[0].score = None;
        trail.decisions[0].reserved_capacity = false;
        for task in &mut trail.tasks {
            task.status = TaskStatus::Cancelled;
        }
        trail.tasks[0].status = TaskStatus::Failed;
        assert_eq!(check(&trail), Vec::<String>::new());
        assert_eq!(outcome(&trail), "failed: task 1.prepare waited 24 h");
        // A dispatch of an attempt that chose no agent contradicts it.
        trail.dispatches = complete().dispatches;
        trail.dispatches[0].task_id = trail.tasks[0].id;
        assert!(check(&trail).iter().any(|f| f.contains("chose no agent")), "{:?}", check(&trail));
    }

    #[test]
    fn a_refusal_on_arrival_names_its_stage_and_reason() {
        let dead = DeadLetter {
            message_id: crate::model::ids::MessageId::random(),
            stage: "decompose".into(),
            queue: "switchyard.requests".into(),
            reason: "empty request text".into(),
            at: Utc::now(),
        };
        let (line, findings) = refused(&Refusal::new(vec![dead.clone()]).unwrap());
        assert_eq!(line, "was refused on arrival at decompose: empty request text");
        assert!(findings.is_empty());
        let blank = DeadLetter { reason: " ".into(), ..dead.clone() };
        let (line, findings) = refused(&Refusal::new(vec![dead, blank]).unwrap());
        assert_eq!(line, "was refused on arrival at decompose: empty request text", "the first one");
        assert_eq!(findings.len(), 1);
        assert!(Refusal::new(Vec::new()).is_none(), "no dead letter, no refusal");
    }

    #[test]
    fn a_task_dispatched_before_its_dependencies_succeeded_is_flagged() {
        let mut trail = complete();
        let second = trail.tasks[1].id;
        let mut early = trail.dispatches[0].clone();
        early.task_id = second;
        trail.dispatches.push(early);
        let findings = check(&trail);
        assert!(
            findings.iter().any(|f| f.contains("1.deploy was routed or dispatched before it was released"))
        );
    }

    #[test]
    fn duplicates_and_contradictions_are_flagged() {
        let mut trail = complete();
        trail.decisions.push(trail.decisions[0].clone());
        trail.dispatches[0].agent_id = "elsewhere".into();
        let findings = check(&trail);
        assert!(findings.iter().any(|f| f.contains("has 2 routing decisions")), "{findings:?}");
        assert!(
            findings.iter().any(|f| f.contains("routed to homelab-1 but dispatched to elsewhere")),
            "{findings:?}"
        );
    }

    fn result(task_id: crate::model::ids::TaskId, at: chrono::DateTime<Utc>) -> crate::store::ResultRow {
        crate::store::ResultRow {
            task_id,
            attempt: 1,
            agent_id: "homelab-1".into(),
            success: true,
            output: String::new(),
            error: None,
            source: "agent".into(),
            started_at: at,
            finished_at: at,
            received_at: at,
        }
    }

    #[test]
    fn a_finished_task_without_its_result_is_flagged() {
        let mut trail = complete();
        trail.tasks[0].status = TaskStatus::Succeeded;
        let findings = check(&trail);
        assert!(
            findings.iter().any(|f| f == "task 1.prepare finished without a result for attempt 1"),
            "{findings:?}"
        );
        let first = trail.tasks[0].id;
        trail.results.push(result(first, Utc::now()));
        // With its result it is finished properly; its dependent is released, still to route.
        assert_eq!(check(&trail), Vec::<String>::new());
        // A plan that completed with a task left is not complete.
        trail.plan.as_mut().unwrap().status = PlanStatus::Completed;
        trail.status = RequestStatus::Completed;
        let findings = check(&trail);
        assert!(findings.iter().any(|f| f.ends_with("but task 1.deploy is pending")), "{findings:?}");
    }

    #[test]
    fn a_dispatch_before_its_dependency_succeeded_is_flagged_from_the_recorded_times() {
        let mut trail = complete();
        let (first, second) = (trail.tasks[0].id, trail.tasks[1].id);
        let succeeded_at = Utc::now();
        trail.tasks[0].status = TaskStatus::Succeeded;
        trail.results.push(result(first, succeeded_at));
        trail.tasks[1].status = TaskStatus::Dispatched;
        trail.tasks[1].attempt = 1;
        let mut decision = trail.decisions[0].clone();
        decision.task_id = second;
        trail.decisions.push(decision);
        let mut dispatch = trail.dispatches[0].clone();
        dispatch.task_id = second;
        // Confirmed a second before the dependency's result was received.
        dispatch.confirmed_at = succeeded_at - chrono::TimeDelta::seconds(1);
        trail.dispatches.push(dispatch.clone());
        let findings = check(&trail);
        assert_eq!(
            findings,
            ["task 1.deploy attempt 1 was dispatched before its dependency 1.prepare succeeded"],
            "{findings:?}"
        );
        trail.dispatches[1].confirmed_at = succeeded_at + chrono::TimeDelta::seconds(1);
        assert_eq!(check(&trail), Vec::<String>::new());
    }

    #[test]
    fn a_rejected_plan_is_complete_without_routing() {
        let mut trail = complete();
        trail.approval.as_mut().unwrap().approved = false;
        trail.approval.as_mut().unwrap().decided_by = "alice".into();
        trail.approval.as_mut().unwrap().reason = "not today".into();
        trail.status = RequestStatus::Rejected;
        trail.plan.as_mut().unwrap().status = PlanStatus::Rejected;
        trail.decisions.clear();
        trail.dispatches.clear();
        for task in &mut trail.tasks {
            *task = TaskState { status: TaskStatus::Cancelled, attempt: 0, ..task.clone() };
        }
        assert_eq!(check(&trail), Vec::<String>::new());
        assert_eq!(outcome(&trail), "was rejected by alice: not today");
    }
}
