//! Applying a message's writes: one transaction holding the idempotency marker, the writes and
//! their audit rows.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::Transaction;
use serde_json::{Value, json};
use uuid::Uuid;

use super::cached::Cached;
use super::{Error, Store};
use crate::model::domain::{PlanStatus, RequestStatus, TaskStatus};
use crate::model::effect::Write;
use crate::model::ids::{MessageId, PlanId, RequestId, TaskId};

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

/// How [`Store::deliver_once`] went.
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
        let applied = match apply_in(&tx, actor, marker, writes).await? {
            (Applied::Done, agents) => match agents.apply(&tx).await? {
                Step::Ok => Applied::Done,
                Step::Conflict(reason) => Applied::Conflict(reason),
            },
            (applied, _) => applied,
        };
        match applied {
            Applied::Done => tx.commit().await?,
            // A duplicate wrote nothing; a conflict must leave nothing written.
            Applied::Duplicate(_) | Applied::Conflict(_) => tx.rollback().await?,
        }
        Ok(applied)
    }

    /// Applies the writes of many messages in one transaction and one commit, each message's
    /// writes all or nothing (a savepoint each): what one message's conflict or error undoes is
    /// its own writes, not the others'.
    ///
    /// A commit waits for the write-ahead log to reach the disk, and one transaction per message
    /// spends most of its time in that wait. The agent rows are the hottest rows there are
    /// (every routing decision reserves capacity on one, every result gives it back), so the
    /// batch changes them last, all at once: locked in the order of their ids (two batches never
    /// wait for each other in a cycle), only for the end of the transaction. A message whose
    /// reservation no longer fits then is a conflict, and the batch is done again without it.
    ///
    /// The outer error is the batch's (the connection or the commit failed: nothing was
    /// written); the inner ones are single messages', whose writes were undone.
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
        // Messages found not to fit on their agent, with why; each round leaves out more.
        let order = lock_order(batch.iter().map(|(_, writes)| *writes));
        let mut client = self.client().await?;
        let mut full = overbooked(&client, batch, &order).await?;
        loop {
            let mut tx = client.transaction().await?;
            let mut outcomes: Vec<Option<Result<Applied, Error>>> = batch.iter().map(|_| None).collect();
            let mut ledgers = Vec::with_capacity(batch.len());
            for &index in &order {
                let (marker, writes) = &batch[index];
                if let Some(reason) = full.get(&index) {
                    outcomes[index] = Some(Ok(Applied::Conflict(reason.clone())));
                    continue;
                }
                let (outcome, agents) = apply_saved(&mut tx, actor, *marker, writes).await?;
                ledgers.extend(agents.map(|agents| (index, agents)));
                outcomes[index] = Some(outcome);
            }
            let rejected = AgentLedger::apply_all(&tx, &ledgers).await?;
            if rejected.is_empty() {
                tx.commit().await?;
                return Ok(outcomes.into_iter().map(|o| o.expect("every message has an outcome")).collect());
            }
            tx.rollback().await?;
            full.extend(rejected);
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
    /// still recorded as delivered. Only the database failing before the commit leaves a
    /// delivered input unrecorded; its copy is then delivered again, with the same message id.
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
        let mut ledgers = Vec::new();
        for (&index, result) in sending.iter().zip(sent) {
            if let Err(err) = result {
                outcomes[index] = Some(Delivery::Failed(err));
                continue;
            }
            let (marker, writes) = &batch[index];
            let (outcome, agents) = apply_saved(&mut tx, actor, Some(marker), writes).await?;
            ledgers.extend(agents.map(|agents| (index, agents)));
            let delivery = match outcome {
                Ok(Applied::Done) => Delivery::Done,
                Ok(Applied::Duplicate(_)) => Delivery::Already,
                // This message's writes only: the others of the batch, delivered too, stand.
                Ok(Applied::Conflict(reason)) => Delivery::Conflict(reason),
                Err(err) => Delivery::Refused(err),
            };
            if matches!(delivery, Delivery::Conflict(_) | Delivery::Refused(_)) {
                apply_in(&tx, actor, Some(marker), &[]).await?;
            }
            outcomes[index] = Some(delivery);
        }
        // Releases and counts only (reservations were refused above): nothing here can be
        // turned down, so no delivered input goes unrecorded for want of capacity.
        AgentLedger::apply_unchecked(&tx, &ledgers).await?;
        tx.commit().await?;
        Ok(outcomes.into_iter().map(|outcome| outcome.expect("every input has an outcome")).collect())
    }
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
        Write::Route { route, .. } => route.task_id,
        Write::TaskFinished { result, .. } => result.task_id,
        Write::Dispatched { task_id, .. }
        | Write::DispatchFailed { task_id, .. }
        | Write::TaskRetry { task_id, .. }
        | Write::TaskFailed { task_id, .. } => *task_id,
        _ => return None,
    };
    Some(task.as_uuid())
}

/// Whether `write` takes a slot of an agent (which the end of a batch may find taken).
fn reserves_capacity(write: &Write) -> bool {
    matches!(write, Write::Route { route, .. } if route.reserves_capacity)
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
                Write::Route { route, .. } if route.reserves_capacity => Some(route.agent_id.to_string()),
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
        .query_cached("SELECT id, capacity - in_flight FROM agents WHERE id = ANY($1)", &[&ids])
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

/// One message of a batch, under a savepoint of its own: kept if applied (with what it changes
/// of agents' rows, for the batch to apply last), undone if it is a duplicate, a conflict or
/// refused (its own error, inside). The outer error is the transaction's: the connection or the
/// server failed all of it, and the whole batch must be done again.
async fn apply_saved(
    tx: &mut Transaction<'_>,
    actor: &str,
    marker: Option<&Marker<'_>>,
    writes: &[Write],
) -> Result<(Result<Applied, Error>, Option<AgentLedger>), Error> {
    let savepoint = tx.transaction().await?;
    match apply_in(&savepoint, actor, marker, writes).await {
        Ok((Applied::Done, agents)) => {
            savepoint.commit().await?;
            Ok((Ok(Applied::Done), Some(agents)))
        }
        Ok((other, _)) => {
            savepoint.rollback().await?;
            Ok((Ok(other), None))
        }
        Err(err) if err.is_transient() => Err(err),
        Err(err) => {
            savepoint.rollback().await?;
            Ok((Err(err), None))
        }
    }
}

/// One message's writes within `tx`: its marker first (a duplicate writes nothing more), then
/// each write with its audit row. What they change of agents' rows is returned, for the caller
/// to apply last. On a conflict, the caller must undo what was written.
async fn apply_in(
    tx: &Transaction<'_>,
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

/// What a transaction changes of agents' rows, applied last and in the order of the agents' ids.
///
/// Every routing decision reserves capacity on an agent and every result gives it back, so a few
/// agent rows are the hottest rows there are. Updated as the writes come, each would stay locked
/// for the rest of its transaction, and two transactions could each hold the agent the other
/// waits for (PostgreSQL breaks such a deadlock only after `deadlock_timeout`, a second, failing
/// one of them). Collected here and applied just before the commit, in one order for everyone,
/// they are locked briefly and never in a cycle.
#[derive(Default)]
struct AgentLedger {
    changes: std::collections::BTreeMap<String, AgentChange>,
}

#[derive(Default)]
struct AgentChange {
    in_flight: i32,
    succeeded: i64,
    failed: i64,
}

impl AgentLedger {
    fn entry(&mut self, agent: &str) -> &mut AgentChange {
        self.changes.entry(agent.to_owned()).or_default()
    }

    /// One more task on `agent`, if it has room: a conflict at [`AgentLedger::apply`] if not.
    fn reserve(&mut self, agent: &str) {
        self.entry(agent).in_flight += 1;
    }

    /// One task fewer on `agent` (never below none).
    fn release(&mut self, agent: &str) {
        self.entry(agent).in_flight -= 1;
    }

    fn finished(&mut self, agent: &str, success: bool) {
        let change = self.entry(agent);
        if success {
            change.succeeded += 1;
        } else {
            change.failed += 1;
        }
    }

    /// Applies the ledgers of a batch's messages (by position in the batch), in their order, and
    /// returns the messages whose reservation did not fit, with why; if there are any, nothing
    /// was changed.
    async fn apply_all(
        tx: &Transaction<'_>,
        ledgers: &[(usize, AgentLedger)],
    ) -> Result<BTreeMap<usize, String>, Error> {
        Self::apply_checked(tx, ledgers, true).await
    }

    /// Applies ledgers without checking capacity: for writes that only give it back and count
    /// outcomes, which must not be turned down.
    async fn apply_unchecked(tx: &Transaction<'_>, ledgers: &[(usize, AgentLedger)]) -> Result<(), Error> {
        Self::apply_checked(tx, ledgers, false).await.map(drop)
    }

    async fn apply_checked(
        tx: &Transaction<'_>,
        ledgers: &[(usize, AgentLedger)],
        check_capacity: bool,
    ) -> Result<BTreeMap<usize, String>, Error> {
        let ids: BTreeSet<&str> =
            ledgers.iter().flat_map(|(_, ledger)| ledger.changes.keys().map(String::as_str)).collect();
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let ids: Vec<&str> = ids.into_iter().collect();
        let rows = tx
            .query_cached(
                "SELECT id, in_flight, capacity FROM agents WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await?;
        // Each agent's row as it will be: (in flight, capacity, succeeded, failed).
        let mut agents: BTreeMap<&str, (i32, i32, i64, i64)> = rows
            .iter()
            .filter_map(|row| {
                let id: &str = row.get(0);
                let id = ids.iter().find(|known| **known == id)?;
                Some((*id, (row.get(1), row.get(2), 0, 0)))
            })
            .collect();
        let mut rejected = BTreeMap::new();
        for (index, ledger) in ledgers {
            let fits = !check_capacity
                || ledger.changes.iter().all(|(agent, change)| match agents.get(agent.as_str()) {
                    Some((in_flight, capacity, ..)) => {
                        change.in_flight <= 0 || in_flight + change.in_flight <= *capacity
                    }
                    None => change.in_flight <= 0,
                });
            if !fits {
                let agent = ledger.changes.iter().find(|(_, c)| c.in_flight > 0).map_or("", |(a, _)| a);
                rejected.insert(*index, format!("agent {agent} has no spare capacity left"));
                continue;
            }
            for (agent, change) in &ledger.changes {
                if let Some((in_flight, _, succeeded, failed)) = agents.get_mut(agent.as_str()) {
                    *in_flight = (*in_flight + change.in_flight).max(0);
                    *succeeded += change.succeeded;
                    *failed += change.failed;
                }
            }
        }
        if !rejected.is_empty() {
            return Ok(rejected);
        }
        let ids: Vec<&str> = agents.keys().copied().collect();
        let in_flight: Vec<i32> = agents.values().map(|a| a.0).collect();
        let succeeded: Vec<i64> = agents.values().map(|a| a.2).collect();
        let failed: Vec<i64> = agents.values().map(|a| a.3).collect();
        tx.execute_cached(
            "UPDATE agents a SET in_flight = d.in_flight, succeeded = a.succeeded + d.succeeded,
                 failed = a.failed + d.failed
             FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[]) AS d (id, in_flight, succeeded, failed)
             WHERE a.id = d.id",
            &[&ids, &in_flight, &succeeded, &failed],
        )
        .await?;
        Ok(rejected)
    }

    async fn apply(self, tx: &Transaction<'_>) -> Result<Step, Error> {
        for (agent, change) in &self.changes {
            let updated = tx
                .execute_cached(
                    "UPDATE agents SET in_flight = GREATEST(in_flight + $2, 0),
                         succeeded = succeeded + $3, failed = failed + $4
                     WHERE id = $1 AND ($2 <= 0 OR in_flight + $2 <= capacity)",
                    &[agent, &change.in_flight, &change.succeeded, &change.failed],
                )
                .await?;
            if updated == 0 && change.in_flight > 0 {
                return Ok(Step::Conflict(format!("agent {agent} has no spare capacity left")));
            }
        }
        Ok(Step::Ok)
    }
}

/// Cancels the tasks of `plan_id` that never started (pending, or waiting for an agent), with
/// `reason`: nothing more of the plan will run.
pub(super) async fn cancel_pending(tx: &Transaction<'_>, plan_id: PlanId, reason: &str) -> Result<(), Error> {
    tx.execute_cached(
        "UPDATE tasks SET status = $2, status_reason = $3, waiting_since = NULL, wait_turn = NULL,
             updated_at = now()
         WHERE plan_id = $1 AND status = ANY($4)",
        &[&plan_id.as_uuid(), &TaskStatus::Cancelled.as_str(), &reason, &NOT_STARTED.as_slice()],
    )
    .await?;
    Ok(())
}

/// The statuses of a task that has not gone to an agent.
const NOT_STARTED: [&str; 2] = ["pending", "waiting"];

/// The statuses of a task whose attempt an agent holds (or is about to).
const ON_AN_AGENT: [&str; 2] = ["routed", "dispatched"];

/// Whether `status` is the plan's (locked until the end of the transaction): writes that move a
/// plan on must not touch one that was cancelled meanwhile.
async fn plan_cancelled(tx: &Transaction<'_>, plan_id: PlanId) -> Result<bool, Error> {
    let row = tx
        .query_opt_cached("SELECT status FROM plans WHERE id = $1 FOR UPDATE", &[&plan_id.as_uuid()])
        .await?;
    Ok(row.is_some_and(|row| row.get::<_, &str>(0) == PlanStatus::Cancelled.as_str()))
}

pub(super) async fn audit(
    tx: &Transaction<'_>,
    actor: &str,
    event: &str,
    request: Option<RequestId>,
    plan: Option<PlanId>,
    task: Option<TaskId>,
    detail: Value,
) -> Result<(), Error> {
    tx.execute_cached(
        "INSERT INTO audit_log (actor, event, request_id, plan_id, task_id, detail)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[&actor, &event, &request.map(Uuid::from), &plan.map(Uuid::from), &task.map(Uuid::from), &detail],
    )
    .await?;
    Ok(())
}

async fn set_request_status(
    tx: &Transaction<'_>,
    id: RequestId,
    status: RequestStatus,
    from: &[RequestStatus],
) -> Result<(), Error> {
    let from: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
    tx.execute_cached(
        "UPDATE requests SET status = $2, updated_at = now() WHERE id = $1 AND status = ANY($3)",
        &[&id.as_uuid(), &status.as_str(), &from],
    )
    .await?;
    Ok(())
}

/// A request cancelled by `by`: see [`Write::Cancel`].
async fn cancel(
    tx: &Transaction<'_>,
    actor: &str,
    request_id: RequestId,
    by: &str,
    reason: &str,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    // The plan first, then the request, as a plan that finishes takes them: two such
    // transactions never wait for each other in a cycle. Locked for update, the request makes a
    // plan being made for it (which shares the lock) wait, and find it cancelled.
    tx.query_cached("SELECT 1 FROM plans WHERE request_id = $1 FOR UPDATE", &[&request_id.as_uuid()]).await?;
    let Some(row) = tx
        .query_opt_cached("SELECT status FROM requests WHERE id = $1 FOR UPDATE", &[&request_id.as_uuid()])
        .await?
    else {
        return Ok(Step::Conflict(format!("no request {request_id}")));
    };
    let status: RequestStatus = super::read::parse_status(row.get(0))?;
    if status == RequestStatus::Cancelled {
        return Ok(Step::Ok);
    }
    if status.is_terminal() {
        return Ok(Step::Conflict(format!("request {request_id} is {status}")));
    }
    let why = format!("cancelled by {by}: {reason}");
    tx.execute_cached(
        "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now() WHERE id = $1",
        &[&request_id.as_uuid(), &RequestStatus::Cancelled.as_str(), &why],
    )
    .await?;
    tx.execute_cached(
        "INSERT INTO cancellations (request_id, cancelled_by, reason) VALUES ($1, $2, $3)",
        &[&request_id.as_uuid(), &by, &reason],
    )
    .await?;
    let under_way: Vec<&str> = [PlanStatus::Planned, PlanStatus::AwaitingApproval, PlanStatus::Approved]
        .map(|s| s.as_str())
        .to_vec();
    // The version too: a result decided on the plan as it was is decided again, and ignored.
    let plan = tx
        .query_opt_cached(
            "UPDATE plans SET status = $2, version = version + 1, updated_at = now()
             WHERE request_id = $1 AND status = ANY($3) RETURNING id",
            &[&request_id.as_uuid(), &PlanStatus::Cancelled.as_str(), &under_way],
        )
        .await?;
    let mut stopped = Vec::new();
    if let Some(row) = plan {
        let plan_id = PlanId::from_uuid(row.get(0));
        let unfinished: Vec<&str> = NOT_STARTED.iter().chain(&ON_AN_AGENT).copied().collect();
        let rows = tx
            .query_cached(
                "WITH hit AS (SELECT id, status FROM tasks WHERE plan_id = $1 AND status = ANY($2) FOR UPDATE)
                 UPDATE tasks t SET status = 'cancelled', status_reason = $3, waiting_since = NULL,
                     wait_turn = NULL, lease_expires_at = NULL, updated_at = now()
                 FROM hit WHERE t.id = hit.id
                 RETURNING t.id, t.attempt, hit.status, t.agent_id",
                &[&plan_id.as_uuid(), &unfinished, &why],
            )
            .await?;
        for row in &rows {
            let was: &str = row.get(2);
            if !ON_AN_AGENT.contains(&was) {
                continue;
            }
            let (task_id, attempt): (Uuid, i32) = (row.get(0), row.get(1));
            // What the attempt's routing decision reserved goes back now: its result, if it
            // comes, is late and ignored.
            let reserved = tx
                .query_opt_cached(
                    "SELECT agent_id FROM routing_decisions
                     WHERE task_id = $1 AND attempt = $2 AND reserved_capacity",
                    &[&task_id, &attempt],
                )
                .await?;
            if let Some(reserved) = reserved {
                agents.release(reserved.get(0));
            }
            let agent: Option<String> = row.get(3);
            stopped.push(json!({ "task_id": task_id, "attempt": attempt, "agent_id": agent, "was": was }));
        }
        super::quota::settle(tx, actor, request_id, plan_id, "quota.settled").await?;
        let detail = json!({ "by": by, "reason": reason, "tasks_cancelled": rows.len(), "stopped": stopped });
        audit(tx, actor, "request.cancelled", Some(request_id), Some(plan_id), None, detail).await?;
    } else {
        let detail = json!({ "by": by, "reason": reason, "tasks_cancelled": 0, "stopped": stopped });
        audit(tx, actor, "request.cancelled", Some(request_id), None, None, detail).await?;
    }
    Ok(Step::Ok)
}

async fn apply_one(
    tx: &Transaction<'_>,
    actor: &str,
    write: &Write,
    agents: &mut AgentLedger,
) -> Result<Step, Error> {
    match write {
        Write::Request(meta) => {
            let inserted = tx
                .execute_cached(
                    "INSERT INTO requests (id, text, submitted_by, priority, auto_approve, status)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                    &[
                        &meta.request_id.as_uuid(),
                        &meta.text,
                        &meta.submitted_by,
                        &i16::from(meta.priority),
                        &meta.auto_approve,
                        &RequestStatus::Received.as_str(),
                    ],
                )
                .await?;
            if inserted == 1 {
                let detail = json!({ "submitted_by": meta.submitted_by, "priority": meta.priority,
                                     "auto_approve": meta.auto_approve });
                audit(tx, actor, "request.received", Some(meta.request_id), None, None, detail).await?;
            }
        }
        Write::Decomposition { request_id, decomposition } => {
            let inserted = tx
                .execute_cached(
                    "INSERT INTO decompositions (request_id, decomposer, intents, confidence, fallback_reason)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                    &[
                        &request_id.as_uuid(),
                        &decomposition.decomposer,
                        &serde_json::to_value(&decomposition.intents).expect("intents serialize"),
                        &decomposition.confidence.clamp(0.0, 1.0),
                        &decomposition.fallback_reason,
                    ],
                )
                .await?;
            if inserted == 1 {
                set_request_status(tx, *request_id, RequestStatus::Decomposed, &[RequestStatus::Received])
                    .await?;
                let work_types: Vec<&str> =
                    decomposition.intents.iter().map(|i| i.work_type.as_str()).collect();
                let detail = json!({ "decomposer": decomposition.decomposer, "work_types": work_types,
                                     "confidence": decomposition.confidence,
                                     "fallback_reason": decomposition.fallback_reason });
                audit(tx, actor, "request.decomposed", Some(*request_id), None, None, detail).await?;
            }
        }
        Write::RequestFailed { request_id, reason } => {
            // Only a request under way fails: one that ended (completed, rejected, cancelled,
            // failed already) keeps how it ended.
            let under_way: Vec<&str> = RequestStatus::UNDER_WAY.map(|s| s.as_str()).to_vec();
            let updated = tx
                .execute_cached(
                    "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
                     WHERE id = $1 AND status = ANY($4)",
                    &[&request_id.as_uuid(), &RequestStatus::Failed.as_str(), reason, &under_way],
                )
                .await?;
            if updated == 1 {
                let detail = json!({ "reason": reason });
                audit(tx, actor, "request.failed", Some(*request_id), None, None, detail).await?;
            }
        }
        Write::Plan { plan, complexity, infeasible, duration_basis } => {
            // Shared with a cancellation, which locks the request for update: a plan is never
            // made for a request cancelled meanwhile.
            let request = tx
                .query_opt_cached(
                    "SELECT status FROM requests WHERE id = $1 FOR SHARE",
                    &[&plan.request_id.as_uuid()],
                )
                .await?;
            if request.is_some_and(|row| row.get::<_, &str>(0) == RequestStatus::Cancelled.as_str()) {
                return Ok(Step::Conflict(format!("request {} is cancelled", plan.request_id)));
            }
            let terms = serde_json::to_value(&complexity.terms).expect("terms serialize");
            let inserted = tx
                .execute_cached(
                    "INSERT INTO plans (id, request_id, status, complexity, complexity_terms, infeasible)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[
                        &plan.id.as_uuid(),
                        &plan.request_id.as_uuid(),
                        &PlanStatus::Planned.as_str(),
                        &complexity.score,
                        &terms,
                        &serde_json::to_value(infeasible).expect("infeasible tasks serialize"),
                    ],
                )
                .await?;
            if inserted == 1 {
                let insert = tx
                    .prepare_cached(
                        "INSERT INTO tasks (id, plan_id, position, key, work_type, description,
                             estimated_duration_secs, cpu, memory_mb, gpu, capabilities, depends_on,
                             affinity, status, duration_basis)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
                    )
                    .await?;
                for (position, task) in plan.tasks().iter().enumerate() {
                    let capabilities: Vec<&str> = task.capabilities.iter().map(String::as_str).collect();
                    let depends_on: Vec<Uuid> = task.depends_on.iter().map(|d| d.as_uuid()).collect();
                    tx.execute(
                        &insert,
                        &[
                            &task.id.as_uuid(),
                            &plan.id.as_uuid(),
                            &(position as i32),
                            &task.key,
                            &task.work_type.as_str(),
                            &task.description,
                            &(task.estimated_duration_secs as i32),
                            &task.resources.cpu,
                            &(task.resources.memory_mb as i64),
                            &(task.resources.gpu as i32),
                            &capabilities,
                            &depends_on,
                            &serde_json::to_value(&task.affinity).expect("affinity serializes"),
                            &TaskStatus::Pending.as_str(),
                            &duration_basis.get(&task.id).map_or("catalog", String::as_str),
                        ],
                    )
                    .await?;
                }
                set_request_status(tx, plan.request_id, RequestStatus::Planned, &[RequestStatus::Decomposed])
                    .await?;
                let keys: Vec<&str> = plan.tasks().iter().map(|t| t.key.as_str()).collect();
                let detail = json!({ "tasks": keys, "complexity": complexity.score, "terms": terms,
                                     "infeasible": infeasible, "learnt_durations": duration_basis });
                audit(tx, actor, "plan.created", Some(plan.request_id), Some(plan.id), None, detail).await?;
            }
        }
        Write::Fallback { request_id, decision, reserve } => {
            if plan_cancelled(tx, decision.plan_id).await? {
                return Ok(Step::Conflict(format!("plan {} is cancelled", decision.plan_id)));
            }
            let inserted = tx
                .execute_cached(
                    "INSERT INTO fallback_decisions (plan_id, use_external, provider, reason,
                         complexity, estimated_cost_micros, quota_left_micros, external_tasks, infeasible,
                         complexity_terms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9,
                             (SELECT complexity_terms FROM plans WHERE id = $1))
                     ON CONFLICT DO NOTHING",
                    &[
                        &decision.plan_id.as_uuid(),
                        &decision.use_external,
                        &decision.provider,
                        &decision.reason,
                        &decision.complexity,
                        &decision.estimated_cost_micros,
                        &decision.quota_left_micros,
                        &decision.external_tasks.iter().map(|t| t.as_uuid()).collect::<Vec<_>>(),
                        &decision.infeasible,
                    ],
                )
                .await?;
            if inserted == 0 {
                // Another message of the same plan decided first: decide again on its decision.
                return Ok(Step::Conflict(format!(
                    "plan {} already has a fallback decision",
                    decision.plan_id
                )));
            }
            if let Some(reservation) = reserve {
                let left = match super::quota::reserve(tx, decision.plan_id, reservation).await? {
                    Ok(left) => left,
                    Err(conflict) => return Ok(Step::Conflict(conflict)),
                };
                // The figure that counts is the one after this reservation, under the row lock.
                tx.execute_cached(
                    "UPDATE fallback_decisions SET quota_left_micros = $2 WHERE plan_id = $1",
                    &[&decision.plan_id.as_uuid(), &left],
                )
                .await?;
            }
            let detail = serde_json::to_value(decision).expect("decision serializes");
            audit(tx, actor, "fallback.decided", Some(*request_id), Some(decision.plan_id), None, detail)
                .await?;
        }
        Write::AwaitingApproval { request_id, plan_id, reason } => {
            let updated = tx
                .execute_cached(
                    "UPDATE plans SET status = $2, updated_at = now() WHERE id = $1 AND status = $3",
                    &[
                        &plan_id.as_uuid(),
                        &PlanStatus::AwaitingApproval.as_str(),
                        &PlanStatus::Planned.as_str(),
                    ],
                )
                .await?;
            if updated == 1 {
                set_request_status(
                    tx,
                    *request_id,
                    RequestStatus::AwaitingApproval,
                    &[RequestStatus::Planned],
                )
                .await?;
                let detail = json!({ "reason": reason });
                audit(tx, actor, "plan.awaiting_approval", Some(*request_id), Some(*plan_id), None, detail)
                    .await?;
            }
        }
        Write::Approval { request_id, plan_id, approved, by, reason } => {
            if plan_cancelled(tx, *plan_id).await? {
                return Ok(Step::Conflict(format!("plan {plan_id} is cancelled")));
            }
            let inserted = tx
                .execute_cached(
                    "INSERT INTO approvals (plan_id, approved, decided_by, reason) VALUES ($1, $2, $3, $4)
                     ON CONFLICT DO NOTHING",
                    &[&plan_id.as_uuid(), approved, by, reason],
                )
                .await?;
            if inserted == 0 {
                // A verdict is final. The same one again is a replay; the opposite one lost a race
                // (approve and reject at once) and must not be reported as done.
                let recorded: bool = tx
                    .query_one_cached(
                        "SELECT approved FROM approvals WHERE plan_id = $1",
                        &[&plan_id.as_uuid()],
                    )
                    .await?
                    .get(0);
                if recorded != *approved {
                    let verdict = if recorded { "approved" } else { "rejected" };
                    return Ok(Step::Conflict(format!("plan {plan_id} is already {verdict}")));
                }
                return Ok(Step::Ok);
            }
            let (plan_status, request_status, event) = if *approved {
                (PlanStatus::Approved, RequestStatus::InProgress, "plan.approved")
            } else {
                (PlanStatus::Rejected, RequestStatus::Rejected, "plan.rejected")
            };
            let before_approval: Vec<&str> =
                [PlanStatus::Planned, PlanStatus::AwaitingApproval].iter().map(|s| s.as_str()).collect();
            tx.execute_cached(
                "UPDATE plans SET status = $2, updated_at = now() WHERE id = $1 AND status = ANY($3)",
                &[&plan_id.as_uuid(), &plan_status.as_str(), &before_approval],
            )
            .await?;
            // Only a request still waiting moves on: an approval never revives a failed request.
            let waiting: Vec<&str> = [RequestStatus::Planned, RequestStatus::AwaitingApproval]
                .iter()
                .map(|s| s.as_str())
                .collect();
            tx.execute_cached(
                "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
                 WHERE id = $1 AND status = ANY($4)",
                &[
                    &request_id.as_uuid(),
                    &request_status.as_str(),
                    &(!approved).then_some(reason.as_str()),
                    &waiting,
                ],
            )
            .await?;
            let detail = json!({ "by": by, "reason": reason });
            audit(tx, actor, event, Some(*request_id), Some(*plan_id), None, detail).await?;
            if !approved {
                cancel_pending(tx, *plan_id, &format!("cancelled: the plan was rejected ({reason})")).await?;
                // A rejected plan will not use the external model: give its quota back.
                super::quota::settle(tx, actor, *request_id, *plan_id, "quota.released").await?;
            }
        }
        Write::Route { request_id, plan_id, attempt, decision_id, route, ready_at } => {
            let inserted = tx
                .execute_cached(
                    "INSERT INTO routing_decisions (id, task_id, plan_id, attempt, agent_id, score, reason,
                         candidates, reserved_capacity, ready_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
                    &[
                        &decision_id.as_uuid(),
                        &route.task_id.as_uuid(),
                        &plan_id.as_uuid(),
                        &(*attempt as i32),
                        &route.agent_id.as_str(),
                        &route.score,
                        &route.reason,
                        &serde_json::to_value(&route.candidates).expect("candidates serialize"),
                        &route.reserves_capacity,
                        ready_at,
                    ],
                )
                .await?;
            if inserted == 0 {
                // Another decision routed this attempt first. Going on would publish a second
                // dispatch of it: decide again instead, and find the task routed.
                return Ok(Step::Conflict(format!(
                    "task {} attempt {attempt} is routed already",
                    route.task_id
                )));
            }
            let updated = tx
                .execute_cached(
                    "UPDATE tasks SET status = $2, attempt = $3, agent_id = $4, status_reason = $5,
                         waiting_since = NULL, wait_turn = NULL, updated_at = now()
                     WHERE id = $1 AND attempt = $3 - 1 AND status = ANY($6)",
                    &[
                        &route.task_id.as_uuid(),
                        &TaskStatus::Routed.as_str(),
                        &(*attempt as i32),
                        &route.agent_id.as_str(),
                        &route.reason,
                        &NOT_STARTED.as_slice(),
                    ],
                )
                .await?;
            if updated == 0 {
                // Cancelled, or moved on, since the decision.
                return Ok(Step::Conflict(format!(
                    "task {} is no longer ready for attempt {attempt}",
                    route.task_id
                )));
            }
            if route.reserves_capacity {
                agents.reserve(route.agent_id.as_str());
            }
            let detail = json!({ "attempt": attempt, "agent_id": route.agent_id, "score": route.score,
                                 "reason": route.reason });
            audit(tx, actor, "task.routed", Some(*request_id), Some(*plan_id), Some(route.task_id), detail)
                .await?;
        }
        Write::TaskWaiting { request_id, plan_id, task_id, attempt, priority, since, reason, candidates } => {
            // Its turn: the next of its plan's in line, but never before the head of the line
            // of its priority, so that a plan joining late takes turns with the others from
            // where they are instead of going first until it catches up.
            let updated = tx
                .execute_cached(
                    "UPDATE tasks SET status = 'waiting', waiting_since = $3, status_reason = $4,
                         priority = $5, updated_at = now(),
                         wait_turn = GREATEST(
                             COALESCE((SELECT min(w.wait_turn) FROM tasks w
                                       WHERE w.status = 'waiting' AND w.priority = $5), 0),
                             COALESCE((SELECT max(w.wait_turn) + 1 FROM tasks w
                                       WHERE w.status = 'waiting' AND w.plan_id = $2), 0))
                     WHERE id = $1 AND status = 'pending' AND attempt = $6 - 1",
                    &[
                        &task_id.as_uuid(),
                        &plan_id.as_uuid(),
                        since,
                        reason,
                        &i16::from(*priority),
                        &(*attempt as i32),
                    ],
                )
                .await?;
            if updated == 0 {
                return Ok(Step::Conflict(format!(
                    "task {task_id} is no longer pending for attempt {attempt}"
                )));
            }
            let detail = json!({ "attempt": attempt, "reason": reason, "candidates": candidates });
            audit(tx, actor, "task.waiting", Some(*request_id), Some(*plan_id), Some(*task_id), detail)
                .await?;
        }
        Write::WaitExpired {
            request_id,
            plan_id,
            task_id,
            attempt,
            decision_id,
            reason,
            candidates,
            ready_at,
        } => {
            let inserted = tx
                .execute_cached(
                    "INSERT INTO routing_decisions (id, task_id, plan_id, attempt, agent_id, score, reason,
                         candidates, reserved_capacity, ready_at)
                     VALUES ($1, $2, $3, $4, NULL, NULL, $5, $6, false, $7) ON CONFLICT DO NOTHING",
                    &[
                        &decision_id.as_uuid(),
                        &task_id.as_uuid(),
                        &plan_id.as_uuid(),
                        &(*attempt as i32),
                        reason,
                        &serde_json::to_value(candidates).expect("candidates serialize"),
                        ready_at,
                    ],
                )
                .await?;
            let updated = if inserted == 1 {
                tx.execute_cached(
                    "UPDATE tasks SET status = $2, attempt = $3, status_reason = $4, waiting_since = NULL,
                         wait_turn = NULL, finished_at = now(), updated_at = now()
                     WHERE id = $1 AND status = 'waiting' AND attempt = $3 - 1",
                    &[&task_id.as_uuid(), &TaskStatus::Failed.as_str(), &(*attempt as i32), reason],
                )
                .await?
            } else {
                0
            };
            if updated == 0 {
                return Ok(Step::Conflict(format!("task {task_id} no longer waits for attempt {attempt}")));
            }
            let detail = json!({ "attempt": attempt, "reason": reason, "gave_up_waiting": true });
            audit(tx, actor, "task.failed", Some(*request_id), Some(*plan_id), Some(*task_id), detail)
                .await?;
        }
        Write::Cancel { request_id, by, reason } => {
            return cancel(tx, actor, *request_id, by, reason, agents).await;
        }
        Write::Dispatched {
            request_id,
            plan_id,
            task_id,
            attempt,
            decision_id,
            agent_id,
            queue,
            message_id,
            lease_secs,
        } => {
            let inserted = tx
                .execute_cached(
                    "INSERT INTO dispatches (task_id, attempt, decision_id, agent_id, queue, message_id)
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                    &[
                        &task_id.as_uuid(),
                        &(*attempt as i32),
                        &decision_id.as_uuid(),
                        &agent_id.as_str(),
                        queue,
                        &message_id.as_uuid(),
                    ],
                )
                .await?;
            if inserted == 1 {
                // Only a routed task becomes dispatched: a fast agent's result may have been
                // recorded before this confirm, and a finished task stays finished.
                tx.execute_cached(
                    "UPDATE tasks SET status = $2, lease_expires_at = now() + make_interval(secs => $5),
                         updated_at = now()
                     WHERE id = $1 AND attempt = $3 AND status = $4",
                    &[
                        &task_id.as_uuid(),
                        &TaskStatus::Dispatched.as_str(),
                        &(*attempt as i32),
                        &TaskStatus::Routed.as_str(),
                        &f64::from(*lease_secs),
                    ],
                )
                .await?;
                let detail = json!({ "attempt": attempt, "agent_id": agent_id, "queue": queue,
                                     "message_id": message_id, "lease_secs": lease_secs });
                audit(
                    tx,
                    actor,
                    "task.dispatched",
                    Some(*request_id),
                    Some(*plan_id),
                    Some(*task_id),
                    detail,
                )
                .await?;
            }
        }
        Write::TaskFinished { request_id, result, plan_version } => {
            let bumped = tx
                .execute_cached(
                    "UPDATE plans SET version = version + 1 WHERE id = $1 AND version = $2",
                    &[&result.plan_id.as_uuid(), plan_version],
                )
                .await?;
            if bumped == 0 {
                return Ok(Step::Conflict(format!(
                    "plan {} recorded another result since this decision",
                    result.plan_id
                )));
            }
            let source = if result.lease_expired { "lease" } else { "agent" };
            let inserted = tx
                .execute_cached(
                    "INSERT INTO task_results (task_id, attempt, agent_id, success, output, error, source,
                         started_at, finished_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                    &[
                        &result.task_id.as_uuid(),
                        &(result.attempt as i32),
                        &result.agent_id.as_str(),
                        &result.success,
                        &result.output,
                        &result.error,
                        &source,
                        &result.started_at,
                        &result.finished_at,
                    ],
                )
                .await?;
            if inserted == 0 {
                // Another result of this attempt was recorded first (an agent's and its lease's
                // expiry, say): decide again, and find the attempt finished.
                return Ok(Step::Conflict(format!(
                    "task {} attempt {} has a result already",
                    result.task_id, result.attempt
                )));
            }
            let status = if result.success { TaskStatus::Succeeded } else { TaskStatus::Failed };
            let updated = tx
                .execute_cached(
                    "UPDATE tasks SET status = $3, finished_at = $4, lease_expires_at = NULL,
                         status_reason = COALESCE($5, status_reason), updated_at = now()
                     WHERE id = $1 AND attempt = $2 AND status = ANY($6)",
                    &[
                        &result.task_id.as_uuid(),
                        &(result.attempt as i32),
                        &status.as_str(),
                        &result.finished_at,
                        &result.error,
                        &ON_AN_AGENT.as_slice(),
                    ],
                )
                .await?;
            if updated == 0 {
                // Cancelled since the decision: its result is late, and its slot was given back.
                return Ok(Step::Conflict(format!(
                    "task {} attempt {} is no longer on its agent",
                    result.task_id, result.attempt
                )));
            }
            // Give back what the attempt's routing decision reserved, on the agent it reserved.
            let reserved = tx
                .query_opt_cached(
                    "SELECT agent_id FROM routing_decisions
                     WHERE task_id = $1 AND attempt = $2 AND reserved_capacity",
                    &[&result.task_id.as_uuid(), &(result.attempt as i32)],
                )
                .await?;
            if let Some(row) = reserved {
                agents.release(row.get(0));
            }
            agents.finished(result.agent_id.as_str(), result.success);
            let event = if result.success { "task.succeeded" } else { "task.attempt_failed" };
            let detail = json!({ "attempt": result.attempt, "agent_id": result.agent_id, "source": source,
                                 "error": result.error });
            audit(tx, actor, event, Some(*request_id), Some(result.plan_id), Some(result.task_id), detail)
                .await?;
        }
        Write::TaskRetry { request_id, plan_id, task_id, attempt, reason } => {
            tx.execute_cached(
                "UPDATE tasks SET status = $3, status_reason = $4, finished_at = NULL, updated_at = now()
                 WHERE id = $1 AND attempt = $2",
                &[&task_id.as_uuid(), &(*attempt as i32), &TaskStatus::Pending.as_str(), reason],
            )
            .await?;
            let detail = json!({ "failed_attempt": attempt, "reason": reason });
            audit(tx, actor, "task.retry", Some(*request_id), Some(*plan_id), Some(*task_id), detail).await?;
        }
        Write::TaskFailed { request_id, plan_id, task_id, reason, cancelled } => {
            tx.execute_cached(
                "UPDATE tasks SET status = $2, status_reason = $3, waiting_since = NULL, wait_turn = NULL,
                     updated_at = now()
                 WHERE id = $1",
                &[&task_id.as_uuid(), &TaskStatus::Failed.as_str(), reason],
            )
            .await?;
            let cancelled_ids: Vec<Uuid> = cancelled.iter().map(|t| t.as_uuid()).collect();
            let why = format!("cancelled: a task it depends on failed ({reason})");
            tx.execute_cached(
                "UPDATE tasks SET status = $2, status_reason = $3, waiting_since = NULL, wait_turn = NULL,
                     updated_at = now()
                 WHERE id = ANY($1) AND status = ANY($4)",
                &[&cancelled_ids, &TaskStatus::Cancelled.as_str(), &why, &NOT_STARTED.as_slice()],
            )
            .await?;
            let detail = json!({ "reason": reason, "cancelled": cancelled });
            audit(tx, actor, "task.failed", Some(*request_id), Some(*plan_id), Some(*task_id), detail)
                .await?;
        }
        Write::PlanFinished { request_id, plan_id, failure } => {
            let (plan_status, request_status, event) = match failure {
                None => (PlanStatus::Completed, RequestStatus::Completed, "request.completed"),
                Some(_) => (PlanStatus::Failed, RequestStatus::Failed, "request.failed"),
            };
            let updated = tx
                .execute_cached(
                    "UPDATE plans SET status = $2, updated_at = now() WHERE id = $1 AND status = $3",
                    &[&plan_id.as_uuid(), &plan_status.as_str(), &PlanStatus::Approved.as_str()],
                )
                .await?;
            if updated == 1 {
                if let Some(reason) = failure {
                    // Nothing else of a failed plan will run.
                    cancel_pending(tx, *plan_id, &format!("cancelled: the plan failed ({reason})")).await?;
                }
                tx.execute_cached(
                    "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
                     WHERE id = $1 AND status = $4",
                    &[
                        &request_id.as_uuid(),
                        &request_status.as_str(),
                        failure,
                        &RequestStatus::InProgress.as_str(),
                    ],
                )
                .await?;
                let detail = json!({ "reason": failure });
                audit(tx, actor, event, Some(*request_id), Some(*plan_id), None, detail).await?;
            }
            // Whatever the plan's reservation still holds goes back; once, even if the plan
            // was finished before.
            super::quota::settle(tx, actor, *request_id, *plan_id, "quota.settled").await?;
        }
        Write::QuotaUsed { request_id, plan_id, task_id, attempt, provider, usage, cost_micros, used_at } => {
            super::quota::record_use(
                tx,
                actor,
                *request_id,
                *plan_id,
                *task_id,
                *attempt,
                provider,
                usage,
                *cost_micros,
                *used_at,
            )
            .await?;
        }
        Write::DispatchFailed { request_id, plan_id, task_id, attempt, decision_id, agent_id, reason } => {
            let updated = tx
                .execute_cached(
                    "UPDATE tasks SET status = $2, status_reason = $3, updated_at = now()
                     WHERE id = $1 AND attempt = $4 AND status = $5",
                    &[
                        &task_id.as_uuid(),
                        &TaskStatus::DispatchFailed.as_str(),
                        reason,
                        &(*attempt as i32),
                        &TaskStatus::Routed.as_str(),
                    ],
                )
                .await?;
            if updated == 1 {
                // Give back the capacity that the routing decision reserved.
                let reserved = tx
                    .query_opt_cached(
                        "SELECT 1 FROM routing_decisions WHERE id = $1 AND reserved_capacity",
                        &[&decision_id.as_uuid()],
                    )
                    .await?;
                if reserved.is_some() {
                    agents.release(agent_id.as_str());
                }
                let detail = json!({ "attempt": attempt, "agent_id": agent_id, "reason": reason });
                audit(
                    tx,
                    actor,
                    "task.dispatch_failed",
                    Some(*request_id),
                    Some(*plan_id),
                    Some(*task_id),
                    detail,
                )
                .await?;
            }
        }
        Write::Agent { heartbeat, received_at } => {
            let at = heartbeat.sent_at.map_or(*received_at, |sent| sent.min(*received_at));
            let capabilities: Vec<&str> = heartbeat.capabilities.iter().map(String::as_str).collect();
            let inserted: bool = tx
                .query_one_cached(
                    "INSERT INTO agents (id, capabilities, capacity, labels, cpu, memory_mb, gpu, last_heartbeat)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (id) DO UPDATE SET capabilities = EXCLUDED.capabilities,
                         capacity = EXCLUDED.capacity, labels = EXCLUDED.labels, cpu = EXCLUDED.cpu,
                         memory_mb = EXCLUDED.memory_mb, gpu = EXCLUDED.gpu,
                         last_heartbeat = GREATEST(agents.last_heartbeat, EXCLUDED.last_heartbeat)
                     RETURNING (xmax = 0)",
                    &[
                        &heartbeat.agent_id.as_str(),
                        &capabilities,
                        &(heartbeat.capacity as i32),
                        &serde_json::to_value(&heartbeat.labels).expect("labels serialize"),
                        &heartbeat.resources.cpu,
                        &(heartbeat.resources.memory_mb as i64),
                        &(heartbeat.resources.gpu as i32),
                        &at,
                    ],
                )
                .await?
                .get(0);
            if inserted {
                let detail = serde_json::to_value(heartbeat).expect("heartbeat serializes");
                audit(tx, actor, "agent.registered", None, None, None, detail).await?;
            }
        }
    }
    Ok(Step::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retry(task_id: TaskId) -> Write {
        let plan_id = RequestId::random().plan_id();
        Write::TaskRetry { request_id: RequestId::random(), plan_id, task_id, attempt: 1, reason: "x".into() }
    }

    #[test]
    fn a_batch_is_applied_in_the_order_of_the_tasks_it_updates() {
        let plan = RequestId::random().plan_id();
        let mut tasks: Vec<TaskId> = ["a", "b", "c"].iter().map(|k| plan.task_id(k)).collect();
        tasks.sort_by_key(|t| t.as_uuid());
        let [low, mid, high] = [tasks[0], tasks[1], tasks[2]];
        let no_task = Write::RequestFailed { request_id: RequestId::random(), reason: "x".into() };
        let batch: Vec<Vec<Write>> =
            vec![vec![retry(high)], vec![retry(high), retry(low)], vec![no_task], vec![retry(mid)]];
        // Messages that update no task first; a message goes by the lowest task it updates.
        assert_eq!(lock_order(batch.iter().map(Vec::as_slice)), [2, 1, 3, 0]);
    }
}
