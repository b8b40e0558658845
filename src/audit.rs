//! The audit of a request: is its trail complete and consistent? A pure check over the rows
//! that `store::Store::trail` reads, naming everything that is missing or contradictory.

use std::collections::{HashMap, HashSet};

use crate::domain::TaskStatus;
use crate::store::Trail;

/// Everything wrong with a trail; empty when it is complete and consistent.
pub fn check(trail: &Trail) -> Vec<String> {
    let mut findings = Vec::new();
    if !trail.has_decomposition {
        findings.push("no decomposition recorded".to_owned());
    }
    let Some(stored) = &trail.plan else {
        findings.push("no plan recorded".to_owned());
        return findings;
    };
    let plan = &stored.plan;
    if plan.tasks().is_empty() {
        findings.push(format!("plan {} has no task", plan.id));
    }
    match trail.fallback_decisions {
        1 => {}
        0 => findings.push(format!("no fallback decision for plan {}", plan.id)),
        n => findings.push(format!("{n} fallback decisions for plan {} (expected one)", plan.id)),
    }
    let Some(approval) = &trail.approval else {
        findings.push(format!("plan {} has no approval decision (status {})", plan.id, stored.status));
        return findings;
    };
    let released_expected = approval.approved;

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
    for task in plan.tasks() {
        let Some(task_state) = state.get(&task.id) else {
            findings.push(format!("task {} has no row", task.key));
            continue;
        };
        let deps_met = task.depends_on.iter().all(|d| succeeded.contains(d));
        let released = released_expected && deps_met;
        let task_decisions = decisions.get(&task.id).map(Vec::as_slice).unwrap_or_default();
        let task_dispatches = dispatches.get(&task.id).map(Vec::as_slice).unwrap_or_default();
        if !released {
            if !task_decisions.is_empty() || !task_dispatches.is_empty() {
                findings.push(format!("task {} was routed or dispatched before it was released", task.key));
            }
            continue;
        }
        if task_state.status == TaskStatus::DispatchFailed {
            findings.push(format!(
                "task {} could not be dispatched: {}",
                task.key,
                task_state.reason.as_deref().unwrap_or("no reason recorded")
            ));
            continue;
        }
        for attempt in 1..=task_state.attempt.max(1) {
            let decided = task_decisions.iter().filter(|d| d.attempt == attempt).count();
            let sent: Vec<_> = task_dispatches.iter().filter(|d| d.attempt == attempt).collect();
            if decided != 1 {
                findings.push(format!(
                    "task {} attempt {attempt} has {decided} routing decisions (expected one)",
                    task.key
                ));
            }
            if sent.len() != 1 {
                findings.push(format!(
                    "task {} attempt {attempt} has {} confirmed dispatches (expected one)",
                    task.key,
                    sent.len()
                ));
            }
            if let (Some(decision), Some(dispatch)) =
                (task_decisions.iter().find(|d| d.attempt == attempt), sent.first())
                && decision.agent_id != dispatch.agent_id
            {
                findings.push(format!(
                    "task {} attempt {attempt} was routed to {} but dispatched to {}",
                    task.key, decision.agent_id, dispatch.agent_id
                ));
            }
        }
    }
    findings
}
