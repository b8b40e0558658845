//! The fallback decision: whether a plan's work goes to an external AI model, and to which.
//!
//! Pure decision logic: the caller passes the plan, its complexity, the configured policy and
//! the providers' remaining quota, and stores the returned [`FallbackDecision`] for audit, with
//! a human-readable reason that carries the figures it was based on.
//!
//! The decision is about a whole plan and is keyed by the plan id alone: it never takes a task
//! id, so a plan-level decision cannot be checked against a task (the mistake of the system
//! this replaces).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;

use super::providers::{Provider, QuotaSnapshot, provider_agent};
use crate::model::domain::Plan;
use crate::model::ids::{PlanId, TaskId, WorkType};

/// When to send a plan's work to an external provider.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FallbackPolicy {
    /// Plans at least this complex (in [0, 1]) go external, quota permitting.
    pub complexity_threshold: f64,
    /// In order of preference. Empty: everything stays local, and a task that no agent could
    /// run makes its plan infeasible.
    pub providers: Vec<Provider>,
}

impl Default for FallbackPolicy {
    fn default() -> Self {
        Self { complexity_threshold: 0.3, providers: Vec::new() }
    }
}

impl FallbackPolicy {
    pub fn provider(&self, name: &str) -> Option<&Provider> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// Refuses a configuration that cannot work, naming the provider and what is wrong with it:
    /// a name that cannot name an agent (`llm-<name>`) or that is used twice, an endpoint that is
    /// not an http(s) URL, a negative price, estimate or quota, a work type `known` does not have.
    pub fn validate(&self, known: impl Fn(&WorkType) -> bool) -> Result<(), Error> {
        if !self.complexity_threshold.is_finite() {
            return Err(Error::Threshold(self.complexity_threshold));
        }
        let mut seen = BTreeSet::new();
        for p in &self.providers {
            let invalid = |problem: String| Error::Provider { name: p.name.clone(), problem };
            if crate::model::ids::AgentId::parse(provider_agent(&p.name)).is_err() {
                return Err(invalid("the name must be 1 to 60 characters of a-z, 0-9, '-' and '_', starting with a letter or digit".into()));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(invalid("the name is used twice".into()));
            }
            match url::Url::parse(&p.endpoint) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => {}
                _ => {
                    return Err(invalid(format!(
                        "endpoint {} is not an http(s) URL",
                        crate::redact::everything(&p.endpoint)
                    )));
                }
            }
            let figures = [
                ("price_per_1k_input_tokens_micros", p.price_per_1k_input_tokens_micros),
                ("price_per_1k_output_tokens_micros", p.price_per_1k_output_tokens_micros),
                ("input_tokens_per_task", p.input_tokens_per_task),
                ("output_tokens_per_task", p.output_tokens_per_task),
                ("quota_micros", p.quota_micros),
            ];
            if let Some((field, value)) = figures.iter().find(|(_, v)| *v < 0) {
                return Err(invalid(format!("{field} is {value}; it may not be negative")));
            }
            if let Some(unknown) = p.work_types.iter().find(|w| !known(w)) {
                return Err(invalid(format!("work type {unknown} is not in the catalog")));
            }
        }
        Ok(())
    }
}

/// Why a policy's configuration cannot work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fallback: the complexity threshold {0} is not a number")]
    Threshold(f64),
    #[error("fallback provider {name:?}: {problem}")]
    Provider { name: String, problem: String },
}

/// A task that no agent of the fleet (nor of the configured inventory) could ever run, and why.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct Infeasible {
    pub task_id: TaskId,
    pub key: String,
    pub work_type: WorkType,
    pub reason: String,
}

/// Whether a plan's work goes to an external provider, and why: each kind of decision with what
/// it needs and nothing else (no provider without its tasks, no tasks without their provider).
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
#[serde(tag = "goes", rename_all = "snake_case")]
pub enum FallbackDecision {
    /// The work stays with the local agents.
    Local { plan_id: PlanId, complexity: f64, reason: String },
    /// `tasks` go to `provider`, for an estimated `cost_micros` reserved from its quota, which
    /// had `quota_left_micros` left after the reservation.
    External {
        plan_id: PlanId,
        complexity: f64,
        reason: String,
        provider: String,
        tasks: Vec<TaskId>,
        cost_micros: i64,
        quota_left_micros: i64,
    },
    /// The plan could not run: a task needed what no agent offered, and no provider could take
    /// it. Decided only for plans made before such tasks waited for an agent (they then ended
    /// `infeasible`); kept so that their records still read as they were.
    Infeasible { plan_id: PlanId, complexity: f64, reason: String },
}

impl FallbackDecision {
    pub fn plan_id(&self) -> PlanId {
        match self {
            Self::Local { plan_id, .. }
            | Self::External { plan_id, .. }
            | Self::Infeasible { plan_id, .. } => *plan_id,
        }
    }

    pub fn complexity(&self) -> f64 {
        match self {
            Self::Local { complexity, .. }
            | Self::External { complexity, .. }
            | Self::Infeasible { complexity, .. } => *complexity,
        }
    }

    /// Why, with the figures it was based on.
    pub fn reason(&self) -> &str {
        match self {
            Self::Local { reason, .. } | Self::External { reason, .. } | Self::Infeasible { reason, .. } => {
                reason
            }
        }
    }

    /// The provider the work goes to, if it goes out.
    pub fn provider(&self) -> Option<&str> {
        match self {
            Self::External { provider, .. } => Some(provider),
            _ => None,
        }
    }

    /// The tasks that go to the provider: none unless the work goes out.
    pub fn external_tasks(&self) -> &[TaskId] {
        match self {
            Self::External { tasks, .. } => tasks,
            _ => &[],
        }
    }

    /// The provider's quota left after the reservation: none unless the work goes out.
    pub fn quota_left_micros(&self) -> Option<i64> {
        match self {
            Self::External { quota_left_micros, .. } => Some(*quota_left_micros),
            _ => None,
        }
    }

    /// What going out costs, as reserved: 0 unless the work goes out.
    pub fn cost_micros(&self) -> i64 {
        match self {
            Self::External { cost_micros, .. } => *cost_micros,
            _ => 0,
        }
    }
}

/// Decides whether `plan`, of the given `complexity`, goes to an external provider.
///
/// Going external is called for when the complexity meets the threshold (then every task of a
/// work type the provider accepts goes) or when some tasks are `infeasible` locally (then at
/// least those go, and a provider must accept all of them). The providers are tried in order; the
/// first that accepts the work and whose remaining `quotas` cover the estimated cost takes it.
/// When none does, the work stays local (infeasible tasks then wait for an agent that can run
/// them); the reason names what each provider lacked ("quota exhausted: …"). A provider without
/// a quota snapshot has no budget known, and is not used.
pub fn decide_fallback(
    plan: &Plan,
    complexity: f64,
    infeasible: &[Infeasible],
    policy: &FallbackPolicy,
    quotas: &[QuotaSnapshot],
) -> FallbackDecision {
    let local = |reason: String| FallbackDecision::Local { plan_id: plan.id, complexity, reason };
    let threshold = policy.complexity_threshold;
    let (c, t) = figures(complexity, threshold);
    // A NaN compares false both ways: it is no reason to spend money.
    let complex = complexity >= threshold;
    let mut why = Vec::new();
    if complex {
        why.push(format!("complexity {c} meets the {t} threshold"));
    }
    let stuck: Vec<String> = infeasible.iter().map(|i| format!("task {} {}", i.key, i.reason)).collect();
    why.extend(stuck.iter().cloned());
    if why.is_empty() {
        return local(if complexity.is_nan() || threshold.is_nan() {
            format!("complexity {complexity} cannot be compared with the threshold {threshold}")
        } else {
            format!("complexity {c} is below the {t} threshold")
        });
    }

    let mut lacks = Vec::new();
    for provider in &policy.providers {
        let Some((external, cost, remaining)) =
            offer(provider, plan, complex, infeasible, quotas, &mut lacks)
        else {
            continue;
        };
        // Saturating: a (misconfigured) negative cost must not overflow.
        let left = remaining.saturating_sub(cost);
        let total = plan.tasks().len();
        let n = external.len();
        // What was given up on the way (a complex plan sent out only in part) is said too.
        let given_up = lacks.iter().map(|l| format!("; {l}")).collect::<String>();
        return FallbackDecision::External {
            plan_id: plan.id,
            complexity,
            provider: provider.name.clone(),
            reason: format!(
                "{}{given_up}; {n} of {total} {} {} to {} for an estimated {cost} micros, leaving {left} micros of quota",
                why.join("; "),
                if total == 1 { "task" } else { "tasks" },
                if n == 1 { "goes" } else { "go" },
                provider.name
            ),
            tasks: external,
            cost_micros: cost,
            quota_left_micros: left,
        };
    }
    if policy.providers.is_empty() {
        lacks.push("no external provider is configured".to_owned());
    }
    if stuck.is_empty() {
        local(format!("{}, but the work stays local: {}", why.join("; "), lacks.join("; ")))
    } else {
        // What no agent could run when the plan was made waits for one that can (an agent may
        // start, or grow), up to the longest wait allowed.
        local(format!(
            "{}; and no provider can take it ({}): it waits for an agent that can run it",
            stuck.join("; "),
            lacks.join("; ")
        ))
    }
}

/// What `provider` would take of `plan` and at what cost, with the quota it has left: `None`,
/// with what it lacked added to `lacks`, when it cannot take the work. A complex plan that does
/// not fit the quota may still send out alone the tasks that cannot run here.
fn offer(
    provider: &Provider,
    plan: &Plan,
    complex: bool,
    infeasible: &[Infeasible],
    quotas: &[QuotaSnapshot],
    lacks: &mut Vec<String>,
) -> Option<(Vec<TaskId>, i64, i64)> {
    if let Some(refused) = infeasible.iter().find(|i| !provider.accepts(&i.work_type)) {
        lacks.push(format!("{} does not take {} work", provider.name, refused.work_type));
        return None;
    }
    let external: Vec<TaskId> = plan
        .tasks()
        .iter()
        .filter(|task| {
            (complex && provider.accepts(&task.work_type)) || infeasible.iter().any(|i| i.task_id == task.id)
        })
        .map(|task| task.id)
        .collect();
    if external.is_empty() {
        let types: Vec<&str> = plan.work_types().into_iter().map(WorkType::as_str).collect();
        lacks.push(format!("{} takes none of the plan's work types ({})", provider.name, types.join(", ")));
        return None;
    }
    let Some(remaining) = quotas.iter().find(|q| q.provider == provider.name).map(|q| q.remaining_micros)
    else {
        lacks.push(format!("no quota known for {}", provider.name));
        return None;
    };
    let mut external = external;
    let mut cost = provider.estimate_cost_micros(external.len());
    if remaining < cost && complex && !infeasible.is_empty() && infeasible.len() < external.len() {
        // The complex plan does not fit, but what cannot run here may still go alone.
        lacks.push(format!(
            "quota short: {} has {remaining} micros left, and all {} tasks it takes would cost {cost} micros",
            provider.name,
            external.len()
        ));
        external.retain(|id| infeasible.iter().any(|i| i.task_id == *id));
        cost = provider.estimate_cost_micros(external.len());
    }
    if remaining < cost {
        lacks.push(format!(
            "quota exhausted: {} has {remaining} micros left, and the plan would cost {cost} micros",
            provider.name
        ));
        return None;
    }
    Some((external, cost, remaining))
}

/// Two figures to be compared in a reason, with three decimals, as complexity is shown everywhere
/// (`status`, its terms), unless three decimals would make different figures read the same
/// ("0.700 is below the 0.700 threshold"): then in full.
pub(super) fn figures(a: f64, b: f64) -> (String, String) {
    let (short_a, short_b) = (format!("{a:.3}"), format!("{b:.3}"));
    if short_a == short_b && a != b { (a.to_string(), b.to_string()) } else { (short_a, short_b) }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::decisions::fixtures::{provider, wt};
    use crate::model::domain::{Resources, Task};
    use crate::model::ids::RequestId;

    /// A plan with one task per entry of `work_types`.
    fn plan(work_types: &[&str]) -> Plan {
        let request = RequestId::random();
        let id = request.plan_id();
        let tasks = work_types
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let key = format!("{i}.{w}");
                Task {
                    id: id.task_id(&key),
                    key,
                    work_type: wt(w),
                    description: w.to_string(),
                    estimated_duration_secs: 60,
                    resources: Resources::default(),
                    capabilities: BTreeSet::new(),
                    depends_on: Vec::new(),
                    affinity: BTreeMap::new(),
                }
            })
            .collect();
        Plan::new(id, request, tasks).unwrap()
    }

    fn policy() -> FallbackPolicy {
        FallbackPolicy { complexity_threshold: 0.7, providers: vec![provider()] }
    }

    fn quota(remaining: i64) -> Vec<QuotaSnapshot> {
        vec![QuotaSnapshot { provider: "bigmodel".into(), remaining_micros: remaining }]
    }

    fn stuck(plan: &Plan, index: usize, reason: &str) -> Infeasible {
        let task = &plan.tasks()[index];
        Infeasible {
            task_id: task.id,
            key: task.key.clone(),
            work_type: task.work_type.clone(),
            reason: reason.into(),
        }
    }

    #[test]
    fn only_the_tasks_a_provider_accepts_go_and_each_costs_its_estimate() {
        // Two accepted tasks of three go when the plan is complex: 2 × 3085.
        let plan = plan(&["deployment", "monitoring", "analysis"]);
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &quota(1_000_000));
        assert_eq!(d.cost_micros(), 6170);
        assert_eq!(d.external_tasks(), [plan.tasks()[0].id, plan.tasks()[2].id]);
    }

    #[test]
    fn stays_local_without_a_provider() {
        let plan = plan(&["deployment"]);
        let d = decide_fallback(
            &plan,
            0.99,
            &[],
            &FallbackPolicy { complexity_threshold: 0.7, ..FallbackPolicy::default() },
            &quota(500),
        );
        assert_eq!(
            d,
            FallbackDecision::Local {
                plan_id: plan.id,
                reason: "complexity 0.990 meets the 0.700 threshold, but the work stays local: \
                         no external provider is configured"
                    .into(),
                complexity: 0.99,
            }
        );
    }

    #[test]
    fn stays_local_below_the_complexity_threshold() {
        let plan = plan(&["deployment"]);
        let d = decide_fallback(&plan, 0.45, &[], &policy(), &quota(1_000_000));
        assert!(d.provider().is_none());
        assert_eq!(d.provider(), None);
        assert_eq!(d.reason(), "complexity 0.450 is below the 0.700 threshold");
        assert_eq!(d.cost_micros(), 0);

        // Rounding must not make the figures read the same.
        let d = decide_fallback(&plan, 0.699, &[], &policy(), &quota(1_000_000));
        assert_eq!(d.reason(), "complexity 0.699 is below the 0.700 threshold");
        // Exactly at the threshold goes external.
        assert!(decide_fallback(&plan, 0.7, &[], &policy(), &quota(1_000_000)).provider().is_some());
        // A NaN complexity is no reason to spend money.
        let d = decide_fallback(&plan, f64::NAN, &[], &policy(), &quota(1_000_000));
        assert!(d.provider().is_none());
        assert!(d.reason().contains("cannot be compared"), "{}", d.reason());
    }

    #[test]
    fn stays_local_when_the_provider_accepts_no_task() {
        let plan = plan(&["monitoring", "notification"]);
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &quota(1_000_000));
        assert!(d.provider().is_none());
        assert_eq!(
            d.reason(),
            "complexity 0.900 meets the 0.700 threshold, but the work stays local: \
             bigmodel takes none of the plan's work types (monitoring, notification)"
        );
        assert_eq!(d.cost_micros(), 0);
    }

    #[test]
    fn stays_local_when_the_quota_is_unknown_or_short() {
        let plan = plan(&["deployment", "analysis"]); // costs 6170
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &[]);
        assert!(d.provider().is_none());
        assert!(d.reason().ends_with("no quota known for bigmodel"), "{}", d.reason());

        // One micro short.
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &quota(6169));
        assert!(matches!(d, FallbackDecision::Local { .. }));
        assert_eq!(
            d.reason(),
            "complexity 0.900 meets the 0.700 threshold, but the work stays local: \
             quota exhausted: bigmodel has 6169 micros left, and the plan would cost 6170 micros"
        );
        assert!(matches!(d, FallbackDecision::Local { .. }));

        // Another provider's quota says nothing about this one's.
        let other = vec![QuotaSnapshot { provider: "othermodel".into(), remaining_micros: 1_000_000 }];
        assert!(decide_fallback(&plan, 0.9, &[], &policy(), &other).provider().is_none());
    }

    #[test]
    fn goes_external_when_complex_enough_and_the_quota_exactly_covers_the_cost() {
        let plan = plan(&["deployment", "monitoring", "analysis"]); // 2 accepted: 6170
        let d = decide_fallback(&plan, 0.85, &[], &policy(), &quota(6170));
        assert_eq!(
            d,
            FallbackDecision::External {
                plan_id: plan.id,
                provider: "bigmodel".into(),
                tasks: vec![plan.tasks()[0].id, plan.tasks()[2].id],
                reason: "complexity 0.850 meets the 0.700 threshold; 2 of 3 tasks go to bigmodel \
                         for an estimated 6170 micros, leaving 0 micros of quota"
                    .into(),
                complexity: 0.85,
                cost_micros: 6170,
                quota_left_micros: 0,
            }
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(serde_json::from_value::<FallbackDecision>(json).unwrap(), d);
    }

    #[test]
    fn an_infeasible_task_goes_external_alone_when_the_plan_is_simple() {
        let plan = plan(&["deployment", "analysis", "monitoring"]);
        let stuck = [stuck(&plan, 1, "needs 1 GPU, and no agent has one")];
        let d = decide_fallback(&plan, 0.2, &stuck, &policy(), &quota(1_000_000));
        assert!(d.provider().is_some());
        assert_eq!(d.external_tasks(), [plan.tasks()[1].id], "only the task that cannot run here");
        assert_eq!(d.cost_micros(), 3085);
        assert_eq!(
            d.reason(),
            "task 1.analysis needs 1 GPU, and no agent has one; 1 of 3 tasks goes to bigmodel \
             for an estimated 3085 micros, leaving 996915 micros of quota"
        );
    }

    #[test]
    fn an_infeasible_task_without_quota_stays_local_and_waits_for_an_agent() {
        let plan = plan(&["deployment", "analysis"]);
        let stuck = [stuck(&plan, 1, "needs 1 GPU, and no agent has one")];
        let d = decide_fallback(&plan, 0.2, &stuck, &policy(), &quota(100));
        assert!(matches!(d, FallbackDecision::Local { .. }));
        assert_eq!(
            d.reason(),
            "task 1.analysis needs 1 GPU, and no agent has one; and no provider can take it (quota \
             exhausted: bigmodel has 100 micros left, and the plan would cost 3085 micros): it waits for \
             an agent that can run it"
        );
        // A provider that does not take the work type cannot help either.
        let stuck = [Infeasible { work_type: wt("transcription"), ..stuck[0].clone() }];
        let d = decide_fallback(&plan, 0.2, &stuck, &policy(), &quota(1_000_000));
        assert!(d.provider().is_none());
        assert!(d.reason().contains("(bigmodel does not take transcription work)"), "{}", d.reason());
        let d = decide_fallback(&plan, 0.2, &stuck, &FallbackPolicy::default(), &[]);
        assert!(d.reason().contains("(no external provider is configured)"), "{}", d.reason());
    }

    #[test]
    fn a_complex_plan_that_does_not_fit_still_sends_out_what_cannot_run_here() {
        let plan = plan(&["deployment", "deployment", "analysis"]);
        let stuck = [stuck(&plan, 2, "needs 1 GPU, and no agent has one")];
        // Three accepted tasks cost 9255; the quota covers one.
        let d = decide_fallback(&plan, 0.9, &stuck, &policy(), &quota(5000));
        assert!(d.provider().is_some(), "{d:#?}");
        assert_eq!(d.external_tasks(), [plan.tasks()[2].id]);
        assert_eq!(
            d.reason(),
            "complexity 0.900 meets the 0.700 threshold; task 2.analysis needs 1 GPU, and no agent has one; \
             quota short: bigmodel has 5000 micros left, and all 3 tasks it takes would cost 9255 micros; \
             1 of 3 tasks goes to bigmodel for an estimated 3085 micros, leaving 1915 micros of quota"
        );
    }

    #[test]
    fn the_first_provider_with_quota_takes_the_work() {
        let plan = plan(&["deployment"]);
        let second = Provider { name: "backup".into(), ..provider() };
        let policy = FallbackPolicy { providers: vec![provider(), second], complexity_threshold: 0.7 };
        let quotas = vec![
            QuotaSnapshot { provider: "bigmodel".into(), remaining_micros: 10 },
            QuotaSnapshot { provider: "backup".into(), remaining_micros: 5000 },
        ];
        let d = decide_fallback(&plan, 0.9, &[], &policy, &quotas);
        assert!(
            matches!(&d, FallbackDecision::External { provider, quota_left_micros: 1915, .. } if provider == "backup"),
            "{d:?}"
        );
    }

    #[test]
    fn provider_configurations_that_cannot_work_are_refused() {
        let known = |w: &WorkType| ["deployment", "analysis"].contains(&w.as_str());
        assert!(policy().validate(known).is_ok());
        let with = |p: Provider| FallbackPolicy { providers: vec![p], ..policy() };
        let err = |p: Provider| with(p).validate(known).unwrap_err().to_string();
        assert_eq!(
            err(Provider { name: "Big Model".into(), ..provider() }),
            "fallback provider \"Big Model\": the name must be 1 to 60 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
        );
        assert!(
            err(Provider { endpoint: "ftp://u:secret@x/".into(), ..provider() }).contains("ftp://***@x/")
        );
        assert!(!err(Provider { endpoint: "ftp://u:secret@x/".into(), ..provider() }).contains("secret"));
        assert!(err(Provider { quota_micros: -1, ..provider() }).contains("quota_micros is -1"));
        assert!(err(Provider { work_types: [wt("cooking")].into(), ..provider() }).contains("cooking"));
        let twice = FallbackPolicy { providers: vec![provider(), provider()], ..policy() };
        assert!(twice.validate(known).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn fallback_policy_reads_from_toml() {
        let policy: FallbackPolicy = toml::from_str(
            r#"
            [[providers]]
            name = "bigmodel"
            endpoint = "https://models.example.com/v1"
            model = "big-1"
            api_key_env = "BIGMODEL_API_KEY"
            price_per_1k_input_tokens_micros = 1000
            price_per_1k_output_tokens_micros = 2170
            input_tokens_per_task = 2000
            output_tokens_per_task = 500
            quota_micros = 1000000
            work_types = ["deployment", "analysis"]
            "#,
        )
        .unwrap();
        assert_eq!(policy, FallbackPolicy { complexity_threshold: 0.3, providers: vec![provider()] });
        assert_eq!(policy.provider("bigmodel"), Some(&provider()));
        assert_eq!(provider().capability(), "provider:bigmodel");
    }
}
