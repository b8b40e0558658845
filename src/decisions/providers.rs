//! External AI model providers: what each costs, what work it takes, and the window after which
//! its quota starts afresh. Pure: quota in use is counted by the store, against these windows.

use std::collections::BTreeSet;

use chrono::{DateTime, Datelike, Days, Months, NaiveTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::ids::WorkType;

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

/// What is left of a provider's quota in the current window.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct QuotaSnapshot {
    pub provider: String,
    pub remaining_micros: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decisions::fixtures::provider;

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
}
