//! fallback: a plan → the plan-level decision on an external AI model (quota reserved
//! atomically), then the approval gate: approved by policy, or waiting for a person. Tasks that
//! no agent could run and that no provider can take stay local: they wait for an agent that can.

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Stage};
use crate::decisions::approval::{ApprovalPolicy, Gate};
use crate::decisions::fallback::{FallbackDecision, FallbackPolicy};
use crate::decisions::providers::QuotaSnapshot;
use crate::decisions::{approval, fallback};
use crate::model::domain::PlanStatus;
use crate::model::effect::{Reservation, Write, write};
use crate::model::ids::RequestId;
use crate::model::wire::{Planned, RouteTasks};
use crate::pipeline::topology::StageQueue;
use crate::store::{self, Store};

pub struct Fallback {
    pub fallback: FallbackPolicy,
    pub approval: ApprovalPolicy,
}

/// The approver recorded when the policy approves.
pub const POLICY_APPROVER: &str = "policy";

/// What the decision is made on.
#[derive(Debug, Default)]
pub struct FallbackContext {
    /// What is left of each provider's quota.
    pub quotas: Vec<QuotaSnapshot>,
    /// The plan's decision if one was recorded already (the plan came again in another message).
    pub recorded: Option<FallbackDecision>,
    /// The plan's approval verdict if one was recorded already: a person may have decided since.
    pub verdict: Option<bool>,
    /// Where the plan stands; `None`: no plan of the message's id was recorded, the message
    /// comes from elsewhere.
    pub plan_status: Option<PlanStatus>,
}

impl Stage for Fallback {
    type Input = Planned;
    type Context = FallbackContext;
    const NAME: &'static str = "fallback";
    type Request = RequestId;

    async fn load(&self, store: &Store, input: &Inbound<Planned>) -> Result<FallbackContext, store::Error> {
        let mut quotas = Vec::with_capacity(self.fallback.providers.len());
        for provider in &self.fallback.providers {
            quotas.extend(store.quota(&provider.name, Utc::now()).await?);
        }
        let plan_id = input.payload.plan.id;
        Ok(FallbackContext {
            quotas,
            recorded: store.fallback_decision(plan_id).await?,
            verdict: store.approval_verdict(plan_id).await?,
            plan_status: store.plan_status(plan_id).await?,
        })
    }

    fn decide(&self, input: &Inbound<Planned>, context: FallbackContext, now: DateTime<Utc>) -> Outcome {
        let Planned { request, complexity, plan, infeasible } = &input.payload;
        match context.plan_status {
            // The plan stage records a plan before it publishes it.
            None => {
                return Outcome::Reject {
                    writes: Vec::new(),
                    reason: format!("no plan {} was recorded: it cannot be decided on", plan.id),
                };
            }
            Some(PlanStatus::Cancelled) => {
                return Outcome::Ignore { reason: format!("plan {} is cancelled", plan.id) };
            }
            Some(_) => {}
        }
        let mut writes = Vec::new();
        // A plan is decided once: when it comes again, the gate follows the recorded decision,
        // not a new one on what is left of the quota now.
        let decision = match context.recorded {
            Some(recorded) => recorded,
            None => {
                let decision = fallback::decide_fallback(
                    plan,
                    complexity.score,
                    infeasible,
                    &self.fallback,
                    &context.quotas,
                );
                let reserve = match &decision {
                    FallbackDecision::External { provider, cost_micros, .. } => Some(Reservation {
                        provider: provider.clone(),
                        amount_micros: *cost_micros,
                        window_start: self.fallback.provider(provider).map_or(now, |p| p.window.start(now)),
                    }),
                    _ => None,
                };
                writes.push(Write::Fallback(write::Fallback {
                    request_id: request.request_id,
                    decision: decision.clone(),
                    reserve,
                }));
                decision
            }
        };
        // A verdict already recorded (by the policy before, or by a person since) stands.
        let gate = match context.verdict {
            None => approval::gate(request.auto_approve, &decision, &self.approval),
            Some(true) => Gate::AutoApproved { reason: String::new() },
            Some(false) => return Outcome::Forward { writes, publish: Vec::new() },
        };
        let recorded_verdict = context.verdict.is_some();
        let mut publish = Vec::new();
        match gate {
            Gate::AutoApproved { reason } => {
                if !recorded_verdict {
                    writes.push(Write::Approval(write::Approval {
                        request_id: request.request_id,
                        plan_id: plan.id,
                        approved: true,
                        by: POLICY_APPROVER.into(),
                        reason,
                    }));
                }
                let approved_by = if recorded_verdict { "recorded approval" } else { POLICY_APPROVER };
                let route = RouteTasks {
                    plan_id: plan.id,
                    priority: input.priority,
                    approved_by: approved_by.into(),
                };
                publish.push(input.forward(
                    Destination::Queue(StageQueue::Route),
                    "route",
                    request.request_id,
                    now,
                    route,
                ));
            }
            Gate::AwaitingApproval { reason } => {
                writes.push(Write::AwaitingApproval(write::AwaitingApproval {
                    request_id: request.request_id,
                    plan_id: plan.id,
                    reason,
                }));
            }
        }
        Outcome::Forward { writes, publish }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::decisions::providers::Provider;
    use crate::model::ids::{MessageId, RequestId, WorkType};
    use crate::model::wire::RequestMeta;
    use crate::understanding::catalog::Catalog;
    use crate::understanding::complexity::Complexity;

    fn input(text: &str, auto_approve: bool) -> Inbound<Planned> {
        let catalog = Catalog::default();
        let request_id = RequestId::random();
        let decomposition = catalog.decompose(text).unwrap();
        let plan = catalog.plan(request_id, &decomposition).unwrap();
        Inbound {
            message_id: MessageId::random(),
            request_id,
            priority: 2,
            payload: Planned {
                request: RequestMeta {
                    request_id,
                    text: text.into(),
                    submitted_by: None,
                    priority: 2,
                    auto_approve,
                },
                complexity: Complexity { score: 0.5, terms: Vec::new() },
                plan,
                infeasible: Vec::new(),
            },
        }
    }

    /// The context of a plan recorded as planned, with nothing decided on it yet.
    fn recorded_plan() -> FallbackContext {
        FallbackContext { plan_status: Some(PlanStatus::Planned), ..Default::default() }
    }

    #[test]
    fn a_cancelled_plan_is_left_alone() {
        let stage = Fallback { fallback: FallbackPolicy::default(), approval: ApprovalPolicy::default() };
        let input = input("Deploy Gitea to the homelab", true);
        let context = FallbackContext { plan_status: Some(PlanStatus::Cancelled), ..Default::default() };
        let outcome = stage.decide(&input, context, Utc::now());
        assert!(
            matches!(&outcome, Outcome::Ignore { reason } if reason.ends_with("is cancelled")),
            "{outcome:?}"
        );
    }

    fn provider() -> Provider {
        Provider {
            name: "cloud".into(),
            endpoint: "http://127.0.0.1:9/v1".into(),
            model: "m".into(),
            api_key_env: None,
            price_per_1k_input_tokens_micros: 10_000,
            price_per_1k_output_tokens_micros: 0,
            input_tokens_per_task: 1_000,
            output_tokens_per_task: 0,
            quota_micros: 1_000_000,
            window: crate::decisions::providers::Window::Monthly,
            work_types: BTreeSet::from([WorkType::parse("code_generation").unwrap()]),
        }
    }

    #[test]
    fn auto_approved_plan_goes_to_routing_with_a_policy_approval() {
        let stage = Fallback { fallback: FallbackPolicy::default(), approval: ApprovalPolicy::default() };
        let input = input("Deploy Gitea to the homelab", true);
        let Outcome::Forward { writes, publish } = stage.decide(&input, recorded_plan(), Utc::now()) else {
            panic!()
        };
        let Write::Fallback(write::Fallback { decision, reserve, .. }) = &writes[0] else {
            panic!("{writes:?}")
        };
        assert_eq!(decision.plan_id(), input.payload.plan.id, "keyed by the plan");
        assert!(decision.provider().is_none() && reserve.is_none());
        assert!(
            matches!(&writes[1], Write::Approval(write::Approval { approved: true, by, .. }) if by == POLICY_APPROVER)
        );
        assert_eq!(publish.len(), 1);
        assert_eq!(publish[0].destination, Destination::Queue(StageQueue::Route));
        assert_eq!(publish[0].body["payload"]["plan_id"], input.payload.plan.id.to_string());
    }

    #[test]
    fn a_plan_never_recorded_is_refused() {
        let stage = Fallback { fallback: FallbackPolicy::default(), approval: ApprovalPolicy::default() };
        let input = input("Deploy Gitea to the homelab", true);
        let context = FallbackContext { plan_status: None, ..Default::default() };
        let Outcome::Reject { writes, reason } = stage.decide(&input, context, Utc::now()) else { panic!() };
        assert!(writes.is_empty(), "no decision and no approval: {writes:?}");
        assert_eq!(
            reason,
            format!("no plan {} was recorded: it cannot be decided on", input.payload.plan.id)
        );
    }

    #[test]
    fn a_plan_without_auto_approval_waits_and_publishes_nothing() {
        let approval = ApprovalPolicy { auto_approve_below: None, allow_request_auto_approve: true };
        let stage = Fallback { fallback: FallbackPolicy::default(), approval };
        let input = input("Deploy Gitea to the homelab", false);
        let Outcome::Forward { writes, publish } = stage.decide(&input, recorded_plan(), Utc::now()) else {
            panic!()
        };
        assert!(
            matches!(&writes[1], Write::AwaitingApproval(write::AwaitingApproval { plan_id, .. }) if *plan_id == input.payload.plan.id)
        );
        assert!(publish.is_empty());
    }

    #[test]
    fn an_external_decision_reserves_its_estimated_cost() {
        let fallback = FallbackPolicy { complexity_threshold: 0.1, providers: vec![provider()] };
        let stage = Fallback { fallback, approval: ApprovalPolicy::default() };
        let input = input("Write a Python script that exports Grafana dashboards", false);
        let quota = QuotaSnapshot { provider: "cloud".into(), remaining_micros: 100_000 };
        let now = Utc::now();
        let Outcome::Forward { writes, publish } =
            stage.decide(&input, FallbackContext { quotas: vec![quota], ..recorded_plan() }, now)
        else {
            panic!()
        };
        let Write::Fallback(write::Fallback { decision, reserve, .. }) = &writes[0] else {
            panic!("{writes:?}")
        };
        assert!(decision.provider().is_some());
        // Three code-generation tasks × 1,000 tokens × 10,000 micros per 1,000 tokens.
        assert_eq!(
            reserve,
            &Some(Reservation {
                provider: "cloud".into(),
                amount_micros: 30_000,
                window_start: provider().window.start(now)
            }),
            "{decision:?}"
        );
        assert!(publish.is_empty(), "an external plan waits for a person by default");
    }
}
