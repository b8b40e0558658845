//! The writes to agents' rows: an agent's heartbeat, and the ledger of what a transaction
//! changes of their capacity and counts, applied last.

use std::collections::{BTreeMap, BTreeSet};

use deadpool_postgres::Transaction;

use super::{Step, Tx};
use crate::model::effect::write;
use crate::store::Error;
use crate::store::cached::Cached;

/// An agent's heartbeat (`Write::Agent`): registers the agent or updates it.
pub(super) async fn agent(tx: &Tx<'_, '_>, actor: &str, w: &write::Agent) -> Result<Step, Error> {
    let write::Agent { heartbeat, received_at } = w;
    let at = heartbeat.sent_at.map_or(*received_at, |sent| sent.min(*received_at));
    let capabilities: Vec<&str> = heartbeat.capabilities.iter().map(String::as_str).collect();
    let inserted: bool = tx
        .query_one_cached(
            "INSERT INTO agents (id, capabilities, capacity, labels, cpu, memory_mb, gpu, last_heartbeat,
                                 heartbeat_every_secs)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (id) DO UPDATE SET capabilities = EXCLUDED.capabilities,
                 capacity = EXCLUDED.capacity, labels = EXCLUDED.labels, cpu = EXCLUDED.cpu,
                 memory_mb = EXCLUDED.memory_mb, gpu = EXCLUDED.gpu,
                 last_heartbeat = GREATEST(agents.last_heartbeat, EXCLUDED.last_heartbeat),
                 heartbeat_every_secs = COALESCE(EXCLUDED.heartbeat_every_secs, agents.heartbeat_every_secs)
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
                &heartbeat.every_secs.map(|secs| i32::try_from(secs).unwrap_or(i32::MAX)),
            ],
        )
        .await?
        .get(0);
    // The row is locked by the upsert: fold in what was given back since, so that an agent that
    // nobody reserves on for a while keeps few rows waiting to be read with it.
    let id = heartbeat.agent_id.as_str();
    for (_, (in_flight, succeeded, failed)) in fold(tx, &[id]).await? {
        tx.execute_cached(
            "UPDATE agents SET in_flight = GREATEST(in_flight + $2, 0), succeeded = succeeded + $3,
                 failed = failed + $4
             WHERE id = $1",
            &[&id, &in_flight, &succeeded, &failed],
        )
        .await?;
    }
    if inserted {
        let detail = serde_json::to_value(heartbeat).expect("heartbeat serializes");
        tx.audit(actor, "agent.registered", None, None, None, detail);
    }
    Ok(Step::Ok)
}

/// What a transaction changes of agents' rows, applied last and in the order of the agents' ids.
///
/// Every routing decision reserves capacity on an agent and every result gives it back, so a few
/// agent rows are the hottest rows there are. Updated as the writes come, each would stay locked
/// for the rest of its transaction, and two transactions could each hold the agent the other
/// waits for (PostgreSQL breaks such a deadlock only after `deadlock_timeout`, a second, failing
/// one of them). Collected here and applied just before the commit, in one order for everyone,
/// they are locked briefly and never in a cycle; and only a reservation locks them at all: what
/// is given back and counted is appended to `agent_deltas`, which the next reservation on the
/// agent (or its heartbeat) folds into its row, and readers read through `agents_now`.
#[derive(Default)]
pub(super) struct AgentLedger {
    changes: BTreeMap<String, AgentChange>,
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
    pub(super) fn reserve(&mut self, agent: &str) {
        self.entry(agent).in_flight += 1;
    }

    /// One task fewer on `agent` (never below none).
    pub(super) fn release(&mut self, agent: &str) {
        self.entry(agent).in_flight -= 1;
    }

    pub(super) fn finished(&mut self, agent: &str, success: bool) {
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
    pub(super) async fn apply_all(
        tx: &Transaction<'_>,
        ledgers: &[(usize, AgentLedger)],
    ) -> Result<BTreeMap<usize, String>, Error> {
        Self::apply_checked(tx, ledgers, true).await
    }

    /// Applies ledgers without checking capacity: for writes that only give it back and count
    /// outcomes, which must not be turned down.
    pub(super) async fn apply_unchecked(
        tx: &Transaction<'_>,
        ledgers: &[(usize, AgentLedger)],
    ) -> Result<(), Error> {
        Self::apply_checked(tx, ledgers, false).await.map(drop)
    }

    async fn apply_checked(
        tx: &Transaction<'_>,
        ledgers: &[(usize, AgentLedger)],
        check_capacity: bool,
    ) -> Result<BTreeMap<usize, String>, Error> {
        // The agents that a message reserves a slot on: their rows are locked, what was given
        // back meanwhile is folded in, and the reservations are checked against capacity.
        let reserving: BTreeSet<&str> = ledgers
            .iter()
            .flat_map(|(_, ledger)| ledger.changes.iter())
            .filter(|(_, change)| change.in_flight > 0)
            .map(|(agent, _)| agent.as_str())
            .collect();
        // Each locked agent's row as it will be: (in flight, capacity, succeeded, failed).
        let mut agents: BTreeMap<&str, (i32, i32, i64, i64)> = BTreeMap::new();
        if !reserving.is_empty() {
            let ids: Vec<&str> = reserving.into_iter().collect();
            let rows = tx
                .query_cached(
                    "SELECT id, in_flight, capacity FROM agents WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                    &[&ids],
                )
                .await?;
            for row in &rows {
                let id: &str = row.get(0);
                if let Some(id) = ids.iter().find(|known| **known == id) {
                    agents.insert(*id, (row.get(1), row.get(2), 0, 0));
                }
            }
            for (id, (in_flight, succeeded, failed)) in fold(tx, &ids).await? {
                if let Some(agent) = agents.get_mut(id.as_str()) {
                    agent.0 = (agent.0 + in_flight).max(0);
                    agent.2 += succeeded;
                    agent.3 += failed;
                }
            }
        }
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
        if !agents.is_empty() {
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
        }
        // Everything else is given back or counted as a row of its own, waiting for no one. An
        // agent that is not registered has nothing to give back.
        let mut deltas: BTreeMap<&str, AgentChange> = BTreeMap::new();
        for (agent, change) in ledgers.iter().flat_map(|(_, ledger)| ledger.changes.iter()) {
            if !agents.contains_key(agent.as_str()) {
                let delta = deltas.entry(agent).or_default();
                delta.in_flight += change.in_flight;
                delta.succeeded += change.succeeded;
                delta.failed += change.failed;
            }
        }
        if !deltas.is_empty() {
            let ids: Vec<&str> = deltas.keys().copied().collect();
            let in_flight: Vec<i32> = deltas.values().map(|d| d.in_flight).collect();
            let succeeded: Vec<i64> = deltas.values().map(|d| d.succeeded).collect();
            let failed: Vec<i64> = deltas.values().map(|d| d.failed).collect();
            tx.execute_cached(
                "INSERT INTO agent_deltas (agent_id, in_flight, succeeded, failed)
                 SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[], $4::bigint[])
                     AS d (agent_id, in_flight, succeeded, failed)
                 WHERE EXISTS (SELECT 1 FROM agents a WHERE a.id = d.agent_id)",
                &[&ids, &in_flight, &succeeded, &failed],
            )
            .await?;
        }
        Ok(rejected)
    }

    /// Applies one message's ledger: a conflict if its reservation does not fit.
    pub(super) async fn apply(self, tx: &Transaction<'_>) -> Result<Step, Error> {
        let mut rejected = Self::apply_checked(tx, &[(0, self)], true).await?;
        Ok(match rejected.remove(&0) {
            Some(reason) => Step::Conflict(reason),
            None => Step::Ok,
        })
    }
}

/// Takes in what was given back to `agents` and counted for them since it was last folded,
/// by agent: (in flight, succeeded, failed), to be added to their rows. Only with their rows
/// locked, so that two folds never count the same rows.
pub(super) async fn fold(
    tx: &Transaction<'_>,
    agents: &[&str],
) -> Result<Vec<(String, (i32, i64, i64))>, Error> {
    let rows = tx
        .query_cached(
            "WITH folded AS (DELETE FROM agent_deltas WHERE agent_id = ANY($1)
                             RETURNING agent_id, in_flight, succeeded, failed)
             SELECT agent_id, sum(in_flight)::int, sum(succeeded)::bigint, sum(failed)::bigint
             FROM folded GROUP BY agent_id",
            &[&agents],
        )
        .await?;
    Ok(rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2), row.get(3)))).collect())
}
