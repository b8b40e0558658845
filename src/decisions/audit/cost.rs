//! The audit of what a request's plan cost to understand and run: the decomposer, the
//! complexity terms, the fallback decision with its reservation, and the settlement of that
//! reservation against what external tasks really used.

use crate::decisions::fallback::FallbackDecision;
use crate::model::domain::PlanStatus;
use crate::store::Trail;

/// The decomposer, the complexity terms, the fallback decision with its reservation, and the
/// settlement of that reservation against what external tasks really used.
pub(super) fn understanding_and_cost(trail: &Trail, findings: &mut Vec<String>) {
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
    let infeasible = matches!(decision, FallbackDecision::Infeasible { .. });
    if infeasible != (stored.status == PlanStatus::Infeasible) {
        findings.push(format!(
            "the fallback decision says infeasible = {infeasible}, but plan {} is {}",
            plan.id, stored.status
        ));
    }
    if let Some(outside) = decision.external_tasks().iter().find(|id| plan.task(**id).is_none()) {
        findings.push(format!(
            "the fallback decision sends {outside} out, which is not a task of plan {}",
            plan.id
        ));
    }
    match (&trail.reservation, decision.provider()) {
        (None, None) => {}
        (None, Some(provider)) => {
            findings.push(format!("plan {} goes to {provider} without a quota reservation", plan.id))
        }
        (Some(r), None) => findings.push(format!(
            "plan {} stays local but reserved {} micros of {}",
            plan.id, r.amount_micros, r.provider
        )),
        (Some(r), Some(provider)) => {
            if r.provider != provider || r.amount_micros != decision.cost_micros() {
                findings.push(format!(
                    "the reservation ({} micros of {}) is not what the decision estimated ({} micros of {provider})",
                    r.amount_micros,
                    r.provider,
                    decision.cost_micros(),
                ));
            }
            let used: i64 = trail.usage.iter().map(|(_, _, cost)| cost).sum();
            if used != r.spent_micros {
                findings.push(format!(
                    "the reservation shows {} micros spent, but the attempts used {used}",
                    r.spent_micros
                ));
            }
            let ended = stored.status.is_terminal();
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
        if !decision.external_tasks().contains(task) {
            findings
                .push(format!("external use recorded for task {task} attempt {attempt}, which stayed local"));
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::super::check;
    use super::super::tests::complete;
    use super::*;
    use crate::decisions::fallback::FallbackDecision;
    use crate::decisions::providers::Window;
    use crate::store::StoredReservation;

    fn external(trail: &Trail) -> FallbackDecision {
        let plan = &trail.plan.as_ref().unwrap().plan;
        FallbackDecision::External {
            plan_id: plan.id,
            provider: "cloud".into(),
            tasks: vec![plan.tasks()[0].id],
            reason: String::new(),
            complexity: 0.5,
            cost_micros: 30_000,
            quota_left_micros: 70_000,
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
