//! What the fleet can do, as the planner sees it: the resources that agents report in their
//! heartbeats plus a configured inventory of machines that may run agents, and the durations that
//! finished tasks really took. Pure: the plan stage loads the agents and the history and passes
//! them in.
//!
//! A task is infeasible when no single member of the fleet offers all the resources it needs
//! (a GPU none has, more memory than any reports). An empty fleet (no agent ever seen, no
//! inventory) judges nothing: agents may still register, and routing has default agents for
//! that case.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::decisions::fallback::Infeasible;
use crate::decisions::plural;
use crate::model::domain::{Agent, Plan, Resources, Task};
use crate::model::ids::WorkType;

/// A machine of the inventory: one that may run agents even if none is running now.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    #[serde(default)]
    pub cpu: f64,
    #[serde(default)]
    pub memory_mb: u64,
    #[serde(default)]
    pub gpu: u32,
}

/// How plans are fitted to the fleet.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PlanningPolicy {
    /// Machines that may run agents, on top of the agents seen.
    pub inventory: Vec<Machine>,
    /// Finished tasks of a work type and step needed before their 90th percentile duration replaces the
    /// catalog's estimate.
    pub min_duration_samples: u32,
    /// How long a planner goes on using the durations it learnt before reading them again, in
    /// seconds: they move slowly, and reading them for every plan costs the database more than
    /// anything else the planner does. 0 reads them for every plan.
    pub history_refresh_secs: u64,
}

impl Default for PlanningPolicy {
    fn default() -> Self {
        Self { inventory: Vec::new(), min_duration_samples: 5, history_refresh_secs: 10 }
    }
}

/// The resources of every agent seen and every machine of the inventory.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fleet {
    members: Vec<(String, Resources)>,
}

impl Fleet {
    pub fn new(agents: &[Agent], inventory: &[Machine]) -> Self {
        let agents = agents.iter().map(|a| (a.id.to_string(), a.resources));
        let machines = inventory
            .iter()
            .map(|m| (m.name.clone(), Resources { cpu: m.cpu, memory_mb: m.memory_mb, gpu: m.gpu }));
        Fleet { members: agents.chain(machines).collect() }
    }

    /// The tasks of `plan` that no member could run, with the reason; none for an empty fleet.
    pub fn infeasible(&self, plan: &Plan) -> Vec<Infeasible> {
        if self.members.is_empty() {
            return Vec::new();
        }
        plan.tasks()
            .iter()
            .filter_map(|task| {
                self.why_not(task).map(|reason| Infeasible {
                    task_id: task.id,
                    key: task.key.clone(),
                    work_type: task.work_type.clone(),
                    reason,
                })
            })
            .collect()
    }

    /// Why no member can run `task`, or `None` when one can.
    fn why_not(&self, task: &Task) -> Option<String> {
        let need = task.resources;
        if self.members.iter().any(|(_, offered)| offered.covers(&need)) {
            return None;
        }
        let most = |f: fn(&Resources) -> f64| self.members.iter().map(|(_, r)| f(r)).fold(0.0, f64::max);
        let (cpu, memory, gpu) = (most(|r| r.cpu), most(|r| r.memory_mb as f64), most(|r| f64::from(r.gpu)));
        let fleet = format!(
            "{} known {}",
            self.members.len(),
            plural(self.members.len(), "agent or machine", "agents and machines")
        );
        let mut short = Vec::new();
        if f64::from(need.gpu) > gpu {
            short.push(format!(
                "{} {} (the most any of the {fleet} has is {gpu})",
                need.gpu,
                plural(need.gpu as usize, "GPU", "GPUs")
            ));
        }
        if need.memory_mb as f64 > memory {
            short.push(format!("{} MiB of memory (the most is {memory} MiB)", need.memory_mb));
        }
        if need.cpu > cpu {
            short.push(format!("{} CPUs (the most is {cpu})", need.cpu));
        }
        Some(if short.is_empty() {
            format!(
                "needs {} CPUs, {} MiB and {} GPUs together, and none of the {fleet} offers all of them",
                need.cpu, need.memory_mb, need.gpu
            )
        } else {
            format!("needs {}", short.join(" and "))
        })
    }
}

/// How long the finished tasks of one work type and step took.
#[derive(Debug, Clone, PartialEq)]
pub struct DurationStats {
    pub work_type: WorkType,
    pub step: String,
    pub samples: u32,
    pub p90_secs: f64,
}

/// The step of a task key ("2.deploy" → "deploy").
pub fn step_of(key: &str) -> &str {
    key.split_once('.').map_or(key, |(_, step)| step)
}

/// Learnt estimates: for each task whose work type and step have at least `min_samples` finished
/// tasks, the duration that 90% of them finished within (at least one second), with the basis to
/// record; tasks without enough history keep the catalog's estimate. Not the median: leases are
/// built on the estimate, and one built on a typical figure would cut the slower half short.
pub fn learnt_durations(
    plan: &Plan,
    history: &[DurationStats],
    min_samples: u32,
) -> HashMap<crate::model::ids::TaskId, (u32, String)> {
    plan.tasks()
        .iter()
        .filter_map(|task| {
            let stats = history.iter().find(|s| {
                s.work_type == task.work_type
                    && s.step == step_of(&task.key)
                    && s.samples >= min_samples.max(1)
            })?;
            let secs = stats.p90_secs.ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
            Some((task.id, (secs, format!("90th percentile of {} finished tasks", stats.samples))))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use chrono::Utc;

    use super::*;
    use crate::model::ids::{AgentId, RequestId};

    fn task(plan_id: crate::model::ids::PlanId, key: &str, work_type: &str, need: Resources) -> Task {
        Task {
            id: plan_id.task_id(key),
            key: key.into(),
            work_type: WorkType::parse(work_type).unwrap(),
            description: String::new(),
            estimated_duration_secs: 60,
            resources: need,
            capabilities: BTreeSet::new(),
            depends_on: Vec::new(),
            affinity: BTreeMap::new(),
        }
    }

    fn plan(needs: &[Resources]) -> Plan {
        let request = RequestId::random();
        let id = request.plan_id();
        let tasks = needs
            .iter()
            .enumerate()
            .map(|(i, n)| task(id, &format!("1.s{i}"), "transcription", *n))
            .collect();
        Plan::new(id, request, tasks).unwrap()
    }

    fn agent(id: &str, offered: Resources) -> Agent {
        Agent {
            id: AgentId::parse(id).unwrap(),
            capabilities: BTreeSet::new(),
            capacity: 1,
            in_flight: 0,
            labels: BTreeMap::new(),
            resources: offered,
            last_heartbeat: Utc::now(),
            succeeded: 0,
            failed: 0,
        }
    }

    const GPU: Resources = Resources { cpu: 2.0, memory_mb: 8192, gpu: 1 };
    const SMALL: Resources = Resources { cpu: 0.5, memory_mb: 512, gpu: 0 };
    const BIG: Resources = Resources { cpu: 8.0, memory_mb: 32_768, gpu: 0 };

    #[test]
    fn a_gpu_task_is_infeasible_on_a_fleet_without_gpus() {
        let plan = plan(&[GPU, SMALL]);
        let fleet = Fleet::new(&[agent("a1", BIG), agent("a2", SMALL)], &[]);
        let stuck = fleet.infeasible(&plan);
        assert_eq!(stuck.len(), 1);
        assert_eq!(stuck[0].key, "1.s0");
        assert_eq!(stuck[0].reason, "needs 1 GPU (the most any of the 2 known agents and machines has is 0)");
    }

    #[test]
    fn the_inventory_counts_as_part_of_the_fleet() {
        let plan = plan(&[GPU]);
        let gpu_box = Machine { name: "gpu-box".into(), cpu: 16.0, memory_mb: 65_536, gpu: 2 };
        assert!(Fleet::new(&[agent("a1", BIG)], &[gpu_box]).infeasible(&plan).is_empty());
    }

    #[test]
    fn needs_must_be_met_by_one_member() {
        // One has the GPU, another the memory: neither can run the task.
        let plan = plan(&[Resources { cpu: 1.0, memory_mb: 16_384, gpu: 1 }]);
        let small_gpu = Resources { cpu: 4.0, memory_mb: 4096, gpu: 1 };
        let stuck = Fleet::new(&[agent("a1", BIG), agent("a2", small_gpu)], &[]).infeasible(&plan);
        assert_eq!(stuck.len(), 1);
        assert!(
            stuck[0].reason.contains("none of the 2 known agents and machines offers all"),
            "{}",
            stuck[0].reason
        );
        // Memory beyond any member is named.
        let plan = self::plan(&[Resources { cpu: 1.0, memory_mb: 100_000, gpu: 0 }]);
        let stuck = Fleet::new(&[agent("a1", BIG)], &[]).infeasible(&plan);
        assert_eq!(stuck[0].reason, "needs 100000 MiB of memory (the most is 32768 MiB)");
    }

    #[test]
    fn an_empty_fleet_judges_nothing() {
        assert!(Fleet::default().infeasible(&plan(&[GPU])).is_empty());
    }

    #[test]
    fn durations_are_learnt_once_there_is_enough_history() {
        let plan = plan(&[SMALL, SMALL]);
        let wt = WorkType::parse("transcription").unwrap();
        let history = vec![
            DurationStats { work_type: wt.clone(), step: "s0".into(), samples: 5, p90_secs: 41.2 },
            DurationStats { work_type: wt.clone(), step: "s1".into(), samples: 4, p90_secs: 10.0 },
        ];
        let learnt = learnt_durations(&plan, &history, 5);
        assert_eq!(learnt.len(), 1, "s1 has too few samples");
        assert_eq!(learnt[&plan.tasks()[0].id], (42, "90th percentile of 5 finished tasks".to_owned()));
        let zero = vec![DurationStats { work_type: wt, step: "s0".into(), samples: 9, p90_secs: 0.01 }];
        assert_eq!(learnt_durations(&plan, &zero, 5)[&plan.tasks()[0].id].0, 1, "never zero");
        assert_eq!(step_of("12.deploy"), "deploy");
    }
}
