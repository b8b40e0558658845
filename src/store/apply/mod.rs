//! Applying a message's writes: one transaction holding the idempotency marker, the writes and
//! their audit rows. Each kind of write has a function of its own, in the file of the rows it
//! writes (`requests`, `plans`, `tasks`, `agents`; a quota's use in `store::quota`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use deadpool_postgres::Transaction;
use serde_json::Value;
use uuid::Uuid;

use super::cached::Cached;
use super::{Error, Store};
use crate::model::effect::{Write, write};
use crate::model::ids::{MessageId, PlanId, RequestId, TaskId};
use agents::AgentLedger;

mod agents;
mod plans;
mod requests;
mod tasks;

pub(super) use requests::fail_request;

/// How applying went.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Done,
    /// The message was processed before; these are the outputs it published then.
    Duplicate(Value),
    /// A guarded write lost a race (the agent filled up, the quota ran out): nothing was written;
    /// decide again on fresh data.
    Conflict(String),
}

/// The idempotency marker of the input message.
#[derive(Debug, Clone)]
pub struct Marker<'a> {
    pub stage: &'a str,
    pub message_id: MessageId,
    pub outputs: Value,
}

enum Step {
    Ok,
    Conflict(String),
}

/// How one input of [`Store::deliver_batch`] went.
#[derive(Debug)]
pub enum Delivery<E> {
    /// Delivered, then the marker and the writes committed.
    Done,
    /// The input was delivered and recorded before: nothing was sent again.
    Already,
    /// A copy of the input is being delivered right now: nothing was sent.
    Busy,
    /// Delivered and recorded as delivered, but a guarded write lost a race (the state moved on
    /// meanwhile): its writes were left out. The input is done; a copy sends nothing again.
    Conflict(String),
    /// The database refused its writes for good: they were left out. If it was delivered (its
    /// writes reserve nothing), it is recorded as delivered, and a copy sends nothing again.
    Refused(Error),
    /// The delivery failed: nothing was written.
    Failed(E),
}

impl Store {
    /// The outputs recorded when `stage` processed `message_id`, if it did.
    pub async fn processed(&self, stage: &str, message_id: MessageId) -> Result<Option<Value>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT outputs FROM processed_messages WHERE stage = $1 AND message_id = $2",
                &[&stage, &message_id.as_uuid()],
            )
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Applies `writes` in one transaction, with `marker` if given and an audit row per change.
    pub async fn apply(
        &self,
        actor: &str,
        marker: Option<Marker<'_>>,
        writes: &[Write],
    ) -> Result<Applied, Error> {
        self.apply_alone(actor, marker.as_ref(), writes).await
    }

    async fn apply_alone(
        &self,
        actor: &str,
        marker: Option<&Marker<'_>>,
        writes: &[Write],
    ) -> Result<Applied, Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let scope = Tx::new(&tx);
        let applied = match apply_in(&scope, actor, marker, writes).await? {
            (Applied::Done, agents) => match agents.apply(&tx).await? {
                Step::Ok => Applied::Done,
                Step::Conflict(reason) => Applied::Conflict(reason),
            },
            (applied, _) => applied,
        };
        match applied {
            Applied::Done => {
                scope.flush().await?;
                tx.commit().await?
            }
            // A duplicate wrote nothing; a conflict must leave nothing written.
            Applied::Duplicate(_) | Applied::Conflict(_) => tx.rollback().await?,
        }
        Ok(applied)
    }

    /// Applies the writes of many messages in one transaction and one commit, each message's
    /// writes all or nothing: what one message's conflict or error undoes is its own writes,
    /// not the others'.
    ///
    /// A commit waits for the write-ahead log to reach the disk, and one transaction per message
    /// spends most of its time in that wait. The statements that every message makes go in once
    /// for the whole batch: the idempotency markers in one statement, the audit rows in one
    /// more. The agent rows are the hottest rows there are (every routing decision reserves
    /// capacity on one, every result gives it back), so the batch changes them last, all at
    /// once: locked in the order of their ids (two batches never wait for each other in a
    /// cycle), only for the end of the transaction.
    ///
    /// No message has a savepoint of its own (a transaction past 64 subtransactions slows every
    /// other one on the server). A message that conflicts (its agent turned out full, the state
    /// moved on) or that the database refuses has the transaction rolled back, and the batch is
    /// done again without it: rare, and cheaper than a savepoint for every message. A refusal
    /// of a statement for the whole batch (an audit row the server will not take) is traced to
    /// its message by doing the batch again one message at a time.
    ///
    /// The outer error is the batch's (the connection or the commit failed: nothing was
    /// written); the inner ones are single messages', whose writes were left out.
    pub async fn apply_batch(
        &self,
        actor: &str,
        batch: &[(Option<&Marker<'_>>, &[Write])],
    ) -> Result<Vec<Result<Applied, Error>>, Error> {
        if let [(marker, writes)] = batch {
            return match self.apply_alone(actor, *marker, writes).await {
                Err(err) if err.is_transient() => Err(err),
                outcome => Ok(vec![outcome]),
            };
        }
        let order = lock_order(batch.iter().map(|(_, writes)| *writes));
        let mut client = self.client().await?;
        // Messages left out, with how they went: found before anything is written not to fit on
        // their agent, then each round leaves out more.
        let mut left_out: BTreeMap<usize, Result<Applied, Error>> = overbooked(&client, batch, &order)
            .await?
            .into_iter()
            .map(|(index, reason)| (index, Ok(Applied::Conflict(reason))))
            .collect();
        let mut each = false;
        loop {
            let tx = client.transaction().await?;
            let included: Vec<usize> = order.iter().copied().filter(|i| !left_out.contains_key(i)).collect();
            match batch_round(&tx, actor, batch, &included, each).await? {
                Round::Done(mut outcomes) => {
                    tx.commit().await?;
                    outcomes.extend(left_out);
                    return Ok(outcomes.into_values().collect());
                }
                Round::LeaveOut(left) => {
                    tx.rollback().await?;
                    left_out.extend(left);
                }
                Round::OneByOne => {
                    tx.rollback().await?;
                    each = true;
                }
                Round::Unrecorded(index, err) => {
                    tx.rollback().await?;
                    left_out.insert(index, Err(err));
                }
            }
        }
    }

    /// Delivers the outputs of many inputs with `deliver` (by position in `batch`, all at once),
    /// then records each delivered input's `writes` with its marker, in one transaction that
    /// holds a lock on every input of the batch throughout: a copy of one of them (a
    /// republished duplicate, a redelivery) handled at the same time, in this process or in
    /// another, finds the lock taken and sends nothing, instead of delivering a second time.
    /// One transaction and one commit for the batch, as in [`Store::apply_batch`].
    ///
    /// What is delivered cannot be taken back, so nothing after a delivery can undo its marker:
    /// an input whose writes would reserve capacity (which the end of a batch may find taken) is
    /// refused before anything is sent, and an input whose writes conflict or are refused is
    /// still recorded as delivered. Since the locks must outlive such a message, the writes go
    /// under one savepoint for the batch (not one per message), rolled back to and done again
    /// without the message. Only the database failing before the commit leaves a delivered
    /// input unrecorded; its copy is then delivered again, with the same message id.
    pub async fn deliver_batch<E, F: Future<Output = Result<(), E>>>(
        &self,
        actor: &str,
        batch: &[(Marker<'_>, &[Write])],
        deliver: impl Fn(usize) -> F,
    ) -> Result<Vec<Delivery<E>>, Error> {
        let Some((first, _)) = batch.first() else {
            return Ok(Vec::new());
        };
        let stage = first.stage;
        let mut client = self.client().await?;
        let mut tx = client.transaction().await?;
        let keys: Vec<i64> = batch
            .iter()
            .map(|(marker, _)| {
                let (key, _) =
                    Uuid::new_v5(&marker.message_id.as_uuid(), marker.stage.as_bytes()).as_u64_pair();
                key as i64
            })
            .collect();
        let locked: Vec<bool> = tx
            .query_cached(
                "SELECT pg_try_advisory_xact_lock(key) FROM unnest($1::bigint[]) WITH ORDINALITY AS k (key, n)
                 ORDER BY n",
                &[&keys],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let ids: Vec<Uuid> = batch.iter().map(|(marker, _)| marker.message_id.as_uuid()).collect();
        let done: BTreeSet<Uuid> = tx
            .query_cached(
                "SELECT message_id FROM processed_messages WHERE stage = $1 AND message_id = ANY($2)",
                &[&stage, &ids],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut outcomes: Vec<Option<Delivery<E>>> = Vec::with_capacity(batch.len());
        let mut seen = BTreeSet::new();
        for (index, key) in keys.iter().enumerate() {
            outcomes.push(if !locked[index] || !seen.insert(*key) {
                // Another transaction holds it, or it is a second copy within this batch (whose
                // lock this session already holds, so taking it again succeeded).
                Some(Delivery::Busy)
            } else if done.contains(&ids[index]) {
                Some(Delivery::Already)
            } else if batch[index].1.iter().any(reserves_capacity) {
                Some(Delivery::Refused(Error::Refused(
                    "a delivery cannot reserve capacity: its reservation could be refused after it was sent"
                        .into(),
                )))
            } else {
                None
            });
        }
        let sending: Vec<usize> = lock_order(batch.iter().map(|(_, writes)| *writes))
            .into_iter()
            .filter(|&i| outcomes[i].is_none())
            .collect();
        let sent = futures::future::join_all(sending.iter().map(|&i| deliver(i))).await;
        let mut delivered = Vec::with_capacity(sending.len());
        for (&index, result) in sending.iter().zip(sent) {
            match result {
                Ok(()) => delivered.push(index),
                Err(err) => outcomes[index] = Some(Delivery::Failed(err)),
            }
        }
        // Delivered, then left out of the writes (conflicts and refusals), with whether their
        // marker is still recorded: all but one the server refused itself.
        let mut left_out: BTreeMap<usize, (Result<Applied, Error>, bool)> = BTreeMap::new();
        let mut each = false;
        let written = loop {
            let savepoint = tx.transaction().await?;
            let round = delivery_round(&savepoint, actor, batch, &delivered, &left_out, each).await?;
            let recorded = match round {
                Round::Done(written) => {
                    savepoint.commit().await?;
                    break written;
                }
                Round::LeaveOut(left) => {
                    left.into_iter().map(|(index, outcome)| (index, (outcome, true))).collect()
                }
                Round::Unrecorded(index, err) => BTreeMap::from([(index, (Err(err), false))]),
                Round::OneByOne => {
                    each = true;
                    BTreeMap::new()
                }
            };
            savepoint.rollback().await?;
            left_out.extend(recorded);
        };
        tx.commit().await?;
        for (index, applied) in written.into_iter().chain(left_out.into_iter().map(|(i, (o, _))| (i, o))) {
            outcomes[index] = Some(match applied {
                Ok(Applied::Done) => Delivery::Done,
                Ok(Applied::Duplicate(_)) => Delivery::Already,
                // This message's writes only: the others of the batch, delivered too, stand.
                Ok(Applied::Conflict(reason)) => Delivery::Conflict(reason),
                Err(err) => Delivery::Refused(err),
            });
        }
        Ok(outcomes.into_iter().map(|outcome| outcome.expect("every input has an outcome")).collect())
    }
}

/// How one attempt at a batch went, within its transaction.
enum Round {
    /// Every message included went in (by position in the batch); what is left is the commit.
    Done(BTreeMap<usize, Result<Applied, Error>>),
    /// These messages must be left out (a conflict, a refusal), and the batch done again.
    LeaveOut(BTreeMap<usize, Result<Applied, Error>>),
    /// A statement made for the whole batch was refused: do it again one message at a time, to
    /// find whose part it was.
    OneByOne,
    /// A delivered input whose very marker the server refused: leave out all of it.
    Unrecorded(usize, Error),
}

/// One attempt at the messages `included` of a batch (positions, in the order to apply them).
async fn batch_round(
    tx: &Transaction<'_>,
    actor: &str,
    batch: &[(Option<&Marker<'_>>, &[Write])],
    included: &[usize],
    each: bool,
) -> Result<Round, Error> {
    let scope = Tx::new(tx);
    let mut applying = Applying::default();
    if each {
        for &index in included {
            let (marker, writes) = batch[index];
            if let Some(round) = applying.take(index, apply_flushed(&scope, actor, marker, writes).await)? {
                return Ok(round);
            }
        }
    } else {
        let markers: Vec<(usize, &Marker<'_>)> =
            included.iter().filter_map(|&i| batch[i].0.map(|marker| (i, marker))).collect();
        let Some(duplicates) = refused(insert_markers(tx, &markers).await)? else {
            return Ok(Round::OneByOne);
        };
        let writing: Vec<(usize, &[Write])> = included
            .iter()
            .filter(|index| !duplicates.contains_key(index))
            .map(|&index| (index, batch[index].1))
            .collect();
        for (index, outputs) in duplicates {
            applying.outcomes.insert(index, Ok(Applied::Duplicate(outputs)));
        }
        if let Some(round) = applying.together(&scope, actor, &writing).await? {
            return Ok(round);
        }
    }
    if refused(scope.flush().await)?.is_none() {
        return Ok(Round::OneByOne);
    }
    let rejected = AgentLedger::apply_all(tx, &applying.ledgers).await?;
    if !rejected.is_empty() {
        return Ok(Round::LeaveOut(
            rejected.into_iter().map(|(index, reason)| (index, Ok(Applied::Conflict(reason)))).collect(),
        ));
    }
    Ok(Round::Done(applying.outcomes))
}

/// One attempt at recording the inputs `delivered` of a batch of deliveries (positions, in the
/// order to apply them): every one's marker, and the writes of those not `left_out`.
async fn delivery_round(
    tx: &Transaction<'_>,
    actor: &str,
    batch: &[(Marker<'_>, &[Write])],
    delivered: &[usize],
    left_out: &BTreeMap<usize, (Result<Applied, Error>, bool)>,
    each: bool,
) -> Result<Round, Error> {
    let scope = Tx::new(tx);
    let recorded = |index: &usize| left_out.get(index).is_none_or(|(_, marker)| *marker);
    let mut applying = Applying::default();
    if each {
        for &index in delivered {
            let (marker, writes) = &batch[index];
            if recorded(&index) {
                // The marker alone first: a marker the server refuses is the message's own fault.
                match apply_in(&scope, actor, Some(marker), &[]).await {
                    Ok(_) => {}
                    Err(err) if err.is_transient() => return Err(err),
                    Err(err) => return Ok(Round::Unrecorded(index, err)),
                }
            }
            if left_out.contains_key(&index) {
                continue;
            }
            if let Some(round) = applying.take(index, apply_flushed(&scope, actor, None, writes).await)? {
                return Ok(round);
            }
        }
    } else {
        let markers: Vec<(usize, &Marker<'_>)> =
            delivered.iter().filter(|i| recorded(i)).map(|&i| (i, &batch[i].0)).collect();
        if refused(insert_markers(tx, &markers).await)?.is_none() {
            return Ok(Round::OneByOne);
        }
        let writing: Vec<(usize, &[Write])> = delivered
            .iter()
            .filter(|index| !left_out.contains_key(index))
            .map(|&index| (index, batch[index].1))
            .collect();
        if let Some(round) = applying.together(&scope, actor, &writing).await? {
            return Ok(round);
        }
    }
    if refused(scope.flush().await)?.is_none() {
        return Ok(Round::OneByOne);
    }
    // Releases and counts only (reservations were refused before sending): nothing here can be
    // turned down, so no delivered input goes unrecorded for want of capacity.
    AgentLedger::apply_unchecked(tx, &applying.ledgers).await?;
    Ok(Round::Done(applying.outcomes))
}

/// One message's marker and writes, then their audit rows at once: when a batch is done one
/// message at a time, so that a refusal is this message's.
async fn apply_flushed(
    tx: &Tx<'_, '_>,
    actor: &str,
    marker: Option<&Marker<'_>>,
    writes: &[Write],
) -> Result<(Applied, AgentLedger), Error> {
    let applied = apply_in(tx, actor, marker, writes).await?;
    tx.flush().await?;
    Ok(applied)
}

/// What a round has applied so far: each message's outcome (by position in its batch), and
/// what the applied ones change of agents' rows, for the end of the batch.
#[derive(Default)]
struct Applying {
    outcomes: BTreeMap<usize, Result<Applied, Error>>,
    ledgers: Vec<(usize, AgentLedger)>,
}

impl Applying {
    /// Takes how one message went: `Some` round to do instead if it cannot stay in the batch.
    fn take(
        &mut self,
        index: usize,
        result: Result<(Applied, AgentLedger), Error>,
    ) -> Result<Option<Round>, Error> {
        match result {
            Ok((Applied::Done, agents)) => {
                self.ledgers.push((index, agents));
                self.outcomes.insert(index, Ok(Applied::Done));
                Ok(None)
            }
            Ok((Applied::Duplicate(outputs), _)) => {
                self.outcomes.insert(index, Ok(Applied::Duplicate(outputs)));
                Ok(None)
            }
            Ok((conflict @ Applied::Conflict(_), _)) => {
                Ok(Some(Round::LeaveOut(BTreeMap::from([(index, Ok(conflict))]))))
            }
            Err(err) if err.is_transient() => Err(err),
            Err(err) => Ok(Some(Round::LeaveOut(BTreeMap::from([(index, Err(err))])))),
        }
    }

    /// The writes of many messages (by position in their batch) within `tx`, all at once: each
    /// message's statements follow each other, and the statements of different messages go to
    /// the server together (pipelined on the connection), instead of one round trip after
    /// another. The server still runs them one by one, in the order they arrive.
    ///
    /// `Some` round to do instead: without the messages that conflict, or without the one whose
    /// statement the server refused (after which every other statement of the transaction fails
    /// too, for no fault of its own).
    async fn together(
        &mut self,
        tx: &Tx<'_, '_>,
        actor: &str,
        writing: &[(usize, &[Write])],
    ) -> Result<Option<Round>, Error> {
        let results =
            futures::future::join_all(writing.iter().map(|(_, writes)| apply_in(tx, actor, None, writes)))
                .await;
        let mut left = BTreeMap::new();
        let mut aborted = false;
        for ((index, _), result) in writing.iter().zip(results) {
            match result {
                Err(err) if err.follows_another() => aborted = true,
                result => {
                    if let Some(Round::LeaveOut(leave)) = self.take(*index, result)? {
                        left.extend(leave);
                    }
                }
            }
        }
        Ok(match (left.is_empty(), aborted) {
            (true, false) => None,
            (false, _) => Some(Round::LeaveOut(left)),
            // Aborted, and no statement says why: find it one message at a time.
            (true, true) => Some(Round::OneByOne),
        })
    }
}

/// A statement made for a whole batch: its value, `None` if the server refused it for good
/// (one message's part of it, not known which), or the batch's error.
fn refused<T>(result: Result<T, Error>) -> Result<Option<T>, Error> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(err) if err.is_transient() => Err(err),
        Err(_) => Ok(None),
    }
}

/// Inserts the markers of a batch's messages in one statement, and returns the messages found
/// processed before (by position in the batch), with the outputs recorded then. A copy being
/// processed by another transaction makes this wait for it, as one marker at a time would; a
/// second copy within the batch is a duplicate of the first.
async fn insert_markers(
    tx: &Transaction<'_>,
    markers: &[(usize, &Marker<'_>)],
) -> Result<BTreeMap<usize, Value>, Error> {
    // Each key once, in one order for everyone: two batches holding copies of the same
    // messages wait for each other's markers in that order, never in a cycle.
    let mut firsts: BTreeMap<(&str, Uuid), (usize, &Marker<'_>)> = BTreeMap::new();
    let mut copies = Vec::new();
    for &(index, marker) in markers {
        let key = (marker.stage, marker.message_id.as_uuid());
        match firsts.entry(key) {
            std::collections::btree_map::Entry::Occupied(_) => copies.push((index, key)),
            std::collections::btree_map::Entry::Vacant(entry) => {
                entry.insert((index, marker));
            }
        }
    }
    if firsts.is_empty() {
        return Ok(BTreeMap::new());
    }
    let stages: Vec<&str> = firsts.keys().map(|(stage, _)| *stage).collect();
    let ids: Vec<Uuid> = firsts.keys().map(|(_, id)| *id).collect();
    let outputs: Vec<&Value> = firsts.values().map(|(_, marker)| &marker.outputs).collect();
    let inserted: BTreeSet<(String, Uuid)> = tx
        .query_cached(
            "INSERT INTO processed_messages (stage, message_id, outputs)
             SELECT * FROM unnest($1::text[], $2::uuid[], $3::jsonb[])
             ON CONFLICT DO NOTHING RETURNING stage, message_id",
            &[&stages, &ids, &outputs],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let before: Vec<(&str, Uuid)> = firsts
        .keys()
        .filter(|(stage, id)| !inserted.contains(&((*stage).to_owned(), *id)))
        .copied()
        .collect();
    let mut recorded: BTreeMap<(String, Uuid), Value> = BTreeMap::new();
    if !before.is_empty() {
        let stages: Vec<&str> = before.iter().map(|(stage, _)| *stage).collect();
        let ids: Vec<Uuid> = before.iter().map(|(_, id)| *id).collect();
        for row in tx
            .query_cached(
                "SELECT m.stage, m.message_id, m.outputs
                 FROM processed_messages m JOIN unnest($1::text[], $2::uuid[]) AS k (stage, message_id)
                   USING (stage, message_id)",
                &[&stages, &ids],
            )
            .await?
        {
            recorded.insert((row.get(0), row.get(1)), row.get(2));
        }
    }
    let outputs_of = |key: &(&str, Uuid)| -> Value {
        let owned = (key.0.to_owned(), key.1);
        match recorded.get(&owned) {
            Some(outputs) => outputs.clone(),
            // Inserted by this batch: its first copy's outputs.
            None => firsts[key].1.outputs.clone(),
        }
    };
    let mut duplicates: BTreeMap<usize, Value> =
        before.iter().map(|key| (firsts[key].0, outputs_of(key))).collect();
    for (index, key) in copies {
        duplicates.insert(index, outputs_of(&key));
    }
    Ok(duplicates)
}

/// The order in which to apply the writes of a batch's messages (positions in the batch): by
/// the first task that each message's writes update. Results and dispatches of the same tasks
/// are recorded at the same moments (an agent may report before the dispatch that sent it the
/// task committed), and two batches that update the same task rows in opposite orders would
/// wait for each other until the server broke the deadlock, a second later, failing one.
fn lock_order<'a>(batch: impl Iterator<Item = &'a [Write]>) -> Vec<usize> {
    let mut keyed: Vec<(Option<Uuid>, usize)> = batch
        .enumerate()
        .map(|(index, writes)| (writes.iter().filter_map(task_updated).min(), index))
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, index)| index).collect()
}

/// The task whose row `write` updates, if it updates one.
fn task_updated(write: &Write) -> Option<Uuid> {
    let task = match write {
        Write::Route(write::Route { route, .. }) => route.task_id,
        Write::TaskFinished(write::TaskFinished { result, .. }) => result.task_id,
        Write::Dispatched(write::Dispatched { attempt, .. })
        | Write::DispatchFailed(write::DispatchFailed { attempt, .. })
        | Write::TaskRetry(write::TaskRetry { attempt, .. }) => attempt.task_id,
        Write::TaskFailed(write::TaskFailed { task_id, .. }) => *task_id,
        _ => return None,
    };
    Some(task.as_uuid())
}

/// Whether `write` takes a slot of an agent (which the end of a batch may find taken).
fn reserves_capacity(write: &Write) -> bool {
    matches!(write, Write::Route(write::Route { route, .. }) if route.reserves_capacity)
}

/// The messages of a batch that would book an agent beyond its capacity, as the agents stand
/// now, with why. The messages of a batch were decided on the same view of the agents, and
/// several may have chosen the last slot of the same one: found out before anything is written,
/// such a message is a conflict at once, instead of making the whole batch be done again when
/// the agents' rows are locked at its end (which still catches what changed meanwhile).
async fn overbooked(
    client: &deadpool_postgres::Object,
    batch: &[(Option<&Marker<'_>>, &[Write])],
    order: &[usize],
) -> Result<BTreeMap<usize, String>, Error> {
    let reserving = |writes: &'_ [Write]| -> Vec<String> {
        writes
            .iter()
            .filter_map(|write| match write {
                Write::Route(write::Route { route, .. }) if route.reserves_capacity => {
                    Some(route.agent_id.to_string())
                }
                _ => None,
            })
            .collect()
    };
    let wanted: Vec<Vec<String>> = batch.iter().map(|(_, writes)| reserving(writes)).collect();
    let ids: Vec<&str> =
        wanted.iter().flatten().map(String::as_str).collect::<BTreeSet<_>>().into_iter().collect();
    if ids.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut room: BTreeMap<String, i32> = client
        .query_cached("SELECT id, capacity - in_flight FROM agents_now WHERE id = ANY($1)", &[&ids])
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut full = BTreeMap::new();
    for &index in order {
        let mut needs: BTreeMap<&str, i32> = BTreeMap::new();
        for agent in &wanted[index] {
            *needs.entry(agent).or_default() += 1;
        }
        // An agent not registered is for the end of the batch to judge, as for a single message.
        match needs.iter().find(|(agent, n)| room.get(**agent).is_some_and(|left| left < *n)) {
            Some((agent, _)) => {
                full.insert(index, format!("agent {agent} has no spare capacity left"));
            }
            None => {
                for (agent, n) in needs {
                    if let Some(left) = room.get_mut(agent) {
                        *left -= n;
                    }
                }
            }
        }
    }
    Ok(full)
}

/// One message's writes within `tx`: its marker first (a duplicate writes nothing more), then
/// each write with its audit row. What they change of agents' rows is returned, for the caller
/// to apply last. On a conflict, the caller must undo what was written.
async fn apply_in(
    tx: &Tx<'_, '_>,
    actor: &str,
    marker: Option<&Marker<'_>>,
    writes: &[Write],
) -> Result<(Applied, AgentLedger), Error> {
    if let Some(marker) = marker {
        // First, so that a concurrent copy of the same message waits here for this one.
        let inserted = tx
            .execute_cached(
                "INSERT INTO processed_messages (stage, message_id, outputs) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&marker.stage, &marker.message_id.as_uuid(), &marker.outputs],
            )
            .await?;
        if inserted == 0 {
            let row = tx
                .query_one_cached(
                    "SELECT outputs FROM processed_messages WHERE stage = $1 AND message_id = $2",
                    &[&marker.stage, &marker.message_id.as_uuid()],
                )
                .await?;
            return Ok((Applied::Duplicate(row.get(0)), AgentLedger::default()));
        }
    }
    let mut agents = AgentLedger::default();
    for write in writes {
        if let Step::Conflict(reason) = apply_one(tx, actor, write, &mut agents).await? {
            return Ok((Applied::Conflict(reason), agents));
        }
    }
    Ok((Applied::Done, agents))
}

/// A transaction, and the audit rows its writes leave, which go in together, in one statement,
/// when it is flushed: a row per change, each a statement of its own, was the most frequent
/// statement of all. Reads within the transaction do not see them before then; none looks.
pub(in crate::store) struct Tx<'s, 't> {
    tx: &'s Transaction<'t>,
    audit: Mutex<Vec<AuditRow>>,
}

struct AuditRow {
    actor: String,
    event: &'static str,
    request: Option<Uuid>,
    plan: Option<Uuid>,
    task: Option<Uuid>,
    detail: Value,
}

impl<'s, 't> Tx<'s, 't> {
    pub(in crate::store) fn new(tx: &'s Transaction<'t>) -> Self {
        Tx { tx, audit: Mutex::new(Vec::new()) }
    }

    /// An audit row, written at the next [`Tx::flush`].
    pub(in crate::store) fn audit(
        &self,
        actor: &str,
        event: &'static str,
        request: Option<RequestId>,
        plan: Option<PlanId>,
        task: Option<TaskId>,
        detail: Value,
    ) {
        let row = AuditRow {
            actor: actor.to_owned(),
            event,
            request: request.map(Uuid::from),
            plan: plan.map(Uuid::from),
            task: task.map(Uuid::from),
            detail,
        };
        self.audit.lock().expect("no audit push panics").push(row);
    }

    /// Writes the audit rows gathered since the last flush, in the order they came.
    pub(in crate::store) async fn flush(&self) -> Result<(), Error> {
        let rows = std::mem::take(&mut *self.audit.lock().expect("no audit push panics"));
        if rows.is_empty() {
            return Ok(());
        }
        let actors: Vec<&str> = rows.iter().map(|r| r.actor.as_str()).collect();
        let events: Vec<&str> = rows.iter().map(|r| r.event).collect();
        let requests: Vec<Option<Uuid>> = rows.iter().map(|r| r.request).collect();
        let plans: Vec<Option<Uuid>> = rows.iter().map(|r| r.plan).collect();
        let tasks: Vec<Option<Uuid>> = rows.iter().map(|r| r.task).collect();
        let details: Vec<&Value> = rows.iter().map(|r| &r.detail).collect();
        self.tx
            .execute_cached(
                "INSERT INTO audit_log (actor, event, request_id, plan_id, task_id, detail)
                 SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::uuid[], $6::jsonb[])",
                &[&actors, &events, &requests, &plans, &tasks, &details],
            )
            .await?;
        Ok(())
    }
}

impl<'t> std::ops::Deref for Tx<'_, 't> {
    type Target = Transaction<'t>;

    fn deref(&self) -> &Transaction<'t> {
        self.tx
    }
}

/// One write within `tx`, with its audit row. Each kind of write has a function of its own, in
/// the file of the rows it writes; it is given the whole write and takes it apart itself, so
/// that this match stays one line a kind.
async fn apply_one(
    tx: &Tx<'_, '_>,
    actor: &str,
    write: &Write,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    match write {
        Write::Request(w) => requests::request(tx, actor, w).await,
        Write::Decomposition(w) => requests::decomposition(tx, actor, w).await,
        Write::RequestFailed(w) => requests::request_failed(tx, actor, w).await,
        Write::Cancel(write::Cancel { request_id, by, reason }) => {
            requests::cancel(tx, actor, *request_id, by, reason, agents).await
        }
        Write::Plan(w) => plans::plan(tx, actor, w).await,
        Write::Fallback(w) => plans::fallback(tx, actor, w).await,
        Write::AwaitingApproval(w) => plans::awaiting_approval(tx, actor, w).await,
        Write::Approval(w) => plans::approval(tx, actor, w).await,
        Write::PlanFinished(w) => plans::plan_finished(tx, actor, w).await,
        Write::Route(w) => tasks::route(tx, actor, w, agents).await,
        Write::TaskWaiting(w) => tasks::task_waiting(tx, actor, w).await,
        Write::WaitExpired(w) => tasks::wait_expired(tx, actor, w).await,
        Write::Dispatched(w) => tasks::dispatched(tx, actor, w).await,
        Write::DispatchFailed(w) => tasks::dispatch_failed(tx, actor, w, agents).await,
        Write::TaskFinished(w) => tasks::task_finished(tx, actor, w, agents).await,
        Write::TaskRetry(w) => tasks::task_retry(tx, actor, w).await,
        Write::TaskFailed(w) => tasks::task_failed(tx, actor, w).await,
        Write::QuotaUsed(w) => {
            super::quota::record_use(tx, actor, w).await?;
            Ok(Step::Ok)
        }
        Write::Agent(w) => agents::agent(tx, actor, w).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::effect::Attempt;

    fn retry(task_id: TaskId) -> Write {
        let plan_id = RequestId::random().plan_id();
        Write::TaskRetry(write::TaskRetry {
            attempt: Attempt { request_id: RequestId::random(), plan_id, task_id, number: 1 },
            reason: "x".into(),
        })
    }

    #[test]
    fn a_batch_is_applied_in_the_order_of_the_tasks_it_updates() {
        let plan = RequestId::random().plan_id();
        let mut tasks: Vec<TaskId> = ["a", "b", "c"].iter().map(|k| plan.task_id(k)).collect();
        tasks.sort_by_key(|t| t.as_uuid());
        let [low, mid, high] = [tasks[0], tasks[1], tasks[2]];
        let no_task = Write::RequestFailed(write::RequestFailed {
            request_id: RequestId::random(),
            reason: "x".into(),
        });
        let batch: Vec<Vec<Write>> =
            vec![vec![retry(high)], vec![retry(high), retry(low)], vec![no_task], vec![retry(mid)]];
        // Messages that update no task first; a message goes by the lowest task it updates.
        assert_eq!(lock_order(batch.iter().map(Vec::as_slice)), [2, 1, 3, 0]);
    }
}
