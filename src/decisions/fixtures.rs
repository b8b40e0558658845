//! What the tests of the decisions share: a provider and the work types it takes.

use crate::decisions::providers::{Provider, Window};
use crate::model::ids::WorkType;

pub(crate) fn wt(s: &str) -> WorkType {
    WorkType::parse(s).unwrap()
}

/// 2,000 input tokens at 1,000 micros and 500 output tokens at 2,170 micros per 1,000:
/// 2,000 + 1,085 = 3,085 micros per task.
pub(crate) fn provider() -> Provider {
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
