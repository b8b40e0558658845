//! Domain types: what Switchyard reasons about, independent of how it travels (`wire`) or is
//! stored (`store`). Constructors check invariants, so a value of these types is valid:
//! a [`Plan`] has at least one task and its dependencies form a DAG.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::model::ids::{AgentId, PlanId, RequestId, TaskId, WorkType};

/// What a task needs of an agent, or what an agent offers.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct Resources {
    /// CPU cores.
    pub cpu: f64,
    /// Memory in MiB.
    pub memory_mb: u64,
    /// Number of GPUs.
    pub gpu: u32,
}

impl Resources {
    /// Whether `self` (what is offered) covers `need`.
    pub fn covers(&self, need: &Resources) -> bool {
        self.cpu >= need.cpu && self.memory_mb >= need.memory_mb && self.gpu >= need.gpu
    }
}

/// One thing a request asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Intent {
    pub work_type: WorkType,
    /// The part of the request's text this intent came from.
    pub text: String,
    /// What the work is about ("Uptime Kuma").
    pub entities: Vec<String>,
    /// Where the work happens or goes ("homelab", "Discord").
    pub targets: Vec<String>,
}

/// The most intents one request may be read into, by any decomposer: a plan grows with the
/// intents (and their dependencies on earlier intents with the square of them), so a request
/// that asks for more is refused, to be split into smaller ones.
pub const MAX_INTENTS: usize = 20;

/// The most tasks a plan may have. Plans from the catalog stay far below it (a few steps per
/// intent, at most [`MAX_INTENTS`] intents); a message that carries a larger one is refused.
pub const MAX_TASKS: usize = 1000;

/// A request broken into intents: at least one, at most 20.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Decomposition {
    /// Which decomposer produced it: "rules" or "llm".
    pub decomposer: String,
    pub intents: Vec<Intent>,
    /// How sure the decomposer is of its reading, in [0, 1]. A term of the plan's complexity.
    /// Messages from before it existed were read by the rules, which were sure of them.
    #[serde(default = "full_confidence")]
    pub confidence: f64,
    /// Why the configured decomposer's reading was not used, when the rules stood in for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
}

fn full_confidence() -> f64 {
    1.0
}

/// A unit of work for one agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Task {
    pub id: TaskId,
    /// Unique within the plan, stable, human-readable ("1.deploy"): the task id derives from it.
    pub key: String,
    pub work_type: WorkType,
    pub description: String,
    pub estimated_duration_secs: u32,
    pub resources: Resources,
    /// Every one of these must be among the agent's capabilities.
    pub capabilities: BTreeSet<String>,
    pub depends_on: Vec<TaskId>,
    /// Agent labels that make an agent a better fit (`target=homelab`); a preference, not a filter.
    pub affinity: BTreeMap<String, String>,
}

/// Why a set of tasks is not a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the request yields no task")]
    NoTasks,
    #[error("the plan has {0} tasks, more than the {MAX_TASKS} a plan may have")]
    TooManyTasks(usize),
    #[error("task id {0} appears twice in the plan")]
    DuplicateTask(TaskId),
    #[error("task {task} depends on {missing}, which is not in the plan")]
    UnknownDependency { task: TaskId, missing: TaskId },
    #[error("the tasks' dependencies form a cycle through {0}")]
    Cycle(TaskId),
}

/// A work plan: a DAG of 1 to 1,000 tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(try_from = "PlanUnchecked")]
pub struct Plan {
    pub id: PlanId,
    pub request_id: RequestId,
    /// In a topological order: every task comes after its dependencies.
    tasks: Vec<Task>,
}

#[derive(Deserialize, JsonSchema)]
struct PlanUnchecked {
    id: PlanId,
    request_id: RequestId,
    tasks: Vec<Task>,
}

impl TryFrom<PlanUnchecked> for Plan {
    type Error = PlanError;
    fn try_from(p: PlanUnchecked) -> Result<Self, PlanError> {
        Plan::new(p.id, p.request_id, p.tasks)
    }
}

impl Plan {
    /// Checks that there are 1 to [`MAX_TASKS`] tasks, that ids are unique, that dependencies
    /// exist and that there is no cycle; orders the tasks topologically (stable: ties keep their
    /// order).
    pub fn new(id: PlanId, request_id: RequestId, tasks: Vec<Task>) -> Result<Self, PlanError> {
        if tasks.is_empty() {
            return Err(PlanError::NoTasks);
        }
        if tasks.len() > MAX_TASKS {
            return Err(PlanError::TooManyTasks(tasks.len()));
        }
        let mut index = HashMap::with_capacity(tasks.len());
        for (i, task) in tasks.iter().enumerate() {
            if index.insert(task.id, i).is_some() {
                return Err(PlanError::DuplicateTask(task.id));
            }
        }
        for task in &tasks {
            if let Some(missing) = task.depends_on.iter().find(|d| !index.contains_key(d)) {
                return Err(PlanError::UnknownDependency { task: task.id, missing: *missing });
            }
        }
        // Kahn's algorithm, always taking the lowest original position that is ready.
        let mut indegree: Vec<usize> = tasks.iter().map(|t| t.depends_on.len()).collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
        for (i, task) in tasks.iter().enumerate() {
            for dep in &task.depends_on {
                dependents[index[dep]].push(i);
            }
        }
        let mut ready: BTreeSet<usize> = (0..tasks.len()).filter(|&i| indegree[i] == 0).collect();
        let mut order = Vec::with_capacity(tasks.len());
        while let Some(i) = ready.pop_first() {
            order.push(i);
            for &j in &dependents[i] {
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    ready.insert(j);
                }
            }
        }
        if order.len() != tasks.len() {
            let stuck = (0..tasks.len()).find(|i| indegree[*i] > 0).expect("a task in the cycle");
            return Err(PlanError::Cycle(tasks[stuck].id));
        }
        let mut slots: Vec<Option<Task>> = tasks.into_iter().map(Some).collect();
        let tasks = order.into_iter().map(|i| slots[i].take().expect("each index once")).collect();
        Ok(Self { id, request_id, tasks })
    }

    /// The tasks, dependencies first.
    pub fn tasks(&self) -> &[Task] {
        &self.tasks
    }

    pub fn task(&self, id: TaskId) -> Option<&Task> {
        self.tasks.iter().find(|t| t.id == id)
    }

    /// Tasks not in `done` whose dependencies are all in `done`.
    pub fn ready_tasks<'a>(&'a self, done: &'a HashSet<TaskId>) -> impl Iterator<Item = &'a Task> {
        self.tasks
            .iter()
            .filter(move |t| !done.contains(&t.id) && t.depends_on.iter().all(|d| done.contains(d)))
    }

    /// The wave of each task: 0 for a task without dependencies, else one more than its deepest
    /// dependency.
    pub fn waves(&self) -> HashMap<TaskId, u32> {
        let mut wave = HashMap::with_capacity(self.tasks.len());
        for task in &self.tasks {
            let w = task.depends_on.iter().map(|d| wave[d] + 1).max().unwrap_or(0);
            wave.insert(task.id, w);
        }
        wave
    }

    /// Tasks that depend on `task`, directly or through others, in plan order.
    pub fn dependents_of(&self, task: TaskId) -> Vec<TaskId> {
        let mut doomed = HashSet::from([task]);
        // Tasks come dependencies first, so one pass in order reaches every descendant.
        for t in &self.tasks {
            if t.depends_on.iter().any(|d| doomed.contains(d)) {
                doomed.insert(t.id);
            }
        }
        self.tasks.iter().map(|t| t.id).filter(|id| *id != task && doomed.contains(id)).collect()
    }

    /// Replaces the estimated duration of the tasks that `estimate` gives one for.
    pub fn estimate_durations(&mut self, estimate: impl Fn(&Task) -> Option<u32>) {
        for task in &mut self.tasks {
            if let Some(secs) = estimate(task) {
                task.estimated_duration_secs = secs;
            }
        }
    }

    /// The set of distinct work types the plan needs.
    pub fn work_types(&self) -> BTreeSet<&WorkType> {
        self.tasks.iter().map(|t| &t.work_type).collect()
    }
}

/// An agent as the router sees it: the latest heartbeat or registration, plus its track record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Agent {
    pub id: AgentId,
    pub capabilities: BTreeSet<String>,
    pub capacity: u32,
    /// Tasks reserved on it and not yet finished.
    pub in_flight: u32,
    pub labels: BTreeMap<String, String>,
    pub resources: Resources,
    pub last_heartbeat: DateTime<Utc>,
    pub succeeded: u64,
    pub failed: u64,
}

impl Agent {
    /// Past success rate, with a neutral prior so that a new agent is neither favoured nor shunned
    /// for lack of history (Laplace's rule of succession).
    pub fn success_rate(&self) -> f64 {
        (self.succeeded as f64 + 1.0) / ((self.succeeded + self.failed) as f64 + 2.0)
    }
}

macro_rules! status_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema,
            strum::Display, strum::EnumString, strum::IntoStaticStr,
        )]
        #[serde(rename_all = "snake_case")]
        #[strum(serialize_all = "snake_case")]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            pub fn as_str(&self) -> &'static str {
                self.into()
            }
        }
    };
}

status_enum!(
    /// Where a request stands.
    RequestStatus {
        /// Accepted, not yet decomposed.
        Received,
        Decomposed,
        Planned,
        AwaitingApproval,
        /// Approved; its tasks are being routed and dispatched.
        InProgress,
        Rejected,
        /// A permanent failure, with its reason on the request.
        Failed,
        /// Every task succeeded.
        Completed,
        /// Someone cancelled it (`switchyard cancel`): nothing more of it runs.
        Cancelled,
    }
);

impl RequestStatus {
    /// The statuses of a request that has not ended.
    pub const UNDER_WAY: [RequestStatus; 5] = [
        RequestStatus::Received,
        RequestStatus::Decomposed,
        RequestStatus::Planned,
        RequestStatus::AwaitingApproval,
        RequestStatus::InProgress,
    ];

    /// Whether the request has ended: nothing will change it any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RequestStatus::Rejected
                | RequestStatus::Failed
                | RequestStatus::Completed
                | RequestStatus::Cancelled
        )
    }
}

status_enum!(
    /// Where a plan stands.
    PlanStatus {
        Planned,
        AwaitingApproval,
        Approved,
        Rejected,
        /// Every task succeeded.
        Completed,
        /// A task failed every attempt.
        Failed,
        /// A task needed what no agent offered, and no external provider could take it. Plans
        /// made before tasks waited for the fleet ended so; such a task now waits for an agent.
        Infeasible,
        /// Its request was cancelled.
        Cancelled,
    }
);

impl PlanStatus {
    /// Whether the plan has ended: none of its tasks will be routed any more.
    pub fn is_terminal(self) -> bool {
        !matches!(self, PlanStatus::Planned | PlanStatus::AwaitingApproval | PlanStatus::Approved)
    }
}

status_enum!(
    /// Where a task stands.
    TaskStatus {
        /// Waiting for approval or for its dependencies.
        Pending,
        /// Ready, but no agent can take it now: it waits in line for a slot.
        Waiting,
        /// An agent was chosen and capacity reserved on it.
        Routed,
        /// The broker confirmed it into the agent's queue.
        Dispatched,
        /// No publish into the agent's queue succeeded.
        DispatchFailed,
        /// The agent reported success: the task's dependents may run.
        Succeeded,
        /// Every attempt failed.
        Failed,
        /// It will not run: a task it depends on failed, its plan ended, or its request was
        /// cancelled (a running attempt is aborted on its agent).
        Cancelled,
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    fn task(plan: PlanId, key: &str, deps: &[&str]) -> Task {
        Task {
            id: plan.task_id(key),
            key: key.into(),
            work_type: WorkType::parse("deployment").unwrap(),
            description: key.into(),
            estimated_duration_secs: 60,
            resources: Resources::default(),
            capabilities: BTreeSet::new(),
            depends_on: deps.iter().map(|d| plan.task_id(d)).collect(),
            affinity: BTreeMap::new(),
        }
    }

    #[test]
    fn plan_orders_tasks_topologically_and_computes_waves() {
        let request = RequestId::random();
        let plan_id = request.plan_id();
        let tasks = vec![
            task(plan_id, "c", &["b"]),
            task(plan_id, "a", &[]),
            task(plan_id, "b", &["a"]),
            task(plan_id, "d", &[]),
        ];
        let plan = Plan::new(plan_id, request, tasks).unwrap();
        let keys: Vec<_> = plan.tasks().iter().map(|t| t.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c", "d"]);
        let waves = plan.waves();
        assert_eq!(waves[&plan_id.task_id("c")], 2);
        assert_eq!(waves[&plan_id.task_id("d")], 0);
        let done = HashSet::from([plan_id.task_id("a")]);
        let ready: Vec<_> = plan.ready_tasks(&done).map(|t| t.key.as_str()).collect();
        assert_eq!(ready, ["b", "d"]);
    }

    #[test]
    fn plan_rejects_empty_cyclic_and_dangling() {
        let request = RequestId::random();
        let p = request.plan_id();
        assert_eq!(Plan::new(p, request, vec![]), Err(PlanError::NoTasks));
        let cyclic = vec![task(p, "a", &["b"]), task(p, "b", &["a"])];
        assert!(matches!(Plan::new(p, request, cyclic), Err(PlanError::Cycle(_))));
        let selfloop = vec![task(p, "a", &["a"])];
        assert!(matches!(Plan::new(p, request, selfloop), Err(PlanError::Cycle(_))));
        let dangling = vec![task(p, "a", &["zz"])];
        assert!(matches!(Plan::new(p, request, dangling), Err(PlanError::UnknownDependency { .. })));
        let dup = vec![task(p, "a", &[]), task(p, "a", &[])];
        assert!(matches!(Plan::new(p, request, dup), Err(PlanError::DuplicateTask(_))));
        let most: Vec<Task> = (0..MAX_TASKS).map(|i| task(p, &format!("t{i}"), &[])).collect();
        assert_eq!(Plan::new(p, request, most.clone()).unwrap().tasks().len(), MAX_TASKS);
        let mut too_many = most;
        too_many.push(task(p, "one-more", &[]));
        let err = Plan::new(p, request, too_many).unwrap_err();
        assert_eq!(err, PlanError::TooManyTasks(MAX_TASKS + 1));
        assert_eq!(err.to_string(), "the plan has 1001 tasks, more than the 1000 a plan may have");
    }

    #[test]
    fn plan_deserialization_checks_the_dag() {
        let request = RequestId::random();
        let p = request.plan_id();
        let json = serde_json::json!({
            "id": p, "request_id": request,
            "tasks": [task(p, "a", &["b"]), task(p, "b", &["a"])],
        });
        let err = serde_json::from_value::<Plan>(json).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    #[test]
    fn success_rate_has_a_neutral_prior() {
        let mut agent = Agent {
            id: AgentId::parse("a").unwrap(),
            capabilities: BTreeSet::new(),
            capacity: 1,
            in_flight: 0,
            labels: BTreeMap::new(),
            resources: Resources::default(),
            last_heartbeat: Utc::now(),
            succeeded: 0,
            failed: 0,
        };
        assert_eq!(agent.success_rate(), 0.5);
        agent.succeeded = 8;
        assert_eq!(agent.success_rate(), 0.9);
    }

    #[test]
    fn statuses_round_trip_as_snake_case() {
        assert_eq!(RequestStatus::AwaitingApproval.as_str(), "awaiting_approval");
        assert_eq!("dispatch_failed".parse::<TaskStatus>().unwrap(), TaskStatus::DispatchFailed);
    }
}
