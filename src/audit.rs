//! The audit of a request: is its trail complete and consistent? A pure check over the rows
//! that `store::Store::trail` reads, naming everything that is missing or contradictory.

use std::collections::{HashMap, HashSet};

use crate::domain::{PlanStatus, TaskStatus};
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
    understanding_and_cost(trail, &mut findings);
    if stored.status == PlanStatus::Infeasible {
        if !trail.decisions.is_empty() || !trail.dispatches.is_empty() {
            findings.push(format!("infeasible plan {} has routing decisions or dispatches", plan.id));
        }
        return findings;
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
    // When each task's success was recorded: nothing that depends on it may go out before.
    let succeeded_at: HashMap<_, _> =
        trail.results.iter().filter(|r| r.success).map(|r| (r.task_id, r.received_at)).collect();
    for task in plan.tasks() {
        if let Some(finished) =
            state.get(&task.id).filter(|t| matches!(t.status, TaskStatus::Succeeded | TaskStatus::Failed))
        {
            let attempt = finished.attempt;
            if !trail.results.iter().any(|r| r.task_id == task.id && r.attempt == attempt) {
                findings.push(format!("task {} finished without a result for attempt {attempt}", task.key));
            }
        }
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

/// The decomposer, the complexity terms, the fallback decision with its reservation, and the
/// settlement of that reservation against what external tasks really used.
fn understanding_and_cost(trail: &Trail, findings: &mut Vec<String>) {
    let Some(stored) = &trail.plan else { return };
    let plan = &stored.plan;
    match trail.decomposer.as_deref() {
        Some("rules" | "llm") | None => {}
        Some(other) => findings.push(format!("decomposition by an unknown decomposer {other:?}")),
    }
    match &trail.complexity {
        Some((score, terms)) if !terms.is_empty() => {
            // Each term and the score are rounded to three decimals: allow for that.
            let sum: f64 = terms.iter().map(|t| t.contribution).sum();
            if (sum.clamp(0.0, 1.0) - score).abs() > 0.0015 {
                findings.push(format!("complexity {score} is not the sum of its terms ({sum:.3})"));
            }
            for t in terms.iter().filter(|t| (t.value * t.weight - t.contribution).abs() > 0.0015) {
                findings.push(format!(
                    "complexity term {} contributes {} instead of {}×{}",
                    t.name, t.contribution, t.weight, t.value
                ));
            }
            let weights: f64 = terms.iter().map(|t| t.weight).sum();
            if (weights - 1.0).abs() > 1e-9 || terms.len() != 6 {
                findings.push(format!(
                    "complexity has {} terms weighing {weights} (expected the formula's six, weighing 1)",
                    terms.len()
                ));
            }
        }
        // A plan made before complexity was kept term by term has none to check.
        Some(_) | None => {}
    }
    let Some(decision) = &trail.fallback else { return };
    if decision.infeasible != (stored.status == PlanStatus::Infeasible) {
        findings.push(format!(
            "the fallback decision says infeasible = {}, but plan {} is {}",
            decision.infeasible, plan.id, stored.status
        ));
    }
    if let Some(outside) = decision.external_tasks.iter().find(|id| plan.task(**id).is_none()) {
        findings.push(format!(
            "the fallback decision sends {outside} out, which is not a task of plan {}",
            plan.id
        ));
    }
    match (&trail.reservation, decision.use_external) {
        (None, false) => {}
        (None, true) => findings.push(format!(
            "plan {} goes to {} without a quota reservation",
            plan.id,
            decision.provider.as_deref().unwrap_or("?")
        )),
        (Some(r), false) => findings.push(format!(
            "plan {} stays local but reserved {} micros of {}",
            plan.id, r.amount_micros, r.provider
        )),
        (Some(r), true) => {
            if Some(r.provider.as_str()) != decision.provider.as_deref()
                || r.amount_micros != decision.estimated_cost_micros
            {
                findings.push(format!(
                    "the reservation ({} micros of {}) is not what the decision estimated ({} micros of {})",
                    r.amount_micros,
                    r.provider,
                    decision.estimated_cost_micros,
                    decision.provider.as_deref().unwrap_or("?")
                ));
            }
            let used: i64 = trail.usage.iter().map(|(_, _, cost)| cost).sum();
            if used != r.spent_micros {
                findings.push(format!(
                    "the reservation shows {} micros spent, but the attempts used {used}",
                    r.spent_micros
                ));
            }
            let ended =
                matches!(stored.status, PlanStatus::Completed | PlanStatus::Failed | PlanStatus::Rejected);
            match (ended, r.settled_at, r.released_micros) {
                (true, None, _) => {
                    findings.push(format!("plan {} ended but its reservation is not settled", plan.id))
                }
                (false, Some(_), _) => findings
                    .push(format!("plan {} is {} but its reservation is settled", plan.id, stored.status)),
                // Use reported after the settlement raises what is spent, never what was released.
                (true, Some(_), Some(released))
                    if released > r.amount_micros
                        || released < r.amount_micros - r.spent_micros.min(r.amount_micros) =>
                {
                    findings.push(format!(
                        "the settlement released {released} micros of {} reserved with {} spent",
                        r.amount_micros, r.spent_micros
                    ))
                }
                _ => {}
            }
        }
    }
    for (task, attempt, _) in &trail.usage {
        if !decision.external_tasks.contains(task) {
            findings
                .push(format!("external use recorded for task {task} attempt {attempt}, which stayed local"));
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;
    use crate::catalog::Catalog;
    use crate::domain::PlanStatus;
    use crate::ids::{MessageId, RequestId};
    use crate::policy::{FallbackDecision, Window};
    use crate::store::StoredReservation;
    use crate::store::{ApprovalRow, DecisionRow, DispatchRow, StoredPlan, TaskState};

    /// The trail of an approved Uptime Kuma request whose first task went to `homelab-1`.
    fn complete() -> Trail {
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
        let complexity = crate::complexity::assess(
            &plan,
            &crate::complexity::Inputs { work: 0.4, unknown_entities: 0, confidence: 1.0 },
        );
        Trail {
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
                agent_id: "homelab-1".into(),
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
    fn a_plan_awaiting_approval_is_incomplete() {
        let mut trail = complete();
        trail.approval = None;
        let findings = check(&trail);
        assert_eq!(findings.len(), 1);
        assert!(findings[0].contains("has no approval decision"), "{findings:?}");
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

    fn result(task_id: crate::ids::TaskId, at: chrono::DateTime<Utc>) -> crate::store::ResultRow {
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
        // With its result it is finished properly; its dependent is released and now missing.
        let findings = check(&trail);
        assert!(!findings.iter().any(|f| f.contains("without a result")), "{findings:?}");
        assert!(
            findings.iter().any(|f| f.contains("1.deploy attempt 1 has 0 routing decisions")),
            "{findings:?}"
        );
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
        trail.decisions.clear();
        trail.dispatches.clear();
        for task in &mut trail.tasks {
            task.status = TaskStatus::Pending;
        }
        assert_eq!(check(&trail), Vec::<String>::new());
    }

    fn external(trail: &Trail) -> FallbackDecision {
        let plan = &trail.plan.as_ref().unwrap().plan;
        FallbackDecision {
            plan_id: plan.id,
            use_external: true,
            provider: Some("cloud".into()),
            external_tasks: vec![plan.tasks()[0].id],
            infeasible: false,
            reason: String::new(),
            complexity: 0.5,
            estimated_cost_micros: 30_000,
            quota_left_micros: Some(70_000),
        }
    }

    fn reservation(spent: i64, settled: bool) -> StoredReservation {
        StoredReservation {
            provider: "cloud".into(),
            window: Window::Monthly,
            window_start: Utc::now(),
            amount_micros: 30_000,
            spent_micros: spent,
            input_tokens: 0,
            output_tokens: 0,
            settled_at: settled.then(Utc::now),
            released_micros: settled.then_some(30_000 - spent.min(30_000)),
        }
    }

    #[test]
    fn external_work_must_be_reserved_used_and_settled_as_recorded() {
        let mut trail = complete();
        let first = trail.tasks[0].id;
        trail.fallback = Some(external(&trail));
        assert_eq!(
            check(&trail),
            ["plan ".to_owned()
                + &trail.plan.as_ref().unwrap().plan.id.to_string()
                + " goes to cloud without a quota reservation"]
        );

        trail.reservation = Some(reservation(7_000, false));
        trail.usage = vec![(first, 1, 7_000)];
        assert_eq!(check(&trail), Vec::<String>::new());

        trail.usage = vec![(first, 1, 5_000)];
        assert_eq!(check(&trail), ["the reservation shows 7000 micros spent, but the attempts used 5000"]);
        trail.usage = vec![(first, 1, 7_000)];

        trail.plan.as_mut().unwrap().status = PlanStatus::Completed;
        assert!(
            check(&trail).iter().any(|f| f.ends_with("ended but its reservation is not settled")),
            "{:?}",
            check(&trail)
        );
        trail.reservation = Some(reservation(7_000, true));
        assert!(!check(&trail).iter().any(|f| f.contains("reservation")), "{:?}", check(&trail));
        trail.reservation.as_mut().unwrap().released_micros = Some(35_000);
        assert!(
            check(&trail).iter().any(|f| f.starts_with("the settlement released 35000")),
            "{:?}",
            check(&trail)
        );
    }

    #[test]
    fn complexity_terms_must_add_up() {
        let mut trail = complete();
        trail.complexity.as_mut().unwrap().0 += 0.1;
        let findings = check(&trail);
        assert!(findings.iter().any(|f| f.contains("is not the sum of its terms")), "{findings:?}");
    }
}
