//! route: an approved plan → an agent for every task whose dependencies are met, each decision
//! with every candidate's verdict, capacity reserved in the same transaction.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Publish, Stage};
use crate::domain::{Agent, PlanStatus, TaskStatus};
use crate::effect::Write;
use crate::ids::{AgentId, TaskId};
use crate::routing::{self, RoutingPolicy};
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
            PlanStatus::Completed | PlanStatus::Failed | PlanStatus::Rejected => {
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
        let done: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).map(|t| t.id).collect();
        let pending: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Pending).map(|t| t.id).collect();
        let ready: Vec<_> = plan.ready_tasks(&done).filter(|t| pending.contains(&t.id)).collect();
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
        let routes =
            match routing::route_tasks_excluding(&ready, &context.agents, now, &self.policy, &context.failed)
            {
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
        plan.plan
            .tasks()
            .iter()
            .map(|t| TaskState {
                id: t.id,
                key: t.key.clone(),
                work_type: t.work_type.to_string(),
                description: t.description.clone(),
                status: TaskStatus::Pending,
                attempt: 0,
                agent_id: None,
                reason: None,
                depends_on: t.depends_on.clone(),
            })
            .collect()
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
}
