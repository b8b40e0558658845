//! What the two stages that route share: `route` places the tasks a plan releases, `place` the
//! tasks waiting in line. Both judge a task against the same pool of agents, with the same
//! default, and turn a route into the same decision and dispatch message.

use std::collections::{BTreeSet, HashSet};

use chrono::{DateTime, Utc};

use super::{Destination, Publish};
use crate::decisions::fallback::FallbackDecision;
use crate::decisions::providers;
use crate::decisions::routing::{Ask, Route, RoutingPolicy};
use crate::model::domain::{Agent, Resources, Task};
use crate::model::effect::{Write, write};
use crate::model::ids::{AgentId, MessageId, PlanId, RequestId, TaskId};
use crate::model::wire::{DispatchTask, Envelope, Wake};
use crate::pipeline::topology::StageQueue;

/// The tasks that a plan's fallback decision sends to an external provider. They are done by
/// the provider's agents (the `llm` executor), so they need the provider's capability instead of
/// their own, and none of the resources that a local agent would need: the model runs elsewhere.
#[derive(Debug)]
pub(crate) struct External {
    tasks: HashSet<TaskId>,
    capability: String,
    /// Where an external task waits when no agent of the provider is up.
    default_agent: Option<AgentId>,
}

impl External {
    pub(crate) fn of(decision: Option<&FallbackDecision>) -> Option<Self> {
        let decision = decision?;
        Some(External::to_provider(decision.provider()?, decision.external_tasks().iter().copied()))
    }

    /// The tasks `tasks`, sent out to the provider `name`.
    pub(crate) fn to_provider(name: &str, tasks: impl IntoIterator<Item = TaskId>) -> Self {
        External {
            tasks: tasks.into_iter().collect(),
            capability: providers::provider_capability(name),
            default_agent: AgentId::parse(providers::provider_agent(name)).ok(),
        }
    }

    pub(crate) fn contains(&self, task: TaskId) -> bool {
        self.tasks.contains(&task)
    }

    /// `task` as the provider's agents see it, if it goes out; else as it is.
    pub(crate) fn adapt(&self, task: &Task) -> Task {
        if !self.tasks.contains(&task.id) {
            return task.clone();
        }
        Task {
            capabilities: BTreeSet::from([self.capability.clone()]),
            resources: Resources::default(),
            ..task.clone()
        }
    }
}

fn serving(agent: &Agent) -> bool {
    providers::serves_a_provider(&agent.capabilities)
}

fn local(agent: &Agent) -> bool {
    !providers::serves_a_provider(&agent.capabilities)
}

/// How `task`'s `attempt` may be routed. An external task goes to its provider's agents only,
/// with the provider's agent as its default; a local task never goes to them (what they ran
/// would be paid for outside any reservation), its default agent is its work type's. A retry
/// goes to an agent that has not failed the task, and never to a default agent.
pub(crate) fn ask<'a>(
    task: &Task,
    attempt: u32,
    external: Option<&'a External>,
    failed: Option<&'a BTreeSet<AgentId>>,
    policy: &'a RoutingPolicy,
) -> Ask<'a> {
    let outside = external.filter(|e| e.contains(task.id));
    let default_agent = match (attempt > 1, outside) {
        (true, _) => None,
        (false, Some(external)) => external.default_agent.as_ref(),
        (false, None) => policy.default_agents.get(&task.work_type),
    };
    Ask { excluded: failed, default_agent, pool: if outside.is_some() { serving } else { local } }
}

/// What one routed task becomes: its routing decision, and the message that has it dispatched.
pub(super) struct Routed<'a> {
    /// The message whose decision this is: the dispatch message's id derives from it.
    pub cause: MessageId,
    pub request_id: RequestId,
    pub plan_id: PlanId,
    pub priority: u8,
    pub attempt: u32,
    /// As the agent gets it (an external task adapted).
    pub task: &'a Task,
    pub route: Route,
    pub ready_at: DateTime<Utc>,
}

impl Routed<'_> {
    pub(super) fn into_effects(self, now: DateTime<Utc>) -> (Write, Publish) {
        let Routed { cause, request_id, plan_id, priority, attempt, task, route, ready_at } = self;
        let decision_id = task.id.decision_id(attempt);
        let envelope = Envelope::derived(
            cause,
            &format!("dispatch:{}:{attempt}", task.id),
            request_id,
            now,
            DispatchTask {
                plan_id,
                priority,
                attempt,
                decision_id,
                agent_id: route.agent_id.clone(),
                task: task.clone(),
            },
        );
        let publish = Publish::envelope(Destination::Queue(StageQueue::Dispatch), priority, &envelope);
        (Write::Route(write::Route { request_id, plan_id, attempt, decision_id, route, ready_at }), publish)
    }
}

/// A wake-up of the `place` stage, caused by the message `cause` (its id derives from it, so
/// that handling the cause again wakes it once). Persistent like any message: the decisions a
/// wake-up leads to are recorded with it, and only its redelivery publishes them again if the
/// process or the broker stops in between.
pub(crate) fn wake(cause: MessageId, what: &str, now: DateTime<Utc>) -> Publish {
    let wake = Wake { message_id: cause.derive("wake"), cause: what.to_owned(), at: now };
    Publish {
        destination: Destination::Queue(StageQueue::Place),
        message_id: wake.message_id,
        priority: 0,
        body: serde_json::to_value(&wake).expect("wake-ups serialize"),
        traceparent: None,
    }
}
