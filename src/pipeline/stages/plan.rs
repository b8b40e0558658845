//! plan: a decomposition → a work plan (a DAG of at least one task) from the catalog's steps,
//! fitted to the fleet: estimated durations learnt from finished tasks, the tasks that no agent
//! could run named, and the plan's complexity computed term by term.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::{Destination, Inbound, Outcome, Stage};
use crate::model::domain::{Agent, RequestStatus};
use crate::model::effect::{Write, write};
use crate::model::ids::RequestId;
use crate::model::wire::{Decomposed, Planned};
use crate::pipeline::topology::StageQueue;
use crate::store::{self, Store};
use crate::understanding::catalog::Catalog;
use crate::understanding::complexity::{self, Inputs};
use crate::understanding::fleet::{self, DurationStats, Fleet, PlanningPolicy};

pub struct PlanStage {
    catalog: Arc<Catalog>,
    policy: PlanningPolicy,
    /// The durations learnt, by work type, with when they were read.
    history: Mutex<HashMap<String, (Instant, Vec<DurationStats>)>>,
}

impl PlanStage {
    pub fn new(catalog: Arc<Catalog>, policy: PlanningPolicy) -> Self {
        PlanStage { catalog, policy, history: Mutex::new(HashMap::new()) }
    }

    /// The durations learnt for `work_types`: read again where older than the policy allows.
    async fn durations(
        &self,
        store: &Store,
        work_types: &[&str],
    ) -> Result<Vec<DurationStats>, store::Error> {
        let refresh = Duration::from_secs(self.policy.history_refresh_secs);
        let now = Instant::now();
        let stale: Vec<&str> = {
            let history = self.history.lock().expect("history lock");
            work_types
                .iter()
                .copied()
                .filter(|w| history.get(*w).is_none_or(|(read, _)| now.duration_since(*read) >= refresh))
                .collect()
        };
        let fresh = if stale.is_empty() { Vec::new() } else { store.duration_history(&stale).await? };
        let mut history = self.history.lock().expect("history lock");
        for work_type in stale {
            let stats = fresh.iter().filter(|s| s.work_type.as_str() == work_type).cloned().collect();
            history.insert(work_type.to_owned(), (now, stats));
        }
        Ok(work_types.iter().filter_map(|w| history.get(*w)).flat_map(|(_, stats)| stats.clone()).collect())
    }
}

/// The fleet and its history, as the plan is made.
#[derive(Debug, Default)]
pub struct PlanContext {
    /// Every agent seen, live or not: what the fleet can do, not what it is doing.
    pub agents: Vec<Agent>,
    pub durations: Vec<DurationStats>,
    /// Where the request stands; `None`: no request of the message's id was recorded, the
    /// decomposition comes from elsewhere.
    pub request_status: Option<RequestStatus>,
}

impl Stage for PlanStage {
    type Input = Decomposed;
    type Context = PlanContext;
    const NAME: &'static str = "plan";
    type Request = RequestId;

    async fn load(&self, store: &Store, input: &Inbound<Decomposed>) -> Result<PlanContext, store::Error> {
        let work_types: Vec<&str> =
            input.payload.decomposition.intents.iter().map(|i| i.work_type.as_str()).collect();
        Ok(PlanContext {
            agents: store.agents().await?,
            durations: self.durations(store, &work_types).await?,
            request_status: store.request_status(input.payload.request.request_id).await?,
        })
    }

    fn decide(&self, input: &Inbound<Decomposed>, context: PlanContext, now: DateTime<Utc>) -> Outcome {
        let request = &input.payload.request;
        let decomposition = &input.payload.decomposition;
        if context.request_status == Some(RequestStatus::Cancelled) {
            return Outcome::Ignore { reason: format!("request {} is cancelled", request.request_id) };
        }
        let planned = self.catalog.plan(request.request_id, decomposition);
        if context.request_status.is_none() {
            // The decompose stage records a request before it publishes its decomposition. Asked
            // before any write: a decomposition of a request nobody submitted must not fail (or
            // create, in the audit) that request. Its own defects still go in the reason, so
            // whoever sent it learns everything that is wrong with it at once.
            let mut reason = format!(
                "no request {} was recorded: its decomposition cannot be planned",
                request.request_id
            );
            if let Err(err) = &planned {
                reason.push_str(&format!(" (and planning failed: {err})"));
            }
            return Outcome::Reject { writes: Vec::new(), reason };
        }
        let mut plan = match planned {
            Ok(plan) => plan,
            Err(err) => {
                // Never an empty plan passed on: the request fails, with the reason on it.
                let reason = format!("planning failed: {err}");
                return Outcome::Reject {
                    writes: vec![Write::RequestFailed(write::RequestFailed {
                        request_id: request.request_id,
                        reason: reason.clone(),
                    })],
                    reason,
                };
            }
        };
        let learnt = fleet::learnt_durations(&plan, &context.durations, self.policy.min_duration_samples);
        plan.estimate_durations(|task| learnt.get(&task.id).map(|(secs, _)| *secs));
        let duration_basis: BTreeMap<_, _> = learnt.into_iter().map(|(id, (_, basis))| (id, basis)).collect();

        let work = plan
            .work_types()
            .into_iter()
            .filter_map(|w| self.catalog.get(w))
            .map(|spec| spec.base_complexity)
            .fold(0.0, f64::max);
        let inputs = Inputs {
            work,
            unknown_entities: self.catalog.unknown_entities(decomposition).len(),
            confidence: decomposition.confidence,
        };
        let complexity = complexity::assess(&plan, &inputs);
        let infeasible = Fleet::new(&context.agents, &self.policy.inventory).infeasible(&plan);

        let planned = Planned {
            request: request.clone(),
            complexity: complexity.clone(),
            plan: plan.clone(),
            infeasible: infeasible.clone(),
        };
        let publish = input.forward(
            Destination::Queue(StageQueue::Planned),
            "planned",
            request.request_id,
            now,
            planned,
        );
        Outcome::Forward {
            writes: vec![Write::Plan(write::Plan { plan, complexity, infeasible, duration_basis })],
            publish: vec![publish],
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::domain::Resources;
    use crate::model::ids::{AgentId, MessageId, RequestId, WorkType};
    use crate::model::wire::RequestMeta;

    fn input(text: &str) -> Inbound<Decomposed> {
        let request_id = RequestId::random();
        Inbound {
            message_id: MessageId::random(),
            request_id,
            priority: 1,
            payload: Decomposed {
                request: RequestMeta {
                    request_id,
                    text: text.into(),
                    submitted_by: None,
                    priority: 1,
                    auto_approve: false,
                },
                decomposition: Catalog::default().decompose(text).unwrap(),
            },
        }
    }

    fn stage() -> PlanStage {
        PlanStage::new(Arc::new(Catalog::default()), PlanningPolicy::default())
    }

    /// The context of a request recorded as decomposed.
    fn recorded_request() -> PlanContext {
        PlanContext { request_status: Some(RequestStatus::Decomposed), ..Default::default() }
    }

    #[test]
    fn a_cancelled_request_is_not_planned() {
        let context = PlanContext { request_status: Some(RequestStatus::Cancelled), ..Default::default() };
        let outcome = stage().decide(&input("Deploy Gitea to the homelab"), context, Utc::now());
        assert!(
            matches!(&outcome, Outcome::Ignore { reason } if reason.ends_with("is cancelled")),
            "{outcome:?}"
        );
    }

    fn agent(gpu: u32) -> Agent {
        Agent {
            id: AgentId::parse("a1").unwrap(),
            capabilities: Default::default(),
            capacity: 1,
            in_flight: 0,
            labels: BTreeMap::new(),
            resources: Resources { cpu: 8.0, memory_mb: 16_384, gpu },
            last_heartbeat: Utc::now(),
            succeeded: 0,
            failed: 0,
        }
    }

    fn planned(outcome: Outcome) -> (Vec<Write>, Planned) {
        let Outcome::Forward { writes, publish } = outcome else { panic!("{outcome:?}") };
        let planned = serde_json::from_value(publish[0].body["payload"].clone()).unwrap();
        (writes, planned)
    }

    #[test]
    fn the_plan_carries_its_complexity_term_by_term() {
        let (writes, planned) = planned(stage().decide(
            &input("Deploy Uptime Kuma to the homelab and send alerts to Discord"),
            recorded_request(),
            Utc::now(),
        ));
        // deployment (0.4) + 5 tasks, 5 waves, 2 types, nothing unknown, full confidence.
        assert_eq!(planned.complexity.score, 0.254, "{}", planned.complexity.explain());
        assert!(planned.infeasible.is_empty());
        let Write::Plan(write::Plan { complexity, duration_basis, .. }) = &writes[0] else { panic!() };
        assert_eq!(complexity, &planned.complexity);
        assert!(duration_basis.is_empty(), "no history: the catalog's estimates");
    }

    #[test]
    fn a_gpu_task_is_named_infeasible_on_a_fleet_without_gpus() {
        let text = "Transcribe the Whisper meeting recordings";
        let on = |agents| {
            planned(stage().decide(&input(text), PlanContext { agents, ..recorded_request() }, Utc::now())).1
        };
        let without = on(vec![agent(0)]);
        assert_eq!(without.infeasible.len(), 1, "{:?}", without.infeasible);
        assert_eq!(without.infeasible[0].key, "1.transcribe");
        assert!(on(vec![agent(1)]).infeasible.is_empty());
    }

    #[test]
    fn a_decomposition_of_a_request_never_recorded_is_refused() {
        let input = input("Deploy Gitea to the homelab");
        let context = PlanContext { request_status: None, ..Default::default() };
        let Outcome::Reject { writes, reason } = stage().decide(&input, context, Utc::now()) else {
            panic!("expected a refusal")
        };
        assert!(writes.is_empty(), "{writes:?}");
        let id = input.payload.request.request_id;
        assert_eq!(reason, format!("no request {id} was recorded: its decomposition cannot be planned"));
    }

    #[test]
    fn an_unplannable_decomposition_of_a_request_never_recorded_fails_nothing() {
        let mut input = input("Deploy Gitea to the homelab");
        input.payload.decomposition.intents[0].work_type = WorkType::parse("teleportation").unwrap();
        let id = input.payload.request.request_id;
        let refuse = |status| {
            stage().decide(&input, PlanContext { request_status: status, ..Default::default() }, Utc::now())
        };

        let Outcome::Reject { writes, reason } = refuse(None) else { panic!("expected a refusal") };
        assert!(writes.is_empty(), "no request to fail: {writes:?}");
        assert!(
            reason.starts_with(&format!("no request {id} was recorded: its decomposition cannot be planned"))
                && reason.contains("work type teleportation is not in the catalog"),
            "{reason}"
        );

        let Outcome::Reject { writes, reason } = refuse(Some(RequestStatus::Decomposed)) else {
            panic!("expected a refusal")
        };
        assert!(
            matches!(&writes[..], [Write::RequestFailed(write::RequestFailed { request_id, .. })] if *request_id == id),
            "{writes:?}"
        );
        assert!(reason.starts_with("planning failed:"), "{reason}");
    }

    #[test]
    fn durations_come_from_history_once_there_is_enough() {
        let wt = WorkType::parse("deployment").unwrap();
        let durations =
            vec![DurationStats { work_type: wt, step: "deploy".into(), samples: 7, p90_secs: 95.5 }];
        let (writes, planned) = planned(stage().decide(
            &input("Deploy Gitea to the homelab"),
            PlanContext { durations, ..recorded_request() },
            Utc::now(),
        ));
        let deploy = planned.plan.tasks().iter().find(|t| t.key == "1.deploy").unwrap();
        assert_eq!(deploy.estimated_duration_secs, 96);
        let prepare = planned.plan.tasks().iter().find(|t| t.key == "1.prepare").unwrap();
        assert_eq!(prepare.estimated_duration_secs, 120, "the catalog's estimate");
        let Write::Plan(write::Plan { duration_basis, .. }) = &writes[0] else { panic!() };
        assert_eq!(duration_basis[&deploy.id], "90th percentile of 7 finished tasks");
    }
}
