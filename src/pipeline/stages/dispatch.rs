//! dispatch: a routed task → the chosen agent's queue, confirmed by the broker, then recorded.
//! Only what a routing decision chose is sent: an agent never receives a task that no decision
//! gave it.

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Publish, Stage};
use crate::decisions::leases::LeasePolicy;
use crate::model::domain::TaskStatus;
use crate::model::effect::{Attempt, Write, write};
use crate::model::ids::RequestId;
use crate::model::wire::{DispatchTask, TaskAssignment};
use crate::pipeline::topology::Names;
use crate::store::{self, RoutedAttempt, Store};

pub struct Dispatch {
    pub names: Names,
    pub leases: LeasePolicy,
}

/// The routing decision that the message carries out, as recorded, and where its task stands.
#[derive(Debug, Default)]
pub struct DispatchContext {
    pub routed: Option<(RoutedAttempt, TaskStatus)>,
}

/// The attempt an input dispatches.
fn attempt(input: &Inbound<DispatchTask>) -> Attempt {
    let task = &input.payload;
    Attempt {
        request_id: input.request_id,
        plan_id: task.plan_id,
        task_id: task.task.id,
        number: task.attempt,
    }
}

impl Stage for Dispatch {
    type Input = DispatchTask;
    type Context = DispatchContext;
    const NAME: &'static str = "dispatch";
    type Request = RequestId;

    async fn load(
        &self,
        store: &Store,
        input: &Inbound<DispatchTask>,
    ) -> Result<DispatchContext, store::Error> {
        Ok(DispatchContext { routed: store.routed_attempt(input.payload.decision_id).await? })
    }

    fn decide(&self, input: &Inbound<DispatchTask>, context: DispatchContext, now: DateTime<Utc>) -> Outcome {
        let task = &input.payload;
        // The route stage records its decision before it publishes the dispatch: a message
        // without one, or that sends something else than it chose, comes from elsewhere.
        let refuse = |reason: String| Outcome::Reject { writes: Vec::new(), reason };
        let asked = RoutedAttempt {
            task_id: task.task.id,
            attempt: task.attempt,
            agent_id: Some(task.agent_id.to_string()),
        };
        match context.routed {
            None => {
                return refuse(format!(
                    "no routing decision {} was recorded: task {} is not sent to {}",
                    task.decision_id, task.task.id, task.agent_id
                ));
            }
            Some((routed, _)) if routed != asked => {
                return refuse(format!(
                    "routing decision {} chose {} for attempt {} of task {}, not {} for attempt {} of task {}",
                    task.decision_id,
                    routed.agent_id.as_deref().unwrap_or("no agent"),
                    routed.attempt,
                    routed.task_id,
                    task.agent_id,
                    asked.attempt,
                    asked.task_id
                ));
            }
            // Its request was cancelled since it was routed: it goes nowhere.
            Some((_, TaskStatus::Cancelled)) => {
                return Outcome::Ignore {
                    reason: format!("task {} is cancelled: not sent to {}", task.task.key, task.agent_id),
                };
            }
            Some(_) => {}
        }
        let assignment = TaskAssignment {
            plan_id: task.plan_id,
            attempt: task.attempt,
            decision_id: task.decision_id,
            agent_id: task.agent_id.clone(),
            task: task.task.clone(),
        };
        let to = Destination::Agent(task.agent_id.clone());
        let publish = input.forward(to, "assignment", input.request_id, now, assignment);
        let then = vec![Write::Dispatched(write::Dispatched {
            attempt: attempt(input),
            decision_id: task.decision_id,
            agent_id: task.agent_id.clone(),
            queue: self.names.agent_queue(&task.agent_id),
            message_id: publish.message_id,
            lease_secs: self.leases.lease_secs(&task.task),
        })];
        Outcome::Deliver { publish, then }
    }

    fn undeliverable(
        &self,
        input: &Inbound<DispatchTask>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> (Vec<Write>, Vec<Publish>) {
        let task = &input.payload;
        let writes = vec![
            Write::DispatchFailed(write::DispatchFailed {
                attempt: attempt(input),
                decision_id: task.decision_id,
                agent_id: task.agent_id.clone(),
                reason: reason.to_owned(),
            }),
            // Nothing takes the agent's messages: the plan cannot go on as planned.
            Write::PlanFinished(write::PlanFinished {
                request_id: input.request_id,
                plan_id: task.plan_id,
                failure: Some(format!(
                    "task {} could not be dispatched to {}: {reason}",
                    task.task.key, task.agent_id
                )),
            }),
        ];
        // The slot the decision reserved is free again.
        (writes, vec![super::wake(input.message_id, "dispatch failed", now)])
    }
}

#[cfg(test)]
mod tests {
    use crate::pipeline::topology::StageQueue;
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::domain::{Resources, Task};
    use crate::model::ids::{AgentId, MessageId, Namespace, RequestId, WorkType};

    fn input() -> Inbound<DispatchTask> {
        let request_id = RequestId::random();
        let plan_id = request_id.plan_id();
        let task_id = plan_id.task_id("1.prepare");
        Inbound {
            message_id: MessageId::random(),
            request_id,
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

    /// The decision that `input` carries out, as the route stage recorded it.
    fn routed(input: &Inbound<DispatchTask>) -> DispatchContext {
        let task = &input.payload;
        DispatchContext {
            routed: Some((
                RoutedAttempt {
                    task_id: task.task.id,
                    attempt: task.attempt,
                    agent_id: Some(task.agent_id.to_string()),
                },
                TaskStatus::Routed,
            )),
        }
    }

    #[test]
    fn a_task_is_delivered_to_its_agent_then_recorded() {
        let stage =
            Dispatch { names: Names::new(Namespace::parse("ns").unwrap()), leases: LeasePolicy::default() };
        let input = input();
        let Outcome::Deliver { publish, then } = stage.decide(&input, routed(&input), Utc::now()) else {
            panic!()
        };
        assert_eq!(publish.destination, Destination::Agent(AgentId::parse("homelab-1").unwrap()));
        assert_eq!(publish.message_id, input.message_id.derive("assignment"));
        assert_eq!(publish.body["payload"]["task"]["key"], "1.prepare");
        let Write::Dispatched(write::Dispatched { queue, message_id, attempt, .. }) = &then[0] else {
            panic!("{then:?}")
        };
        assert_eq!(queue, "ns.agent.homelab-1");
        assert_eq!((*message_id, attempt.number), (publish.message_id, 1));
    }

    #[test]
    fn a_task_that_no_routing_decision_chose_is_never_delivered() {
        let stage =
            Dispatch { names: Names::new(Namespace::parse("ns").unwrap()), leases: LeasePolicy::default() };
        let input = input();
        let task = &input.payload;
        let Outcome::Reject { writes, reason } = stage.decide(&input, DispatchContext::default(), Utc::now())
        else {
            panic!("expected a refusal")
        };
        assert!(writes.is_empty(), "{writes:?}");
        assert_eq!(
            reason,
            format!(
                "no routing decision {} was recorded: task {} is not sent to homelab-1",
                task.decision_id, task.task.id
            )
        );
        // A decision that chose another agent does not send the task to this one.
        let mut other = routed(&input);
        other.routed.as_mut().unwrap().0.agent_id = Some("homelab-2".into());
        let Outcome::Reject { reason, .. } = stage.decide(&input, other, Utc::now()) else { panic!() };
        assert!(reason.contains("chose homelab-2 for attempt 1"), "{reason}");
        assert!(reason.contains("not homelab-1 for attempt 1"), "{reason}");
    }

    #[test]
    fn a_task_cancelled_since_it_was_routed_is_not_delivered() {
        let stage =
            Dispatch { names: Names::new(Namespace::parse("ns").unwrap()), leases: LeasePolicy::default() };
        let input = input();
        let mut context = routed(&input);
        context.routed.as_mut().unwrap().1 = TaskStatus::Cancelled;
        let outcome = stage.decide(&input, context, Utc::now());
        assert!(
            matches!(&outcome, Outcome::Ignore { reason } if reason == "task 1.prepare is cancelled: not sent to homelab-1"),
            "{outcome:?}"
        );
    }

    #[test]
    fn an_undeliverable_task_is_recorded_as_failed_with_the_reason() {
        let stage =
            Dispatch { names: Names::new(Namespace::parse("ns").unwrap()), leases: LeasePolicy::default() };
        let (writes, publish) = stage.undeliverable(&input(), "unroutable", Utc::now());
        assert_eq!(
            publish[0].destination,
            Destination::Queue(StageQueue::Place),
            "the slot is offered again"
        );
        assert!(
            matches!(&writes[0], Write::DispatchFailed(write::DispatchFailed { reason, attempt: Attempt { number: 1, .. }, .. }) if reason == "unroutable")
        );
        assert!(
            matches!(&writes[1], Write::PlanFinished(write::PlanFinished { failure: Some(f), .. }) if f.contains("unroutable"))
        );
    }
}
