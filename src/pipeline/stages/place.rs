//! place: a wake-up → the tasks waiting in line placed on the agents that have room, in the
//! order of the line (priority, then turn, then how long they have waited), across every plan; a
//! task that no agent can take yet keeps its place, and the ones behind it may pass it for agents
//! it cannot use (the store reads past such tasks, however many head the line). A task that has waited longer than allowed gives up: its routing decision
//! chooses no agent, with every candidate's verdict, and its plan fails.
//!
//! Wake-ups come when room may have opened (a result or an expired lease freed a slot, an agent
//! came, returned or grew), when tasks join the line, and every few seconds while any task waits,
//! as a safety net for a wake-up lost on the way. They carry nothing but their cause: each one
//! is a fresh look at the line, and those that find nothing to do cost two reads.

use std::collections::HashSet;

use chrono::{DateTime, TimeDelta, Utc};

use super::placement::{self, External, Routed};
use super::{AmqpMeta, Inbound, NoRequest, Outcome, Stage};
use crate::decisions::routing::{self, Placement, Router, RoutingPolicy};
use crate::model::domain::Agent;
use crate::model::effect::{Attempt, Write, write};
use crate::model::ids::PlanId;
use crate::model::wire::{self, Wake};
use crate::store::{self, Store, WaitingTask};

pub struct Place {
    pub policy: RoutingPolicy,
}

/// The fleet, the head of the line, and what the tasks there need besides.
#[derive(Debug, Default)]
pub struct PlaceContext {
    pub agents: Vec<Agent>,
    /// The first waiting tasks that an agent could take now, in the order they are served.
    pub line: Vec<WaitingTask>,
    /// Tasks that have waited longer than allowed, the longest first.
    pub expired: Vec<WaitingTask>,
}

/// Every wake-up of this process takes its turn: two looks at the line at once would both
/// offer its head the same slot, and one would only lose the race and look again.
const ONE_LINE: uuid::Uuid = uuid::Uuid::from_u128(0x7061_6365_2d6c_696e_6500_0000_0000_0001);

/// The most tasks that give up in one look.
const EXPIRED_PER_LOOK: i64 = 100;

impl Place {
    /// How many tasks of the line to read: enough to fill every free slot even when most of the
    /// head cannot use it, never the whole of a long line; none when no live agent has room
    /// (most wake-ups: another look took the slot first). A task in line whose agents vanished
    /// meanwhile goes to its default agent at the next look with room.
    fn look_ahead(&self, agents: &[Agent], now: DateTime<Utc>) -> i64 {
        let ttl = TimeDelta::try_seconds(i64::try_from(self.policy.heartbeat_ttl_secs).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX);
        let free: u64 = agents
            .iter()
            .filter(|a| now.signed_duration_since(a.last_heartbeat) <= ttl)
            .map(|a| u64::from(a.capacity.saturating_sub(a.in_flight)))
            .sum();
        match free {
            0 => 0,
            free => free.saturating_mul(8).clamp(16, 500) as i64,
        }
    }
}

impl Stage for Place {
    type Input = Wake;
    type Request = NoRequest;
    type Context = PlaceContext;
    const NAME: &'static str = "place";

    fn parse(
        &self,
        body: &[u8],
        _amqp: &AmqpMeta<'_>,
        limit: usize,
    ) -> Result<Inbound<Wake, NoRequest>, wire::Error> {
        let wake = wire::parse_wake(body, limit)?;
        Ok(Inbound { message_id: wake.message_id, request_id: NoRequest, priority: 0, payload: wake })
    }

    async fn load(
        &self,
        store: &Store,
        _input: &Inbound<Wake, NoRequest>,
    ) -> Result<PlaceContext, store::Error> {
        // Reads that do not depend on each other go at once, each on a connection of its own:
        // a look at the line is on the path from a freed slot to the next task on it.
        let (agents, expired) = tokio::try_join!(store.agents(), async {
            match self.policy.max_wait_secs {
                0 => Ok(Vec::new()),
                max => store.expired_waits(max, EXPIRED_PER_LOOK).await,
            }
        })?;
        let defaulted: Vec<&str> = self.policy.default_agents.keys().map(|w| w.as_str()).collect();
        let ttl = self.policy.heartbeat_ttl_secs;
        let line = match self.look_ahead(&agents, Utc::now()) {
            0 => Vec::new(),
            look_ahead => store.line(look_ahead, &defaulted, ttl).await?,
        };
        Ok(PlaceContext { agents, line, expired })
    }

    fn decide(&self, input: &Inbound<Wake, NoRequest>, context: PlaceContext, now: DateTime<Utc>) -> Outcome {
        let mut router = Router::new(&context.agents, now, &self.policy);
        let mut writes = Vec::new();
        let mut publish = Vec::new();

        // Those that waited too long first: they give up, and their plans end.
        let max_wait = TimeDelta::try_seconds(i64::try_from(self.policy.max_wait_secs).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX);
        let mut ended: HashSet<PlanId> = HashSet::new();
        for waiting in &context.expired {
            let waited = now.signed_duration_since(waiting.waiting_since);
            // One task that gives up ends its plan, which cancels the plan's other waiting tasks.
            if self.policy.max_wait_secs == 0 || waited < max_wait || ended.contains(&waiting.plan_id) {
                continue;
            }
            let (task, outside) = adapted(waiting);
            let ask =
                placement::ask(&task, waiting.attempt, outside.as_ref(), Some(&waiting.failed), &self.policy);
            let candidates = router.judge(&task, ask);
            let reason = format!(
                "waited {} for an agent, longer than the {} allowed ({}): {}",
                span(waited),
                span(max_wait),
                "routing.max_wait_secs",
                routing::waiting_reason(&candidates)
            );
            writes.push(Write::WaitExpired(write::WaitExpired {
                attempt: Attempt {
                    request_id: waiting.request_id,
                    plan_id: waiting.plan_id,
                    task_id: task.id,
                    number: waiting.attempt,
                },
                decision_id: task.id.decision_id(waiting.attempt),
                reason: reason.clone(),
                candidates,
                ready_at: waiting.waiting_since,
            }));
            if ended.insert(waiting.plan_id) {
                writes.push(Write::PlanFinished(write::PlanFinished {
                    request_id: waiting.request_id,
                    plan_id: waiting.plan_id,
                    failure: Some(format!("task {} {reason}", task.key)),
                }));
            }
        }

        let mut waiting = 0;
        for entry in context.line.iter().filter(|w| !ended.contains(&w.plan_id)) {
            let (task, outside) = adapted(entry);
            let ask =
                placement::ask(&task, entry.attempt, outside.as_ref(), Some(&entry.failed), &self.policy);
            match router.place(&task, ask) {
                Placement::Routed(route) => {
                    let (write, mut message) = Routed {
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
                    // Sent for its request, not for the wake-up: its dispatch continues the
                    // request's trace.
                    message.traceparent = entry.traceparent.clone();
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

    fn contention_key(&self, _input: &Inbound<Wake, NoRequest>) -> Option<uuid::Uuid> {
        Some(ONE_LINE)
    }

    /// A wake-up belongs to no request.
    fn dead_letter_fails_request(&self) -> bool {
        false
    }

    /// Most wake-ups find nothing to place (another look took the slot first), and deciding one
    /// again on a redelivery places what fits then, as any wake-up would.
    fn records_ignored(&self) -> bool {
        false
    }
}

/// A waiting task as its agents would take it (adapted, if it goes out), and where it goes out.
fn adapted(waiting: &WaitingTask) -> (crate::model::domain::Task, Option<External>) {
    match &waiting.provider {
        Some(provider) => {
            let outside = External::to_provider(provider, [waiting.task.id]);
            (outside.adapt(&waiting.task), Some(outside))
        }
        None => (waiting.task.clone(), None),
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

#[cfg(test)]
mod tests {
    use crate::pipeline::topology::StageQueue;
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::domain::{Resources, Task};
    use crate::model::ids::{AgentId, MessageId, RequestId, WorkType};
    use crate::pipeline::stages::Destination;

    fn agent(id: &str, capacity: u32, in_flight: u32) -> Agent {
        Agent {
            id: AgentId::parse(id).unwrap(),
            capabilities: BTreeSet::from(["deployment".to_owned()]),
            capacity,
            in_flight,
            labels: BTreeMap::new(),
            resources: Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 },
            last_heartbeat: Utc::now(),
            succeeded: 0,
            failed: 0,
        }
    }

    /// A waiting first attempt of a one-task plan, waiting for `secs`.
    fn waiting(key: &str, priority: u8, secs: i64, capability: &str) -> WaitingTask {
        let request_id = RequestId::random();
        let plan_id = request_id.plan_id();
        WaitingTask {
            request_id,
            plan_id,
            task: Task {
                id: plan_id.task_id(key),
                key: key.into(),
                work_type: WorkType::parse("deployment").unwrap(),
                description: key.into(),
                estimated_duration_secs: 60,
                resources: Resources::default(),
                capabilities: BTreeSet::from([capability.to_owned()]),
                depends_on: Vec::new(),
                affinity: BTreeMap::new(),
            },
            attempt: 1,
            priority,
            waiting_since: Utc::now() - TimeDelta::seconds(secs),
            failed: BTreeSet::new(),
            provider: None,
            traceparent: None,
        }
    }

    fn wake() -> Inbound<Wake, NoRequest> {
        let message_id = MessageId::random();
        Inbound {
            message_id,
            request_id: NoRequest,
            priority: 0,
            payload: Wake { message_id, cause: "result".into(), at: Utc::now() },
        }
    }

    fn place(max_wait_secs: u64) -> Place {
        Place { policy: RoutingPolicy { max_wait_secs, ..RoutingPolicy::default() } }
    }

    fn routed_keys(outcome: &Outcome) -> Vec<String> {
        let Outcome::Forward { writes, .. } = outcome else { panic!("{outcome:?}") };
        writes
            .iter()
            .filter_map(|w| match w {
                Write::Route(write::Route { route, .. }) => Some(route.task_id),
                _ => None,
            })
            .map(|id| id.to_string())
            .collect()
    }

    #[test]
    fn the_free_slots_go_to_the_head_of_the_line_and_those_behind_may_pass_a_task_that_cannot_use_them() {
        // The line as the store orders it: the GPU task first, which no agent can take.
        let line = vec![
            waiting("gpu", 9, 50, "gpu-transcode"),
            waiting("first", 5, 40, "deployment"),
            waiting("second", 5, 30, "deployment"),
            waiting("third", 5, 20, "deployment"),
        ];
        let ids: Vec<String> = line.iter().map(|w| w.task.id.to_string()).collect();
        let context = PlaceContext { agents: vec![agent("a1", 2, 0)], line, ..Default::default() };
        let now = Utc::now();
        let outcome = place(86_400).decide(&wake(), context, now);
        assert_eq!(routed_keys(&outcome), [ids[1].clone(), ids[2].clone()], "two slots, in line order");
        let Outcome::Forward { writes, publish } = outcome else { unreachable!() };
        let Write::Route(write::Route { attempt: 1, ready_at, route, .. }) = &writes[0] else { panic!() };
        assert_eq!(route.agent_id.as_str(), "a1");
        assert!(*ready_at < now, "ready since it began to wait");
        assert!(publish.iter().all(|p| p.destination == Destination::Queue(StageQueue::Dispatch)));
        assert_eq!(publish[0].body["payload"]["priority"], 5);
    }

    #[test]
    fn with_no_room_nothing_is_written() {
        let context = PlaceContext {
            agents: vec![agent("a1", 2, 2)],
            line: vec![waiting("t", 0, 5, "deployment")],
            ..Default::default()
        };
        let outcome = place(86_400).decide(&wake(), context, Utc::now());
        let Outcome::Ignore { reason } = outcome else { panic!("{outcome:?}") };
        assert_eq!(reason, "woken (result): 1 waiting at the head of the line, none fits now");
    }

    #[test]
    fn a_task_that_waited_too_long_gives_up_with_every_verdict_and_its_plan_fails() {
        let old = waiting("old", 0, 120, "gpu-transcode");
        let context = PlaceContext {
            agents: vec![agent("a1", 2, 0)],
            line: vec![old.clone()],
            expired: vec![old.clone()],
        };
        let Outcome::Forward { writes, publish } = place(60).decide(&wake(), context, Utc::now()) else {
            panic!()
        };
        assert!(publish.is_empty(), "nothing dispatched");
        let Write::WaitExpired(write::WaitExpired {
            attempt: Attempt { number: 1, .. },
            decision_id,
            reason,
            candidates,
            ..
        }) = &writes[0]
        else {
            panic!("{writes:?}")
        };
        assert_eq!(*decision_id, old.task.id.decision_id(1));
        assert_eq!(candidates.len(), 1);
        assert_eq!(
            reason,
            "waited 2 min for an agent, longer than the 60 s allowed (routing.max_wait_secs): no agent has \
             capability gpu-transcode"
        );
        assert!(
            matches!(&writes[1], Write::PlanFinished(write::PlanFinished { failure: Some(f), .. }) if f.starts_with("task old waited"))
        );
        assert_eq!(writes.len(), 2, "not routed besides: {writes:?}");
        // 0 is for ever.
        let context =
            PlaceContext { agents: vec![agent("a1", 2, 2)], line: vec![old.clone()], expired: vec![old] };
        assert!(matches!(place(0).decide(&wake(), context, Utc::now()), Outcome::Ignore { .. }));
    }

    #[test]
    fn of_two_tasks_of_one_plan_that_waited_too_long_one_gives_up_and_ends_the_plan() {
        let first = waiting("a", 0, 120, "gpu-transcode");
        // The same plan: giving up the first cancels the second, which must not give up too.
        let mut second = waiting("b", 0, 120, "gpu-transcode");
        second.request_id = first.request_id;
        second.plan_id = first.plan_id;
        second.task.id = first.plan_id.task_id("b");
        let context = PlaceContext {
            expired: vec![first.clone(), second.clone()],
            line: vec![first, second],
            ..Default::default()
        };
        let Outcome::Forward { writes, .. } = place(60).decide(&wake(), context, Utc::now()) else {
            panic!()
        };
        assert!(
            matches!(
                writes[..],
                [
                    Write::WaitExpired(write::WaitExpired { .. }),
                    Write::PlanFinished(write::PlanFinished { .. })
                ]
            ),
            "{writes:?}"
        );
    }

    #[test]
    fn a_first_attempt_goes_to_its_default_agent_but_a_retry_waits() {
        let mut policy = RoutingPolicy::default();
        policy
            .default_agents
            .insert(WorkType::parse("deployment").unwrap(), AgentId::parse("deployer").unwrap());
        let stage = Place { policy };
        let first = waiting("first", 0, 5, "deployment");
        let mut retry = waiting("retry", 0, 5, "deployment");
        retry.attempt = 2;
        let context =
            PlaceContext { agents: vec![agent("a1", 1, 1)], line: vec![first, retry], ..Default::default() };
        let Outcome::Forward { writes, .. } = stage.decide(&wake(), context, Utc::now()) else { panic!() };
        assert_eq!(writes.len(), 1, "{writes:?}");
        let Write::Route(write::Route { route, .. }) = &writes[0] else { panic!() };
        assert_eq!(route.agent_id.as_str(), "deployer");
        assert!(!route.reserves_capacity);
    }

    #[test]
    fn the_look_ahead_grows_with_the_free_slots_of_live_agents() {
        let mut silent = agent("silent", 100, 0);
        silent.last_heartbeat = Utc::now() - TimeDelta::minutes(5);
        let stage = place(86_400);
        assert_eq!(stage.look_ahead(&[agent("a", 2, 2), silent.clone()], Utc::now()), 0);
        assert_eq!(stage.look_ahead(&[agent("a", 2, 1)], Utc::now()), 16);
        assert_eq!(stage.look_ahead(&[agent("a", 4, 0)], Utc::now()), 32);
        assert_eq!(stage.look_ahead(&[agent("a", 1000, 0)], Utc::now()), 500);
    }
}
