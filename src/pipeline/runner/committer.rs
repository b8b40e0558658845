//! The committer: the writes of the messages decided meanwhile go into one transaction and one
//! commit, each message's all or nothing (`Store::apply_batch`); deliveries into agents' queues
//! are committed with their markers in the same way, in batches of their own. Each message hears
//! how its own writes went.
//!
//! Writes and deliveries wait apart and are committed by committers of their own, so that writes
//! never wait behind a delivery. A delivery publishes once while its batch's transaction holds
//! the inputs' locks; trying again is for the runner, between batches, never under a lock.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use super::Failure;
use crate::broker::{self, Broker, Outgoing};
use crate::model::effect::Write;
use crate::store::{self, Applied, Delivery, Marker, Store};
use crate::telemetry::metrics::{StageKind, ended_requests, metrics};

/// Committers of each kind per runner: while one waits for its commit to reach the disk, the
/// next gathers the messages decided meanwhile.
const COMMITTERS: usize = 2;

/// The most messages whose writes go into one transaction. A batch's markers and audit rows go
/// to the server as one statement each, so what a batch holds at once grows with it: measured
/// with `switchyard bench`, a worker's peak memory was 66 to 67 MiB at 128 (past the 64 MiB it
/// may take) and 59 to 62 MiB at 64, for requests per second within the noise of the runs.
const MAX_BATCH: usize = 64;

/// The most messages a batch of a runner with `prefetch` holds: at most half of what the
/// consumer may hold, so that the next batch gathers while one commits.
pub(super) fn max_batch(prefetch: u16) -> usize {
    (usize::from(prefetch) / 2).clamp(1, MAX_BATCH)
}

fn stopping() -> Failure {
    Failure::Transient("the runner is stopping".into())
}

/// A message's marker and writes, waiting for a batch.
struct WriteJob {
    marker: Option<Marker<'static>>,
    writes: Vec<Write>,
    done: oneshot::Sender<Result<Applied, Failure>>,
}

/// A message's delivery into an agent's queue, then its marker and writes, waiting for a batch.
struct DeliveryJob {
    marker: Marker<'static>,
    message: Arc<Outgoing>,
    then: Arc<[Write]>,
    done: oneshot::Sender<Result<Delivery<broker::Error>, Failure>>,
}

/// What waits to be committed, of one kind: handlers put, committers take batches.
struct Batches<T> {
    put: mpsc::Sender<T>,
    pending: tokio::sync::Mutex<mpsc::Receiver<T>>,
    max: usize,
}

impl<T> Batches<T> {
    fn new(max: usize) -> Self {
        let (put, pending) = mpsc::channel(max);
        Batches { put, pending: tokio::sync::Mutex::new(pending), max }
    }

    async fn put(&self, job: T) -> Result<(), Failure> {
        self.put.send(job).await.map_err(|_| stopping())
    }

    /// What waits: at least one job (waiting for it), at most `max`. `None` never comes while
    /// `self` lives, since it holds a sender.
    async fn take(&self) -> Option<Vec<T>> {
        let mut pending = self.pending.lock().await;
        let first = pending.recv().await?;
        let mut batch = vec![first];
        while batch.len() < self.max {
            match pending.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        Some(batch)
    }
}

/// Commits the writes and the deliveries of one stage's runner, in batches.
pub(super) struct Committer {
    stage: &'static str,
    store: Store,
    broker: Arc<Broker>,
    writes: Batches<WriteJob>,
    deliveries: Batches<DeliveryJob>,
}

impl Committer {
    /// A committer whose batches hold at most `max_batch` messages.
    pub(super) fn new(stage: &'static str, store: Store, broker: Arc<Broker>, max_batch: usize) -> Self {
        let (writes, deliveries) = (Batches::new(max_batch), Batches::new(max_batch));
        Committer { stage, store, broker, writes, deliveries }
    }

    /// Has the next batch of writes commit `marker` and `writes`; how it went for them.
    pub(super) async fn persist(
        &self,
        marker: Option<Marker<'static>>,
        writes: Vec<Write>,
    ) -> Result<Applied, Failure> {
        let (done, applied) = oneshot::channel();
        self.writes.put(WriteJob { marker, writes, done }).await?;
        applied.await.map_err(|_| stopping())?
    }

    /// Has the next batch of deliveries publish `message` once, then record `then` with
    /// `marker`; how it went. Shared, so that trying again copies nothing.
    pub(super) async fn deliver(
        &self,
        marker: Marker<'static>,
        message: Arc<Outgoing>,
        then: Arc<[Write]>,
    ) -> Result<Delivery<broker::Error>, Failure> {
        let (done, delivered) = oneshot::channel();
        self.deliveries.put(DeliveryJob { marker, message, then, done }).await?;
        delivered.await.map_err(|_| stopping())?
    }

    /// Commits batches for as long as it is polled: [`COMMITTERS`] for writes and as many for
    /// deliveries. Never returns; once every handler has its answer, none of them holds a batch
    /// that anyone waits for, and it can be dropped.
    pub(super) async fn run(&self) {
        let writes = (0..COMMITTERS).map(|_| async {
            while let Some(batch) = self.writes.take().await {
                self.commit_writes(batch).await;
            }
        });
        let deliveries = (0..COMMITTERS).map(|_| async {
            while let Some(batch) = self.deliveries.take().await {
                self.commit_deliveries(batch).await;
            }
        });
        futures::future::join(futures::future::join_all(writes), futures::future::join_all(deliveries)).await;
    }

    async fn commit_writes(&self, batch: Vec<WriteJob>) {
        let started = Instant::now();
        let jobs: Vec<(Option<&Marker<'_>>, &[Write])> =
            batch.iter().map(|job| (job.marker.as_ref(), job.writes.as_slice())).collect();
        let outcomes = self.store.apply_batch(self.stage, &jobs).await;
        drop(jobs);
        debug!(messages = batch.len(), "committed a batch of writes");
        self.observe("writes", started, batch.len());
        let outcomes = outcomes
            .map(|outcomes| outcomes.into_iter().map(|o| o.map_err(Failure::from)).collect::<Vec<_>>());
        if let Ok(outcomes) = &outcomes {
            let done = outcomes.iter().map(|o| matches!(o, Ok(Applied::Done)));
            self.count(batch.iter().map(|job| job.writes.as_slice()).zip(done));
        }
        answer(batch.into_iter().map(|job| job.done), outcomes);
    }

    async fn commit_deliveries(&self, batch: Vec<DeliveryJob>) {
        let started = Instant::now();
        let jobs: Vec<(Marker<'_>, &[Write])> =
            batch.iter().map(|job| (job.marker.clone(), &job.then[..])).collect();
        let broker = &*self.broker;
        // One publish each: a failed one is tried again by the runner, after this transaction
        // let go of the inputs' locks.
        let outcomes =
            self.store.deliver_batch(self.stage, &jobs, |i| broker.publish(&batch[i].message)).await;
        drop(jobs);
        debug!(messages = batch.len(), "delivered and committed a batch");
        self.observe("deliveries", started, batch.len());
        if let Ok(outcomes) = &outcomes {
            let done = outcomes.iter().map(|o| matches!(o, Delivery::Done));
            self.count(batch.iter().map(|job| &job.then[..]).zip(done));
        }
        let outcomes = outcomes.map(|outcomes| outcomes.into_iter().map(Ok).collect());
        answer(batch.into_iter().map(|job| job.done), outcomes);
    }

    fn observe(&self, kind: &'static str, started: Instant, messages: usize) {
        let labels = StageKind { stage: self.stage, kind };
        let metrics = metrics();
        metrics.batch_size.get_or_create(&labels).observe(messages as f64);
        metrics.commit.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
    }

    /// Counts what `writes`, committed by the runner itself (not in a batch), decided.
    pub(super) fn committed(&self, writes: &[Write]) {
        self.count(std::iter::once((writes, true)));
    }

    /// Counts what the `writes` committed (those paired with `true`) decided; the requests they
    /// end are timed apart, off the committer's way (it reads when they were received).
    fn count<'a>(&self, writes: impl Iterator<Item = (&'a [Write], bool)>) {
        let now = chrono::Utc::now();
        let mut ended = Vec::new();
        for (writes, _) in writes.filter(|(_, committed)| *committed) {
            metrics().committed(self.stage, writes, now);
            ended.extend(ended_requests(writes));
        }
        if ended.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            match store.request_ends(&ended).await {
                Ok(ends) => {
                    for (status, took) in ends {
                        metrics().request_ended(status.as_str(), took);
                    }
                }
                Err(err) => debug!(error = %err, "cannot read how long the requests that ended took"),
            }
        });
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_at_most_half_the_prefetch() {
        assert_eq!(max_batch(128), 64);
        assert_eq!(max_batch(500), MAX_BATCH);
        assert_eq!(max_batch(50), 25);
        assert_eq!(max_batch(1), 1);
        assert_eq!(max_batch(0), 1);
    }
}
