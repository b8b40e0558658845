//! dispatch: a routed task → the chosen agent's queue, confirmed by the broker, then recorded.

use chrono::{DateTime, Utc};

use super::{AmqpMeta, Destination, Inbound, Outcome, Publish, Stage, parse_envelope};
use crate::effect::Write;
use crate::store::{self, Store};
use crate::topology::Names;
use crate::wire::{self, DispatchTask, Envelope, TaskAssignment};

pub struct Dispatch {
    pub names: Names,
}

fn request_id(input: &Inbound<DispatchTask>) -> crate::ids::RequestId {
    input.request_id.expect("envelopes carry their request id")
}

impl Stage for Dispatch {
    type Input = DispatchTask;
    type Context = ();
    const NAME: &'static str = "dispatch";

    fn parse(&self, body: &[u8], amqp: &AmqpMeta<'_>, limit: usize) -> Result<Inbound<DispatchTask>, wire::Error> {
        parse_envelope(body, amqp, limit)
    }

    async fn load(&self, _: &Store, _: &Inbound<DispatchTask>) -> Result<(), store::Error> {
        Ok(())
    }

    fn decide(&self, input: &Inbound<DispatchTask>, _: (), now: DateTime<Utc>) -> Outcome {
        let task = &input.payload;
        let envelope = Envelope::derived(
            input.message_id,
            "assignment",
            request_id(input),
            now,
            TaskAssignment {
                plan_id: task.plan_id,
                attempt: task.attempt,
                decision_id: task.decision_id,
                agent_id: task.agent_id.clone(),
                task: task.task.clone(),
            },
        );
        let publish = Publish::envelope(Destination::Agent(task.agent_id.clone()), input.priority, &envelope);
        let then = vec![Write::Dispatched {
            request_id: request_id(input),
            plan_id: task.plan_id,
            task_id: task.task.id,
            attempt: task.attempt,
            decision_id: task.decision_id,
            agent_id: task.agent_id.clone(),
            queue: self.names.agent_queue(&task.agent_id),
            message_id: envelope.message_id,
        }];
        Outcome::Deliver { publish, then }
    }

    fn undeliverable(&self, input: &Inbound<DispatchTask>, reason: &str) -> Vec<Write> {
        let task = &input.payload;
        vec![Write::DispatchFailed {
            request_id: request_id(input),
            plan_id: task.plan_id,
            task_id: task.task.id,
            attempt: task.attempt,
            decision_id: task.decision_id,
            agent_id: task.agent_id.clone(),
            reason: reason.to_owned(),
        }]
    }
}
