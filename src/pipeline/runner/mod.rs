//! The one loop that runs every stage: consume → parse → load → decide → persist → publish →
//! ack. It owns delivery semantics so that stages do not have to:
//!
//! - an input is acknowledged only after its writes committed and its outputs were confirmed;
//! - a redelivered input finds its idempotency marker and republishes the recorded outputs
//!   (same message ids) instead of deciding again;
//! - a permanent failure is recorded in `dead_letters` and published to `<namespace>.dead` with
//!   its reason in a header, then acknowledged: never a crash, never a silent drop;
//! - a transient failure is retried in process with backoff, then parked in the queue's retry
//!   queue (the broker brings it back after a delay), and if even that fails, requeued;
//! - outputs that no queue takes (the next stage's queue was deleted, or the namespace is wrong)
//!   are a transient failure: the input waits for the queue, it is never acknowledged and lost;
//! - a panic in a stage's `parse` or `decide` is a permanent failure of that message only;
//! - writes are committed in batches: each message's writes, all or nothing, share one
//!   transaction and one commit with the other messages decided meanwhile, and each message is
//!   published and acknowledged only after that commit;
//! - when the broker connection or the publishing channel is gone, the runner stops, so that the
//!   worker connects again instead of parking and requeueing in vain.
//!
//! Here: the loop, from a delivery to its acknowledgement; the batches of writes in `committer`,
//! dead letters and parking in `failure`, the span of each handling (which carries the message's
//! trace on to what it sends) and the log lines of requests' state changes in `spans`, and the
//! check that the consumer still receives in `watchdog`.

mod committer;
mod failure;
mod spans;
mod watchdog;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use self::committer::Committer;
use self::failure::{Failure, describe, sniff_ids};
use self::spans::StateChanges;
use self::watchdog::Activity;
use crate::backoff;
use crate::broker::{self, Broker, Incoming, Outgoing};
use crate::model::effect::Write;
use crate::model::wire;
use crate::pipeline::stages::{AmqpMeta, Destination, Inbound, Outcome, Publish, Stage};
use crate::pipeline::topology::{Names, Topology};
use crate::store::{Applied, Delivery, Marker, Store};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{StageLabels, StageOutcome, metrics};
use crate::telemetry::trace;

/// How a runner behaves. Every field has a sensible default.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Settings {
    /// Deliveries in flight per stage consumer (AMQP prefetch), processed concurrently. A batch
    /// of writes holds at most half of it (and 64), so that the next batch gathers while the one
    /// before commits. The default, 128, is that; 50 left the committers
    /// waiting for deliveries (BENCHMARKS.md: 13 % fewer requests per second), 256 doubled a
    /// worker's memory for a few percent more.
    pub prefetch: u16,
    /// Largest accepted request or heartbeat body, in bytes. Messages between stages may be
    /// larger, up to [`wire::MAX_ENVELOPE_BYTES`] (or this, if larger).
    pub max_payload_bytes: usize,
    /// Publish attempts into an agent's queue before a task is `dispatch_failed`.
    pub dispatch_attempts: usize,
    /// In-process attempts on a transient failure before the message is parked for a retry.
    pub transient_attempts: usize,
    /// Base delay between attempts, in milliseconds; doubled each time, with jitter.
    pub retry_base_delay_ms: u64,
    /// How long a consumer may go without a delivery, holding none, while messages wait in its
    /// queue, before it is taken for stalled and the worker connects again (seconds; 0: never).
    pub stall_after_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            prefetch: 128,
            max_payload_bytes: wire::DEFAULT_MAX_PAYLOAD_BYTES,
            dispatch_attempts: 3,
            transient_attempts: 3,
            retry_base_delay_ms: 100,
            stall_after_secs: 60,
        }
    }
}

impl Settings {
    fn backoff(&self, attempts: usize) -> ExponentialBuilder {
        backoff::exponential(
            Duration::from_millis(self.retry_base_delay_ms),
            Duration::from_secs(5),
            attempts,
        )
    }
}

/// Why a runner stopped before being asked to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error("the topology has no queue consumed by stage {0}")]
    NoQueue(&'static str),
    /// The delivery stream ended or failed: the broker cancelled the consumer (its queue was
    /// deleted, say) or closed its channel or connection.
    #[error("the consumer of {0} stopped: the broker cancelled it or closed its channel")]
    ConsumerEnded(String),
    #[error("the broker connection or its publishing channel is closed")]
    BrokerBroken,
    /// Messages waited in the queue while the consumer received nothing: the broker or the
    /// client lost track of it without closing anything.
    #[error("the consumer of {0} stopped receiving while messages waited")]
    ConsumerStalled(String),
}

/// How many times a stage decides again after a guarded write lost a race.
const MAX_DECISION_ROUNDS: usize = 8;

/// How long a stopping runner goes on handling the deliveries that the broker sent before it
/// took the consumer's cancellation in.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Runs one stage against its queue.
pub struct Runner<S: Stage> {
    stage: Arc<S>,
    broker: Arc<Broker>,
    store: Store,
    settings: Settings,
    queue: String,
    retry_queue: Option<String>,
    turns: Turns,
    activity: Activity,
    committer: Committer,
    health: Health,
}

/// Turns for inputs that contend (see [`Stage::contention_key`]): a fixed set of locks, a key
/// taking the one its hash picks. Bounded whatever the number of keys; two keys sharing a lock
/// only wait for each other, which is rare with far more locks than inputs in flight.
struct Turns {
    locks: Box<[tokio::sync::Mutex<()>]>,
}

impl Turns {
    const LOCKS: usize = 256;

    fn new() -> Self {
        Turns { locks: (0..Self::LOCKS).map(|_| tokio::sync::Mutex::new(())).collect() }
    }

    async fn take(&self, key: uuid::Uuid) -> tokio::sync::MutexGuard<'_, ()> {
        let (high, low) = key.as_u64_pair();
        // Ids are random (v4) or hashes (v5): any of their bits spread well.
        let index = ((high ^ low) % self.locks.len() as u64) as usize;
        self.locks[index].lock().await
    }
}

impl<S: Stage> Runner<S> {
    /// A runner for `stage`, on the queue that the (resolved) `topology` gives it.
    pub fn new(
        stage: S,
        broker: Arc<Broker>,
        store: Store,
        topology: &Topology,
        settings: Settings,
    ) -> Result<Self, Error> {
        let queue = topology.queue_of(S::NAME).ok_or(Error::NoQueue(S::NAME))?.name.clone();
        let retry_queue = topology.retry_queue_of(&queue).map(|q| q.name.clone());
        Ok(Runner {
            stage: Arc::new(stage),
            committer: Committer::new(
                S::NAME,
                store.clone(),
                broker.clone(),
                committer::max_batch(settings.prefetch),
            ),
            broker,
            store,
            settings,
            queue,
            retry_queue,
            turns: Turns::new(),
            activity: Activity::new(),
            health: Health::new(),
        })
    }

    /// Reports to `health` while it consumes (a process is ready only while its consumers are).
    pub fn reporting_to(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Consumes until `shutdown` is cancelled (then finishes the deliveries in hand and returns
    /// `Ok`), or the consumer fails or the broker connection breaks (then returns the error, and
    /// the unacknowledged deliveries go back to the queue when the channel closes).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        // The subscription keeps the consumer's channel open until the end of this function, after
        // the deliveries in hand were settled: their acknowledgements go on that channel.
        let (subscription, deliveries) = self.broker.subscribe(&self.queue, self.settings.prefetch).await?;
        info!(stage = S::NAME, queue = %self.queue, prefetch = self.settings.prefetch, "stage consuming");
        let receiving = self.health.consuming();
        // Cancelled by `handle` when the broker is found broken; a child, so shutdown stops too.
        let broken = shutdown.child_token();
        // On stopping, the broker is asked for no more deliveries; those it sent before it took
        // that in are still handled, for a while, then the stream is cut (what is left unacked
        // goes back to the queue when the channel closes).
        let stopped = async {
            broken.cancelled().await;
            // Bounded: a stalled consumer's channel may never answer.
            match tokio::time::timeout(STOP_GRACE, subscription.cancel()).await {
                Ok(Ok(())) => tokio::time::sleep(STOP_GRACE).await,
                Ok(Err(err)) => debug!(stage = S::NAME, error = %err, "cannot cancel the consumer"),
                Err(_) => debug!(stage = S::NAME, "the consumer's cancellation went unanswered"),
            }
        };
        let this = &self;
        let consuming = deliveries
            .take_until(stopped)
            .take_while(|delivery| {
                if let Err(err) = delivery {
                    error!(stage = S::NAME, error = %err, "consumer failed");
                }
                std::future::ready(delivery.is_ok())
            })
            .filter_map(|delivery| std::future::ready(delivery.ok()))
            .for_each_concurrent(usize::from(self.settings.prefetch.max(1)), |delivery| {
                this.handle(delivery, &broken)
            });
        // The committer never stops on its own (nor does the watchdog): it is dropped once every
        // delivery was handled.
        let committing = this.committer.run();
        let stall = std::sync::atomic::AtomicBool::new(false);
        tokio::select! {
            () = consuming => {}
            () = committing => {}
            () = this.watch(&broken, &stall) => {}
        }
        drop(receiving);
        subscription.close().await;
        if shutdown.is_cancelled() {
            info!(stage = S::NAME, "stage stopped");
            Ok(())
        } else if stall.load(std::sync::atomic::Ordering::SeqCst) {
            Err(Error::ConsumerStalled(self.queue.clone()))
        } else if broken.is_cancelled() {
            Err(Error::BrokerBroken)
        } else {
            Err(Error::ConsumerEnded(self.queue.clone()))
        }
    }

    async fn handle(&self, delivery: Incoming, broken: &CancellationToken) {
        let span = spans::handling(S::NAME, &delivery.headers);
        self.activity.received();
        let started = std::time::Instant::now();
        async {
            let handled = self.handle_one(&delivery).await;
            self.activity.settled();
            metrics()
                .handling
                .get_or_create(&StageLabels { stage: S::NAME })
                .observe(started.elapsed().as_secs_f64());
            // A transient failure may be the publishing channel closed (a channel error is final)
            // or the connection lost: then every later publish fails too, parking included, and
            // messages would only go round. Only a new connection helps: stop, and the worker
            // reconnects.
            if handled == Handled::Deferred && !broken.is_cancelled() && !self.broker.is_healthy() {
                error!("the broker connection or publishing channel is closed; stopping to reconnect");
                broken.cancel();
            }
        }
        .instrument(span)
        .await
    }

    /// Processes one delivery and settles it.
    async fn handle_one(&self, delivery: &Incoming) -> Handled {
        let amqp = AmqpMeta { message_id: delivery.message_id.as_deref(), priority: delivery.priority };
        let limit = self.settings.max_payload_bytes;
        let parsed = catch_panic(|| self.stage.parse(&delivery.body, &amqp, limit))
            .and_then(|parsed| parsed.map_err(|err| err.to_string()));
        let input = match parsed {
            Ok(input) => input,
            Err(reason) => {
                let (sniffed_id, request_id) = sniff_ids(&delivery.body);
                let message_id =
                    sniffed_id.unwrap_or_else(|| wire::entry_message_id(amqp.message_id, &delivery.body));
                tracing::Span::current().record("message_id", tracing::field::display(message_id));
                spans::describe(&tracing::Span::current(), request_id, &delivery.body);
                return self
                    .dead_letter(
                        delivery,
                        message_id,
                        request_id,
                        (&reason, "unreadable"),
                        self.stage.dead_letter_fails_request(),
                    )
                    .await;
            }
        };
        tracing::Span::current().record("message_id", tracing::field::display(input.message_id));
        spans::describe(&tracing::Span::current(), input.request_id.into(), &delivery.body);
        let key = self.stage.contention_key(&input);
        let attempt = || async {
            let turn = match key {
                Some(key) => Some(self.turns.take(key).await),
                None => None,
            };
            self.process(&input, turn).await
        };
        let result = attempt
            .retry(self.settings.backoff(self.settings.transient_attempts))
            .when(|f| matches!(f, Failure::Transient(_)))
            .notify(|f, wait| {
                metrics().retries.get_or_create(&StageLabels { stage: S::NAME }).inc();
                warn!(error = %f, ?wait, "transient failure, retrying")
            })
            .await;
        let (message_id, request_id) = (input.message_id, input.request_id.into());
        let fails_request = self.stage.dead_letter_fails_request();
        match result {
            Ok(finished) => {
                self.count(finished.label());
                self.settle(delivery.ack().await)
            }
            Err(Failure::Permanent(reason)) => {
                self.dead_letter(delivery, message_id, request_id, (&reason, "permanent"), fails_request)
                    .await
            }
            Err(Failure::Undeliverable(reason)) => {
                let reason = (&reason[..], "undeliverable");
                self.dead_letter(delivery, message_id, request_id, reason, fails_request).await
            }
            Err(Failure::Refused(reason)) => {
                self.dead_letter(delivery, message_id, request_id, (&reason, "refused"), false).await
            }
            Err(Failure::Transient(reason)) => self.park(delivery, &reason).await,
        }
    }

    /// Counts a message handled, by how its handling ended.
    fn count(&self, outcome: &'static str) {
        metrics().messages.get_or_create(&StageOutcome { stage: S::NAME, outcome }).inc();
    }

    fn settle(&self, result: Result<(), broker::Error>) -> Handled {
        match result {
            Ok(()) => Handled::Settled,
            Err(err) => {
                // The channel is gone: the broker redelivers the message, and the marker makes
                // that harmless.
                warn!(error = %err, "could not acknowledge; the message will be redelivered");
                Handled::Deferred
            }
        }
    }

    /// One attempt at the whole decision for `input`, during its `turn` if it contends with others
    /// (see [`Turns`]): the turn ends once its writes are committed, before its outputs are
    /// published, since what the next one in turn reads is in the database.
    async fn process(
        &self,
        input: &Inbound<S::Input, S::Request>,
        mut turn: Option<tokio::sync::MutexGuard<'_, ()>>,
    ) -> Result<Finished, Failure> {
        if self.stage.deduplicates()
            && let Some(outputs) = self.store.processed(S::NAME, input.message_id).await?
        {
            debug!("already processed: republishing its recorded outputs");
            return self.republish(outputs).await.map(|()| Finished::Duplicate);
        }
        for _ in 0..MAX_DECISION_ROUNDS {
            let context = self.stage.load(&self.store, input).await?;
            let outcome =
                catch_panic(|| self.stage.decide(input, context, Utc::now())).map_err(Failure::Permanent)?;
            match outcome {
                Outcome::Forward { mut writes, publish } => {
                    let outputs = serde_json::to_value(&publish).expect("outputs serialize");
                    spans::keep_trace(&mut writes);
                    let changes = StateChanges::of(&writes);
                    match self.persist(input, outputs, writes).await? {
                        Applied::Done => {
                            changes.say();
                            drop(turn.take());
                            return self.publish(&publish).await.map(|()| Finished::Done);
                        }
                        Applied::Duplicate(outputs) => {
                            return self.republish(outputs).await.map(|()| Finished::Duplicate);
                        }
                        Applied::Conflict(reason) => debug!(%reason, "lost a race; deciding again"),
                    }
                }
                Outcome::Deliver { publish, then } => return self.deliver(input, publish, then).await,
                Outcome::Ignore { reason } if !self.stage.records_ignored() => {
                    debug!(%reason, "nothing to do");
                    return Ok(Finished::Ignored);
                }
                Outcome::Ignore { reason } => {
                    debug!(%reason, "ignored");
                    return match self.persist(input, Value::Array(Vec::new()), Vec::new()).await? {
                        Applied::Done | Applied::Duplicate(_) => Ok(Finished::Ignored),
                        Applied::Conflict(reason) => Err(Failure::Transient(reason)),
                    };
                }
                Outcome::Refuse { reason } => return Err(Failure::Refused(reason)),
                Outcome::Reject { mut writes, reason } => {
                    spans::keep_trace(&mut writes);
                    // No marker: the writes are idempotent, and a redelivery must dead-letter again
                    // if the first attempt died before it could. Writes that lost a race were
                    // decided on a state that is gone: decide again, as for any other outcome.
                    match self.store.apply(S::NAME, None, &writes).await? {
                        Applied::Conflict(conflict) => debug!(%conflict, "lost a race; deciding again"),
                        Applied::Done | Applied::Duplicate(_) => {
                            // Idempotent writes, said again on a redelivery: rare, and a failure.
                            StateChanges::of(&writes).say();
                            self.committer.committed(&writes);
                            return Err(Failure::Permanent(reason));
                        }
                    }
                }
            }
        }
        Err(Failure::Transient(format!("still conflicting after {MAX_DECISION_ROUNDS} decisions")))
    }

    /// Has the committer record the input's marker (with its `outputs`) and `writes`.
    async fn persist(
        &self,
        input: &Inbound<S::Input, S::Request>,
        outputs: Value,
        writes: Vec<Write>,
    ) -> Result<Applied, Failure> {
        let marker = self.stage.deduplicates().then_some(Marker {
            stage: S::NAME,
            message_id: input.message_id,
            outputs,
        });
        self.committer.persist(marker, writes).await
    }

    /// Publishes a stage's outputs. An unroutable output is transient here: the next stage's
    /// queue was deleted or the namespace is wrong, and acknowledging the input would lose the
    /// request; it waits in the retry queue until the queue is declared again (a worker does at
    /// start).
    async fn publish(&self, publish: &[Publish]) -> Result<(), Failure> {
        let outgoing: Vec<Outgoing> =
            publish.iter().map(|p| outgoing(self.broker.names(), S::NAME, p)).collect();
        self.broker.publish_all(&outgoing).await.map_err(|err| match err {
            broker::Error::Unroutable { .. } => Failure::Transient(describe(&err)),
            err => err.into(),
        })
    }

    async fn republish(&self, outputs: Value) -> Result<(), Failure> {
        let publish: Vec<Publish> = serde_json::from_value(outputs)
            .map_err(|e| Failure::Permanent(format!("recorded outputs are unreadable: {e}")))?;
        self.publish(&publish).await
    }

    /// Delivers `publish` into its agent's queue and records `then` (see [`Committer::deliver`]).
    /// A publish that fails is tried again, with backoff, up to `dispatch_attempts` times in
    /// all: between batches, never while a transaction holds the input's lock. What no queue takes
    /// after the last attempt is undeliverable: the stage records that, and the input is
    /// dead-lettered.
    async fn deliver(
        &self,
        input: &Inbound<S::Input, S::Request>,
        publish: Publish,
        then: Vec<Write>,
    ) -> Result<Finished, Failure> {
        let message = Arc::new(outgoing(self.broker.names(), S::NAME, &publish));
        let then: Arc<[Write]> = then.into();
        let mut pauses = self.settings.backoff(self.settings.dispatch_attempts).build();
        loop {
            let marker =
                Marker { stage: S::NAME, message_id: input.message_id, outputs: Value::Array(Vec::new()) };
            let err = match self.committer.deliver(marker, message.clone(), then.clone()).await? {
                Delivery::Done => return Ok(Finished::Done),
                Delivery::Already => return Ok(Finished::Duplicate),
                Delivery::Busy => {
                    return Err(Failure::Transient("a copy of this message is being delivered".into()));
                }
                // Sent and recorded as sent: deciding again would send it twice.
                Delivery::Conflict(reason) => {
                    debug!(%reason, "delivered, but the state moved on: its writes were left out");
                    return Ok(Finished::Done);
                }
                Delivery::Refused(err) => return Err(err.into()),
                Delivery::Failed(err) => err,
            };
            if let Some(pause) = pauses.next() {
                metrics().retries.get_or_create(&StageLabels { stage: S::NAME }).inc();
                warn!(error = %err, ?pause, "delivery failed, retrying");
                tokio::time::sleep(pause).await;
                continue;
            }
            return match err {
                broker::Error::Unroutable { .. } => {
                    let reason =
                        format!("{err}; gave up after {} attempts", self.settings.dispatch_attempts.max(1));
                    let (writes, publish) = self.stage.undeliverable(input, &reason, Utc::now());
                    self.store.apply(S::NAME, None, &writes).await?;
                    StateChanges::of(&writes).say();
                    self.committer.committed(&writes);
                    self.publish(&publish).await?;
                    Err(Failure::Undeliverable(reason))
                }
                err => Err(err.into()),
            };
        }
    }
}

/// The message for `publish`: mandatory (as every publish), so that a missing queue is an error
/// instead of a confirmed and dropped message; carrying the trace of the handling that sends it.
/// A message that continues a trace of its own ([`Publish::traceparent`]) is sent from a span of
/// `stage` in that trace, linked to the handling that sends it.
fn outgoing(names: &Names, stage: &'static str, publish: &Publish) -> Outgoing {
    let queue = match &publish.destination {
        Destination::Queue(queue) => names.of(*queue),
        Destination::Agent(agent) => names.agent_queue(agent),
    };
    let mut outgoing = Outgoing::json(queue, publish.message_id, &publish.body);
    outgoing.priority = Some(publish.priority);
    match &publish.traceparent {
        None => trace::inject(&tracing::Span::current(), &mut outgoing.headers),
        Some(traceparent) => {
            let sending = spans::on_behalf(stage, traceparent, &outgoing.body);
            trace::inject(&sending, &mut outgoing.headers);
        }
    }
    outgoing
}

/// How a message that needs no retry was handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Decided, recorded and sent on.
    Done,
    /// Handled before: what it sent then was sent again.
    Duplicate,
    /// Nothing to do.
    Ignored,
}

impl Finished {
    fn label(self) -> &'static str {
        match self {
            Finished::Done => "done",
            Finished::Duplicate => "duplicate",
            Finished::Ignored => "ignored",
        }
    }
}

/// How the handling of a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handled {
    /// Acknowledged: processed, or dead-lettered.
    Settled,
    /// Something failed transiently: the message was parked or requeued, or could not be
    /// acknowledged.
    Deferred,
}

/// Runs a stage's pure code (`parse`, `decide`), turning a panic into the reason of a permanent
/// failure: a bug that one message triggers must dead-letter that message, not kill the runner
/// and come back with every redelivery. Nothing is shared across the call but the stage, whose
/// pure methods leave it as it was.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|payload| format!("stage panicked: {}", crate::panic_message(payload.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_reason_of_a_permanent_failure() {
        assert_eq!(catch_panic(|| 7), Ok(7));
        assert_eq!(catch_panic(|| -> u8 { panic!("boom") }), Err("stage panicked: boom".into()));
        let index = 3;
        assert_eq!(
            catch_panic(|| -> u8 { panic!("no task at {index}") }),
            Err("stage panicked: no task at 3".into())
        );
        let empty: Vec<u8> = Vec::new();
        let err = catch_panic(|| empty[index]).unwrap_err();
        assert!(err.starts_with("stage panicked: index out of bounds"), "{err}");
    }
}
