//! route: an approved plan → an agent for every task whose dependencies are met, each decision
//! with every candidate's verdict, capacity reserved in the same transaction.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Publish, Stage};
use crate::domain::{Agent, PlanStatus, Resources, Task, TaskStatus};
use crate::effect::Write;
use crate::ids::{AgentId, TaskId};
use crate::policy::{self, FallbackDecision};
use crate::routing::{self, Route as Routed, RoutingPolicy};
use crate::store::{self, Store, StoredPlan, TaskState};
use crate::wire::{DispatchTask, Envelope, RouteTasks};

pub struct Route {
    pub policy: RoutingPolicy,
}

/// The plan, where its tasks stand, and the fleet.
#[derive(Debug, Default)]
pub struct RouteContext {
    pub plan: Option<StoredPlan>,
    pub tasks: Vec<TaskState>,
    pub agents: Vec<Agent>,
    /// The agents that failed each task before: a retry goes elsewhere.
    pub failed: HashMap<TaskId, BTreeSet<AgentId>>,
    /// The plan's fallback decision, which names the tasks that go to an external provider.
    pub fallback: Option<FallbackDecision>,
}

impl Stage for Route {
    type Input = RouteTasks;
    type Context = RouteContext;
    const NAME: &'static str = "route";

    async fn load(&self, store: &Store, input: &Inbound<RouteTasks>) -> Result<RouteContext, store::Error> {
        let plan_id = input.payload.plan_id;
        Ok(RouteContext {
            plan: store.plan(plan_id).await?,
            tasks: store.task_states(plan_id).await?,
            agents: store.agents().await?,
            failed: store.failed_agents(plan_id).await?,
            fallback: store.fallback_decision(plan_id).await?,
        })
    }

    fn decide(&self, input: &Inbound<RouteTasks>, context: RouteContext, now: DateTime<Utc>) -> Outcome {
        let plan_id = input.payload.plan_id;
        let Some(stored) = context.plan else {
            return Outcome::Reject { writes: Vec::new(), reason: format!("no plan {plan_id}") };
        };
        match stored.status {
            PlanStatus::Approved => {}
            // A plan that ended has nothing left to route: a late message, not an error.
            PlanStatus::Completed | PlanStatus::Failed | PlanStatus::Rejected | PlanStatus::Infeasible => {
                return Outcome::Ignore { reason: format!("plan {plan_id} is {}", stored.status) };
            }
            PlanStatus::Planned | PlanStatus::AwaitingApproval => {
                return Outcome::Reject {
                    writes: Vec::new(),
                    reason: format!("plan {plan_id} is {}, not approved", stored.status),
                };
            }
        }
        let plan = &stored.plan;
        let external = External::of(context.fallback.as_ref());
        let done: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).map(|t| t.id).collect();
        let pending: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Pending).map(|t| t.id).collect();
        let ready: Vec<Task> = plan
            .ready_tasks(&done)
            .filter(|t| pending.contains(&t.id))
            .map(|t| external.as_ref().map_or_else(|| t.clone(), |e| e.adapt(t)))
            .collect();
        let state = |task_id| context.tasks.iter().find(|t| t.id == task_id);
        let is_retry = |task_id| state(task_id).is_some_and(|t| t.attempt > 0);
        // A retry goes to an agent that has not failed the task, never to a default agent. If no
        // agent could ever take it, the task has failed for good; its plan with it.
        for task in ready.iter().filter(|t| is_retry(t.id)) {
            let failed = context.failed.get(&task.id);
            let able = context
                .agents
                .iter()
                .any(|a| routing::capable(task, a, failed.is_some_and(|f| f.contains(&a.id))));
            if !able {
                let tried: Vec<&str> = failed.into_iter().flatten().map(|a| a.as_str()).collect();
                let reason = format!(
                    "task {} failed on {} and no other agent has what it needs",
                    task.key,
                    tried.join(", ")
                );
                let writes = vec![
                    Write::TaskFailed {
                        request_id: plan.request_id,
                        plan_id,
                        task_id: task.id,
                        reason: reason.clone(),
                        cancelled: plan.dependents_of(task.id),
                    },
                    Write::PlanFinished { request_id: plan.request_id, plan_id, failure: Some(reason) },
                ];
                return Outcome::Forward { writes, publish: Vec::new() };
            }
        }
        // External tasks are routed on their own, among the agents that serve a provider, so that
        // their default agent is the provider's and not the work type's local one. Local tasks
        // never go to those agents: what they ran would be paid for outside any reservation.
        let (outside, inside): (Vec<usize>, Vec<usize>) = (0..ready.len())
            .partition(|&i| external.as_ref().is_some_and(|e| e.tasks.contains(&ready[i].id)));
        let (serving, local_agents): (Vec<Agent>, Vec<Agent>) =
            context.agents.iter().cloned().partition(|a| policy::serves_a_provider(&a.capabilities));
        let route_group = |indices: &[usize], agents: &[Agent], policy: &RoutingPolicy| {
            let tasks: Vec<&Task> = indices.iter().map(|&i| &ready[i]).collect();
            routing::route_tasks_excluding(&tasks, agents, now, policy, &context.failed)
        };
        let routed = route_group(&inside, &local_agents, &self.policy).and_then(|mut local| {
            let Some(external) = &external else { return Ok(local) };
            let remote = route_group(&outside, &serving, &external.policy(&self.policy, &ready))?;
            let mut all: Vec<Option<Routed>> = (0..ready.len()).map(|_| None).collect();
            for (i, route) in inside.iter().zip(local.drain(..)).chain(outside.iter().zip(remote)) {
                all[*i] = Some(route);
            }
            Ok(all.into_iter().map(|r| r.expect("every task routed once")).collect())
        });
        let routes = match routed {
            Ok(routes) => routes,
            Err(routing::RouteError::NoDefaultAgent { task_id, .. }) if is_retry(task_id) => {
                return Outcome::Defer {
                    reason: format!("task {task_id} waits for an agent that has not failed it"),
                };
            }
            Err(err) => {
                // The plan cannot go on: it fails, what it had left is cancelled, and the
                // input is dead-lettered so that the failure is also seen where operators look.
                let reason = format!("routing failed: {err}");
                let writes = vec![Write::PlanFinished {
                    request_id: plan.request_id,
                    plan_id,
                    failure: Some(reason.clone()),
                }];
                return Outcome::Reject { writes, reason };
            }
        };
        if let Some((task, _)) = ready.iter().zip(&routes).find(|(t, r)| is_retry(t.id) && r.score.is_none())
        {
            return Outcome::Defer {
                reason: format!(
                    "task {} waits for an agent that has not failed it: those that could are busy or silent",
                    task.key
                ),
            };
        }
        let attempts = |task_id| state(task_id).map_or(0, |t| t.attempt) + 1;
        let mut writes = Vec::with_capacity(routes.len());
        let mut publish = Vec::with_capacity(routes.len());
        for (task, route) in ready.iter().zip(routes) {
            let attempt = attempts(task.id);
            let decision_id = task.id.decision_id(attempt);
            let envelope = Envelope::derived(
                input.message_id,
                &format!("dispatch:{}:{attempt}", task.id),
                plan.request_id,
                now,
                DispatchTask {
                    plan_id,
                    priority: input.payload.priority,
                    attempt,
                    decision_id,
                    agent_id: route.agent_id.clone(),
                    task: (*task).clone(),
                },
            );
            publish.push(Publish::envelope(Destination::Queue("dispatch".into()), input.priority, &envelope));
            writes.push(Write::Route { request_id: plan.request_id, plan_id, attempt, decision_id, route });
        }
        Outcome::Forward { writes, publish }
    }
}

/// The tasks that a plan's fallback decision sends to an external provider. They are done by
/// the provider's agents (the `llm` executor), so they need the provider's capability instead of
/// their own, and none of the resources that a local agent would need: the model runs elsewhere.
#[derive(Debug)]
struct External {
    tasks: HashSet<TaskId>,
    capability: String,
    /// Where an external task waits when no agent of the provider is up.
    default_agent: Option<AgentId>,
}

impl External {
    fn of(decision: Option<&FallbackDecision>) -> Option<Self> {
        let decision = decision.filter(|d| d.use_external)?;
        let provider = decision.provider.as_deref()?;
        Some(External {
            tasks: decision.external_tasks.iter().copied().collect(),
            capability: policy::provider_capability(provider),
            default_agent: AgentId::parse(policy::provider_agent(provider)).ok(),
        })
    }

    fn adapt(&self, task: &Task) -> Task {
        if !self.tasks.contains(&task.id) {
            return task.clone();
        }
        Task {
            capabilities: BTreeSet::from([self.capability.clone()]),
            resources: Resources::default(),
            ..task.clone()
        }
    }

    /// `base`, with the provider's agent as the default agent of the external tasks' work types.
    fn policy(&self, base: &RoutingPolicy, ready: &[Task]) -> RoutingPolicy {
        let mut policy = base.clone();
        policy.default_agents.clear();
        if let Some(agent) = &self.default_agent {
            for task in ready.iter().filter(|t| self.tasks.contains(&t.id)) {
                policy.default_agents.insert(task.work_type.clone(), agent.clone());
            }
        }
        policy
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::catalog::Catalog;
    use crate::domain::Resources;
    use crate::ids::{AgentId, MessageId, RequestId, WorkType};

    fn stored(status: PlanStatus) -> StoredPlan {
        let catalog = Catalog::default();
        let d = catalog.decompose("Deploy Uptime Kuma to the homelab and send alerts to Discord").unwrap();
        StoredPlan { plan: catalog.plan(RequestId::random(), &d).unwrap(), status, version: 0 }
    }

    fn states(plan: &StoredPlan) -> Vec<TaskState> {
        plan.plan.tasks().iter().map(TaskState::pending).collect()
    }

    fn agent(id: &str) -> Agent {
        Agent {
            id: AgentId::parse(id).unwrap(),
            capabilities: ["deployment", "monitoring", "shell"].map(String::from).into(),
            capacity: 4,
            in_flight: 0,
            labels: BTreeMap::new(),
            resources: Resources { cpu: 8.0, memory_mb: 16_384, gpu: 0 },
            last_heartbeat: Utc::now(),
            succeeded: 0,
            failed: 0,
        }
    }

    fn input(plan: &StoredPlan) -> Inbound<RouteTasks> {
        Inbound {
            message_id: MessageId::random(),
            request_id: Some(plan.plan.request_id),
            priority: 0,
            payload: RouteTasks { plan_id: plan.plan.id, priority: 0, approved_by: "policy".into() },
        }
    }

    #[test]
    fn routes_only_the_ready_pending_tasks() {
        let plan = stored(PlanStatus::Approved);
        let mut tasks = states(&plan);
        let stage = Route { policy: RoutingPolicy::default() };
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: tasks.clone(),
            agents: vec![agent("a1")],
            ..Default::default()
        };
        let Outcome::Forward { writes, publish } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        assert_eq!(writes.len(), 1, "only 1.prepare has no dependency");
        let Write::Route { attempt, route, decision_id, .. } = &writes[0] else { panic!("{writes:?}") };
        assert_eq!((route.task_id, *attempt), (tasks[0].id, 1));
        assert_eq!(*decision_id, tasks[0].id.decision_id(1));
        assert_eq!(publish[0].body["payload"]["agent_id"], "a1");

        // Once 1.prepare succeeded, 1.deploy is next; a routed task is not routed again.
        tasks[0].status = TaskStatus::Succeeded;
        tasks[1].status = TaskStatus::Routed;
        tasks[1].attempt = 1;
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: tasks.clone(),
            agents: vec![agent("a1")],
            ..Default::default()
        };
        let Outcome::Forward { writes, .. } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        assert!(writes.is_empty(), "{writes:?}");
    }

    #[test]
    fn a_plan_that_is_not_approved_is_refused() {
        let plan = stored(PlanStatus::AwaitingApproval);
        let stage = Route { policy: RoutingPolicy::default() };
        let context = RouteContext { plan: Some(plan.clone()), tasks: states(&plan), ..Default::default() };
        let Outcome::Reject { reason, .. } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        assert!(reason.contains("awaiting_approval, not approved"), "{reason}");
    }

    #[test]
    fn no_agent_and_no_default_fails_the_request() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: RoutingPolicy::default() };
        let context = RouteContext { plan: Some(plan.clone()), tasks: states(&plan), ..Default::default() };
        let Outcome::Reject { writes, reason } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        assert!(reason.contains("no default agent"), "{reason}");
        assert!(matches!(
            &writes[0],
            Write::PlanFinished { request_id, failure: Some(_), .. } if *request_id == plan.plan.request_id
        ));
    }

    #[test]
    fn with_no_candidate_the_default_agent_gets_the_task_without_a_reservation() {
        let plan = stored(PlanStatus::Approved);
        let mut policy = RoutingPolicy::default();
        policy
            .default_agents
            .insert(WorkType::parse("deployment").unwrap(), AgentId::parse("fallback").unwrap());
        let stage = Route { policy };
        let mut busy = agent("a1");
        busy.capabilities = BTreeSet::from(["monitoring".to_owned()]);
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: states(&plan),
            agents: vec![busy],
            ..Default::default()
        };
        let Outcome::Forward { writes, .. } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        let Write::Route { route, .. } = &writes[0] else { panic!() };
        assert_eq!(route.agent_id.as_str(), "fallback");
        assert!(route.reason.starts_with("no agents available"), "{}", route.reason);
        assert!(!route.reserves_capacity);
    }

    /// The plan's first task (1.prepare) goes to the provider `cloud`.
    fn external(plan: &StoredPlan) -> FallbackDecision {
        FallbackDecision {
            plan_id: plan.plan.id,
            use_external: true,
            provider: Some("cloud".into()),
            external_tasks: vec![plan.plan.tasks()[0].id],
            infeasible: false,
            reason: String::new(),
            complexity: 0.9,
            estimated_cost_micros: 10,
            quota_left_micros: Some(0),
        }
    }

    #[test]
    fn an_external_task_goes_to_an_agent_of_its_provider_whatever_its_resources() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: RoutingPolicy::default() };
        let mut model = agent("model-1");
        model.capabilities = BTreeSet::from(["provider:cloud".to_owned()]);
        model.resources = Resources::default();
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: states(&plan),
            agents: vec![agent("a1"), model],
            fallback: Some(external(&plan)),
            ..Default::default()
        };
        let Outcome::Forward { writes, publish } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        let Write::Route { route, .. } = &writes[0] else { panic!("{writes:?}") };
        assert_eq!(route.agent_id.as_str(), "model-1", "{route:?}");
        let task = &publish[0].body["payload"]["task"];
        assert_eq!(task["capabilities"], serde_json::json!(["provider:cloud"]));
        assert_eq!(task["resources"]["memory_mb"], 0);
    }

    #[test]
    fn an_external_task_waits_for_its_provider_agent_never_a_local_default() {
        let plan = stored(PlanStatus::Approved);
        let mut policy = RoutingPolicy::default();
        policy
            .default_agents
            .insert(WorkType::parse("deployment").unwrap(), AgentId::parse("fallback").unwrap());
        let stage = Route { policy };
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: states(&plan),
            agents: vec![agent("a1")],
            fallback: Some(external(&plan)),
            ..Default::default()
        };
        let Outcome::Forward { writes, .. } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        let Write::Route { route, .. } = &writes[0] else { panic!("{writes:?}") };
        assert_eq!(route.agent_id.as_str(), "llm-cloud");
        assert!(!route.reserves_capacity);
    }

    #[test]
    fn an_agent_that_serves_a_provider_takes_no_local_task() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: RoutingPolicy::default() };
        // It could run the task, and it is idle: it would still bill the provider for it.
        let mut model = agent("aaa-model");
        model.capabilities.insert("provider:cloud".into());
        let mut busy = agent("zzz-local");
        busy.in_flight = 3;
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: states(&plan),
            agents: vec![model, busy],
            ..Default::default()
        };
        let Outcome::Forward { writes, .. } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        let Write::Route { route, .. } = &writes[0] else { panic!("{writes:?}") };
        assert_eq!(route.agent_id.as_str(), "zzz-local");
        assert!(!route.candidates.iter().any(|c| c.agent_id.as_str() == "aaa-model"), "{route:?}");
    }
}
