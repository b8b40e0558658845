//! The approval gate: whether a plan runs at once or waits for a person to approve it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::fallback::{FallbackDecision, figures};

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
    let complexity = decision.complexity();
    if let Some(limit) = policy.auto_approve_below
        && complexity < limit
        && decision.provider().is_none()
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
    if let Some(provider) = decision.provider() {
        reasons.push(format!("uses an external AI model ({provider})"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ids::RequestId;

    /// Auto-approval below 0.5.
    fn approval() -> ApprovalPolicy {
        ApprovalPolicy { auto_approve_below: Some(0.5), allow_request_auto_approve: true }
    }

    fn decision(complexity: f64, use_external: bool) -> FallbackDecision {
        let plan_id = RequestId::random().plan_id();
        let reason = String::new();
        if !use_external {
            return FallbackDecision::Local { plan_id, complexity, reason };
        }
        FallbackDecision::External {
            plan_id,
            complexity,
            reason,
            provider: "bigmodel".to_owned(),
            tasks: Vec::new(),
            cost_micros: 0,
            quota_left_micros: 0,
        }
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
            Gate::AutoApproved { reason: "complexity 0.300 is below 0.500 and the work stays local".into() }
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
        assert_eq!(g.reason(), "complexity 0.800 is not below 0.500");
        // Exactly at the limit is not below it.
        let g = gate(false, &decision(0.5, false), &approval());
        assert_eq!(g.reason(), "complexity 0.500 is not below 0.500");
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
             uses an external AI model (bigmodel); complexity 0.900 is not below 0.500"
        );
        assert!(!g.is_auto_approved());
        // The complexity rule still applies on its own.
        assert!(gate(true, &decision(0.1, false), &strict).is_auto_approved());

        let json = serde_json::to_value(&g).unwrap();
        assert_eq!(json["gate"], "awaiting_approval");
        assert_eq!(serde_json::from_value::<Gate>(json).unwrap(), g);
    }

    #[test]
    fn approval_policy_reads_from_toml() {
        assert_eq!(toml::from_str::<ApprovalPolicy>("").unwrap(), ApprovalPolicy::default());
        let strict: ApprovalPolicy = toml::from_str("allow_request_auto_approve = false").unwrap();
        assert_eq!(strict.auto_approve_below, Some(0.2));
    }
}
