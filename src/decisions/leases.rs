//! Leases: every dispatched attempt must report within its lease, or it is given up. The lease
//! is derived from the task's estimated duration; the sweeper (`pipeline::sweeper`) finds
//! expired leases and reports each with [`expiry_message`] to the track stage as a failed
//! attempt, which re-routes the task and releases the capacity the attempt held. A result that
//! arrives later belongs to an older attempt and is ignored.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::model::domain::Task;
use crate::model::ids::MessageId;
use crate::model::wire::{Envelope, TaskResult};
use crate::store::ExpiredLease;

/// How long an agent has for a task.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct LeasePolicy {
    /// The lease is the estimated duration times this…
    pub factor: f64,
    /// …plus this many seconds.
    pub grace_secs: u32,
    /// How often the sweeper looks for expired leases.
    pub sweep_every_secs: u64,
}

impl Default for LeasePolicy {
    fn default() -> Self {
        LeasePolicy { factor: 2.0, grace_secs: 60, sweep_every_secs: 5 }
    }
}

impl LeasePolicy {
    /// The lease of `task`, in seconds.
    pub fn lease_secs(&self, task: &Task) -> u32 {
        let scaled = f64::from(task.estimated_duration_secs) * self.factor.max(0.0);
        // Saturating: an absurd estimate gives the longest lease, not a wrapped-around short one.
        (scaled.min(f64::from(u32::MAX)) as u32).saturating_add(self.grace_secs)
    }
}

/// The message that tells the track stage an attempt's lease expired. Its id derives from the
/// task and attempt, so two sweepers (or two sweeps) report one expiry once.
pub fn expiry_message(lease: &ExpiredLease, now: DateTime<Utc>) -> Envelope<TaskResult> {
    let key = format!("lease:{}:{}", lease.task_id, lease.attempt);
    Envelope::new(
        MessageId::from_uuid(Uuid::new_v5(&lease.task_id.as_uuid(), key.as_bytes())),
        lease.request_id,
        now,
        TaskResult {
            plan_id: lease.plan_id,
            task_id: lease.task_id,
            attempt: lease.attempt,
            agent_id: lease.agent_id.clone(),
            success: false,
            output: String::new(),
            error: Some(if lease.agent_silent {
                format!(
                    "agent {} went silent before reporting (its heartbeat expired at {})",
                    lease.agent_id,
                    lease.expired_at.format("%H:%M:%S")
                )
            } else {
                format!(
                    "lease expired at {}: no result from {} in time",
                    lease.expired_at.format("%H:%M:%S"),
                    lease.agent_id
                )
            }),
            started_at: lease.dispatched_at,
            finished_at: now,
            lease_expired: true,
            usage: None,
            simulated: false,
        },
    )
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::model::domain::Resources;
    use crate::model::ids::{AgentId, RequestId, WorkType};

    fn task(secs: u32) -> Task {
        Task {
            id: RequestId::random().plan_id().task_id("t"),
            key: "t".into(),
            work_type: WorkType::parse("deployment").unwrap(),
            description: String::new(),
            estimated_duration_secs: secs,
            resources: Resources::default(),
            capabilities: BTreeSet::new(),
            depends_on: vec![],
            affinity: BTreeMap::new(),
        }
    }

    #[test]
    fn a_lease_is_the_estimate_scaled_plus_grace() {
        let policy = LeasePolicy { factor: 2.0, grace_secs: 60, sweep_every_secs: 5 };
        assert_eq!(policy.lease_secs(&task(120)), 300);
        let none = LeasePolicy { factor: 0.0, grace_secs: 2, sweep_every_secs: 1 };
        assert_eq!(none.lease_secs(&task(120)), 2);
        let huge = LeasePolicy { factor: 1e12, grace_secs: 60, sweep_every_secs: 5 };
        assert_eq!(huge.lease_secs(&task(120)), u32::MAX);
    }

    #[test]
    fn an_expiry_is_reported_once_per_attempt() {
        let request_id = RequestId::random();
        let lease = ExpiredLease {
            request_id,
            plan_id: request_id.plan_id(),
            task_id: request_id.plan_id().task_id("1.prepare"),
            attempt: 2,
            agent_id: AgentId::parse("gone").unwrap(),
            dispatched_at: Utc::now(),
            expired_at: Utc::now(),
            agent_silent: false,
        };
        let (a, b) = (expiry_message(&lease, Utc::now()), expiry_message(&lease, Utc::now()));
        assert_eq!(a.message_id, b.message_id);
        assert!(a.payload.lease_expired && !a.payload.success);
        let next = ExpiredLease { attempt: 3, ..lease };
        assert_ne!(expiry_message(&next, Utc::now()).message_id, a.message_id);
    }
}
