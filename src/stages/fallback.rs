//! fallback: a plan → the plan-level decision on an external AI model (quota reserved
//! atomically), then the approval gate: approved by policy, or waiting for a person.

use chrono::{DateTime, Utc};

use super::{AmqpMeta, Destination, Inbound, Outcome, Publish, Stage, parse_envelope};
use crate::effect::{Reservation, Write};
use crate::policy::{self, ApprovalPolicy, FallbackPolicy, Gate, QuotaSnapshot};
use crate::store::{self, Store};
use crate::wire::{self, Envelope, Planned, RouteTasks};

pub struct Fallback {
    pub fallback: FallbackPolicy,
    pub approval: ApprovalPolicy,
}

/// The approver recorded when the policy approves.
pub const POLICY_APPROVER: &str = "policy";

impl Stage for Fallback {
    type Input = Planned;
    /// What is left of the provider's quota.
    type Context = Option<QuotaSnapshot>;
    const NAME: &'static str = "fallback";

    fn parse(&self, body: &[u8], amqp: &AmqpMeta<'_>, limit: usize) -> Result<Inbound<Planned>, wire::Error> {
        parse_envelope(body, amqp, limit)
    }

    async fn load(&self, store: &Store, _: &Inbound<Planned>) -> Result<Option<QuotaSnapshot>, store::Error> {
        match &self.fallback.provider {
            Some(provider) => store.quota(&provider.name).await,
            None => Ok(None),
        }
    }

    fn decide(&self, input: &Inbound<Planned>, quota: Option<QuotaSnapshot>, now: DateTime<Utc>) -> Outcome {
        let Planned { request, complexity, plan } = &input.payload;
        let decision = policy::decide_fallback(plan, *complexity, &self.fallback, quota.as_ref());
        let reserve = match (&decision.provider, decision.use_external) {
            (Some(provider), true) => {
                Some(Reservation { provider: provider.clone(), amount_micros: decision.estimated_cost_micros })
            }
            _ => None,
        };
        let gate = policy::gate(request.auto_approve, &decision, &self.approval);
        let mut writes = vec![Write::Fallback { request_id: request.request_id, decision, reserve }];
        let mut publish = Vec::new();
        match gate {
            Gate::AutoApproved { reason } => {
                writes.push(Write::Approval {
                    request_id: request.request_id,
                    plan_id: plan.id,
                    approved: true,
                    by: POLICY_APPROVER.into(),
                    reason,
                });
                let envelope = Envelope::derived(
                    input.message_id,
                    "route",
                    request.request_id,
                    now,
                    RouteTasks { plan_id: plan.id, priority: input.priority, approved_by: POLICY_APPROVER.into() },
                );
                publish.push(Publish::envelope(Destination::Queue("route".into()), input.priority, &envelope));
            }
            Gate::AwaitingApproval { reason } => {
                writes.push(Write::AwaitingApproval { request_id: request.request_id, plan_id: plan.id, reason });
            }
        }
        Outcome::Forward { writes, publish }
    }
}
