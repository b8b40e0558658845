//! What the routing tests share: a fixed clock, tasks and agents, and ways to read a route.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, TimeDelta, TimeZone, Utc};

use super::{Placement, Reason, Route, RoutingPolicy, Verdict, route_tasks};
use crate::model::domain::{Agent, Resources, Task};
use crate::model::ids::{AgentId, RequestId, WorkType};

pub(super) fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
}

pub(super) fn id(s: &str) -> AgentId {
    AgentId::parse(s).unwrap()
}

pub(super) fn wt(s: &str) -> WorkType {
    WorkType::parse(s).unwrap()
}

pub(super) fn task(key: &str) -> Task {
    Task {
        id: RequestId::random().plan_id().task_id(key),
        key: key.into(),
        work_type: wt("deployment"),
        description: key.into(),
        estimated_duration_secs: 60,
        resources: Resources::default(),
        capabilities: BTreeSet::new(),
        depends_on: Vec::new(),
        affinity: BTreeMap::new(),
    }
}

/// A healthy, idle agent with capacity 4, no history, no labels and modest resources.
pub(super) fn agent(name: &str) -> Agent {
    Agent {
        id: id(name),
        capabilities: BTreeSet::new(),
        capacity: 4,
        in_flight: 0,
        labels: BTreeMap::new(),
        resources: Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 },
        last_heartbeat: now() - TimeDelta::seconds(5),
        succeeded: 0,
        failed: 0,
    }
}

pub(super) fn routed(placement: Placement) -> Route {
    match placement {
        Placement::Routed(route) => route,
        Placement::Waits(candidates) => panic!("waits: {candidates:?}"),
    }
}

pub(super) fn routes_of(tasks: &[&Task], agents: &[Agent], policy: &RoutingPolicy) -> Vec<Route> {
    route_tasks(tasks, agents, now(), policy).into_iter().map(routed).collect()
}

pub(super) fn caps(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

pub(super) fn route_one(task: &Task, agents: &[Agent], policy: &RoutingPolicy) -> Route {
    let mut routes = routes_of(&[task], agents, policy);
    assert_eq!(routes.len(), 1);
    routes.pop().unwrap()
}

pub(super) fn verdict_of<'a>(route: &'a Route, agent: &str) -> &'a Verdict {
    &route.candidates.iter().find(|c| c.agent_id.as_str() == agent).unwrap().verdict
}

/// The reasons as the audit record reads them.
pub(super) fn reasons_of(route: &Route, agent: &str) -> Vec<String> {
    match verdict_of(route, agent) {
        Verdict::Rejected { reasons } => reasons.iter().map(Reason::to_string).collect(),
        other => panic!("{agent} not rejected: {other:?}"),
    }
}

pub(super) fn with_default(work_type: &str, agent: &str) -> RoutingPolicy {
    let mut policy = RoutingPolicy::default();
    policy.default_agents.insert(wt(work_type), id(agent));
    policy
}
