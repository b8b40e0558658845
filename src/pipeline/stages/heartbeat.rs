//! heartbeat: an agent's announcement → its row in the agents table (registration or refresh),
//! and a wake-up of the scheduler when tasks wait in line and the agent brings room: it is new,
//! back from silence, or offers more than before.

use chrono::{DateTime, TimeDelta, Utc};

use super::{AmqpMeta, Inbound, NoRequest, Outcome, Stage};
use crate::model::domain::Agent;
use crate::model::effect::{Write, write};
use crate::model::wire::{self, Heartbeat};
use crate::store::{self, Store};

pub struct HeartbeatStage {
    /// An agent silent for longer is presumed gone (the routing's TTL): its next heartbeat brings
    /// it back.
    pub heartbeat_ttl_secs: u64,
}

/// The agent as stored before this heartbeat, and whether tasks wait in line.
#[derive(Debug, Default)]
pub struct HeartbeatContext {
    pub known: Option<Agent>,
    pub line: bool,
}

impl HeartbeatStage {
    /// Whether `beat` offers room that the agent as `known` did not: new, back from silence, a
    /// larger capacity, or other capabilities, resources or labels.
    fn brings_room(&self, beat: &Heartbeat, known: Option<&Agent>, now: DateTime<Utc>) -> bool {
        let Some(known) = known else { return true };
        let ttl = TimeDelta::try_seconds(i64::try_from(self.heartbeat_ttl_secs).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX);
        now.signed_duration_since(known.last_heartbeat) > ttl
            || beat.capacity > known.capacity
            || beat.capabilities != known.capabilities
            || beat.resources != known.resources
            || beat.labels != known.labels
    }
}

impl Stage for HeartbeatStage {
    type Input = Heartbeat;
    type Request = NoRequest;
    type Context = HeartbeatContext;
    const NAME: &'static str = "heartbeat";

    fn parse(
        &self,
        body: &[u8],
        amqp: &AmqpMeta<'_>,
        limit: usize,
    ) -> Result<Inbound<Heartbeat, NoRequest>, wire::Error> {
        let heartbeat = wire::parse_heartbeat(body, limit)?;
        Ok(Inbound {
            message_id: wire::entry_message_id(amqp.message_id, body),
            request_id: NoRequest,
            priority: 0,
            payload: heartbeat,
        })
    }

    async fn load(
        &self,
        store: &Store,
        input: &Inbound<Heartbeat, NoRequest>,
    ) -> Result<HeartbeatContext, store::Error> {
        let (known, line) = store.agent_and_line(&input.payload.agent_id).await?;
        Ok(HeartbeatContext { known, line })
    }

    fn decide(
        &self,
        input: &Inbound<Heartbeat, NoRequest>,
        context: HeartbeatContext,
        now: DateTime<Utc>,
    ) -> Outcome {
        let write = Write::Agent(write::Agent { heartbeat: input.payload.clone(), received_at: now });
        let mut publish = Vec::new();
        if context.line && self.brings_room(&input.payload, context.known.as_ref(), now) {
            publish.push(super::wake(input.message_id, "agent", now));
        }
        Outcome::Forward { writes: vec![write], publish }
    }

    /// An upsert that keeps the latest heartbeat is idempotent, and heartbeats come every few
    /// seconds from every agent: a marker per heartbeat would only grow the table.
    fn deduplicates(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::domain::Resources;
    use crate::model::ids::{AgentId, MessageId};

    fn beat(capacity: u32) -> Inbound<Heartbeat, NoRequest> {
        Inbound {
            message_id: MessageId::random(),
            request_id: NoRequest,
            priority: 0,
            payload: Heartbeat {
                agent_id: AgentId::parse("a1").unwrap(),
                capabilities: ["deployment".to_owned()].into(),
                capacity,
                in_flight: 0,
                labels: BTreeMap::new(),
                resources: Resources { cpu: 4.0, memory_mb: 4096, gpu: 0 },
                sent_at: None,
                every_secs: None,
            },
        }
    }

    fn stored(beat: &Heartbeat, seen: DateTime<Utc>) -> Agent {
        Agent {
            id: beat.agent_id.clone(),
            capabilities: beat.capabilities.clone(),
            capacity: beat.capacity,
            in_flight: 0,
            labels: beat.labels.clone(),
            resources: beat.resources,
            last_heartbeat: seen,
            succeeded: 0,
            failed: 0,
        }
    }

    fn wakes(outcome: Outcome) -> bool {
        let Outcome::Forward { writes, publish } = outcome else { panic!("{outcome:?}") };
        assert!(matches!(writes[..], [Write::Agent(write::Agent { .. })]));
        !publish.is_empty()
    }

    #[test]
    fn an_agent_that_brings_room_wakes_the_line_when_tasks_wait() {
        let stage = HeartbeatStage { heartbeat_ttl_secs: 30 };
        let now = Utc::now();
        let input = beat(2);
        let same = || Some(stored(&input.payload, now - TimeDelta::seconds(5)));
        let context = |known, line| HeartbeatContext { known, line };
        assert!(wakes(stage.decide(&input, context(None, true), now)), "a new agent");
        assert!(!wakes(stage.decide(&input, context(None, false), now)), "nothing waits");
        assert!(!wakes(stage.decide(&input, context(same(), true), now)), "nothing changed");
        let silent = Some(stored(&input.payload, now - TimeDelta::seconds(31)));
        assert!(wakes(stage.decide(&input, context(silent, true), now)), "back from silence");
        assert!(wakes(stage.decide(&beat(3), context(same(), true), now)), "larger");
        assert!(!wakes(stage.decide(&beat(1), context(same(), true), now)), "smaller");
    }
}
