//! The committer: the writes of the messages decided meanwhile go into one transaction and one
//! commit, each message under a savepoint of its own; a delivery into an agent's queue is
//! committed with its marker in the same way. Each message hears how its own writes went.

use serde_json::Value;
use tokio::sync::oneshot;
use tracing::debug;

use super::{Failure, Runner};
use crate::broker;
use crate::model::effect::Write;
use crate::pipeline::stages::{Inbound, Publish, Stage};
use crate::store::{self, Applied, Delivery, Marker};

/// Batches of writes committed at once by a runner: while one waits for its commit to reach the
/// disk, the next gathers the messages decided meanwhile.
pub(super) const COMMITTERS: usize = 2;

/// The most messages whose writes go into one transaction.
pub(super) const MAX_BATCH: usize = 128;

type WritesDone = oneshot::Sender<Result<Applied, Failure>>;

type DeliveryDone = oneshot::Sender<Result<Delivery<broker::Error>, Failure>>;

pub(super) fn stopping() -> Failure {
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
pub(super) enum Commit {
    /// Its marker and writes.
    Writes { marker: Option<Marker<'static>>, writes: Vec<Write>, done: WritesDone },
    /// Its delivery into an agent's queue, then its marker and writes.
    Delivery { marker: Marker<'static>, publish: Publish, then: Vec<Write>, done: DeliveryDone },
}

impl<S: Stage> Runner<S> {
    /// Has the next batch commit the input's marker and `writes`.
    pub(super) async fn persist(
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
    pub(super) async fn commit_batches(&self) {
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
}
