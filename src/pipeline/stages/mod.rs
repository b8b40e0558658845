//! The stages of the pipeline. Each is a pure function from its input message (plus the context
//! that the runner loads for it) to an [`Outcome`]; [`crate::pipeline::runner`] owns consume, persist,
//! publish and ack for all of them. A new stage is one new file here.

mod decompose;
mod dispatch;
mod fallback;
mod heartbeat;
mod place;
mod placement;
mod plan;
mod route;
mod track;

use std::future::Future;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub use decompose::{Decompose, DecomposeContext, Reading, reused_id};
pub use dispatch::Dispatch;
pub use fallback::Fallback;
pub use heartbeat::{HeartbeatContext, HeartbeatStage};
pub use place::{Place, PlaceContext};
pub(crate) use placement::{External, ask, wake};
pub use plan::PlanStage;
pub use route::Route;
pub use track::{Track, TrackingPolicy};

use crate::model::effect::Write;
use crate::model::ids::{AgentId, MessageId, RequestId};
use crate::model::wire::{self, Envelope};
use crate::pipeline::topology::StageQueue;
use crate::store::{self, Store};

/// A parsed input message, about the request `R` names: a [`RequestId`] for the messages of one
/// request, so that a stage that needs it has it, or [`NoRequest`] (a heartbeat, a wake-up).
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound<T, R = RequestId> {
    /// The idempotency key of this input.
    pub message_id: MessageId,
    pub request_id: R,
    pub priority: u8,
    pub payload: T,
}

/// What an input about no request (a heartbeat, a wake-up of the scheduler) names as its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRequest;

impl From<NoRequest> for Option<RequestId> {
    fn from(_: NoRequest) -> Self {
        None
    }
}

/// An envelope always names a request; a stage whose inputs are about none leaves it aside.
impl From<RequestId> for NoRequest {
    fn from(_: RequestId) -> Self {
        NoRequest
    }
}

impl<T, R> Inbound<T, R> {
    /// What processing this input sends on to `to`, about `request_id`: an envelope caused by
    /// this input, with an id derived from its id and `label` (so that deciding the same input
    /// again sends the very same message), at its priority.
    pub fn forward<P: Serialize>(
        &self,
        to: Destination,
        label: &str,
        request_id: RequestId,
        now: DateTime<Utc>,
        payload: P,
    ) -> Publish {
        Publish::envelope(
            to,
            self.priority,
            &Envelope::derived(self.message_id, label, request_id, now, payload),
        )
    }
}

impl<T> Inbound<T> {
    fn from_envelope(envelope: Envelope<T>, priority: u8) -> Self {
        Inbound {
            message_id: envelope.message_id,
            request_id: envelope.request_id,
            priority,
            payload: envelope.payload,
        }
    }
}

/// Where a published message goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Destination {
    /// A queue of the namespace.
    Queue(StageQueue),
    /// The queue of an agent.
    Agent(AgentId),
}

/// A message a stage wants published. Serializable: it is recorded with the input's idempotency
/// marker so that a redelivered input republishes exactly the same messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    pub destination: Destination,
    pub message_id: MessageId,
    pub priority: u8,
    pub body: serde_json::Value,
    /// The trace this message continues, when not the trace of the message that has it sent (a
    /// wake-up's look at the line places tasks of many requests, each in its request's trace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl Publish {
    pub fn envelope<P: Serialize>(destination: Destination, priority: u8, envelope: &Envelope<P>) -> Self {
        Publish {
            destination,
            message_id: envelope.message_id,
            priority,
            body: serde_json::to_value(envelope).expect("envelopes serialize"),
            traceparent: None,
        }
    }
}

/// What a stage decided about one input.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Persist `writes` (in one transaction, with the idempotency marker), then publish, then ack.
    Forward { writes: Vec<Write>, publish: Vec<Publish> },
    /// Publish into an agent's queue first (mandatory: an absent queue is an error), then persist
    /// `then` once the broker confirmed. If no attempt gets through, the stage's
    /// [`Stage::undeliverable`] writes are persisted and the input is dead-lettered.
    Deliver { publish: Publish, then: Vec<Write> },
    /// A permanent failure: persist `writes` (the failure recorded where users look), then
    /// dead-letter the input with `reason`.
    Reject { writes: Vec<Write>, reason: String },
    /// A message that is not this request's to send (a request id submitted again with another
    /// text): dead-letter the input with `reason`, and leave the request it names as it is.
    Refuse { reason: String },
    /// Nothing to do (a late or duplicate message): log `reason`, mark the input processed, ack.
    Ignore { reason: String },
}

/// One stage of the pipeline.
pub trait Stage: Send + Sync + 'static {
    type Input: serde::de::DeserializeOwned + Send + Sync;
    /// The request an input is about: [`RequestId`], or [`NoRequest`].
    type Request: Copy + From<RequestId> + Into<Option<RequestId>> + Send + Sync;
    /// What `decide` needs from the store; `Default` is what a stage that reads nothing gets.
    type Context: Default + Send;

    /// Names the stage in logs, idempotency markers and the audit log, and picks its queue from
    /// the topology (the queue whose `consumer` it is).
    const NAME: &'static str;

    /// Parses a delivery. Stage-to-stage messages are envelopes; entry points override this.
    fn parse(
        &self,
        body: &[u8],
        amqp: &AmqpMeta<'_>,
        limit: usize,
    ) -> Result<Inbound<Self::Input, Self::Request>, wire::Error> {
        let Inbound { message_id, request_id, priority, payload } = parse_envelope(body, amqp, limit)?;
        Ok(Inbound { message_id, request_id: request_id.into(), priority, payload })
    }

    /// Loads what `decide` needs from the store. The only I/O a stage has, and the runner runs it.
    /// By default a stage reads nothing.
    fn load(
        &self,
        _store: &Store,
        _input: &Inbound<Self::Input, Self::Request>,
    ) -> impl Future<Output = Result<Self::Context, store::Error>> + Send {
        std::future::ready(Ok(Self::Context::default()))
    }

    /// The decision. Pure: no I/O, the time is given.
    fn decide(
        &self,
        input: &Inbound<Self::Input, Self::Request>,
        context: Self::Context,
        now: DateTime<Utc>,
    ) -> Outcome;

    /// What to record, and publish, when an [`Outcome::Deliver`] could not be delivered.
    fn undeliverable(
        &self,
        _input: &Inbound<Self::Input, Self::Request>,
        _reason: &str,
        _now: DateTime<Utc>,
    ) -> (Vec<Write>, Vec<Publish>) {
        (Vec::new(), Vec::new())
    }

    /// Inputs with the same key contend for the same guarded rows (results of one plan, each
    /// guarded by the plan's version). The runner decides such inputs one at a time within its
    /// process: decided together, all but one would lose the race and decide again, over and
    /// over. Other processes still race, and the guard still settles that.
    fn contention_key(&self, _input: &Inbound<Self::Input, Self::Request>) -> Option<uuid::Uuid> {
        None
    }

    /// Whether the runner keeps an idempotency marker per input. Stages whose writes are
    /// idempotent by nature and very frequent (heartbeats) do without.
    fn deduplicates(&self) -> bool {
        true
    }

    /// Whether an [`Outcome::Ignore`] is recorded (a marker) and logged. A stage whose inputs are
    /// often ignored and harmless to decide again (a wake-up that finds nothing to place) says
    /// no: its no-op costs no commit, and no log line.
    fn records_ignored(&self) -> bool {
        true
    }

    /// Whether a dead-lettered input fails the request it belongs to. True where an unusable
    /// message means the request cannot go on; false where it is a stray (a result for a task
    /// that does not exist says nothing about the request's own tasks).
    fn dead_letter_fails_request(&self) -> bool {
        true
    }
}

/// AMQP properties a stage may use when parsing.
#[derive(Debug, Clone, Copy, Default)]
pub struct AmqpMeta<'a> {
    pub message_id: Option<&'a str>,
    pub priority: Option<u8>,
}

/// Parses an envelope carrying `P`. `limit` is the configured limit of what clients send; an
/// envelope may be larger, up to [`wire::MAX_ENVELOPE_BYTES`].
pub(crate) fn parse_envelope<P: serde::de::DeserializeOwned>(
    body: &[u8],
    amqp: &AmqpMeta<'_>,
    limit: usize,
) -> Result<Inbound<P>, wire::Error> {
    let envelope = wire::parse_envelope::<P>(body, limit.max(wire::MAX_ENVELOPE_BYTES))?;
    Ok(Inbound::from_envelope(envelope, amqp.priority.unwrap_or(0)))
}
