//! The lease sweeper: now and then, the attempts whose lease ran out (or whose agent went
//! silent) are reported to the track stage as failed, so that their tasks are routed again.

use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{Broker, Outgoing};
use crate::decisions::leases::{LeasePolicy, expiry_message};
use crate::pipeline::topology::StageQueue;
use crate::store::Store;

/// Looks for expired leases every `policy.sweep_every_secs` until `shutdown`, and reports each
/// to `<namespace>.results`. Errors are logged and the next sweep tries again.
pub async fn sweep(
    store: Store,
    broker: &Broker,
    policy: &LeasePolicy,
    heartbeat_ttl_secs: u64,
    shutdown: CancellationToken,
) {
    let every = Duration::from_secs(policy.sweep_every_secs.max(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let expired = match store.expired_leases(heartbeat_ttl_secs, 500).await {
            Ok(expired) => expired,
            Err(err) => {
                warn!(error = %err, "lease sweep could not read the store");
                continue;
            }
        };
        for lease in &expired {
            let envelope = expiry_message(lease, Utc::now());
            let outgoing =
                Outgoing::json(broker.names().of(StageQueue::Results), envelope.message_id, &envelope);
            match broker.publish(&outgoing).await {
                Ok(()) => {
                    info!(task = %lease.task_id, attempt = lease.attempt, agent = %lease.agent_id, "lease expired")
                }
                Err(err) => warn!(error = %err, "could not report an expired lease; the next sweep will"),
            }
        }
    }
}
