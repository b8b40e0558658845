//! How complex a plan is, as a documented formula whose every term is kept, so that a decision
//! taken on the score (send the work to an external model, ask a person to approve) can be
//! explained term by term.
//!
//! The score is a weighted sum of six terms, each normalised to [0, 1]:
//!
//! | term          | measure                                           | value                 | weight |
//! |---------------|---------------------------------------------------|-----------------------|--------|
//! | `work`        | the highest base complexity of the plan's types   | as is                 | 0.35   |
//! | `size`        | number of tasks                                   | (n − 1) / 19, ≤ 1     | 0.15   |
//! | `depth`       | number of waves (the DAG's longest path)          | (n − 1) / 9, ≤ 1      | 0.10   |
//! | `breadth`     | number of distinct work types                     | (n − 1) / 4, ≤ 1      | 0.15   |
//! | `unknown`     | entities that no work type of the catalog knows   | n / 3, ≤ 1            | 0.10   |
//! | `uncertainty` | the decomposer's confidence c                     | 1 − c                 | 0.15   |
//!
//! The weights add up to 1, so the score is in [0, 1]; it is rounded to three decimals. One task of
//! a simple, known kind, read with full confidence, scores its work type's base complexity × 0.35.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::domain::Plan;

/// One term of the formula.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Term {
    pub name: String,
    /// What was measured, in its own unit (tasks, waves, a confidence).
    pub measure: f64,
    /// The measure normalised to [0, 1].
    pub value: f64,
    pub weight: f64,
    /// `value × weight`: this term's share of the score.
    pub contribution: f64,
}

/// A plan's complexity with the terms it was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Complexity {
    /// In [0, 1].
    pub score: f64,
    pub terms: Vec<Term>,
}

/// What the formula is computed over, besides the plan itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    /// The highest base complexity among the plan's work types, in [0, 1].
    pub work: f64,
    /// Entities of the request that no work type knows.
    pub unknown_entities: usize,
    /// The decomposer's confidence, in [0, 1].
    pub confidence: f64,
}

pub const WEIGHT_WORK: f64 = 0.35;
pub const WEIGHT_SIZE: f64 = 0.15;
pub const WEIGHT_DEPTH: f64 = 0.10;
pub const WEIGHT_BREADTH: f64 = 0.15;
pub const WEIGHT_UNKNOWN: f64 = 0.10;
pub const WEIGHT_UNCERTAINTY: f64 = 0.15;

/// The complexity of `plan` (see the module documentation for the formula).
pub fn assess(plan: &Plan, inputs: &Inputs) -> Complexity {
    let tasks = plan.tasks().len();
    let waves = plan.waves().values().max().map_or(0, |w| w + 1) as usize;
    let types = plan.work_types().len();
    // Out-of-range inputs (a NaN confidence from a model) are read as the worst case.
    let confidence = if inputs.confidence.is_finite() { inputs.confidence.clamp(0.0, 1.0) } else { 0.0 };
    let work = if inputs.work.is_finite() { inputs.work.clamp(0.0, 1.0) } else { 1.0 };
    let ramp = |n: usize, full: f64| (n.saturating_sub(1) as f64 / full).min(1.0);
    let terms = vec![
        term("work", work, work, WEIGHT_WORK),
        term("size", tasks as f64, ramp(tasks, 19.0), WEIGHT_SIZE),
        term("depth", waves as f64, ramp(waves, 9.0), WEIGHT_DEPTH),
        term("breadth", types as f64, ramp(types, 4.0), WEIGHT_BREADTH),
        term(
            "unknown",
            inputs.unknown_entities as f64,
            (inputs.unknown_entities as f64 / 3.0).min(1.0),
            WEIGHT_UNKNOWN,
        ),
        term("uncertainty", confidence, 1.0 - confidence, WEIGHT_UNCERTAINTY),
    ];
    let score = round(terms.iter().map(|t| t.contribution).sum::<f64>().clamp(0.0, 1.0));
    Complexity { score, terms }
}

fn term(name: &str, measure: f64, value: f64, weight: f64) -> Term {
    Term {
        name: name.to_owned(),
        measure: round(measure),
        value: round(value),
        weight,
        contribution: round(value * weight),
    }
}

fn round(value: f64) -> f64 {
    // Three decimals, so that stored and displayed values read 0.45, not 0.45000000000000007.
    (value * 1000.0).round() / 1000.0
}

/// Reads a complexity with its terms, or a bare score (as messages carried it before the terms
/// were kept): a score without terms.
pub fn score_or_terms<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Complexity, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Terms(Complexity),
        Score(f64),
    }
    Ok(match Either::deserialize(deserializer)? {
        Either::Terms(complexity) => complexity,
        Either::Score(score) => Complexity { score, terms: Vec::new() },
    })
}

impl Complexity {
    /// The formula with this plan's figures: "0.35×0.40 work + 0.15×0.11 size (3) + …".
    pub fn explain(&self) -> String {
        let parts: Vec<String> = self
            .terms
            .iter()
            .map(|t| format!("{:.2}×{:.3} {} ({})", t.weight, t.value, t.name, t.measure))
            .collect();
        format!("{:.3} = {}", self.score, parts.join(" + "))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::domain::{Resources, Task};
    use crate::model::ids::{RequestId, WorkType};

    /// A chain of `n` tasks, the i-th of work type `types[i % types.len()]`.
    fn chain(n: usize, types: &[&str]) -> Plan {
        let request = RequestId::random();
        let id = request.plan_id();
        let tasks: Vec<Task> = (0..n)
            .map(|i| {
                let key = format!("{i}.step");
                Task {
                    id: id.task_id(&key),
                    key,
                    work_type: WorkType::parse(types[i % types.len()]).unwrap(),
                    description: String::new(),
                    estimated_duration_secs: 60,
                    resources: Resources::default(),
                    capabilities: BTreeSet::new(),
                    depends_on: if i == 0 { vec![] } else { vec![id.task_id(&format!("{}.step", i - 1))] },
                    affinity: BTreeMap::new(),
                }
            })
            .collect();
        Plan::new(id, request, tasks).unwrap()
    }

    fn inputs(work: f64, unknown: usize, confidence: f64) -> Inputs {
        Inputs { work, unknown_entities: unknown, confidence }
    }

    #[test]
    fn a_planned_message_from_before_the_terms_reads_as_a_bare_score() {
        #[derive(Deserialize)]
        struct Old {
            #[serde(deserialize_with = "score_or_terms")]
            complexity: Complexity,
        }
        let old: Old = serde_json::from_str(r#"{"complexity": 0.55}"#).unwrap();
        assert_eq!(old.complexity, Complexity { score: 0.55, terms: Vec::new() });
        let new = assess(&chain(2, &["a"]), &inputs(0.4, 0, 1.0));
        let json = serde_json::json!({ "complexity": new });
        assert_eq!(serde_json::from_value::<Old>(json).unwrap().complexity, new);
    }

    #[test]
    fn the_weights_add_up_to_one() {
        let sum =
            WEIGHT_WORK + WEIGHT_SIZE + WEIGHT_DEPTH + WEIGHT_BREADTH + WEIGHT_UNKNOWN + WEIGHT_UNCERTAINTY;
        assert!((sum - 1.0).abs() < 1e-12, "{sum}");
    }

    #[test]
    fn a_single_known_task_scores_its_work_only() {
        let c = assess(&chain(1, &["deployment"]), &inputs(0.4, 0, 1.0));
        assert_eq!(c.score, 0.14);
        let names: Vec<&str> = c.terms.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["work", "size", "depth", "breadth", "unknown", "uncertainty"]);
        assert!(c.terms[1..].iter().all(|t| t.contribution == 0.0), "{c:?}");
    }

    #[test]
    fn every_term_is_kept_with_its_measure_and_contribution() {
        // 3 tasks in 3 waves of 2 work types, 1 unknown entity, confidence 0.75.
        let c = assess(&chain(3, &["deployment", "monitoring"]), &inputs(0.4, 1, 0.75));
        let term = |name: &str| c.terms.iter().find(|t| t.name == name).unwrap().clone();
        assert_eq!((term("size").measure, term("size").value), (3.0, 0.105));
        assert_eq!((term("depth").measure, term("depth").value), (3.0, 0.222));
        assert_eq!((term("breadth").measure, term("breadth").value), (2.0, 0.25));
        assert_eq!((term("unknown").measure, term("unknown").value), (1.0, 0.333));
        assert_eq!((term("uncertainty").measure, term("uncertainty").value), (0.75, 0.25));
        // 0.14 + 0.016 + 0.022 + 0.038 + 0.033 + 0.038, of the rounded contributions
        assert_eq!(c.score, 0.287);
        let sum: f64 = c.terms.iter().map(|t| t.contribution).sum();
        assert!((sum - c.score).abs() < 0.002, "{sum} vs {}", c.score);
        assert!(
            c.explain().starts_with("0.287 = 0.35×0.400 work (0.4) + 0.15×0.105 size (3)"),
            "{}",
            c.explain()
        );
    }

    #[test]
    fn the_score_stays_in_bounds_whatever_the_inputs() {
        let big = assess(&chain(40, &["a", "b", "c", "d", "e", "f"]), &inputs(1.0, 10, 0.0));
        assert_eq!(big.score, 1.0);
        let odd = assess(&chain(1, &["a"]), &inputs(f64::NAN, 0, f64::NAN));
        assert!((0.0..=1.0).contains(&odd.score), "{odd:?}");
        assert_eq!(odd.terms[5].value, 1.0, "a confidence that is not a number counts as none");
        let negative = assess(&chain(1, &["a"]), &inputs(-3.0, 0, 7.0));
        assert_eq!(negative.score, 0.0);
    }

    #[test]
    fn more_of_anything_never_lowers_the_score() {
        let base = assess(&chain(3, &["a"]), &inputs(0.4, 0, 1.0)).score;
        assert!(assess(&chain(6, &["a"]), &inputs(0.4, 0, 1.0)).score > base);
        assert!(assess(&chain(3, &["a", "b"]), &inputs(0.4, 0, 1.0)).score > base);
        assert!(assess(&chain(3, &["a"]), &inputs(0.4, 2, 1.0)).score > base);
        assert!(assess(&chain(3, &["a"]), &inputs(0.4, 0, 0.5)).score > base);
        assert!(assess(&chain(3, &["a"]), &inputs(0.5, 0, 1.0)).score > base);
    }
}
