//! plan: a decomposition → a work plan (a DAG of at least one task), from the catalog's steps.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Publish, Stage};
use crate::catalog::Catalog;
use crate::effect::Write;
use crate::wire::{Decomposed, Envelope, Planned};

pub struct PlanStage {
    pub catalog: Arc<Catalog>,
}

impl Stage for PlanStage {
    type Input = Decomposed;
    type Context = ();
    const NAME: &'static str = "plan";

    fn decide(&self, input: &Inbound<Decomposed>, _: (), now: DateTime<Utc>) -> Outcome {
        let request = &input.payload.request;
        let decomposition = &input.payload.decomposition;
        match self.catalog.plan(request.request_id, decomposition) {
            Ok(plan) => {
                let complexity = decomposition.complexity;
                let envelope = Envelope::derived(
                    input.message_id,
                    "planned",
                    request.request_id,
                    now,
                    Planned { request: request.clone(), complexity, plan: plan.clone() },
                );
                Outcome::Forward {
                    writes: vec![Write::Plan { plan, complexity }],
                    publish: vec![Publish::envelope(
                        Destination::Queue("planned".into()),
                        input.priority,
                        &envelope,
                    )],
                }
            }
            Err(err) => {
                // Never an empty plan passed on: the request fails, with the reason on it.
                let reason = format!("planning failed: {err}");
                Outcome::Reject {
                    writes: vec![Write::RequestFailed {
                        request_id: request.request_id,
                        reason: reason.clone(),
                    }],
                    reason,
                }
            }
        }
    }
}
