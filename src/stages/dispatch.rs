//! dispatch: a routed task → the chosen agent's queue, confirmed by the broker, then recorded.

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Publish, Stage};
use crate::effect::Write;
use crate::leases::LeasePolicy;
use crate::topology::Names;
use crate::wire::{DispatchTask, Envelope, TaskAssignment};

pub struct Dispatch {
    pub names: Names,
    pub leases: LeasePolicy,
}

fn request_id(input: &Inbound<DispatchTask>) -> crate::ids::RequestId {
    input.request_id.expect("envelopes carry their request id")
}

impl Stage for Dispatch {
    type Input = DispatchTask;
    type Context = ();
    const NAME: &'static str = "dispatch";

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
            lease_secs: self.leases.lease_secs(&task.task),
        }];
        Outcome::Deliver { publish, then }
    }

    fn undeliverable(&self, input: &Inbound<DispatchTask>, reason: &str) -> Vec<Write> {
        let task = &input.payload;
        vec![
            Write::DispatchFailed {
                request_id: request_id(input),
                plan_id: task.plan_id,
                task_id: task.task.id,
                attempt: task.attempt,
                decision_id: task.decision_id,
                agent_id: task.agent_id.clone(),
                reason: reason.to_owned(),
            },
            // Nothing takes the agent's messages: the plan cannot go on as planned.
            Write::PlanFinished {
                request_id: request_id(input),
                plan_id: task.plan_id,
                failure: Some(format!(
                    "task {} could not be dispatched to {}: {reason}",
                    task.task.key, task.agent_id
                )),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::domain::{Resources, Task};
    use crate::ids::{AgentId, MessageId, Namespace, RequestId, WorkType};

    fn input() -> Inbound<DispatchTask> {
        let request_id = RequestId::random();
        let plan_id = request_id.plan_id();
        let task_id = plan_id.task_id("1.prepare");
        Inbound {
            message_id: MessageId::random(),
            request_id: Some(request_id),
            priority: 3,
            payload: DispatchTask {
                plan_id,
                priority: 3,
                attempt: 1,
                decision_id: task_id.decision_id(1),
                agent_id: AgentId::parse("homelab-1").unwrap(),
                task: Task {
                    id: task_id,
                    key: "1.prepare".into(),
                    work_type: WorkType::parse("deployment").unwrap(),
                    description: "prepare".into(),
                    estimated_duration_secs: 60,
                    resources: Resources::default(),
                    capabilities: BTreeSet::new(),
                    depends_on: vec![],
                    affinity: BTreeMap::new(),
                },
            },
        }
    }

    #[test]
    fn a_task_is_delivered_to_its_agent_then_recorded() {
        let stage =
            Dispatch { names: Names::new(Namespace::parse("ns").unwrap()), leases: LeasePolicy::default() };
        let input = input();
        let Outcome::Deliver { publish, then } = stage.decide(&input, (), Utc::now()) else { panic!() };
        assert_eq!(publish.destination, Destination::Agent(AgentId::parse("homelab-1").unwrap()));
        assert_eq!(publish.message_id, input.message_id.derive("assignment"));
        assert_eq!(publish.body["payload"]["task"]["key"], "1.prepare");
        let Write::Dispatched { queue, message_id, attempt, .. } = &then[0] else { panic!("{then:?}") };
        assert_eq!(queue, "ns.agent.homelab-1");
        assert_eq!((*message_id, *attempt), (publish.message_id, 1));
    }

    #[test]
    fn an_undeliverable_task_is_recorded_as_failed_with_the_reason() {
        let stage =
            Dispatch { names: Names::new(Namespace::parse("ns").unwrap()), leases: LeasePolicy::default() };
        let writes = stage.undeliverable(&input(), "unroutable");
        assert!(
            matches!(&writes[0], Write::DispatchFailed { reason, attempt: 1, .. } if reason == "unroutable")
        );
        assert!(
            matches!(&writes[1], Write::PlanFinished { failure: Some(f), .. } if f.contains("unroutable"))
        );
    }
}
