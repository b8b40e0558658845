//! route: an approved plan → for every task whose dependencies are met, an agent (each decision
//! with every candidate's verdict, capacity reserved in the same transaction), or a place in the
//! line of waiting tasks when no agent can take it now. While others wait in line, released tasks
//! join it too, so that they are served in turn instead of jumping ahead.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::placement::{self, External, Routed};
use super::{Inbound, Outcome, Stage};
use crate::decisions::fallback::FallbackDecision;
use crate::decisions::routing::{self, Placement, Router, RoutingPolicy};
use crate::model::domain::{Agent, PlanStatus, Task, TaskStatus};
use crate::model::effect::{Attempt, Write, write};
use crate::model::ids::{AgentId, RequestId, TaskId};
use crate::model::wire::RouteTasks;
use crate::store::{self, Store, StoredPlan, TaskState};

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
    /// Whether tasks wait in line for an agent.
    pub line: bool,
}

impl Stage for Route {
    type Input = RouteTasks;
    type Context = RouteContext;
    const NAME: &'static str = "route";
    type Request = RequestId;

    async fn load(&self, store: &Store, input: &Inbound<RouteTasks>) -> Result<RouteContext, store::Error> {
        let plan_id = input.payload.plan_id;
        let (plan, tasks, line) = store.plan_states_and_line(plan_id).await?;
        Ok(RouteContext {
            plan,
            tasks,
            agents: store.agents().await?,
            failed: store.failed_agents(plan_id).await?,
            fallback: store.fallback_decision(plan_id).await?,
            line,
        })
    }

    fn decide(&self, input: &Inbound<RouteTasks>, context: RouteContext, now: DateTime<Utc>) -> Outcome {
        let plan_id = input.payload.plan_id;
        let Some(stored) = context.plan else {
            return Outcome::Reject { writes: Vec::new(), reason: format!("no plan {plan_id}") };
        };
        match stored.status {
            PlanStatus::Approved => {}
            PlanStatus::Planned | PlanStatus::AwaitingApproval => {
                return Outcome::Reject {
                    writes: Vec::new(),
                    reason: format!("plan {plan_id} is {}, not approved", stored.status),
                };
            }
            // A plan that ended has nothing left to route: a late message, not an error.
            ended => return Outcome::Ignore { reason: format!("plan {plan_id} is {ended}") },
        }
        let plan = &stored.plan;
        let external = External::of(context.fallback.as_ref());
        let done: HashSet<_> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).map(|t| t.id).collect();
        let pending: HashMap<TaskId, &TaskState> =
            context.tasks.iter().filter(|t| t.status == TaskStatus::Pending).map(|t| (t.id, t)).collect();
        let ready: Vec<(Task, &TaskState)> = plan
            .ready_tasks(&done)
            .filter_map(|t| pending.get(&t.id).map(|state| (t, *state)))
            .map(|(t, state)| (external.as_ref().map_or_else(|| t.clone(), |e| e.adapt(t)), state))
            .collect();
        // A retry whose every capable agent has failed it has failed for good; its plan with it.
        // (With no capable agent at all, it waits for one, as a first attempt does.)
        for (task, state) in ready.iter().filter(|(_, s)| s.attempt > 0) {
            let failed = context.failed.get(&task.id);
            let pool = placement::ask(task, state.attempt + 1, external.as_ref(), failed, &self.policy).pool;
            let capable: Vec<&Agent> =
                context.agents.iter().filter(|a| pool(a) && routing::capable(task, a, false)).collect();
            if !capable.is_empty() && capable.iter().all(|a| failed.is_some_and(|f| f.contains(&a.id))) {
                let tried: Vec<&str> = failed.into_iter().flatten().map(|a| a.as_str()).collect();
                let reason = format!(
                    "task {} failed on {} and no other agent has what it needs",
                    task.key,
                    tried.join(", ")
                );
                let writes = vec![
                    Write::TaskFailed(write::TaskFailed {
                        request_id: plan.request_id,
                        plan_id,
                        task_id: task.id,
                        reason: reason.clone(),
                        cancelled: plan.dependents_of(task.id),
                    }),
                    Write::PlanFinished(write::PlanFinished {
                        request_id: plan.request_id,
                        plan_id,
                        failure: Some(reason),
                    }),
                ];
                return Outcome::Forward { writes, publish: Vec::new() };
            }
        }
        let mut router = Router::new(&context.agents, now, &self.policy);
        let mut writes = Vec::with_capacity(ready.len());
        let mut publish = Vec::with_capacity(ready.len());
        for (task, state) in &ready {
            let attempt = state.attempt + 1;
            let ask =
                placement::ask(task, attempt, external.as_ref(), context.failed.get(&task.id), &self.policy);
            // Others wait in line: a task that an agent could take now queues behind them, and
            // the placement pass serves them all in order; one that no agent can take goes to
            // its default agent at once, as it would have with no line.
            let placed = match context.line {
                true => {
                    let judged = router.judge(task, ask);
                    if judged.iter().any(|c| c.verdict.score().is_some()) || ask.default_agent.is_none() {
                        Placement::Waits(judged)
                    } else {
                        router.place(task, ask)
                    }
                }
                false => router.place(task, ask),
            };
            match placed {
                Placement::Routed(route) => {
                    let (write, message) = Routed {
                        cause: input.message_id,
                        request_id: plan.request_id,
                        plan_id,
                        priority: input.payload.priority,
                        attempt,
                        task,
                        route,
                        ready_at: now,
                    }
                    .into_effects(now);
                    writes.push(write);
                    publish.push(message);
                }
                Placement::Waits(candidates) => writes.push(Write::TaskWaiting(write::TaskWaiting {
                    attempt: Attempt {
                        request_id: plan.request_id,
                        plan_id,
                        task_id: task.id,
                        number: attempt,
                    },
                    priority: input.payload.priority,
                    since: now,
                    reason: routing::waiting_reason(&candidates),
                    candidates,
                })),
            }
        }
        if writes.iter().any(|w| matches!(w, Write::TaskWaiting(write::TaskWaiting { .. }))) {
            // Room may have opened since the agents were read: the placement pass looks again
            // once these are in line.
            publish.push(placement::wake(input.message_id, "queued", now));
        }
        Outcome::Forward { writes, publish }
    }
}

#[cfg(test)]
mod tests {
    use crate::pipeline::topology::StageQueue;
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::domain::Resources;
    use crate::model::ids::{AgentId, MessageId, RequestId, WorkType};
    use crate::pipeline::stages::Destination;
    use crate::understanding::catalog::Catalog;

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
            request_id: plan.plan.request_id,
            priority: 3,
            payload: RouteTasks { plan_id: plan.plan.id, priority: 3, approved_by: "policy".into() },
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
        let Write::Route(write::Route { attempt, route, decision_id, .. }) = &writes[0] else {
            panic!("{writes:?}")
        };
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
    fn with_no_agent_and_no_default_the_task_waits_and_says_why() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: RoutingPolicy::default() };
        let mut full = agent("a1");
        full.capacity = 2;
        full.in_flight = 2;
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: states(&plan),
            agents: vec![full],
            ..Default::default()
        };
        let now = Utc::now();
        let Outcome::Forward { writes, publish } = stage.decide(&input(&plan), context, now) else {
            panic!()
        };
        let Write::TaskWaiting(write::TaskWaiting {
            attempt: Attempt { task_id, number: attempt, .. },
            since,
            reason,
            candidates,
            priority,
            ..
        }) = &writes[0]
        else {
            panic!("{writes:?}")
        };
        assert_eq!((*task_id, *attempt, *since, *priority), (plan.plan.tasks()[0].id, 1, now, 3));
        assert_eq!(reason, "1 capable agent busy (2/2)");
        assert_eq!(candidates.len(), 1);
        // The placement pass is woken, once these are in line; nothing is dispatched.
        assert_eq!(publish.len(), 1);
        assert_eq!(publish[0].destination, Destination::Queue(StageQueue::Place));
        assert_eq!(publish[0].body["cause"], "queued");
    }

    #[test]
    fn while_tasks_wait_in_line_a_released_task_queues_behind_them() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: RoutingPolicy::default() };
        let context = RouteContext {
            plan: Some(plan.clone()),
            tasks: states(&plan),
            agents: vec![agent("a1")],
            line: true,
            ..Default::default()
        };
        let Outcome::Forward { writes, publish } = stage.decide(&input(&plan), context, Utc::now()) else {
            panic!()
        };
        let Write::TaskWaiting(write::TaskWaiting { reason, .. }) = &writes[0] else { panic!("{writes:?}") };
        assert_eq!(reason, "in line behind tasks that waited first (1 capable agent with room)");
        assert!(!writes.iter().any(|w| matches!(w, Write::Route(write::Route { .. }))), "{writes:?}");
        assert_eq!(publish.len(), 1, "only the wake-up");
    }

    #[test]
    fn a_retry_waits_for_an_agent_that_has_not_failed_it_and_fails_when_all_capable_did() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: RoutingPolicy::default() };
        let first = plan.plan.tasks()[0].id;
        let mut tasks = states(&plan);
        tasks[0].attempt = 1;
        let mut busy = agent("b2");
        busy.in_flight = busy.capacity;
        let context = |agents: Vec<Agent>| RouteContext {
            plan: Some(plan.clone()),
            tasks: tasks.clone(),
            agents,
            failed: HashMap::from([(first, BTreeSet::from([AgentId::parse("a1").unwrap()]))]),
            ..Default::default()
        };
        // Another capable agent exists, busy: the retry waits for it.
        let Outcome::Forward { writes, .. } =
            stage.decide(&input(&plan), context(vec![agent("a1"), busy]), Utc::now())
        else {
            panic!()
        };
        let Write::TaskWaiting(write::TaskWaiting { attempt: Attempt { number: 2, .. }, reason, .. }) =
            &writes[0]
        else {
            panic!("{writes:?}")
        };
        assert_eq!(reason, "1 capable agent busy (4/4); 1 capable agent failed it before (a1)");
        // Every capable agent failed it: the task and its plan fail.
        let Outcome::Forward { writes, .. } =
            stage.decide(&input(&plan), context(vec![agent("a1")]), Utc::now())
        else {
            panic!()
        };
        assert!(
            matches!(&writes[0], Write::TaskFailed(write::TaskFailed { reason, .. }) if reason.contains("failed on a1")),
            "{writes:?}"
        );
        assert!(matches!(&writes[1], Write::PlanFinished(write::PlanFinished { failure: Some(_), .. })));
    }

    #[test]
    fn a_cancelled_plan_is_not_routed() {
        let plan = stored(PlanStatus::Cancelled);
        let stage = Route { policy: RoutingPolicy::default() };
        let context = RouteContext { plan: Some(plan.clone()), tasks: states(&plan), ..Default::default() };
        let outcome = stage.decide(&input(&plan), context, Utc::now());
        assert!(
            matches!(&outcome, Outcome::Ignore { reason } if reason.ends_with("is cancelled")),
            "{outcome:?}"
        );
    }

    #[test]
    fn with_no_candidate_the_default_agent_gets_the_task_at_once_without_a_reservation() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: with_default_agent("fallback") };
        let mut other = agent("a1");
        other.capabilities = BTreeSet::from(["monitoring".to_owned()]);
        // Whether or not other tasks wait in line, a task no agent can take does not join it.
        for line in [false, true] {
            let context = RouteContext {
                plan: Some(plan.clone()),
                tasks: states(&plan),
                agents: vec![other.clone()],
                line,
                ..Default::default()
            };
            let Outcome::Forward { writes, .. } = stage.decide(&input(&plan), context, Utc::now()) else {
                panic!()
            };
            let Write::Route(write::Route { route, .. }) = &writes[0] else { panic!("{writes:?}") };
            assert_eq!(route.agent_id.as_str(), "fallback", "line: {line}");
            assert!(route.reason.starts_with("no agents available"), "{}", route.reason);
            assert!(!route.reserves_capacity);
        }
    }

    /// A policy that sends deployment work no agent can take to `agent`.
    fn with_default_agent(agent: &str) -> RoutingPolicy {
        let mut policy = RoutingPolicy::default();
        policy.default_agents.insert(WorkType::parse("deployment").unwrap(), AgentId::parse(agent).unwrap());
        policy
    }

    /// The plan's first task (1.prepare) goes to the provider `cloud`.
    fn external(plan: &StoredPlan) -> FallbackDecision {
        FallbackDecision::External {
            plan_id: plan.plan.id,
            provider: "cloud".into(),
            tasks: vec![plan.plan.tasks()[0].id],
            reason: String::new(),
            complexity: 0.9,
            cost_micros: 10,
            quota_left_micros: 0,
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
        let Write::Route(write::Route { route, .. }) = &writes[0] else { panic!("{writes:?}") };
        assert_eq!(route.agent_id.as_str(), "model-1", "{route:?}");
        let task = &publish[0].body["payload"]["task"];
        assert_eq!(task["capabilities"], serde_json::json!(["provider:cloud"]));
        assert_eq!(task["resources"]["memory_mb"], 0);
    }

    #[test]
    fn an_external_task_waits_for_its_provider_agent_never_a_local_default() {
        let plan = stored(PlanStatus::Approved);
        let stage = Route { policy: with_default_agent("fallback") };
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
        let Write::Route(write::Route { route, .. }) = &writes[0] else { panic!("{writes:?}") };
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
        let Write::Route(write::Route { route, .. }) = &writes[0] else { panic!("{writes:?}") };
        assert_eq!(route.agent_id.as_str(), "zzz-local");
        assert!(!route.candidates.iter().any(|c| c.agent_id.as_str() == "aaa-model"), "{route:?}");
    }
}
