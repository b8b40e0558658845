//! The filter of routing: the verdict on one agent for one task, with every hard requirement
//! it misses (capabilities, a fresh heartbeat, spare capacity, resources) or its score.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};

use super::{Lack, Reason, Shortfall, Terms, Verdict, Weights};
use crate::model::domain::{Agent, Resources, Task};
use crate::model::ids::AgentId;

/// The clock of one routing decision, with what follows from it for every agent worked out once.
pub(super) struct Clock {
    now: DateTime<Utc>,
    ttl_secs: u64,
    /// A heartbeat before this instant is stale; `None` when none can be (a TTL too large for a
    /// `TimeDelta` means "never stale", and so does one reaching back before the earliest instant).
    stale_before: Option<DateTime<Utc>>,
}

impl Clock {
    pub(super) fn new(now: DateTime<Utc>, ttl_secs: u64) -> Self {
        let ttl = i64::try_from(ttl_secs).ok().and_then(TimeDelta::try_seconds);
        // `now - heartbeat > ttl` exactly when `heartbeat < now - ttl`: chrono's arithmetic is exact.
        let stale_before = ttl.and_then(|ttl| now.checked_sub_signed(ttl));
        Self { now, ttl_secs, stale_before }
    }

    /// Whether a heartbeat at `last_heartbeat` is too old. A heartbeat in the future (clock skew
    /// between the agent and us) counts as fresh: skew is no evidence that the agent is gone.
    pub(super) fn is_stale(&self, last_heartbeat: DateTime<Utc>) -> bool {
        self.stale_before.is_some_and(|limit| last_heartbeat < limit)
    }
}

/// Passes the verdicts on the agents for one task, with what follows from the task worked out once.
pub(super) struct Judge<'a> {
    task: &'a Task,
    /// The task's capabilities and affinity pairs, in order, as plain slices: walking the task's
    /// B-trees again for every agent cost as much as the checks themselves.
    capabilities: Vec<&'a str>,
    affinity: Vec<(&'a str, &'a str)>,
    /// The agents that failed this task before.
    failed: Option<&'a BTreeSet<AgentId>>,
    clock: &'a Clock,
    /// As applied: they sum to 1.
    weights: Weights,
    /// Which of `capabilities` the agent at hand lacks, as a bit set (bit `i % 64` of word
    /// `i / 64` for the `i`-th). Kept across agents to reuse its allocation.
    lacking: Vec<u64>,
    /// The lists of missing capabilities given so far, by their bit set: agents that lack the same
    /// ones (most of those that lack any) share one list instead of each getting a copy.
    missing: BTreeMap<Vec<u64>, Arc<[String]>>,
}

impl<'a> Judge<'a> {
    pub(super) fn new(
        task: &'a Task,
        failed: Option<&'a BTreeSet<AgentId>>,
        clock: &'a Clock,
        weights: Weights,
    ) -> Self {
        let capabilities: Vec<&str> = task.capabilities.iter().map(String::as_str).collect();
        Self {
            task,
            lacking: vec![0; capabilities.len().div_ceil(64)],
            capabilities,
            affinity: task.affinity.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect(),
            failed,
            clock,
            weights,
            missing: BTreeMap::new(),
        }
    }

    /// The verdict on `agent`, given its in-flight count so far in the batch.
    ///
    /// Most agents pass, and a decision looks at every agent, so the requirements are first tested
    /// without allocating; the reasons are recorded only for an agent that misses one.
    pub(super) fn verdict(&mut self, agent: &Agent, in_flight: u32) -> Verdict {
        let task = self.task;
        let capable = self.check_capabilities(agent);
        let stale = self.clock.is_stale(agent.last_heartbeat);
        let full = in_flight >= agent.capacity;
        let covered = agent.resources.covers(&task.resources);
        let failed_before = self.failed.is_some_and(|ids| ids.contains(&agent.id));
        let misses = usize::from(!capable)
            + usize::from(stale)
            + usize::from(full)
            + usize::from(!covered)
            + usize::from(failed_before);
        if misses > 0 {
            let mut reasons = Vec::with_capacity(misses);
            if !capable {
                reasons.push(Reason::MissingCapabilities(self.missing_capabilities()));
            }
            if stale {
                reasons.push(Reason::StaleHeartbeat {
                    age_millis: millis_rounded_up(self.clock.now - agent.last_heartbeat),
                    ttl_secs: self.clock.ttl_secs,
                });
            }
            if full {
                reasons.push(Reason::NoSpareCapacity { in_flight, capacity: agent.capacity });
            }
            if !covered {
                reasons.push(Reason::InsufficientResources(shortfall(&agent.resources, &task.resources)));
            }
            if failed_before {
                reasons.push(Reason::FailedBefore);
            }
            return Verdict::Rejected { reasons };
        }

        // Capacity is > in_flight here (else rejected above), so the division is safe and load > 0.
        let load = 1.0 - f64::from(in_flight) / f64::from(agent.capacity);
        let success = agent.success_rate();
        let affinity = self.affinity(agent);
        // The weights sum to 1, so the sum of the contributions is already the weighted mean.
        // Only numbers are kept: the terms are told from them when the verdict is explained.
        let score = Terms::weigh([load, success, affinity], self.weights).score();
        Verdict::Scored { score, load, success, affinity, weights: Some(self.weights) }
    }

    /// Whether `agent` has every capability of the task; notes in `lacking` those it lacks.
    fn check_capabilities(&mut self, agent: &Agent) -> bool {
        self.lacking.fill(0);
        for (i, capability) in self.capabilities.iter().enumerate() {
            if !agent.capabilities.contains(*capability) {
                self.lacking[i / 64] |= 1 << (i % 64);
            }
        }
        self.lacking.iter().all(|&word| word == 0)
    }

    /// The capabilities that the last agent checked lacks, in the task's order: shared with every
    /// agent of this decision that lacks the same ones.
    fn missing_capabilities(&mut self) -> Arc<[String]> {
        if let Some(names) = self.missing.get(self.lacking.as_slice()) {
            return Arc::clone(names);
        }
        let lacking = &self.lacking;
        let names: Arc<[String]> = (self.capabilities.iter().enumerate())
            .filter(|(i, _)| lacking[i / 64] & (1 << (i % 64)) != 0)
            .map(|(_, name)| (*name).to_owned())
            .collect();
        self.missing.insert(self.lacking.clone(), Arc::clone(&names));
        names
    }

    /// The fraction of the task's affinity pairs that the agent's labels match; 1 for a task
    /// without affinity, so that such a task does not penalise anyone.
    fn affinity(&self, agent: &Agent) -> f64 {
        if self.affinity.is_empty() {
            return 1.0;
        }
        let matched = (self.affinity.iter())
            .filter(|(key, value)| agent.labels.get(*key).is_some_and(|label| label == value))
            .count();
        matched as f64 / self.affinity.len() as f64
    }
}

/// A positive age in whole milliseconds, rounded *up* so that an age just over the TTL never reads
/// as equal to it.
fn millis_rounded_up(age: TimeDelta) -> u64 {
    let partial = age.subsec_nanos() % 1_000_000 != 0;
    u64::try_from(age.num_milliseconds()).unwrap_or(0) + u64::from(partial)
}

/// Every resource that `has` lacks to cover `needs`.
fn shortfall(has: &Resources, needs: &Resources) -> Shortfall {
    // Tested as "not enough" rather than "less", like `Resources::covers`, so that a NaN counts
    // as a shortfall in both.
    let enough_cpu = has.cpu >= needs.cpu;
    let shortfall = Shortfall {
        cpu: (!enough_cpu).then_some(Lack { needs: needs.cpu, has: has.cpu }),
        memory_mb: (has.memory_mb < needs.memory_mb)
            .then_some(Lack { needs: needs.memory_mb, has: has.memory_mb }),
        gpu: (has.gpu < needs.gpu).then_some(Lack { needs: needs.gpu, has: has.gpu }),
    };
    debug_assert_eq!(shortfall == Shortfall::default(), has.covers(needs));
    shortfall
}
#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;
    use super::*;

    #[test]
    fn rejects_agents_missing_capabilities_and_names_them() {
        let mut t = task("t");
        t.capabilities = caps(&["docker", "gpu", "ssh"]);
        let mut lacking = agent("lacking");
        lacking.capabilities = caps(&["ssh"]);
        let mut able = agent("able");
        able.capabilities = caps(&["docker", "gpu", "ssh", "extra"]);

        let route = route_one(&t, &[lacking, able], &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "able");
        assert_eq!(reasons_of(&route, "lacking"), ["missing capabilities: docker, gpu"]);
    }

    #[test]
    fn rejects_stale_heartbeats_but_not_fresh_or_future_ones() {
        let mut stale = agent("stale");
        stale.last_heartbeat = now() - TimeDelta::seconds(45);
        let mut edge = agent("edge");
        edge.last_heartbeat = now() - TimeDelta::seconds(30); // exactly the TTL: still fresh
        let mut future = agent("future");
        future.last_heartbeat = now() + TimeDelta::seconds(120); // clock skew
        let mut just_over = agent("just-over");
        just_over.last_heartbeat = now() - TimeDelta::milliseconds(30_250);

        let route = route_one(&task("t"), &[stale, edge, future, just_over], &RoutingPolicy::default());
        assert_eq!(reasons_of(&route, "stale"), ["heartbeat 45s old exceeds the 30s TTL"]);
        assert_eq!(reasons_of(&route, "just-over"), ["heartbeat 30.25s old exceeds the 30s TTL"]);
        assert!(verdict_of(&route, "edge").score().is_some());
        assert!(verdict_of(&route, "future").score().is_some());
    }

    #[test]
    fn a_heartbeat_age_is_rounded_up_to_the_millisecond() {
        let aged = |name: &str, nanos: i64| {
            let mut agent = agent(name);
            agent.last_heartbeat = now() - TimeDelta::nanoseconds(nanos);
            agent
        };
        let agents = [aged("a", 30_000_000_001), aged("b", 30_999_999_999), aged("c", 30_010_000_000)];
        let route = route_one(&task("t"), &agents, &with_default("deployment", "fallback"));
        assert_eq!(reasons_of(&route, "a"), ["heartbeat 30.001s old exceeds the 30s TTL"]);
        assert_eq!(reasons_of(&route, "b"), ["heartbeat 31s old exceeds the 30s TTL"]);
        assert_eq!(reasons_of(&route, "c"), ["heartbeat 30.01s old exceeds the 30s TTL"]);
    }

    #[test]
    fn agents_lacking_the_same_capabilities_share_one_list_of_them() {
        let mut t = task("t");
        t.capabilities = caps(&["docker", "gpu", "ssh"]);
        let mut first = agent("first");
        first.capabilities = caps(&["ssh"]);
        let mut second = agent("second");
        second.capabilities = caps(&["ssh", "extra"]);
        let mut other = agent("other");
        other.capabilities = caps(&["docker"]);

        let route = route_one(&t, &[first, second, other], &with_default("deployment", "fallback"));
        let missing = |name| match verdict_of(&route, name) {
            Verdict::Rejected { reasons } => match &reasons[..] {
                [Reason::MissingCapabilities(names)] => Arc::clone(names),
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        };
        assert!(Arc::ptr_eq(&missing("first"), &missing("second")));
        assert_eq!(*missing("first"), ["docker".to_owned(), "gpu".to_owned()]);
        assert_eq!(*missing("other"), ["gpu".to_owned(), "ssh".to_owned()]);
    }

    #[test]
    fn a_task_may_need_more_capabilities_than_fit_in_one_word() {
        let names: Vec<String> = (0..70).map(|i| format!("c{i:02}")).collect();
        let mut t = task("t");
        t.capabilities = names.iter().cloned().collect();
        let mut all = agent("all");
        all.capabilities = t.capabilities.clone();
        let mut most = agent("most");
        most.capabilities = t.capabilities.clone();
        most.capabilities.remove("c00");
        most.capabilities.remove("c65");

        let route = route_one(&t, &[all, most], &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "all");
        assert_eq!(reasons_of(&route, "most"), ["missing capabilities: c00, c65"]);
    }

    #[test]
    fn a_ttl_reaching_back_before_the_earliest_instant_never_makes_a_heartbeat_stale() {
        let mut ancient = agent("ancient");
        ancient.last_heartbeat = DateTime::<Utc>::MIN_UTC;
        let policy = with_default("deployment", "fallback");
        assert_eq!(route_one(&task("t"), &[ancient.clone()], &policy).agent_id.as_str(), "fallback");
        for ttl in [1 << 50, u64::MAX] {
            let policy = RoutingPolicy { heartbeat_ttl_secs: ttl, ..RoutingPolicy::default() };
            assert_eq!(route_one(&task("t"), &[ancient.clone()], &policy).agent_id.as_str(), "ancient");
        }
    }

    #[test]
    fn rejects_agents_at_full_capacity() {
        let mut full = agent("full");
        full.capacity = 3;
        full.in_flight = 3;
        let mut zero = agent("zero");
        zero.capacity = 0;

        let policy = with_default("deployment", "fallback");
        let route = route_one(&task("t"), &[full, zero], &policy);
        assert_eq!(reasons_of(&route, "full"), ["no spare capacity (3/3 in flight)"]);
        assert_eq!(reasons_of(&route, "zero"), ["no spare capacity (0/0 in flight)"]);
        assert_eq!(route.agent_id.as_str(), "fallback");
    }

    #[test]
    fn rejects_agents_with_insufficient_resources() {
        let mut t = task("t");
        t.resources = Resources { cpu: 2.0, memory_mb: 1024, gpu: 2 };
        let cpu_only = agent("cpu-only");
        let mut gpu_box = agent("gpu-box");
        gpu_box.resources.gpu = 2;
        let mut tiny = agent("tiny");
        tiny.resources = Resources { cpu: 0.5, memory_mb: 512, gpu: 1 };

        let route = route_one(&t, &[cpu_only, gpu_box, tiny], &RoutingPolicy::default());
        assert_eq!(route.agent_id.as_str(), "gpu-box");
        assert_eq!(reasons_of(&route, "cpu-only"), ["insufficient resources: needs 2 GPU, has 0"]);
        assert_eq!(
            reasons_of(&route, "tiny"),
            ["insufficient resources: needs 2 CPU, has 0.5; needs 1024 MiB memory, has 512; \
                 needs 2 GPU, has 1"]
        );
    }

    #[test]
    fn lists_every_reason_an_agent_is_rejected() {
        let mut t = task("t");
        t.capabilities = caps(&["docker"]);
        t.resources.gpu = 1;
        let mut hopeless = agent("hopeless");
        hopeless.last_heartbeat = now() - TimeDelta::seconds(300);
        hopeless.capacity = 1;
        hopeless.in_flight = 1;

        let policy = with_default("deployment", "fallback");
        let route = route_one(&t, &[hopeless], &policy);
        assert_eq!(
            reasons_of(&route, "hopeless"),
            [
                "missing capabilities: docker",
                "heartbeat 300s old exceeds the 30s TTL",
                "no spare capacity (1/1 in flight)",
                "insufficient resources: needs 1 GPU, has 0",
            ]
        );
    }

    #[test]
    fn a_scored_verdict_keeps_its_terms_whose_contributions_make_the_score() {
        let mut t = task("t");
        t.affinity.insert("zone".into(), "eu".into());
        let mut local = agent("a-local");
        local.in_flight = 1;
        local.succeeded = 9;
        local.failed = 1;
        local.labels.insert("zone".into(), "eu".into());
        let policy = RoutingPolicy {
            weights: Weights { load: 2.0, success: 1.0, affinity: 1.0 },
            ..RoutingPolicy::default()
        };
        let route = route_one(&t, &[local, agent("b-far")], &policy);

        let terms = verdict_of(&route, "a-local").terms().unwrap();
        assert_eq!(terms.load, Term { value: 0.75, weight: 0.5, contribution: 0.375 });
        assert_eq!(
            terms.success,
            Term { value: 10.0 / 12.0, weight: 0.25, contribution: 0.25 * (10.0 / 12.0) }
        );
        assert_eq!(terms.affinity, Term { value: 1.0, weight: 0.25, contribution: 0.25 });
        let far = verdict_of(&route, "b-far").terms().unwrap();
        assert_eq!(far.affinity, Term { value: 0.0, weight: 0.25, contribution: 0.0 });
        for candidate in &route.candidates {
            let terms = candidate.verdict.terms().unwrap();
            // Exactly: the verdict's score is this very sum.
            assert_eq!(Some(terms.score()), candidate.verdict.score());
            let names: Vec<&str> = terms.named().iter().map(|(name, _)| *name).collect();
            assert_eq!(names, ["load", "success", "affinity"]);
        }

        // The audit records the weights as applied, once per scored candidate, as numbers.
        let json = serde_json::to_value(&route.candidates).unwrap();
        assert_eq!(json[0]["weights"], serde_json::json!({"load": 0.5, "success": 0.25, "affinity": 0.25}));
        assert_eq!(json[0]["load"], 0.75);
        let back: Vec<Candidate> = serde_json::from_value(json).unwrap();
        assert_eq!(back, route.candidates);
    }

    #[test]
    fn a_verdict_recorded_before_the_weights_were_kept_reads_with_its_values_only() {
        let old = serde_json::json!([
            {"agent_id": "a", "verdict": "scored", "score": 0.725, "load": 0.75, "success": 0.5, "affinity": 1.0},
            {"agent_id": "b", "verdict": "rejected", "reasons": ["no spare capacity (4/4 in flight)"]}
        ]);
        let candidates: Vec<Candidate> = serde_json::from_value(old.clone()).unwrap();
        let Verdict::Scored { score, load, weights, .. } = candidates[0].verdict else { panic!() };
        assert_eq!((score, load, weights), (0.725, 0.75, None));
        assert_eq!(candidates[0].verdict.terms(), None);
        assert_eq!(candidates[1].verdict.terms(), None);
        // Written again, it is what it was.
        assert_eq!(serde_json::to_value(&candidates).unwrap(), old);
    }
}
