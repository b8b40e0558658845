//! place: a wake-up → the tasks waiting in line placed on the agents that have room, in the
//! order of the line (priority, then turn, then how long they have waited), across every plan; a
//! task that no agent can take yet keeps its place, and the ones behind it may pass it for agents
//! it cannot use. A task that has waited longer than allowed gives up: its routing decision
//! chooses no agent, with every candidate's verdict, and its plan fails.
//!
//! Wake-ups come when room may have opened (a result or an expired lease freed a slot, an agent
//! came, returned or grew), when tasks join the line, and every few seconds while any task waits,
//! as a safety net for a wake-up lost on the way. They carry nothing but their cause: each one
//! is a fresh look at the line, and those that find nothing to do cost two reads.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, TimeDelta, Utc};

use super::placement::{self, External, Routed};
use super::{AmqpMeta, Inbound, Outcome, Stage};
use crate::domain::Agent;
use crate::effect::Write;
use crate::ids::{AgentId, PlanId, TaskId};
use crate::policy::FallbackDecision;
use crate::routing::{self, Placement, Router, RoutingPolicy};
use crate::store::{self, Store, WaitingTask};
use crate::wire::{self, Wake};

pub struct Place {
    pub policy: RoutingPolicy,
}

/// The fleet, the head of the line, and what the tasks there need besides.
#[derive(Debug, Default)]
pub struct PlaceContext {
    pub agents: Vec<Agent>,
    /// The first waiting tasks, in the order they are served.
    pub line: Vec<WaitingTask>,
    /// Tasks that have waited longer than allowed, the longest first.
    pub expired: Vec<WaitingTask>,
    /// The agents that failed each of these tasks before.
    pub failed: HashMap<TaskId, BTreeSet<AgentId>>,
    /// The fallback decisions of their plans that send work out.
    pub external: Vec<FallbackDecision>,
}

/// Every wake-up of this process takes its turn: two looks at the line at once would both
/// offer its head the same slot, and one would only lose the race and look again.
const ONE_LINE: uuid::Uuid = uuid::Uuid::from_u128(0x7061_6365_2d6c_696e_6500_0000_0000_0001);

/// The most tasks that give up in one look.
const EXPIRED_PER_LOOK: i64 = 100;

impl Place {
    /// How many tasks of the line to read: enough to fill every free slot even when most of the
    /// head cannot use it, never the whole of a long line.
    fn look_ahead(&self, agents: &[Agent], now: DateTime<Utc>) -> i64 {
        let ttl = TimeDelta::try_seconds(i64::try_from(self.policy.heartbeat_ttl_secs).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX);
        let free: u64 = agents
            .iter()
            .filter(|a| now.signed_duration_since(a.last_heartbeat) <= ttl)
            .map(|a| u64::from(a.capacity.saturating_sub(a.in_flight)))
            .sum();
        (free.saturating_mul(8)).clamp(16, 500) as i64
    }
}

impl Stage for Place {
    type Input = Wake;
    type Context = PlaceContext;
    const NAME: &'static str = "place";

    fn parse(&self, body: &[u8], _amqp: &AmqpMeta<'_>, limit: usize) -> Result<Inbound<Wake>, wire::Error> {
        let wake = wire::parse_wake(body, limit)?;
        Ok(Inbound { message_id: wake.message_id, request_id: None, priority: 0, payload: wake })
    }

    async fn load(&self, store: &Store, _input: &Inbound<Wake>) -> Result<PlaceContext, store::Error> {
        let agents = store.agents().await?;
        let line = store.line(self.look_ahead(&agents, Utc::now())).await?;
        let expired = match self.policy.max_wait_secs {
            0 => Vec::new(),
            max => store.expired_waits(max, EXPIRED_PER_LOOK).await?,
        };
        let tasks: Vec<TaskId> = line.iter().chain(&expired).map(|w| w.task.id).collect();
        let plans: Vec<PlanId> =
            line.iter().chain(&expired).map(|w| w.plan_id).collect::<BTreeSet<_>>().into_iter().collect();
        let (failed, external) = if tasks.is_empty() {
            (HashMap::new(), Vec::new())
        } else {
            (store.failed_agents_of(&tasks).await?, store.external_decisions(&plans).await?)
        };
        Ok(PlaceContext { agents, line, expired, failed, external })
    }

    fn decide(&self, input: &Inbound<Wake>, context: PlaceContext, now: DateTime<Utc>) -> Outcome {
        let external: HashMap<PlanId, External> =
            (context.external.iter()).filter_map(|d| External::of(Some(d)).map(|e| (d.plan_id, e))).collect();
        let mut router = Router::new(&context.agents, now, &self.policy);
        let mut writes = Vec::new();
        let mut publish = Vec::new();

        // Those that waited too long first: they give up, and their plans end.
        let max_wait = TimeDelta::try_seconds(i64::try_from(self.policy.max_wait_secs).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX);
        let mut ended: HashSet<PlanId> = HashSet::new();
        for waiting in &context.expired {
            let waited = now.signed_duration_since(waiting.waiting_since);
            if self.policy.max_wait_secs == 0 || waited < max_wait {
                continue;
            }
            let outside = external.get(&waiting.plan_id);
            let task = outside.map_or_else(|| waiting.task.clone(), |e| e.adapt(&waiting.task));
            let failed = context.failed.get(&task.id);
            let candidates =
                router.judge(&task, placement::ask(&task, waiting.attempt, outside, failed, &self.policy));
            let reason = format!(
                "waited {} for an agent, longer than the {} allowed ({}): {}",
                span(waited),
                span(max_wait),
                "routing.max_wait_secs",
                routing::waiting_reason(&candidates)
            );
            writes.push(Write::WaitExpired {
                request_id: waiting.request_id,
                plan_id: waiting.plan_id,
                task_id: task.id,
                attempt: waiting.attempt,
                decision_id: task.id.decision_id(waiting.attempt),
                reason: reason.clone(),
                candidates,
                ready_at: waiting.waiting_since,
            });
            if ended.insert(waiting.plan_id) {
                writes.push(Write::PlanFinished {
                    request_id: waiting.request_id,
                    plan_id: waiting.plan_id,
                    failure: Some(format!("task {} {reason}", task.key)),
                });
            }
        }

        let mut waiting = 0;
        for entry in context.line.iter().filter(|w| !ended.contains(&w.plan_id)) {
            let outside = external.get(&entry.plan_id);
            let task = outside.map_or_else(|| entry.task.clone(), |e| e.adapt(&entry.task));
            let failed = context.failed.get(&task.id);
            let ask = placement::ask(&task, entry.attempt, outside, failed, &self.policy);
            match router.place(&task, ask) {
                Placement::Routed(route) => {
                    let (write, message) = Routed {
                        cause: input.message_id,
                        request_id: entry.request_id,
                        plan_id: entry.plan_id,
                        priority: entry.priority,
                        attempt: entry.attempt,
                        task: &task,
                        route,
                        ready_at: entry.waiting_since,
                    }
                    .into_effects(now);
                    writes.push(write);
                    publish.push(message);
                }
                Placement::Waits(_) => waiting += 1,
            }
        }
        if writes.is_empty() {
            return Outcome::Ignore {
                reason: format!(
                    "woken ({}): {waiting} waiting at the head of the line, none fits now",
                    input.payload.cause
                ),
            };
        }
        Outcome::Forward { writes, publish }
    }

    fn contention_key(&self, _input: &Inbound<Wake>) -> Option<uuid::Uuid> {
        Some(ONE_LINE)
    }

    /// A wake-up belongs to no request.
    fn dead_letter_fails_request(&self) -> bool {
        false
    }
}

/// A duration in the largest unit that says it: "90 s", "12 min", "26 h".
fn span(d: TimeDelta) -> String {
    let secs = d.num_seconds().max(0);
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        _ => format!("{} h", secs / 3600),
    }
}
