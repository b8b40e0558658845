//! heartbeat: an agent's announcement → its row in the agents table (registration or refresh).

use chrono::{DateTime, Utc};

use super::{AmqpMeta, Inbound, Outcome, Stage};
use crate::effect::Write;
use crate::wire::{self, Heartbeat};

pub struct HeartbeatStage;

impl Stage for HeartbeatStage {
    type Input = Heartbeat;
    type Context = ();
    const NAME: &'static str = "heartbeat";

    fn parse(
        &self,
        body: &[u8],
        amqp: &AmqpMeta<'_>,
        limit: usize,
    ) -> Result<Inbound<Heartbeat>, wire::Error> {
        let heartbeat = wire::parse_heartbeat(body, limit)?;
        Ok(Inbound {
            message_id: wire::entry_message_id(amqp.message_id, body),
            request_id: None,
            priority: 0,
            payload: heartbeat,
        })
    }

    fn decide(&self, input: &Inbound<Heartbeat>, _: (), now: DateTime<Utc>) -> Outcome {
        let write = Write::Agent { heartbeat: input.payload.clone(), received_at: now };
        Outcome::Forward { writes: vec![write], publish: Vec::new() }
    }

    /// An upsert that keeps the latest heartbeat is idempotent, and heartbeats come every few
    /// seconds from every agent: a marker per heartbeat would only grow the table.
    fn deduplicates(&self) -> bool {
        false
    }
}
