//! The watchdog of a runner: a consumer that receives nothing while messages wait in its queue
//! has stalled (its channel is stuck), and the runner stops so that the worker connects again.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{debug, error};

use super::Runner;
use crate::pipeline::stages::Stage;

/// Whether a consumer has stalled: it has held nothing and received nothing for `patience`
/// (`idle` is `None` while it holds a delivery: a slow message is not a stall) while `ready`
/// messages wait in its queue.
fn stalled(idle: Option<Duration>, ready: u32, patience: Duration) -> bool {
    idle.is_some_and(|idle| idle >= patience) && ready > 0
}

/// When a runner last received a delivery, and how many it holds.
pub(super) struct Activity {
    last: std::sync::Mutex<tokio::time::Instant>,
    holding: std::sync::atomic::AtomicUsize,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            last: std::sync::Mutex::new(tokio::time::Instant::now()),
            holding: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub(super) fn received(&self) {
        *self.last.lock().expect("activity lock") = tokio::time::Instant::now();
        self.holding.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    pub(super) fn settled(&self) {
        self.holding.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// How long since the last delivery, if none is held.
    pub(super) fn idle(&self) -> Option<Duration> {
        let last = *self.last.lock().expect("activity lock");
        (self.holding.load(std::sync::atomic::Ordering::SeqCst) == 0).then(|| last.elapsed())
    }
}

impl<S: Stage> Runner<S> {
    /// Checks now and then that the consumer still receives (see [`stalled`]); if it does not,
    /// stops the runner (flagging `stall`), so that the worker connects again. Never returns.
    pub(super) async fn watch(&self, broken: &CancellationToken, stall: &std::sync::atomic::AtomicBool) {
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
