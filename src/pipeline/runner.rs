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
//! - writes are committed in batches: each message's writes (under a savepoint of their own)
//!   share one transaction and one commit with the other messages decided meanwhile, and each
//!   message is published and acknowledged only after that commit;
//! - when the broker connection or the publishing channel is gone, the runner stops, so that the
//!   worker connects again instead of parking and requeueing in vain.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use chrono::Utc;
use futures::StreamExt;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::broker::{self, Broker, Incoming, Outgoing};
use crate::model::effect::Write;
use crate::model::wire;
use crate::pipeline::stages::{AmqpMeta, Destination, Inbound, Outcome, Publish, Stage};
use crate::pipeline::topology::Topology;
use crate::store::{self, Applied, Delivery, Marker, Store};

/// How a runner behaves. Every field has a sensible default.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Settings {
    /// Deliveries in flight per stage consumer (AMQP prefetch), processed concurrently.
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
            prefetch: 50,
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
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry_base_delay_ms))
            .with_max_delay(Duration::from_secs(5))
            .with_max_times(attempts.saturating_sub(1))
            .with_jitter()
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

/// Whether a consumer has stalled: it has held nothing and received nothing for `patience`
/// (`idle` is `None` while it holds a delivery: a slow message is not a stall) while `ready`
/// messages wait in its queue.
fn stalled(idle: Option<Duration>, ready: u32, patience: Duration) -> bool {
    idle.is_some_and(|idle| idle >= patience) && ready > 0
}

/// When a runner last received a delivery, and how many it holds.
struct Activity {
    last: std::sync::Mutex<tokio::time::Instant>,
    holding: std::sync::atomic::AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
            holding: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn received(&self) {
        *self.last.lock().expect("activity lock") = tokio::time::Instant::now();
        self.holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn settled(&self) {
        self.holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How long since the last delivery, if none is held.
    fn idle(&self) -> Option<Duration> {
        let last = *self.last.lock().expect("activity lock");
        (self.holding.load(std::sync::atomic::Ordering::SeqCst) == 0).then(|| last.elapsed())
    }
}

/// What went wrong with one message.
#[derive(Debug, Clone, thiserror::Error)]
enum Failure {
    /// Retrying cannot help: dead-letter.
    #[error("{0}")]
    Permanent(String),
    /// The database or the broker is unavailable: try again later.
    #[error("{0}")]
    Transient(String),
}

impl From<store::Error> for Failure {
    fn from(err: store::Error) -> Self {
        let reason = describe(&err);
        if err.is_transient() { Failure::Transient(reason) } else { Failure::Permanent(reason) }
    }
}

impl From<broker::Error> for Failure {
    fn from(err: broker::Error) -> Self {
        let reason = describe(&err);
        if err.is_transient() { Failure::Transient(reason) } else { Failure::Permanent(reason) }
    }
}

/// An error with its causes ("a: b: c"). A dead letter's reason must say what went wrong, and
/// some errors keep that in their source only: tokio-postgres says "db error", and the server's
/// message is its source.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    crate::error_chain(err)
}

/// How many times a stage decides again after a guarded write lost a race.
const MAX_DECISION_ROUNDS: usize = 8;

/// Batches of writes committed at once by a runner: while one waits for its commit to reach the
/// disk, the next gathers the messages decided meanwhile.
const COMMITTERS: usize = 2;

/// How long a stopping runner goes on handling the deliveries that the broker sent before it
/// took the consumer's cancellation in.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// The most messages whose writes go into one transaction.
const MAX_BATCH: usize = 128;

type WritesDone = oneshot::Sender<Result<Applied, Failure>>;
type DeliveryDone = oneshot::Sender<Result<Delivery<broker::Error>, Failure>>;

fn stopping() -> Failure {
    Failure::Transient("the runner is stopping".into())
}

/// Tells each message of a batch how it went: its own outcome, or the batch's failure.
fn answer<T>(
    dones: impl Iterator<Item = oneshot::Sender<Result<T, Failure>>>,
    outcomes: Result<Vec<Result<T, Failure>>, store::Error>,
) {
    // The handlers wait for these answers: they are never gone, and a send cannot fail.
    match outcomes {
        Ok(outcomes) => {
            for (done, outcome) in dones.zip(outcomes) {
                let _ = done.send(outcome);
            }
        }
        Err(err) => {
            let failure = Failure::from(err);
            for done in dones {
                let _ = done.send(Err(failure.clone()));
            }
        }
    }
}

/// What one message waits for a batch to commit.
enum Commit {
    /// Its marker and writes.
    Writes { marker: Option<Marker<'static>>, writes: Vec<Write>, done: WritesDone },
    /// Its delivery into an agent's queue, then its marker and writes.
    Delivery { marker: Marker<'static>, publish: Publish, then: Vec<Write>, done: DeliveryDone },
}

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
    commits: mpsc::Sender<Commit>,
    /// What the committers take their batches from.
    pending: tokio::sync::Mutex<mpsc::Receiver<Commit>>,
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
        let (commits, pending) = mpsc::channel(MAX_BATCH);
        Ok(Runner {
            stage: Arc::new(stage),
            broker,
            store,
            settings,
            queue,
            retry_queue,
            turns: Turns::new(),
            activity: Activity::new(),
            commits,
            pending: tokio::sync::Mutex::new(pending),
        })
    }

    /// Consumes until `shutdown` is cancelled (then finishes the deliveries in hand and returns
    /// `Ok`), or the consumer fails or the broker connection breaks (then returns the error, and
    /// the unacknowledged deliveries go back to the queue when the channel closes).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        // The subscription keeps the consumer's channel open until the end of this function, after
        // the deliveries in hand were settled: their acknowledgements go on that channel.
        let (subscription, deliveries) = self.broker.subscribe(&self.queue, self.settings.prefetch).await?;
        info!(stage = S::NAME, queue = %self.queue, prefetch = self.settings.prefetch, "stage consuming");
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
        // The committers never stop on their own; once every delivery was handled, none of them
        // holds a batch that anyone waits for, and they can be dropped. The watchdog neither.
        let committing = futures::future::join_all((0..COMMITTERS).map(|_| this.commit_batches()));
        let stall = std::sync::atomic::AtomicBool::new(false);
        tokio::select! {
            () = consuming => {}
            _ = committing => {}
            () = this.watch(&broken, &stall) => {}
        }
        drop(subscription);
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

    /// Checks now and then that the consumer still receives (see [`stalled`]); if it does not,
    /// stops the runner (flagging `stall`), so that the worker connects again. Never returns.
    async fn watch(&self, broken: &CancellationToken, stall: &std::sync::atomic::AtomicBool) {
        let patience = Duration::from_secs(self.settings.stall_after_secs);
        if patience.is_zero() {
            return std::future::pending().await;
        }
        let mut ticks = tokio::time::interval(patience / 4);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let idle = self.activity.idle();
            if broken.is_cancelled() || idle.is_none_or(|idle| idle < patience) {
                continue;
            }
            // Asked on a channel of its own: the consumer's may be the one that is stuck.
            let ready = match self.broker.queue_len(&self.queue).await {
                Ok(ready) => ready,
                Err(err) => {
                    debug!(stage = S::NAME, error = %err, "cannot look at the queue");
                    continue;
                }
            };
            if stalled(idle, ready, patience) {
                error!(
                    stage = S::NAME,
                    queue = %self.queue,
                    ready,
                    idle_secs = idle.unwrap_or_default().as_secs(),
                    "the consumer receives nothing while messages wait; stopping to reconnect"
                );
                stall.store(true, std::sync::atomic::Ordering::SeqCst);
                broken.cancel();
                return std::future::pending().await;
            }
        }
    }

    async fn handle(&self, delivery: Incoming, broken: &CancellationToken) {
        let span = info_span!("message", stage = S::NAME, message_id = tracing::field::Empty);
        self.activity.received();
        async {
            let handled = self.handle_one(&delivery).await;
            self.activity.settled();
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
                return self.dead_letter(delivery, message_id, request_id, &reason).await;
            }
        };
        tracing::Span::current().record("message_id", tracing::field::display(input.message_id));
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
            .notify(|f, wait| warn!(error = %f, ?wait, "transient failure, retrying"))
            .await;
        match result {
            Ok(()) => self.settle(delivery.ack().await),
            Err(Failure::Permanent(reason)) => {
                self.dead_letter(delivery, input.message_id, input.request_id, &reason).await
            }
            Err(Failure::Transient(reason)) => self.park(delivery, &reason).await,
        }
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
        input: &Inbound<S::Input>,
        mut turn: Option<tokio::sync::MutexGuard<'_, ()>>,
    ) -> Result<(), Failure> {
        if self.stage.deduplicates()
            && let Some(outputs) = self.store.processed(S::NAME, input.message_id).await?
        {
            debug!("already processed: republishing its recorded outputs");
            return self.republish(outputs).await;
        }
        for _ in 0..MAX_DECISION_ROUNDS {
            let context = self.stage.load(&self.store, input).await?;
            let outcome =
                catch_panic(|| self.stage.decide(input, context, Utc::now())).map_err(Failure::Permanent)?;
            match outcome {
                Outcome::Forward { writes, publish } => {
                    let outputs = serde_json::to_value(&publish).expect("outputs serialize");
                    match self.persist(input, outputs, writes).await? {
                        Applied::Done => {
                            drop(turn.take());
                            return self.publish(&publish).await;
                        }
                        Applied::Duplicate(outputs) => return self.republish(outputs).await,
                        Applied::Conflict(reason) => debug!(%reason, "lost a race; deciding again"),
                    }
                }
                Outcome::Deliver { publish, then } => {
                    let marker = Marker {
                        stage: S::NAME,
                        message_id: input.message_id,
                        outputs: Value::Array(Vec::new()),
                    };
                    let (done, delivered) = oneshot::channel();
                    self.commits
                        .send(Commit::Delivery { marker, publish, then, done })
                        .await
                        .map_err(|_| stopping())?;
                    return match delivered.await.map_err(|_| stopping())?? {
                        Delivery::Done | Delivery::Already => Ok(()),
                        Delivery::Busy => {
                            Err(Failure::Transient("a copy of this message is being delivered".into()))
                        }
                        // Sent and recorded as sent: deciding again would send it twice.
                        Delivery::Conflict(reason) => {
                            info!(%reason, "delivered, but the state moved on: its writes were left out");
                            Ok(())
                        }
                        Delivery::Refused(err) => Err(err.into()),
                        Delivery::Failed(err @ broker::Error::Unroutable { .. }) => {
                            let reason = format!(
                                "{err}; gave up after {} attempts",
                                self.settings.dispatch_attempts.max(1)
                            );
                            let (writes, publish) = self.stage.undeliverable(input, &reason, Utc::now());
                            self.store.apply(S::NAME, None, &writes).await?;
                            self.publish(&publish).await?;
                            Err(Failure::Permanent(reason))
                        }
                        Delivery::Failed(err) => Err(err.into()),
                    };
                }
                Outcome::Ignore { reason } if !self.stage.records_ignored() => {
                    debug!(%reason, "nothing to do");
                    return Ok(());
                }
                Outcome::Ignore { reason } => {
                    info!(%reason, "ignored");
                    return match self.persist(input, Value::Array(Vec::new()), Vec::new()).await? {
                        Applied::Done | Applied::Duplicate(_) => Ok(()),
                        Applied::Conflict(reason) => Err(Failure::Transient(reason)),
                    };
                }
                Outcome::Reject { writes, reason } => {
                    // No marker: the writes are idempotent, and a redelivery must dead-letter again
                    // if the first attempt died before it could.
                    self.store.apply(S::NAME, None, &writes).await?;
                    return Err(Failure::Permanent(reason));
                }
            }
        }
        Err(Failure::Transient(format!("still conflicting after {MAX_DECISION_ROUNDS} decisions")))
    }

    /// Has the next batch commit the input's marker and `writes`.
    async fn persist(
        &self,
        input: &Inbound<S::Input>,
        outputs: Value,
        writes: Vec<Write>,
    ) -> Result<Applied, Failure> {
        let marker = self.stage.deduplicates().then_some(Marker {
            stage: S::NAME,
            message_id: input.message_id,
            outputs,
        });
        let (done, applied) = oneshot::channel();
        self.commits.send(Commit::Writes { marker, writes, done }).await.map_err(|_| stopping())?;
        applied.await.map_err(|_| stopping())?
    }

    /// Takes what messages wait to be committed (at least one, waiting for it, at most
    /// [`MAX_BATCH`]) and commits them in one transaction, then tells each how it went.
    async fn commit_batches(&self) {
        loop {
            let batch = {
                let mut pending = self.pending.lock().await;
                let Some(first) = pending.recv().await else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match pending.try_recv() {
                        Ok(commit) => batch.push(commit),
                        Err(_) => break,
                    }
                }
                batch
            };
            let mut writes = Vec::new();
            let mut deliveries = Vec::new();
            for commit in batch {
                match commit {
                    Commit::Writes { marker, writes: w, done } => writes.push((marker, w, done)),
                    Commit::Delivery { marker, publish, then, done } => {
                        deliveries.push((marker, publish, then, done))
                    }
                }
            }
            tokio::join!(self.commit_writes(writes), self.commit_deliveries(deliveries));
        }
    }

    async fn commit_writes(&self, batch: Vec<(Option<Marker<'static>>, Vec<Write>, WritesDone)>) {
        if batch.is_empty() {
            return;
        }
        let jobs: Vec<(Option<&Marker<'_>>, &[Write])> =
            batch.iter().map(|(marker, writes, _)| (marker.as_ref(), writes.as_slice())).collect();
        let outcomes = self.store.apply_batch(S::NAME, &jobs).await;
        drop(jobs);
        debug!(messages = batch.len(), "committed a batch of writes");
        let outcomes =
            outcomes.map(|outcomes| outcomes.into_iter().map(|o| o.map_err(Failure::from)).collect());
        answer(batch.into_iter().map(|(_, _, done)| done), outcomes);
    }

    async fn commit_deliveries(&self, batch: Vec<(Marker<'static>, Publish, Vec<Write>, DeliveryDone)>) {
        if batch.is_empty() {
            return;
        }
        let jobs: Vec<(Marker<'_>, &[Write])> =
            batch.iter().map(|(marker, _, then, _)| (marker.clone(), then.as_slice())).collect();
        let outcomes = self.store.deliver_batch(S::NAME, &jobs, |i| self.deliver(&batch[i].1)).await;
        drop(jobs);
        debug!(messages = batch.len(), "delivered and committed a batch");
        let outcomes = outcomes.map(|outcomes| outcomes.into_iter().map(Ok).collect());
        answer(batch.into_iter().map(|(_, _, _, done)| done), outcomes);
    }

    /// The message for `publish`: mandatory (as every publish), so that a missing queue is an
    /// error instead of a confirmed and dropped message.
    fn outgoing(&self, publish: &Publish) -> Outgoing {
        let names = self.broker.names();
        let queue = match &publish.destination {
            Destination::Queue(name) => names.queue(name),
            Destination::Agent(agent) => names.agent_queue(agent),
        };
        let mut outgoing =
            Outgoing::to_queue(queue, serde_json::to_vec(&publish.body).expect("bodies serialize"));
        outgoing.message_id = Some(publish.message_id.to_string());
        outgoing.priority = Some(publish.priority);
        outgoing
    }

    /// Publishes a stage's outputs. An unroutable output is transient here: the next stage's
    /// queue was deleted or the namespace is wrong, and acknowledging the input would lose the
    /// request; it waits in the retry queue until the queue is declared again (a worker does at
    /// start).
    async fn publish(&self, publish: &[Publish]) -> Result<(), Failure> {
        let outgoing: Vec<Outgoing> = publish.iter().map(|p| self.outgoing(p)).collect();
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

    /// Publishes into an agent's queue, retrying an unroutable or failed publish with backoff.
    async fn deliver(&self, publish: &Publish) -> Result<(), broker::Error> {
        let outgoing = self.outgoing(publish);
        (|| self.broker.publish(&outgoing))
            .retry(self.settings.backoff(self.settings.dispatch_attempts))
            .notify(|err, wait| warn!(error = %err, ?wait, queue = %outgoing.routing_key, "delivery failed, retrying"))
            .await
    }

    /// Records the message as a dead letter, publishes it to `<namespace>.dead` with its reason,
    /// then acknowledges it. If the record or the publish fails (an unroutable one included: the
    /// dead queue is bound, so then it is missing), the message is parked instead.
    async fn dead_letter(
        &self,
        delivery: &Incoming,
        message_id: crate::model::ids::MessageId,
        request_id: Option<crate::model::ids::RequestId>,
        reason: &str,
    ) -> Handled {
        let reason = bounded_reason(reason);
        warn!(%reason, "dead-lettering message");
        let body = recorded_body(&delivery.body);
        let recorded = self
            .store
            .record_dead_letter(
                S::NAME,
                &self.queue,
                message_id,
                request_id,
                &reason,
                &body,
                self.stage.dead_letter_fails_request(),
            )
            .await;
        if let Err(err) = recorded {
            return self.park(delivery, &format!("could not record dead letter: {err}")).await;
        }
        let names = self.broker.names();
        let mut outgoing = Outgoing::to_queue(self.queue.clone(), delivery.body.clone());
        outgoing.exchange = names.dead_exchange();
        outgoing.message_id = delivery.message_id.clone();
        outgoing.headers = BTreeMap::from([
            ("x-switchyard-reason".to_owned(), reason),
            ("x-switchyard-stage".to_owned(), S::NAME.to_owned()),
            ("x-switchyard-queue".to_owned(), self.queue.clone()),
            ("x-switchyard-message-id".to_owned(), message_id.to_string()),
        ]);
        match self.broker.publish(&outgoing).await {
            Ok(()) => self.settle(delivery.ack().await),
            Err(err) => self.park(delivery, &format!("could not publish dead letter: {err}")).await,
        }
    }

    /// Puts a message that failed transiently into the retry queue (the broker brings it back
    /// after the queue's TTL), or back into its queue if that fails too (an unroutable publish
    /// included: the retry queue is missing). Never drops it.
    async fn park(&self, delivery: &Incoming, reason: &str) -> Handled {
        let retries = delivery.retries() + 1;
        let parked = match &self.retry_queue {
            Some(retry_queue) => {
                let mut outgoing = Outgoing::to_queue(retry_queue.clone(), delivery.body.clone());
                outgoing.message_id = delivery.message_id.clone();
                outgoing.priority = delivery.priority;
                outgoing.headers = delivery.headers.clone();
                outgoing.headers.insert("x-switchyard-retries".into(), retries.to_string());
                outgoing.headers.insert("x-switchyard-last-error".into(), bounded_reason(reason));
                self.broker.publish(&outgoing).await.map_err(|err| err.to_string())
            }
            None => Err(format!("the topology gives {} no retry queue", self.queue)),
        };
        match parked {
            Ok(()) => {
                warn!(%reason, retries, "transient failure; parked for a delayed retry");
                self.settle(delivery.ack().await);
            }
            Err(err) => {
                error!(%reason, error = %err, "transient failure and the message cannot be parked; requeueing");
                self.settle(delivery.requeue().await);
            }
        }
        Handled::Deferred
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

/// PostgreSQL text cannot hold NUL characters; a hostile message must not make its own dead
/// letter unrecordable.
fn sanitize(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// The longest reason a dead letter (or a parked message) carries, in bytes. The reason travels
/// in a header, and AMQP carries all of a message's headers in one frame (128 KiB by default):
/// a longer header makes the broker close the whole connection, every stage of the worker with
/// it, and the message comes back to do it again. A reason may quote the message (an unknown
/// field's name, an invalid agent id), so it can be as long as the message.
const MAX_REASON_BYTES: usize = 2048;

/// `reason` as a dead letter records it: no NUL characters, and at most [`MAX_REASON_BYTES`],
/// the start and the end of a longer one kept with how much was cut between them (an error
/// says what is wrong first, and often what was expected last).
fn bounded_reason(reason: &str) -> String {
    let reason = sanitize(reason);
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let (head, tail) = (MAX_REASON_BYTES * 3 / 4, MAX_REASON_BYTES / 8);
    let head_end = floor_char_boundary(&reason, head);
    let tail_start = ceil_char_boundary(&reason, reason.len() - tail);
    let cut = tail_start - head_end;
    format!("{} […{cut} bytes cut…] {}", &reason[..head_end], &reason[tail_start..])
}

/// The most of a dead letter's body that its row keeps, in bytes. The copy in `<ns>.dead` is
/// the whole message; the row is what people read, and a client may send up to the broker's
/// largest message (128 MiB by default), which the database would otherwise hold as text.
const MAX_RECORDED_BODY_BYTES: usize = 64 * 1024;

/// A dead letter's body as its row keeps it: as text (bytes that are not UTF-8 replaced, NUL
/// characters too), at most [`MAX_RECORDED_BODY_BYTES`] of it, with how much more there was.
fn recorded_body(body: &[u8]) -> String {
    let mut end = body.len().min(MAX_RECORDED_BODY_BYTES);
    // Not in the middle of a character: a UTF-8 character has at most 3 continuation bytes.
    for _ in 0..3 {
        if end < body.len() && end > 0 && body[end] & 0xC0 == 0x80 {
            end -= 1;
        }
    }
    let mut text = sanitize(&String::from_utf8_lossy(&body[..end]));
    if end < body.len() {
        text.push_str(&format!(
            " […{} more bytes; the whole message is in the dead queue]",
            body.len() - end
        ));
    }
    text
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn ceil_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index += 1;
    }
    index
}

/// The message id and request id of a message that could not be parsed, where they can be read
/// from it, so that the dead letter matches the other records and shows in the request's status.
///
/// Only these two fields are read: the rest of the message is skipped without being built, so a
/// body over the size limit costs no memory beyond itself, and what made the message unusable
/// elsewhere in it (nesting deeper than a parser recurses, bytes that are not UTF-8 in another
/// field) does not hide its ids.
fn sniff_ids(body: &[u8]) -> (Option<crate::model::ids::MessageId>, Option<crate::model::ids::RequestId>) {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow, default)]
        message_id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        request_id: Option<&'a RawValue>,
    }
    fn text(raw: Option<&RawValue>) -> Option<String> {
        serde_json::from_str(raw?.get()).ok()
    }
    let Ok(ids) = serde_json::from_slice::<Ids>(body) else {
        return (None, None);
    };
    (text(ids.message_id).and_then(|id| id.parse().ok()), text(ids.request_id).and_then(|id| id.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_of_an_unusable_message_are_read_past_what_makes_it_unusable() {
        let (message, request) =
            (crate::model::ids::MessageId::random(), crate::model::ids::RequestId::random());
        let ids = |rest: &str| -> Vec<u8> {
            format!(r#"{{"message_id":"{message}",{rest},"request_id":"{request}"}}"#).into_bytes()
        };
        let both = (Some(message), Some(request));
        assert_eq!(sniff_ids(&ids(r#""payload":{"plan_id":7}"#)), both);
        // Deeper than serde_json recurses (128): skipped without recursion.
        let deep = format!(r#""payload":{}{}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(sniff_ids(&ids(&deep)), both);
        // Bytes that are not UTF-8, in a field that is not read.
        let mut body = ids(r#""payload":"PLACEHOLDER""#);
        let at = body.windows(11).position(|w| w == b"PLACEHOLDER").unwrap();
        body.splice(at..at + 11, [0xff, 0xfe]);
        assert_eq!(sniff_ids(&body), both);
        // Ids that are not UUIDs, or not strings, are not ids.
        assert_eq!(sniff_ids(br#"{"message_id":"42; DROP TABLE x","request_id":[[1]]}"#), (None, None));
        assert_eq!(sniff_ids(br#"{"message_id":null}"#), (None, None));
        for unreadable in [&b"not json"[..], b"", b"[1,2]", b"{\"message_id\": \"x\"", b"\xff\xfe"] {
            assert_eq!(sniff_ids(unreadable), (None, None), "{}", String::from_utf8_lossy(unreadable));
        }
    }

    #[test]
    fn a_dead_letter_s_row_keeps_the_start_of_a_large_body() {
        assert_eq!(recorded_body(b"{\"text\": \"deploy\""), "{\"text\": \"deploy\"");
        assert_eq!(recorded_body(b"a\0\xffb"), "a\u{FFFD}\u{FFFD}b");
        let large = format!("{}{}", "x".repeat(MAX_RECORDED_BODY_BYTES - 1), "é".repeat(5_000_000));
        let kept = recorded_body(large.as_bytes());
        // The "é" across the limit is left out whole, not cut into a replacement character.
        let head = "x".repeat(MAX_RECORDED_BODY_BYTES - 1);
        assert_eq!(kept, format!("{head} […10000000 more bytes; the whole message is in the dead queue]"));
        let exactly = "y".repeat(MAX_RECORDED_BODY_BYTES);
        assert_eq!(recorded_body(exactly.as_bytes()), exactly);
    }

    #[test]
    fn a_reason_is_bounded_keeping_its_start_and_end() {
        assert_eq!(bounded_reason("malformed JSON: EOF"), "malformed JSON: EOF");
        assert_eq!(bounded_reason("a\0b"), "a\u{FFFD}b");
        // What serde says of a field named with 200,000 characters.
        let name = "é".repeat(100_000);
        let reason =
            format!("schema violation: unknown field `{name}`, expected one of `text`, `request_id`");
        let bounded = bounded_reason(&reason);
        assert!(bounded.len() <= MAX_REASON_BYTES, "{}", bounded.len());
        assert!(bounded.starts_with("schema violation: unknown field `éé"), "{bounded}");
        assert!(bounded.ends_with("éé`, expected one of `text`, `request_id`"), "{bounded}");
        // What was kept and what was cut add up to the whole.
        let (head, rest) = bounded.split_once(" […").unwrap();
        let (cut, tail) = rest.split_once(" bytes cut…] ").unwrap();
        assert_eq!(head.len() + cut.parse::<usize>().unwrap() + tail.len(), reason.len());
    }

    #[test]
    fn a_consumer_has_stalled_when_idle_for_its_patience_while_messages_wait() {
        let patience = Duration::from_secs(60);
        assert!(stalled(Some(Duration::from_secs(60)), 1, patience));
        assert!(stalled(Some(Duration::from_secs(600)), 500, patience));
        // Nothing waits: an idle consumer of an empty queue is just idle.
        assert!(!stalled(Some(Duration::from_secs(600)), 0, patience));
        // Not idle long enough, or holding a (slow) delivery.
        assert!(!stalled(Some(Duration::from_secs(59)), 10, patience));
        assert!(!stalled(None, 10, patience));
    }

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
