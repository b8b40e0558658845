//! Policy: whether a plan's work goes to an external AI model, and whether a plan needs a human's
//! approval before it runs.
//!
//! Pure decision logic: the caller passes the plan, its complexity, the configured policies and
//! the provider's remaining quota, and stores the returned [`FallbackDecision`] and [`Gate`] for
//! audit. Every decision carries a human-readable reason with the figures it was based on.
//!
//! The fallback decision is about a whole plan and is keyed by the plan id alone: it never takes a
//! task id, so a plan-level decision cannot be checked against a task (the mistake of the system
//! this replaces).

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Days, Months, NaiveTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::domain::Plan;
use crate::model::ids::{PlanId, TaskId, WorkType};

/// An external AI model provider that can take over work the local agents would find too hard,
/// or cannot do at all. Its work is done by agents of the `llm` executor that serve it. `Debug`
/// shows the endpoint without user, password or query values.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    /// Base URL of its OpenAI-compatible API (`https://api.example.com/v1`).
    pub endpoint: String,
    pub model: String,
    /// The environment variable that holds its API key; `None` for an endpoint without one. The
    /// key itself is never part of the configuration, so it cannot end up where the
    /// configuration is shown.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Prices in millionths of the currency unit per 1,000 tokens. Integers, so that costs add up
    /// exactly.
    pub price_per_1k_input_tokens_micros: i64,
    pub price_per_1k_output_tokens_micros: i64,
    /// Tokens a task is expected to use: the basis of the cost estimate that is reserved.
    pub input_tokens_per_task: i64,
    pub output_tokens_per_task: i64,
    /// The budget per window, in micros. The database holds what is reserved and spent of it.
    pub quota_micros: i64,
    /// How often the budget starts afresh.
    #[serde(default)]
    pub window: Window,
    /// The work types the provider takes. Tasks of other types stay local.
    pub work_types: BTreeSet<WorkType>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("endpoint", &crate::redact::everything(&self.endpoint))
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("price_per_1k_input_tokens_micros", &self.price_per_1k_input_tokens_micros)
            .field("price_per_1k_output_tokens_micros", &self.price_per_1k_output_tokens_micros)
            .field("input_tokens_per_task", &self.input_tokens_per_task)
            .field("output_tokens_per_task", &self.output_tokens_per_task)
            .field("quota_micros", &self.quota_micros)
            .field("window", &self.window)
            .field("work_types", &self.work_types)
            .finish()
    }
}

impl Provider {
    /// The capability that an agent serving this provider (an `llm` executor) offers, and that
    /// the tasks sent to the provider require instead of their own.
    pub fn capability(&self) -> String {
        provider_capability(&self.name)
    }

    /// Whether the provider takes tasks of `work_type`.
    pub fn accepts(&self, work_type: &WorkType) -> bool {
        self.work_types.contains(work_type)
    }

    /// What `input` and `output` tokens cost, in micros, rounded up so that an estimate never
    /// undercuts the quota check.
    ///
    /// Computed in 128 bits and saturated to `i64`, so that no config can make it overflow (and
    /// wrap to a cost that looks affordable).
    pub fn cost_micros(&self, input_tokens: i64, output_tokens: i64) -> i64 {
        let product = i128::from(input_tokens)
            .saturating_mul(i128::from(self.price_per_1k_input_tokens_micros))
            .saturating_add(
                i128::from(output_tokens).saturating_mul(i128::from(self.price_per_1k_output_tokens_micros)),
            );
        // Integer division truncates towards zero: that is the ceiling for a negative product,
        // and one short of it for a positive one that does not divide evenly.
        let cost = product / 1000 + i128::from(product % 1000 > 0);
        i64::try_from(cost).unwrap_or(if cost > 0 { i64::MAX } else { i64::MIN })
    }

    /// The estimated cost of `tasks` tasks, in micros: each task's expected input and output
    /// tokens at the provider's prices.
    pub fn estimate_cost_micros(&self, tasks: usize) -> i64 {
        let tasks = i64::try_from(tasks).unwrap_or(i64::MAX);
        self.cost_micros(
            tasks.saturating_mul(self.input_tokens_per_task),
            tasks.saturating_mul(self.output_tokens_per_task),
        )
    }
}

/// The capability of agents that serve the provider `name`: `provider:<name>`.
pub fn provider_capability(name: &str) -> String {
    format!("{PROVIDER_CAPABILITY_PREFIX}{name}")
}

/// Whether an agent with `capabilities` serves an external provider: it takes that provider's
/// tasks only.
pub fn serves_a_provider(capabilities: &BTreeSet<String>) -> bool {
    capabilities.iter().any(|c| c.starts_with(PROVIDER_CAPABILITY_PREFIX))
}

const PROVIDER_CAPABILITY_PREFIX: &str = "provider:";

/// The id of the agent that serves the provider `name` by default (`llm-<name>`): where the
/// provider's tasks wait when none of its agents is up.
pub fn provider_agent(name: &str) -> String {
    format!("llm-{name}")
}

/// The period after which a provider's quota starts afresh. Windows are aligned to UTC: a daily
/// window starts at midnight, a monthly one at midnight on the first of the month.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    Deserialize,
    Serialize,
    strum::Display,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Window {
    Daily,
    #[default]
    Monthly,
}

impl Window {
    /// The start of the window that `at` falls in.
    pub fn start(self, at: DateTime<Utc>) -> DateTime<Utc> {
        let day = at.date_naive();
        let first = match self {
            Window::Daily => day,
            Window::Monthly => day.with_day(1).expect("every month has a first day"),
        };
        first.and_time(NaiveTime::MIN).and_utc()
    }

    /// The start of the window after the one that starts at `start`.
    pub fn next(self, start: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Window::Daily => start + Days::new(1),
            Window::Monthly => start + Months::new(1),
        }
    }
}

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

/// What is left of a provider's quota in the current window.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct QuotaSnapshot {
    pub provider: String,
    pub remaining_micros: i64,
}

/// A task that no agent of the fleet (nor of the configured inventory) could ever run, and why.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct Infeasible {
    pub task_id: TaskId,
    pub key: String,
    pub work_type: WorkType,
    pub reason: String,
}

/// Whether a plan's work goes to an external provider, and why.
#[derive(Serialize, Deserialize, JsonSchema, Debug, Clone, PartialEq)]
pub struct FallbackDecision {
    pub plan_id: PlanId,
    pub use_external: bool,
    /// The provider the work goes to; `None` when it stays local.
    pub provider: Option<String>,
    /// The tasks that go to the provider: empty when the work stays local.
    #[serde(default)]
    pub external_tasks: Vec<TaskId>,
    /// The plan could not run: a task needed what no agent offered, and no provider could take
    /// it. Set only on plans made before such tasks waited for an agent (they then ended
    /// `infeasible`); kept so that their records still read as they were.
    #[serde(default)]
    pub infeasible: bool,
    pub reason: String,
    pub complexity: f64,
    /// What going external costs in micros (the amount reserved); 0 when the work stays local.
    pub estimated_cost_micros: i64,
    /// The provider's quota left after the reservation; `None` when the work stays local.
    pub quota_left_micros: Option<i64>,
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
    let local = |reason: String| FallbackDecision {
        plan_id: plan.id,
        use_external: false,
        provider: None,
        external_tasks: Vec::new(),
        infeasible: false,
        reason,
        complexity,
        estimated_cost_micros: 0,
        quota_left_micros: None,
    };
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
        if let Some(refused) = infeasible.iter().find(|i| !provider.accepts(&i.work_type)) {
            lacks.push(format!("{} does not take {} work", provider.name, refused.work_type));
            continue;
        }
        let external: Vec<TaskId> = plan
            .tasks()
            .iter()
            .filter(|task| {
                (complex && provider.accepts(&task.work_type))
                    || infeasible.iter().any(|i| i.task_id == task.id)
            })
            .map(|task| task.id)
            .collect();
        if external.is_empty() {
            let types: Vec<&str> = plan.work_types().into_iter().map(WorkType::as_str).collect();
            lacks.push(format!(
                "{} takes none of the plan's work types ({})",
                provider.name,
                types.join(", ")
            ));
            continue;
        }
        let Some(remaining) = quotas.iter().find(|q| q.provider == provider.name).map(|q| q.remaining_micros)
        else {
            lacks.push(format!("no quota known for {}", provider.name));
            continue;
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
            continue;
        }
        // Saturating: a (misconfigured) negative cost must not overflow.
        let left = remaining.saturating_sub(cost);
        let total = plan.tasks().len();
        let n = external.len();
        // What was given up on the way (a complex plan sent out only in part) is said too.
        let given_up = lacks.iter().map(|l| format!("; {l}")).collect::<String>();
        return FallbackDecision {
            plan_id: plan.id,
            use_external: true,
            provider: Some(provider.name.clone()),
            reason: format!(
                "{}{given_up}; {n} of {total} {} {} to {} for an estimated {cost} micros, leaving {left} micros of quota",
                why.join("; "),
                if total == 1 { "task" } else { "tasks" },
                if n == 1 { "goes" } else { "go" },
                provider.name
            ),
            external_tasks: external,
            infeasible: false,
            complexity,
            estimated_cost_micros: cost,
            quota_left_micros: Some(left),
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

/// When a plan may run without a human's approval.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct ApprovalPolicy {
    /// Local plans less complex than this are approved automatically; `None`: never by complexity.
    pub auto_approve_below: Option<f64>,
    /// Whether a request may ask to skip approval.
    pub allow_request_auto_approve: bool,
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        Self { auto_approve_below: Some(0.2), allow_request_auto_approve: true }
    }
}

/// Whether a plan runs at once or waits for a human.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "gate", rename_all = "snake_case")]
pub enum Gate {
    AutoApproved { reason: String },
    AwaitingApproval { reason: String },
}

impl Gate {
    pub fn is_auto_approved(&self) -> bool {
        matches!(self, Gate::AutoApproved { .. })
    }

    pub fn reason(&self) -> &str {
        match self {
            Gate::AutoApproved { reason } | Gate::AwaitingApproval { reason } => reason,
        }
    }
}

/// Whether the plan of `decision` needs approval.
///
/// Approved automatically when the request asked for it and the policy allows that (even for
/// external work: the requester took responsibility), or when the work stays local and is less
/// complex than the policy's limit. Otherwise it waits, with every reason that applies.
pub fn gate(request_auto_approve: bool, decision: &FallbackDecision, policy: &ApprovalPolicy) -> Gate {
    if request_auto_approve && policy.allow_request_auto_approve {
        return Gate::AutoApproved {
            reason: "the request asked for auto-approval and the policy allows it".to_owned(),
        };
    }
    let complexity = decision.complexity;
    if let Some(limit) = policy.auto_approve_below
        && complexity < limit
        && !decision.use_external
    {
        let (c, l) = figures(complexity, limit);
        return Gate::AutoApproved {
            reason: format!("complexity {c} is below {l} and the work stays local"),
        };
    }

    let mut reasons = Vec::new();
    if request_auto_approve {
        reasons.push("the request asked for auto-approval but the policy does not allow it".to_owned());
    }
    if decision.use_external {
        reasons.push(match &decision.provider {
            Some(provider) => format!("uses an external AI model ({provider})"),
            None => "uses an external AI model".to_owned(),
        });
    }
    match policy.auto_approve_below {
        None => reasons.push("the policy does not auto-approve by complexity".to_owned()),
        Some(limit) => {
            // A NaN complexity is not below anything: it waits for a human.
            let below = complexity < limit;
            if !below {
                let (c, l) = figures(complexity, limit);
                reasons.push(format!("complexity {c} is not below {l}"));
            }
        }
    }
    // Unreachable with an empty list: not auto-approved means external, no limit, or not below.
    debug_assert!(!reasons.is_empty());
    Gate::AwaitingApproval { reason: reasons.join("; ") }
}

/// Two figures to be compared in a reason, with two decimals, unless two decimals would make
/// different figures read the same ("0.70 is below the 0.70 threshold"): then in full.
fn figures(a: f64, b: f64) -> (String, String) {
    let (short_a, short_b) = (format!("{a:.2}"), format!("{b:.2}"));
    if short_a == short_b && a != b { (a.to_string(), b.to_string()) } else { (short_a, short_b) }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::domain::{Resources, Task};
    use crate::model::ids::RequestId;

    fn wt(s: &str) -> WorkType {
        WorkType::parse(s).unwrap()
    }

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

    /// 2,000 input tokens at 1,000 micros and 500 output tokens at 2,170 micros per 1,000:
    /// 2,000 + 1,085 = 3,085 micros per task.
    fn provider() -> Provider {
        Provider {
            name: "bigmodel".into(),
            endpoint: "https://models.example.com/v1".into(),
            model: "big-1".into(),
            api_key_env: Some("BIGMODEL_API_KEY".into()),
            price_per_1k_input_tokens_micros: 1000,
            price_per_1k_output_tokens_micros: 2170,
            input_tokens_per_task: 2000,
            output_tokens_per_task: 500,
            quota_micros: 1_000_000,
            window: Window::Monthly,
            work_types: [wt("deployment"), wt("analysis")].into(),
        }
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

    /// Auto-approval below 0.5.
    fn approval() -> ApprovalPolicy {
        ApprovalPolicy { auto_approve_below: Some(0.5), allow_request_auto_approve: true }
    }

    fn decision(complexity: f64, use_external: bool) -> FallbackDecision {
        FallbackDecision {
            plan_id: RequestId::random().plan_id(),
            use_external,
            provider: use_external.then(|| "bigmodel".to_owned()),
            external_tasks: Vec::new(),
            infeasible: false,
            reason: String::new(),
            complexity,
            estimated_cost_micros: 0,
            quota_left_micros: None,
        }
    }

    #[test]
    fn cost_prices_input_and_output_tokens_and_rounds_up() {
        let p = provider();
        assert_eq!(p.estimate_cost_micros(0), 0);
        assert_eq!(p.estimate_cost_micros(1), 3085);
        assert_eq!(p.cost_micros(1000, 0), 1000);
        assert_eq!(p.cost_micros(0, 1000), 2170);
        // 333 × 1001 = 333,333 → 333.333 → 334.
        let odd = Provider { price_per_1k_input_tokens_micros: 1001, ..provider() };
        assert_eq!(odd.cost_micros(333, 0), 334);
        let huge = Provider { price_per_1k_input_tokens_micros: i64::MAX, ..provider() };
        assert_eq!(huge.cost_micros(i64::MAX, i64::MAX), i64::MAX);
        assert_eq!(huge.estimate_cost_micros(usize::MAX), i64::MAX);

        // Two accepted tasks of three go when the plan is complex: 2 × 3085.
        let plan = plan(&["deployment", "monitoring", "analysis"]);
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &quota(1_000_000));
        assert_eq!(d.estimated_cost_micros, 6170);
        assert_eq!(d.external_tasks, [plan.tasks()[0].id, plan.tasks()[2].id]);
    }

    #[test]
    fn windows_start_at_utc_midnight_and_roll_over() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let day = Window::Daily.start(at("2026-01-31T23:59:59Z"));
        assert_eq!(day, at("2026-01-31T00:00:00Z"));
        assert_eq!(Window::Daily.next(day), at("2026-02-01T00:00:00Z"));
        let month = Window::Monthly.start(at("2026-01-31T23:59:59Z"));
        assert_eq!(month, at("2026-01-01T00:00:00Z"));
        assert_eq!(Window::Monthly.next(month), at("2026-02-01T00:00:00Z"));
        assert_eq!(Window::Monthly.start(at("2026-02-01T00:00:00Z")), at("2026-02-01T00:00:00Z"));
        assert_eq!(Window::Monthly.next(at("2026-12-01T00:00:00Z")), at("2027-01-01T00:00:00Z"));
        assert_eq!("daily".parse::<Window>().unwrap(), Window::Daily);
        assert_eq!(Window::default().to_string(), "monthly");
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
            FallbackDecision {
                plan_id: plan.id,
                use_external: false,
                provider: None,
                external_tasks: Vec::new(),
                infeasible: false,
                reason: "complexity 0.99 meets the 0.70 threshold, but the work stays local: \
                         no external provider is configured"
                    .into(),
                complexity: 0.99,
                estimated_cost_micros: 0,
                quota_left_micros: None,
            }
        );
    }

    #[test]
    fn stays_local_below_the_complexity_threshold() {
        let plan = plan(&["deployment"]);
        let d = decide_fallback(&plan, 0.45, &[], &policy(), &quota(1_000_000));
        assert!(!d.use_external);
        assert_eq!(d.provider, None);
        assert_eq!(d.reason, "complexity 0.45 is below the 0.70 threshold");
        assert_eq!(d.estimated_cost_micros, 0);

        // Rounding must not make the figures read the same.
        let d = decide_fallback(&plan, 0.699, &[], &policy(), &quota(1_000_000));
        assert_eq!(d.reason, "complexity 0.699 is below the 0.7 threshold");
        // Exactly at the threshold goes external.
        assert!(decide_fallback(&plan, 0.7, &[], &policy(), &quota(1_000_000)).use_external);
        // A NaN complexity is no reason to spend money.
        let d = decide_fallback(&plan, f64::NAN, &[], &policy(), &quota(1_000_000));
        assert!(!d.use_external);
        assert!(d.reason.contains("cannot be compared"), "{}", d.reason);
    }

    #[test]
    fn stays_local_when_the_provider_accepts_no_task() {
        let plan = plan(&["monitoring", "notification"]);
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &quota(1_000_000));
        assert!(!d.use_external);
        assert_eq!(
            d.reason,
            "complexity 0.90 meets the 0.70 threshold, but the work stays local: \
             bigmodel takes none of the plan's work types (monitoring, notification)"
        );
        assert_eq!(d.estimated_cost_micros, 0);
    }

    #[test]
    fn stays_local_when_the_quota_is_unknown_or_short() {
        let plan = plan(&["deployment", "analysis"]); // costs 6170
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &[]);
        assert!(!d.use_external);
        assert!(d.reason.ends_with("no quota known for bigmodel"), "{}", d.reason);

        // One micro short.
        let d = decide_fallback(&plan, 0.9, &[], &policy(), &quota(6169));
        assert!(!d.use_external && !d.infeasible);
        assert_eq!(
            d.reason,
            "complexity 0.90 meets the 0.70 threshold, but the work stays local: \
             quota exhausted: bigmodel has 6169 micros left, and the plan would cost 6170 micros"
        );
        assert_eq!(d.quota_left_micros, None);

        // Another provider's quota says nothing about this one's.
        let other = vec![QuotaSnapshot { provider: "othermodel".into(), remaining_micros: 1_000_000 }];
        assert!(!decide_fallback(&plan, 0.9, &[], &policy(), &other).use_external);
    }

    #[test]
    fn goes_external_when_complex_enough_and_the_quota_exactly_covers_the_cost() {
        let plan = plan(&["deployment", "monitoring", "analysis"]); // 2 accepted: 6170
        let d = decide_fallback(&plan, 0.85, &[], &policy(), &quota(6170));
        assert_eq!(
            d,
            FallbackDecision {
                plan_id: plan.id,
                use_external: true,
                provider: Some("bigmodel".into()),
                external_tasks: vec![plan.tasks()[0].id, plan.tasks()[2].id],
                infeasible: false,
                reason: "complexity 0.85 meets the 0.70 threshold; 2 of 3 tasks go to bigmodel \
                         for an estimated 6170 micros, leaving 0 micros of quota"
                    .into(),
                complexity: 0.85,
                estimated_cost_micros: 6170,
                quota_left_micros: Some(0),
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
        assert!(d.use_external && !d.infeasible);
        assert_eq!(d.external_tasks, [plan.tasks()[1].id], "only the task that cannot run here");
        assert_eq!(d.estimated_cost_micros, 3085);
        assert_eq!(
            d.reason,
            "task 1.analysis needs 1 GPU, and no agent has one; 1 of 3 tasks goes to bigmodel \
             for an estimated 3085 micros, leaving 996915 micros of quota"
        );
    }

    #[test]
    fn an_infeasible_task_without_quota_stays_local_and_waits_for_an_agent() {
        let plan = plan(&["deployment", "analysis"]);
        let stuck = [stuck(&plan, 1, "needs 1 GPU, and no agent has one")];
        let d = decide_fallback(&plan, 0.2, &stuck, &policy(), &quota(100));
        assert!(!d.infeasible && !d.use_external);
        assert_eq!(
            d.reason,
            "task 1.analysis needs 1 GPU, and no agent has one; and no provider can take it (quota \
             exhausted: bigmodel has 100 micros left, and the plan would cost 3085 micros): it waits for \
             an agent that can run it"
        );
        // A provider that does not take the work type cannot help either.
        let stuck = [Infeasible { work_type: wt("transcription"), ..stuck[0].clone() }];
        let d = decide_fallback(&plan, 0.2, &stuck, &policy(), &quota(1_000_000));
        assert!(!d.use_external);
        assert!(d.reason.contains("(bigmodel does not take transcription work)"), "{}", d.reason);
        let d = decide_fallback(&plan, 0.2, &stuck, &FallbackPolicy::default(), &[]);
        assert!(d.reason.contains("(no external provider is configured)"), "{}", d.reason);
    }

    #[test]
    fn a_complex_plan_that_does_not_fit_still_sends_out_what_cannot_run_here() {
        let plan = plan(&["deployment", "deployment", "analysis"]);
        let stuck = [stuck(&plan, 2, "needs 1 GPU, and no agent has one")];
        // Three accepted tasks cost 9255; the quota covers one.
        let d = decide_fallback(&plan, 0.9, &stuck, &policy(), &quota(5000));
        assert!(d.use_external && !d.infeasible, "{d:#?}");
        assert_eq!(d.external_tasks, [plan.tasks()[2].id]);
        assert_eq!(
            d.reason,
            "complexity 0.90 meets the 0.70 threshold; task 2.analysis needs 1 GPU, and no agent has one; \
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
        assert_eq!(d.provider.as_deref(), Some("backup"));
        assert_eq!(d.quota_left_micros, Some(5000 - 3085));
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
        assert_eq!(toml::from_str::<ApprovalPolicy>("").unwrap(), ApprovalPolicy::default());
        let strict: ApprovalPolicy = toml::from_str("allow_request_auto_approve = false").unwrap();
        assert_eq!(strict.auto_approve_below, Some(0.2));
    }

    #[test]
    fn gate_honours_an_allowed_auto_approve_request_even_for_external_work() {
        let g = gate(true, &decision(0.95, true), &approval());
        assert_eq!(
            g,
            Gate::AutoApproved {
                reason: "the request asked for auto-approval and the policy allows it".into()
            }
        );
        assert!(g.is_auto_approved());
    }

    #[test]
    fn gate_auto_approves_simple_local_plans() {
        let g = gate(false, &decision(0.3, false), &approval());
        assert_eq!(
            g,
            Gate::AutoApproved { reason: "complexity 0.30 is below 0.50 and the work stays local".into() }
        );
    }

    #[test]
    fn gate_holds_external_work() {
        let g = gate(false, &decision(0.3, true), &approval());
        assert_eq!(g, Gate::AwaitingApproval { reason: "uses an external AI model (bigmodel)".into() });
        assert!(!g.is_auto_approved());
    }

    #[test]
    fn gate_holds_complex_plans() {
        let g = gate(false, &decision(0.8, false), &approval());
        assert_eq!(g.reason(), "complexity 0.80 is not below 0.50");
        // Exactly at the limit is not below it.
        let g = gate(false, &decision(0.5, false), &approval());
        assert_eq!(g.reason(), "complexity 0.50 is not below 0.50");
        let never = ApprovalPolicy { auto_approve_below: None, ..approval() };
        let g = gate(false, &decision(0.0, false), &never);
        assert_eq!(
            g,
            Gate::AwaitingApproval { reason: "the policy does not auto-approve by complexity".into() }
        );
    }

    #[test]
    fn gate_refuses_an_auto_approve_request_the_policy_forbids() {
        let strict = ApprovalPolicy { allow_request_auto_approve: false, ..approval() };
        let g = gate(true, &decision(0.9, true), &strict);
        assert_eq!(
            g.reason(),
            "the request asked for auto-approval but the policy does not allow it; \
             uses an external AI model (bigmodel); complexity 0.90 is not below 0.50"
        );
        assert!(!g.is_auto_approved());
        // The complexity rule still applies on its own.
        assert!(gate(true, &decision(0.1, false), &strict).is_auto_approved());

        let json = serde_json::to_value(&g).unwrap();
        assert_eq!(json["gate"], "awaiting_approval");
        assert_eq!(serde_json::from_value::<Gate>(json).unwrap(), g);
    }
}
