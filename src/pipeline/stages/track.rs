//! track: an attempt's result → the task succeeded (its dependents whose dependencies have all
//! succeeded go to routing; the last one completes the plan and the request), or it failed (it
//! is retried on another agent while attempts remain; then it fails, its dependents are
//! cancelled, and the plan and the request fail). A late or duplicate result changes nothing.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Destination, Inbound, Outcome, Stage};
use crate::decisions::fallback::{FallbackDecision, FallbackPolicy};
use crate::model::domain::{PlanStatus, TaskStatus};
use crate::model::effect::{Attempt, Write, write};
use crate::model::ids::{RequestId, TaskId};
use crate::model::wire::{RouteTasks, TaskResult};
use crate::pipeline::topology::StageQueue;
use crate::store::{self, Store, StoredPlan, TaskState};

/// How the track stage treats failures.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct TrackingPolicy {
    /// Attempts a task gets, each on an agent that has not failed it, before it fails for good.
    pub max_attempts: u32,
}

impl Default for TrackingPolicy {
    fn default() -> Self {
        TrackingPolicy { max_attempts: 3 }
    }
}

pub struct Track {
    pub policy: TrackingPolicy,
    /// The providers, whose prices turn the tokens an external task used into what it cost.
    pub fallback: FallbackPolicy,
}

/// The plan and where its tasks stand.
#[derive(Debug, Default, Clone)]
pub struct TrackContext {
    pub plan: Option<StoredPlan>,
    pub tasks: Vec<TaskState>,
    /// The plan's fallback decision, loaded for results that report tokens used.
    pub fallback: Option<FallbackDecision>,
    /// Whether tasks wait in line for an agent: a finished attempt frees a slot for them.
    pub line: bool,
}

impl Stage for Track {
    type Input = TaskResult;
    type Context = TrackContext;
    const NAME: &'static str = "track";
    type Request = RequestId;

    async fn load(&self, store: &Store, input: &Inbound<TaskResult>) -> Result<TrackContext, store::Error> {
        let plan_id = input.payload.plan_id;
        let fallback = match input.payload.usage {
            Some(_) => store.fallback_decision(plan_id).await?,
            None => None,
        };
        let (plan, tasks, line) = store.plan_states_and_line(plan_id).await?;
        Ok(TrackContext { plan, tasks, fallback, line })
    }

    fn contention_key(&self, input: &Inbound<TaskResult>) -> Option<uuid::Uuid> {
        Some(input.payload.plan_id.as_uuid())
    }

    fn decide(&self, input: &Inbound<TaskResult>, context: TrackContext, now: DateTime<Utc>) -> Outcome {
        let result = &input.payload;
        let reject = |reason: String| Outcome::Reject { writes: Vec::new(), reason };
        let Some(stored) = context.plan else {
            return reject(format!(
                "result for task {} of an unknown plan {}",
                result.task_id, result.plan_id
            ));
        };
        let (Some(task), Some(state)) =
            (stored.plan.task(result.task_id), context.tasks.iter().find(|t| t.id == result.task_id))
        else {
            return reject(format!(
                "result for a task {} that plan {} does not have",
                result.task_id, result.plan_id
            ));
        };
        let request_id = stored.plan.request_id;
        let plan_id = stored.plan.id;
        // Tokens an external model used are spent whatever becomes of the result: a late one
        // is still paid for.
        let used = self.quota_used(result, context.fallback.as_ref(), request_id, now);
        let running = matches!(state.status, TaskStatus::Routed | TaskStatus::Dispatched);
        if result.attempt != state.attempt || !running {
            if let Some(used) = used {
                return Outcome::Forward { writes: vec![used], publish: Vec::new() };
            }
            return Outcome::Ignore {
                reason: format!(
                    "result of task {} attempt {} from {} is late or a duplicate: the task is at attempt {} ({})",
                    task.key, result.attempt, result.agent_id, state.attempt, state.status
                ),
            };
        }
        if state.agent_id.as_deref() != Some(result.agent_id.as_str()) {
            if let Some(used) = used {
                return Outcome::Forward { writes: vec![used], publish: Vec::new() };
            }
            return Outcome::Ignore {
                reason: format!(
                    "result of task {} attempt {} came from {}, but the attempt went to {}",
                    task.key,
                    result.attempt,
                    result.agent_id,
                    state.agent_id.as_deref().unwrap_or("no agent")
                ),
            };
        }
        let mut writes = vec![Write::TaskFinished(write::TaskFinished {
            request_id,
            result: result.clone(),
            plan_version: stored.version,
        })];
        // Before the plan may finish: its settlement releases only what was not spent.
        writes.extend(used);
        // The attempt's slot is free: tasks waiting in line may take it.
        let mut publish = Vec::new();
        if context.line {
            publish.push(super::wake(input.message_id, "result", now));
        }
        // A plan that already ended (another branch failed) only records what its tasks report.
        if stored.status != PlanStatus::Approved {
            return Outcome::Forward { writes, publish };
        }
        let mut status: HashMap<TaskId, TaskStatus> =
            context.tasks.iter().map(|t| (t.id, t.status)).collect();
        let route_message = |label: &str| {
            let route = RouteTasks { plan_id, priority: input.priority, approved_by: "track".into() };
            input.forward(Destination::Queue(StageQueue::Route), label, request_id, now, route)
        };
        if result.success {
            status.insert(task.id, TaskStatus::Succeeded);
            if status.values().all(|s| *s == TaskStatus::Succeeded) {
                writes.push(Write::PlanFinished(write::PlanFinished { request_id, plan_id, failure: None }));
                return Outcome::Forward { writes, publish };
            }
            let done: HashSet<TaskId> =
                status.iter().filter(|(_, s)| **s == TaskStatus::Succeeded).map(|(id, _)| *id).collect();
            let released =
                stored.plan.ready_tasks(&done).any(|t| status.get(&t.id) == Some(&TaskStatus::Pending));
            if released {
                publish.push(route_message("route"));
            }
            return Outcome::Forward { writes, publish };
        }
        let why = result.error.clone().unwrap_or_else(|| "the agent reported a failure".into());
        if result.attempt < self.policy.max_attempts {
            writes.push(Write::TaskRetry(write::TaskRetry {
                attempt: Attempt { request_id, plan_id, task_id: task.id, number: result.attempt },
                reason: format!("attempt {} on {} failed: {why}", result.attempt, result.agent_id),
            }));
            publish.push(route_message("retry"));
            return Outcome::Forward { writes, publish };
        }
        let reason = format!("task {} failed after {} attempts; the last: {why}", task.key, result.attempt);
        writes.push(Write::TaskFailed(write::TaskFailed {
            request_id,
            plan_id,
            task_id: task.id,
            reason: reason.clone(),
            cancelled: stored.plan.dependents_of(task.id),
        }));
        writes.push(Write::PlanFinished(write::PlanFinished { request_id, plan_id, failure: Some(reason) }));
        Outcome::Forward { writes, publish }
    }

    fn dead_letter_fails_request(&self) -> bool {
        false
    }
}

impl Track {
    /// What the tokens that `result` reports cost, when its task went to an external provider
    /// by the plan's `decision`. A provider no longer configured has no prices: its use is
    /// recorded at no cost rather than not at all, so that the tokens stay on record.
    fn quota_used(
        &self,
        result: &TaskResult,
        decision: Option<&FallbackDecision>,
        request_id: crate::model::ids::RequestId,
        now: DateTime<Utc>,
    ) -> Option<Write> {
        let usage = result.usage?;
        let decision = decision.filter(|d| d.external_tasks().contains(&result.task_id))?;
        let provider = decision.provider()?.to_owned();
        let cost_micros = self.fallback.provider(&provider).map_or(0, |p| {
            let tokens = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            p.cost_micros(tokens(usage.input_tokens), tokens(usage.output_tokens))
        });
        Some(Write::QuotaUsed(write::QuotaUsed {
            attempt: Attempt {
                request_id,
                plan_id: result.plan_id,
                task_id: result.task_id,
                number: result.attempt,
            },
            provider,
            usage,
            cost_micros,
            // When the agent finished, as it reports it, so that a redelivery charges the same
            // window; but never later than now, so that an agent's clock running ahead cannot
            // charge a window to come.
            used_at: result.finished_at.min(now),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::decisions::providers::{Provider, Window};
    use crate::model::ids::{AgentId, MessageId, RequestId, WorkType};
    use crate::model::wire::TokenUsage;
    use crate::understanding::catalog::Catalog;

    fn stage() -> Track {
        let provider = Provider {
            name: "cloud".into(),
            endpoint: "http://127.0.0.1:9/v1".into(),
            model: "m".into(),
            api_key_env: None,
            price_per_1k_input_tokens_micros: 1_000,
            price_per_1k_output_tokens_micros: 4_000,
            input_tokens_per_task: 2_000,
            output_tokens_per_task: 1_000,
            quota_micros: 1_000_000,
            window: Window::Monthly,
            work_types: BTreeSet::from([WorkType::parse("deployment").unwrap()]),
        };
        Track {
            policy: TrackingPolicy::default(),
            fallback: FallbackPolicy { providers: vec![provider], ..FallbackPolicy::default() },
        }
    }

    /// "Deploy Gitea": 1.prepare dispatched to `llm-cloud` at attempt 1, its result reporting
    /// 1,200 input and 300 output tokens; the plan sends 1.prepare to the provider.
    fn setup(attempt: u32) -> (Inbound<TaskResult>, TrackContext) {
        let catalog = Catalog::default();
        let request = RequestId::random();
        let plan = catalog.plan(request, &catalog.decompose("Deploy Gitea").unwrap()).unwrap();
        let first = plan.tasks()[0].clone();
        let tasks = plan
            .tasks()
            .iter()
            .map(|t| match t.id == first.id {
                true => TaskState {
                    status: TaskStatus::Dispatched,
                    attempt: 1,
                    agent_id: Some("llm-cloud".to_owned()),
                    ..TaskState::pending(t)
                },
                false => TaskState::pending(t),
            })
            .collect();
        let decision = FallbackDecision::External {
            plan_id: plan.id,
            provider: "cloud".into(),
            tasks: vec![first.id],
            reason: String::new(),
            complexity: 0.5,
            cost_micros: 6_000,
            quota_left_micros: 994_000,
        };
        let result = TaskResult {
            plan_id: plan.id,
            task_id: first.id,
            attempt,
            agent_id: AgentId::parse("llm-cloud").unwrap(),
            success: true,
            output: "done".into(),
            error: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            lease_expired: false,
            usage: Some(TokenUsage { input_tokens: 1_200, output_tokens: 300 }),
            simulated: false,
        };
        let input =
            Inbound { message_id: MessageId::random(), request_id: request, priority: 0, payload: result };
        let context = TrackContext {
            plan: Some(StoredPlan { plan, status: PlanStatus::Approved, version: 3 }),
            tasks,
            fallback: Some(decision),
            line: false,
        };
        (input, context)
    }

    #[test]
    fn an_external_result_records_what_its_tokens_cost() {
        let (input, context) = setup(1);
        let Outcome::Forward { writes, publish } = stage().decide(&input, context, Utc::now()) else {
            panic!()
        };
        // 1,200 × 1,000 / 1,000 + 300 × 4,000 / 1,000.
        assert!(
            matches!(&writes[1], Write::QuotaUsed(write::QuotaUsed { cost_micros: 2_400, provider, attempt: Attempt { number: 1, .. }, .. }) if provider == "cloud"),
            "{writes:?}"
        );
        assert_eq!(publish.len(), 1, "the next wave is released");
    }

    #[test]
    fn a_late_result_is_still_paid_for_and_changes_nothing_else() {
        let (input, mut context) = setup(1);
        context.tasks[0].attempt = 2;
        let Outcome::Forward { writes, publish } = stage().decide(&input, context, Utc::now()) else {
            panic!()
        };
        assert!(
            matches!(writes.as_slice(), [Write::QuotaUsed(write::QuotaUsed { cost_micros: 2_400, .. })]),
            "{writes:?}"
        );
        assert!(publish.is_empty());
    }

    #[test]
    fn tokens_are_used_when_the_agent_finished_but_never_after_now() {
        let (mut input, context) = setup(1);
        let now = Utc::now();
        let used_at = |input: &Inbound<TaskResult>, context| match stage().decide(input, context, now) {
            Outcome::Forward { writes, .. } => writes.into_iter().find_map(|w| match w {
                Write::QuotaUsed(write::QuotaUsed { used_at, .. }) => Some(used_at),
                _ => None,
            }),
            other => panic!("{other:?}"),
        };
        input.payload.finished_at = now - chrono::Duration::minutes(5);
        assert_eq!(used_at(&input, context.clone()), Some(now - chrono::Duration::minutes(5)));
        input.payload.finished_at = now + chrono::Duration::hours(1);
        assert_eq!(used_at(&input, context), Some(now), "an agent's clock ahead charges no later window");
    }

    #[test]
    fn tokens_of_a_local_task_cost_nothing() {
        let (input, mut context) = setup(1);
        let Some(FallbackDecision::External { tasks, .. }) = context.fallback.as_mut() else { panic!() };
        tasks.clear();
        let Outcome::Forward { writes, .. } = stage().decide(&input, context, Utc::now()) else { panic!() };
        assert!(!writes.iter().any(|w| matches!(w, Write::QuotaUsed(write::QuotaUsed { .. }))), "{writes:?}");
    }
}
