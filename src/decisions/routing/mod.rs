//! Routing: which agent gets each task of a batch.
//!
//! Pure decision logic: the caller passes the agents' latest known state and the current time,
//! and stores the returned [`Route`]s (with every candidate's [`Verdict`]) for audit. Nothing here
//! reads the clock or does I/O, so a decision can be replayed and tested exactly.
//!
//! Routing is two steps:
//! 1. a filter on hard requirements (capabilities, a fresh heartbeat, spare capacity, resources).
//!    A rejection lists *every* requirement the agent misses, not only the first, so an operator
//!    sees at once everything that would have to change for the agent to qualify;
//! 2. a score in [0, 1] over the agents that pass: spare capacity, past success and label
//!    affinity, weighted by the [`RoutingPolicy`]. The best score wins; ties go to the lowest id
//!    so that the same inputs always give the same route.
//!
//! A decision looks at every agent of the fleet for every task, and records a verdict on each for
//! the audit, so the per-agent work is kept small: agent ids are shared rather than copied, and a
//! rejection records its [`Reason`]s as values, which become text only when the audit record is
//! serialised.
//!
//! Here: the policy, the router and the choice among scored agents; the verdict on one agent in
//! `judge`, its reasons in `reason`, and why a task waits in `waiting`.

mod choice;
#[cfg(test)]
mod fixtures;
mod judge;
mod reason;
mod waiting;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use self::choice::{Choice, RunnerUp, choice};
use self::judge::{Clock, Judge};
pub use self::reason::{Lack, Reason, Shortfall};
pub use self::waiting::waiting_reason;
use crate::decisions::plural;
use crate::model::domain::{Agent, Task};
use crate::model::ids::{AgentId, TaskId, WorkType};

/// Scores this close are equal: floating-point noise must not decide between two agents, the
/// id order must, so that a replay gives the same route.
const TIE_EPSILON: f64 = 1e-9;

/// How tasks are routed. Every field has a default, so it can sit (partially) in a TOML config.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RoutingPolicy {
    /// An agent whose last heartbeat is older than this is presumed gone.
    pub heartbeat_ttl_secs: u64,
    pub weights: Weights,
    /// Where a task goes when no agent is eligible for it, by work type; without one, it waits
    /// in line until an agent can take it.
    pub default_agents: BTreeMap<WorkType, AgentId>,
    /// How long a task may wait for an agent before it fails, in seconds; 0: for ever.
    pub max_wait_secs: u64,
    /// How often the line is looked at while tasks wait, in seconds, whatever happens: the safety
    /// net for a wake-up lost on the way, and when waits expire.
    pub recheck_secs: u64,
}

impl Default for RoutingPolicy {
    fn default() -> Self {
        Self {
            heartbeat_ttl_secs: 30,
            weights: Weights::default(),
            default_agents: BTreeMap::new(),
            max_wait_secs: 86_400,
            recheck_secs: 3,
        }
    }
}

/// The relative weights of the score's terms. Only their ratios matter: the score is divided by
/// their sum. A verdict records them as applied, normalised to sum to 1.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct Weights {
    /// Spare capacity: prefer the least loaded agent.
    pub load: f64,
    /// Past success rate: prefer the agent that fails least.
    pub success: f64,
    /// Label affinity: prefer the agent whose labels match the task's affinity.
    pub affinity: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { load: 0.5, success: 0.3, affinity: 0.2 }
    }
}

impl Weights {
    /// The weights as applied, `[load, success, affinity]`, summing to 1.
    ///
    /// A negative or non-finite weight counts as 0, and if nothing positive is left the terms
    /// weigh equally: a bad config must not produce a NaN score (it would make the ordering
    /// meaningless and the audit JSON unreadable) or a score outside [0, 1].
    fn normalised(&self) -> [f64; 3] {
        let clean = |w: f64| if w.is_finite() && w > 0.0 { w } else { 0.0 };
        let raw = [clean(self.load), clean(self.success), clean(self.affinity)];
        let max = raw.iter().copied().fold(0.0, f64::max);
        if max == 0.0 {
            return [1.0 / 3.0; 3];
        }
        // Scale by the largest first, so that summing huge weights cannot overflow to infinity.
        let scaled = raw.map(|w| w / max);
        let total: f64 = scaled.iter().sum();
        scaled.map(|w| w / total)
    }

    /// The weights as applied (see [`Weights::normalised`]), as weights.
    fn applied(&self) -> Weights {
        let [load, success, affinity] = self.normalised();
        Weights { load, success, affinity }
    }
}

/// What the router made of one agent for one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// The agent misses at least one hard requirement; every one it misses is listed.
    Rejected { reasons: Vec<Reason> },
    /// The agent is eligible. `score` is the weighted mean of the three terms, each in [0, 1]:
    /// `load` (spare capacity), `success` (past success rate) and `affinity` (labels matched).
    Scored {
        score: f64,
        load: f64,
        success: f64,
        affinity: f64,
        /// The weights the terms were given, as applied (summing to 1): with them each term's
        /// contribution to the score can be told. `None` in decisions recorded before the
        /// weights were kept, which have the terms' values only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        weights: Option<Weights>,
    },
}

impl Verdict {
    /// The score, if the agent was eligible.
    pub fn score(&self) -> Option<f64> {
        match self {
            Verdict::Rejected { .. } => None,
            Verdict::Scored { score, .. } => Some(*score),
        }
    }

    /// The score's terms, each with its value, weight and contribution, if the agent was eligible
    /// and the weights were recorded.
    pub fn terms(&self) -> Option<Terms> {
        match *self {
            Verdict::Scored { load, success, affinity, weights: Some(weights), .. } => {
                Some(Terms::weigh([load, success, affinity], weights))
            }
            _ => None,
        }
    }
}

/// One term of an eligible agent's score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Term {
    /// In [0, 1].
    pub value: f64,
    /// Its weight, as applied: the three terms' weights sum to 1.
    pub weight: f64,
    /// What it adds to the score: `value × weight`.
    pub contribution: f64,
}

/// The three terms of an eligible agent's score, whose contributions sum to the score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Terms {
    pub load: Term,
    pub success: Term,
    pub affinity: Term,
}

impl Terms {
    /// The terms of `[load, success, affinity]` under `weights` (as applied).
    pub fn weigh([load, success, affinity]: [f64; 3], weights: Weights) -> Self {
        let term = |value: f64, weight: f64| Term { value, weight, contribution: weight * value };
        Terms {
            load: term(load, weights.load),
            success: term(success, weights.success),
            affinity: term(affinity, weights.affinity),
        }
    }

    /// The score they make: the sum of their contributions, in [0, 1] (the clamp only absorbs
    /// rounding). The same sum, in the same order, as the verdict's score.
    pub fn score(&self) -> f64 {
        (self.load.contribution + self.success.contribution + self.affinity.contribution).clamp(0.0, 1.0)
    }

    /// The terms by name, in the order of the score.
    pub fn named(&self) -> [(&'static str, Term); 3] {
        [("load", self.load), ("success", self.success), ("affinity", self.affinity)]
    }
}

/// One agent considered for a task. In JSON the verdict is flattened into the candidate:
/// `{"agent_id": "a", "verdict": "scored", "score": 0.9, ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Candidate {
    pub agent_id: AgentId,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Where one task goes, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Route {
    pub task_id: TaskId,
    pub agent_id: AgentId,
    /// The chosen agent's score; `None` when no agent was eligible and the task went to the
    /// default agent of its work type.
    pub score: Option<f64>,
    /// Human-readable: why this agent.
    pub reason: String,
    /// Every agent, sorted by id, with its verdict.
    pub candidates: Vec<Candidate>,
    /// Whether the caller should reserve a slot of the agent's capacity. False for a default
    /// agent: it was not chosen for its spare capacity, and it may not even be registered.
    pub reserves_capacity: bool,
}

/// What routing made of one task.
#[derive(Debug, Clone, PartialEq)]
pub enum Placement {
    /// To the best eligible agent (a slot of it reserved: `reserves_capacity`), or, with none
    /// eligible, to the task's default agent.
    Routed(Route),
    /// No agent can take it now, and it has no default agent: it waits for one. Every
    /// candidate's verdict says why.
    Waits(Vec<Candidate>),
}

/// How one task may be routed.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// Agents that may not take it: those that failed it before, so that a retry goes elsewhere.
    pub excluded: Option<&'a BTreeSet<AgentId>>,
    /// Where it goes when no agent is eligible; without one it waits.
    pub default_agent: Option<&'a AgentId>,
    /// Which agents are candidates at all: the others are not even listed.
    pub pool: fn(&Agent) -> bool,
}

impl Ask<'_> {
    /// Every agent a candidate, nothing excluded, no default agent.
    pub const ANY: Ask<'static> = Ask { excluded: None, default_agent: None, pool: |_| true };
}

/// Routes the tasks of one decision, one after the other, over one snapshot of the fleet.
///
/// Each slot it gives is counted against its agent before the next task is routed, so a decision
/// never puts more on an agent than its capacity, even though `agents` is a snapshot taken before.
pub struct Router<'a> {
    /// Sorted by id: the candidates are listed in this order and ties go to the first.
    agents: Vec<&'a Agent>,
    /// The slots given so far, by position in `agents`: an agent's in-flight count is its own
    /// plus these (kept apart so that building this reads no agent).
    reserved: Vec<u32>,
    clock: Clock,
    weights: Weights,
}

impl<'a> Router<'a> {
    pub fn new(agents: &'a [Agent], now: DateTime<Utc>, policy: &RoutingPolicy) -> Self {
        let mut agents: Vec<&Agent> = agents.iter().collect();
        agents.sort_by(|a, b| a.id.cmp(&b.id));
        Router {
            reserved: vec![0; agents.len()],
            agents,
            clock: Clock::new(now, policy.heartbeat_ttl_secs),
            weights: policy.weights.applied(),
        }
    }

    /// Every candidate of `ask`'s pool with its verdict on `task`, as things stand; takes nothing.
    pub fn judge(&self, task: &Task, ask: Ask<'_>) -> Vec<Candidate> {
        self.verdicts(task, ask).into_iter().map(|(_, candidate)| candidate).collect()
    }

    /// Routes `task`: to the best eligible agent (one of its slots then counts as taken for the
    /// tasks routed after), else to the default agent, else it waits.
    pub fn place(&mut self, task: &Task, ask: Ask<'_>) -> Placement {
        let judged = self.verdicts(task, ask);
        let (positions, candidates): (Vec<usize>, Vec<Candidate>) = judged.into_iter().unzip();
        let best = best_candidates(&candidates);
        if let Some(&chosen) = best.first() {
            let at = positions[chosen];
            self.reserved[at] = self.reserved[at].saturating_add(1);
            return Placement::Routed(chosen_route(task, &best, candidates));
        }
        match ask.default_agent {
            Some(agent_id) => Placement::Routed(default_route(task, agent_id, candidates)),
            None => Placement::Waits(candidates),
        }
    }

    /// The candidates of `ask`'s pool, in id order, each with its position in `agents`.
    fn verdicts(&self, task: &Task, ask: Ask<'_>) -> Vec<(usize, Candidate)> {
        let mut judge = Judge::new(task, ask.excluded, &self.clock, self.weights);
        (self.agents.iter().zip(&self.reserved).enumerate())
            .filter(|(_, (agent, _))| (ask.pool)(agent))
            .map(|(at, (agent, &more))| {
                let verdict = judge.verdict(agent, agent.in_flight.saturating_add(more));
                (at, Candidate { agent_id: agent.id.clone(), verdict })
            })
            .collect()
    }
}

/// Routes the tasks of one batch, in order, every agent a candidate: each to the best eligible
/// agent, else to the default agent of its work type (`policy.default_agents`), else it waits.
pub fn route_tasks(
    tasks: &[&Task],
    agents: &[Agent],
    now: DateTime<Utc>,
    policy: &RoutingPolicy,
) -> Vec<Placement> {
    let mut router = Router::new(agents, now, policy);
    tasks
        .iter()
        .map(|task| {
            let ask = Ask { default_agent: policy.default_agents.get(&task.work_type), ..Ask::ANY };
            router.place(task, ask)
        })
        .collect()
}

/// Whether `agent` could ever take `task`: it has the capabilities and the resources, and (when
/// `failed_before` is false) has not failed it. Load and health come and go; these do not.
pub fn capable(task: &Task, agent: &Agent, failed_before: bool) -> bool {
    !failed_before
        && task.capabilities.iter().all(|c| agent.capabilities.contains(c))
        && agent.resources.covers(&task.resources)
}

/// The positions of the candidates (sorted by id) that tie for the best score, in id order: the
/// first is the winner. Empty when no agent is eligible.
///
/// Takes the best score, then every agent within [`TIE_EPSILON`] of it. Done in two passes rather
/// than with a sort, because "equal within epsilon" is not transitive and a sort comparator built
/// on it would not be a total order.
fn best_candidates(candidates: &[Candidate]) -> Vec<usize> {
    let Some(best) = candidates.iter().filter_map(|c| c.verdict.score()).reduce(f64::max) else {
        return Vec::new();
    };
    (0..candidates.len())
        .filter(|&i| candidates[i].verdict.score().is_some_and(|s| s >= best - TIE_EPSILON))
        .collect()
}

/// The route to the first of `best`, which must not be empty.
fn chosen_route(task: &Task, best: &[usize], candidates: Vec<Candidate>) -> Route {
    let winner = &candidates[best[0]];
    let Verdict::Scored { score, load, success, affinity, .. } = winner.verdict else {
        unreachable!("best_candidates only returns scored candidates");
    };
    let eligible = candidates.iter().filter(|c| c.verdict.score().is_some()).count();
    let mut reason = format!(
        "best of {eligible} eligible {} (score {score:.2}: load {load:.2}, success {success:.2}, affinity {affinity:.2})",
        plural(eligible, "agent", "agents")
    );
    if best.len() > 1 {
        let tied: Vec<&str> = best[1..].iter().map(|&i| candidates[i].agent_id.as_str()).collect();
        reason.push_str(&format!("; tied with {}, chosen by agent id", tied.join(", ")));
    }
    Route {
        task_id: task.id,
        agent_id: winner.agent_id.clone(),
        score: Some(score),
        reason,
        candidates,
        reserves_capacity: true,
    }
}

fn default_route(task: &Task, agent_id: &AgentId, candidates: Vec<Candidate>) -> Route {
    let why = match candidates.len() {
        0 => "no agents registered".to_owned(),
        n => format!("{n} {} rejected", plural(n, "candidate", "candidates")),
    };
    Route {
        task_id: task.id,
        agent_id: agent_id.clone(),
        score: None,
        reason: format!("no agents available: {why}; default agent for {}", task.work_type),
        candidates,
        reserves_capacity: false,
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn an_agent_that_failed_a_task_is_not_given_it_again() {
        let task = task("t");
        let failed = BTreeSet::from([id("a")]);
        let ask = Ask { excluded: Some(&failed), ..Ask::ANY };
        let agents = [agent("a"), agent("b")];
        let route = routed(Router::new(&agents, now(), &RoutingPolicy::default()).place(&task, ask));
        assert_eq!(route.agent_id, id("b"));
        let a = route.candidates.iter().find(|c| c.agent_id == id("a")).unwrap();
        assert_eq!(a.verdict, Verdict::Rejected { reasons: vec![Reason::FailedBefore] });
        assert_eq!(reasons_of(&route, "a"), ["failed an earlier attempt of this task"]);
        // With nobody else, the default agent takes it rather than the one that failed.
        let fallback = id("fallback");
        let ask = Ask { default_agent: Some(&fallback), ..ask };
        let alone = [agent("a")];
        let route = routed(Router::new(&alone, now(), &RoutingPolicy::default()).place(&task, ask));
        assert_eq!(route.agent_id, id("fallback"));
        // Without a default, it waits, and says who failed it.
        let ask = Ask { default_agent: None, ..ask };
        let Placement::Waits(candidates) =
            Router::new(&alone, now(), &RoutingPolicy::default()).place(&task, ask)
        else {
            panic!("expected a wait")
        };
        assert_eq!(waiting_reason(&candidates), "1 capable agent failed it before (a)");
    }

    #[test]
    fn prefers_the_less_loaded_agent() {
        let mut busy = agent("a-busy");
        busy.in_flight = 3; // load term 0.25
        let mut idle = agent("b-idle");
        idle.in_flight = 1; // load term 0.75

        let route = route_one(&task("t"), &[busy, idle], &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "b-idle");
        let Verdict::Scored { load, score, .. } = *verdict_of(&route, "a-busy") else { panic!() };
        assert_eq!(load, 0.25);
        // 0.5 * 0.25 + 0.3 * 0.5 (no history) + 0.2 * 1.0 (no affinity)
        assert!((score - 0.475).abs() < 1e-12, "{score}");
        assert!((route.score.unwrap() - 0.725).abs() < 1e-12);
        assert!(route.reserves_capacity);
        assert_eq!(
            route.reason,
            "best of 2 eligible agents (score 0.73: load 0.75, success 0.50, affinity 1.00)"
        );
    }

    #[test]
    fn prefers_the_agent_with_the_better_track_record() {
        let mut flaky = agent("a-flaky");
        flaky.succeeded = 2;
        flaky.failed = 8;
        let mut solid = agent("b-solid");
        solid.succeeded = 9;
        solid.failed = 1;

        let route = route_one(&task("t"), &[flaky, solid], &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "b-solid");
        let Verdict::Scored { success, .. } = *verdict_of(&route, "b-solid") else { panic!() };
        assert_eq!(success, 10.0 / 12.0);
    }

    #[test]
    fn prefers_the_agent_matching_the_task_affinity() {
        let mut t = task("t");
        t.affinity.insert("target".into(), "homelab".into());
        t.affinity.insert("zone".into(), "eu".into());
        let mut half = agent("a-half");
        half.labels.insert("target".into(), "homelab".into());
        half.labels.insert("zone".into(), "us".into());
        let mut full = agent("b-full");
        full.labels.insert("target".into(), "homelab".into());
        full.labels.insert("zone".into(), "eu".into());
        let none = agent("c-none");

        let route = route_one(&t, &[half, full, none], &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "b-full");
        let affinity_of = |name| match *verdict_of(&route, name) {
            Verdict::Scored { affinity, .. } => affinity,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(affinity_of("a-half"), 0.5);
        assert_eq!(affinity_of("b-full"), 1.0);
        assert_eq!(affinity_of("c-none"), 0.0);
    }

    #[test]
    fn breaks_ties_by_agent_id_whatever_the_input_order() {
        let agents = [agent("charlie"), agent("alpha"), agent("bravo")];
        let route = route_one(&task("t"), &agents, &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "alpha");
        assert!(route.reason.ends_with("; tied with bravo, charlie, chosen by agent id"), "{}", route.reason);

        let reversed: Vec<Agent> = agents.iter().rev().cloned().collect();
        let again = route_one(&task("t"), &reversed, &RoutingPolicy::default());
        assert_eq!(again.agent_id.as_str(), "alpha");
    }

    #[test]
    fn a_batch_does_not_overfill_an_agent() {
        let mut small = agent("a-small");
        small.capacity = 1;
        small.succeeded = 50; // the better agent while it has room
        let mut big = agent("b-big");
        big.capacity = 10;
        big.in_flight = 5;
        let (first, second) = (task("first"), task("second"));

        let routes = routes_of(&[&first, &second], &[small.clone(), big], &RoutingPolicy::default());
        assert_eq!(routes[0].task_id, first.id);
        assert_eq!(routes[0].agent_id.as_str(), "a-small");
        assert_eq!(routes[1].task_id, second.id);
        assert_eq!(routes[1].agent_id.as_str(), "b-big");
        assert_eq!(reasons_of(&routes[1], "a-small"), ["no spare capacity (1/1 in flight)"]);

        // Alone, the capacity-1 agent takes the first task and the second goes to the default.
        let policy = with_default("deployment", "fallback");
        let routes = routes_of(&[&first, &second], &[small], &policy);
        assert_eq!(routes[0].agent_id.as_str(), "a-small");
        assert!(routes[0].reserves_capacity);
        assert_eq!(routes[1].agent_id.as_str(), "fallback");
        assert!(!routes[1].reserves_capacity);
    }

    #[test]
    fn falls_back_to_the_default_agent_when_no_agent_is_eligible() {
        let mut t = task("t");
        t.capabilities = caps(&["docker"]);
        let policy = with_default("deployment", "deployer");

        let route = route_one(&t, &[agent("x"), agent("y")], &policy);
        assert_eq!(route.agent_id.as_str(), "deployer");
        assert_eq!(route.score, None);
        assert!(!route.reserves_capacity);
        assert!(route.reason.starts_with("no agents available"));
        assert_eq!(route.reason, "no agents available: 2 candidates rejected; default agent for deployment");

        let route = route_one(&t, &[], &policy);
        assert_eq!(route.agent_id.as_str(), "deployer");
        assert_eq!(route.reason, "no agents available: no agents registered; default agent for deployment");
        assert!(route.candidates.is_empty());
    }

    #[test]
    fn waits_when_no_agent_is_eligible_and_no_default_is_configured() {
        let mut t = task("t");
        t.work_type = wt("monitoring");
        t.capabilities = caps(&["prometheus"]);
        // A default exists, but for another work type.
        let policy = with_default("deployment", "deployer");
        let ok = task("ok");

        let placed = route_tasks(&[&ok, &t], &[agent("x")], now(), &policy);
        assert!(matches!(&placed[0], Placement::Routed(r) if r.agent_id.as_str() == "x"), "{placed:?}");
        let Placement::Waits(candidates) = &placed[1] else { panic!("{placed:?}") };
        assert_eq!(candidates.len(), 1);
        assert_eq!(waiting_reason(candidates), "no agent has capability prometheus");
    }

    #[test]
    fn a_pool_limits_the_candidates_and_a_router_counts_the_slots_it_gave() {
        let mut one = agent("one");
        one.capacity = 1;
        let agents = [one, agent("provider-agent")];
        let pool: fn(&Agent) -> bool = |a| a.id.as_str() != "provider-agent";
        let mut router = Router::new(&agents, now(), &RoutingPolicy::default());
        let ask = Ask { pool, ..Ask::ANY };
        let first = routed(router.place(&task("first"), ask));
        assert_eq!(first.agent_id.as_str(), "one");
        assert_eq!(first.candidates.len(), 1, "the other pool is not listed");
        // Its only slot was given: the next task waits, and judging takes nothing.
        let Placement::Waits(candidates) = router.place(&task("second"), ask) else { panic!() };
        assert_eq!(waiting_reason(&candidates), "1 capable agent busy (1/1)");
        assert_eq!(
            router.judge(&task("third"), ask),
            candidates
                .iter()
                .map(|c| Candidate { agent_id: c.agent_id.clone(), verdict: c.verdict.clone() })
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn candidates_list_every_agent_sorted_by_id_and_serialise_flat() {
        let mut t = task("t");
        t.capabilities = caps(&["docker"]);
        let mut docker = agent("m-docker");
        docker.capabilities = caps(&["docker"]);
        let agents = [agent("z-plain"), docker, agent("a-plain")];

        let route = route_one(&t, &agents, &RoutingPolicy::default());
        let ids: Vec<&str> = route.candidates.iter().map(|c| c.agent_id.as_str()).collect();
        assert_eq!(ids, ["a-plain", "m-docker", "z-plain"]);
        assert_eq!(route.reason.split(" (").next().unwrap(), "best of 1 eligible agent");

        let json = serde_json::to_value(&route.candidates).unwrap();
        assert_eq!(json[0]["agent_id"], "a-plain");
        assert_eq!(json[0]["verdict"], "rejected");
        assert_eq!(json[0]["reasons"][0], "missing capabilities: docker");
        assert_eq!(json[1]["verdict"], "scored");
        assert!(json[1]["score"].is_f64());
        let back: Vec<Candidate> = serde_json::from_value(json).unwrap();
        assert_eq!(back, route.candidates);
        let route_back: Route = serde_json::from_value(serde_json::to_value(&route).unwrap()).unwrap();
        assert_eq!(route_back, route);

        // The audit schema describes the flattened verdict.
        let schema = serde_json::to_string(&schemars::schema_for!(Route)).unwrap();
        assert!(schema.contains("\"rejected\"") && schema.contains("\"scored\""), "{schema}");
    }

    #[test]
    fn policy_reads_from_partial_toml_with_defaults() {
        let policy: RoutingPolicy = toml::from_str(
            r#"
            heartbeat_ttl_secs = 60
            [weights]
            load = 1.0
            [default_agents]
            deployment = "deployer"
            "#,
        )
        .unwrap();
        assert_eq!(policy.heartbeat_ttl_secs, 60);
        assert_eq!(policy.weights, Weights { load: 1.0, success: 0.3, affinity: 0.2 });
        assert_eq!(policy.default_agents[&wt("deployment")], id("deployer"));

        let empty: RoutingPolicy = toml::from_str("").unwrap();
        assert_eq!(empty, RoutingPolicy::default());
        assert_eq!(empty.heartbeat_ttl_secs, 30);

        let bad = toml::from_str::<RoutingPolicy>("[default_agents]\ndeployment = \"Not Valid\"");
        assert!(bad.is_err());
    }

    #[test]
    fn weights_are_relative_and_bad_weights_cannot_break_the_score() {
        assert_eq!(Weights { load: 5.0, success: 3.0, affinity: 2.0 }.normalised(), [0.5, 0.3, 0.2]);
        let third = 1.0 / 3.0;
        assert_eq!(Weights { load: 0.0, success: -1.0, affinity: f64::NAN }.normalised(), [third; 3]);
        assert_eq!(
            Weights { load: f64::MAX, success: f64::MAX, affinity: 0.0 }.normalised(),
            [0.5, 0.5, 0.0]
        );

        // Only load counts: the idle agent wins despite a poor record.
        let policy = RoutingPolicy {
            weights: Weights { load: 1.0, success: 0.0, affinity: 0.0 },
            ..RoutingPolicy::default()
        };
        let mut idle = agent("b-idle");
        idle.failed = 20;
        let mut busy = agent("a-busy");
        busy.in_flight = 2;
        busy.succeeded = 20;
        let route = route_one(&task("t"), &[busy, idle], &policy);
        assert_eq!(route.agent_id.as_str(), "b-idle");
        assert_eq!(route.score, Some(1.0));
    }
}
