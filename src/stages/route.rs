//! route: an approved plan → an agent for every task whose dependencies are met, each decision
//! with every candidate's verdict, capacity reserved in the same transaction.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::{AmqpMeta, Destination, Inbound, Outcome, Publish, Stage, parse_envelope};
use crate::domain::{Agent, PlanStatus, TaskStatus};
use crate::effect::Write;
use crate::routing::{self, RoutingPolicy};
use crate::store::{self, Store, StoredPlan, TaskState};
use crate::wire::{self, DispatchTask, Envelope, RouteTasks};

pub struct Route {
    pub policy: RoutingPolicy,
}

/// The plan, where its tasks stand, and the fleet.
pub struct RouteContext {
    pub plan: Option<StoredPlan>,
    pub tasks: Vec<TaskState>,
    pub agents: Vec<Agent>,
}

impl Stage for Route {
    type Input = RouteTasks;
    type Context = RouteContext;
    const NAME: &'static str = "route";

    fn parse(&self, body: &[u8], amqp: &AmqpMeta<'_>, limit: usize) -> Result<Inbound<RouteTasks>, wire::Error> {
        parse_envelope(body, amqp, limit)
    }

    async fn load(&self, store: &Store, input: &Inbound<RouteTasks>) -> Result<RouteContext, store::Error> {
        let plan_id = input.payload.plan_id;
        Ok(RouteContext {
            plan: store.plan(plan_id).await?,
            tasks: store.task_states(plan_id).await?,
            agents: store.agents().await?,
        })
    }

    fn decide(&self, input: &Inbound<RouteTasks>, context: RouteContext, now: DateTime<Utc>) -> Outcome {
        let plan_id = input.payload.plan_id;
        let Some(stored) = context.plan else {
            return Outcome::Reject { writes: Vec::new(), reason: format!("no plan {plan_id}") };
        };
        if stored.status != PlanStatus::Approved {
            return Outcome::Reject {
                writes: Vec::new(),
                reason: format!("plan {plan_id} is {}, not approved", stored.status),
            };
        }
        let plan = &stored.plan;
        let done: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).map(|t| t.id).collect();
        let pending: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Pending).map(|t| t.id).collect();
        let ready: Vec<_> = plan.ready_tasks(&done).filter(|t| pending.contains(&t.id)).collect();
        let routes = match routing::route_tasks(&ready, &context.agents, now, &self.policy) {
            Ok(routes) => routes,
            Err(err) => {
                let reason = format!("routing failed: {err}");
                let writes = vec![Write::RequestFailed { request_id: plan.request_id, reason: reason.clone() }];
                return Outcome::Reject { writes, reason };
            }
        };
        let attempts = |task_id| context.tasks.iter().find(|t| t.id == task_id).map_or(0, |t| t.attempt) + 1;
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
