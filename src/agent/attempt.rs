//! One attempt at an agent: the assignment accepted or rejected, run (unless told to stop it),
//! and its result reported before the assignment is acknowledged; and the stops that
//! `switchyard cancel` sends on the agent's control queue.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use backon::Retryable;
use chrono::{DateTime, Utc};
use futures::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Execution, Shared, TaskHandler, truncate_utf8};
use crate::backoff;
use crate::broker::{Incoming, Outgoing};
use crate::model::ids::{AgentId, TaskId};
use crate::model::wire::{self, Envelope, MAX_RESULT_OUTPUT_BYTES, TaskAbort, TaskAssignment, TaskResult};
use crate::pipeline::topology::StageQueue;
use crate::telemetry::metrics::{AgentLabels, AgentOutcome, Gauge, metrics};
use crate::telemetry::trace;

/// An attempt of a task: what an abort names.
pub(super) type AttemptKey = (TaskId, u32);

/// The attempts this agent was told to stop: those running, aborted at once; those not started
/// yet (still in its queue, or on their way there), never run. Bounded: the oldest are forgotten
/// first, long after their tasks would have come.
#[derive(Default)]
pub(super) struct Stops {
    /// The attempts running, each with its stop and how many deliveries of it run (a copy of an
    /// assignment may run beside the first).
    running: HashMap<AttemptKey, (CancellationToken, usize)>,
    stopped: HashMap<AttemptKey, String>,
    order: VecDeque<AttemptKey>,
}

impl Stops {
    /// How many stopped attempts are remembered.
    const REMEMBERED: usize = 10_000;

    /// Stops `key` with `reason`: aborts it if it runs, and remembers it. Whether it was running.
    fn stop(&mut self, key: AttemptKey, reason: String) -> bool {
        if self.stopped.insert(key, reason).is_none() {
            self.order.push_back(key);
            if self.order.len() > Self::REMEMBERED
                && let Some(old) = self.order.pop_front()
            {
                self.stopped.remove(&old);
            }
        }
        self.running.get(&key).inspect(|(token, _)| token.cancel()).is_some()
    }

    /// Starts `key`, unless it was stopped: then why.
    fn start(&mut self, key: AttemptKey) -> Result<CancellationToken, String> {
        if let Some(reason) = self.stopped.get(&key) {
            return Err(reason.clone());
        }
        let (token, runs) = self.running.entry(key).or_default();
        *runs += 1;
        Ok(token.clone())
    }

    fn finish(&mut self, key: &AttemptKey) {
        if let Some((_, runs)) = self.running.get_mut(key) {
            *runs -= 1;
            if *runs == 0 {
                self.running.remove(key);
            }
        }
    }
}

/// Counts a task in flight for as long as it lives, in the agent's count and in its metric.
struct InFlight<'a>(&'a AtomicU32, Gauge);

impl<'a> InFlight<'a> {
    fn enter(count: &'a AtomicU32, agent: &AgentId) -> Self {
        let gauge =
            metrics().agent_slots_used.get_or_create(&AgentLabels { agent: agent.to_string() }).clone();
        count.fetch_add(1, Ordering::SeqCst);
        gauge.inc();
        InFlight(count, gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
        self.1.dec();
    }
}

/// Counts an attempt that ended `outcome` (succeeded, failed, refused).
fn count(agent: &AgentId, outcome: &'static str) {
    metrics().agent_tasks.get_or_create(&AgentOutcome { agent: agent.to_string(), outcome }).inc();
}

/// Runs the handler; a panic is a failure.
async fn execute<H: TaskHandler>(handler: &H, task: &TaskAssignment) -> Execution {
    match AssertUnwindSafe(handler.run(task)).catch_unwind().await {
        Ok(execution) => execution,
        Err(panic) => {
            let what = crate::panic_message(panic.as_ref());
            error!(task = %task.task.id, panic = %what, "the task handler panicked");
            Execution::failed(format!("the task handler panicked: {what}"))
        }
    }
}

/// A control message: an attempt to stop. Acknowledged once acted on; one that cannot be read,
/// or is for another agent, is dropped with a log line (it would come back for ever).
pub(super) async fn take_control<H>(shared: &Shared<H>, delivery: Incoming) {
    let agent = &shared.settings.id;
    match wire::parse_envelope::<TaskAbort>(&delivery.body, wire::MAX_ENVELOPE_BYTES) {
        Ok(abort) if abort.payload.agent_id == *agent => {
            let TaskAbort { task_id, attempt, reason, .. } = abort.payload;
            let running = shared.stops.lock().expect("stops lock").stop((task_id, attempt), reason);
            info!(%agent, task = %task_id, attempt, running, "told to stop a task");
        }
        Ok(abort) => {
            error!(%agent, addressed_to = %abort.payload.agent_id, "a stop for another agent: dropped");
        }
        Err(err) => error!(%agent, error = %err, "unusable control message: dropped"),
    }
    if let Err(err) = delivery.ack().await {
        warn!(%agent, error = %err, "cannot acknowledge a control message");
    }
}

/// One delivery: parse, run, report, then settle; in a span of its own (`task`), the child of
/// the dispatch that sent it, which its result carries back.
pub(super) async fn handle<H: TaskHandler>(shared: Arc<Shared<H>>, delivery: Incoming) {
    let Some(assignment) = accept(&shared, &delivery).await else { return };
    let task = &assignment.payload;
    let span = info_span!(
        "task",
        agent = %shared.settings.id,
        request_id = %assignment.request_id,
        plan_id = %task.plan_id,
        task_id = %task.task.id,
        task_key = %task.task.key,
        attempt = task.attempt,
        trace_id = tracing::field::Empty,
    );
    trace::adopt(&span, &delivery.headers);
    if let Some(trace_id) = trace::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    async {
        // Counted until its result is out: a slot is taken until the broker has the result.
        let _counted = InFlight::enter(&shared.in_flight, &shared.settings.id);
        let (execution, started_at, finished_at) = run(&shared, &assignment.payload).await;
        report(&shared, delivery, &assignment, execution, started_at, finished_at).await;
    }
    .instrument(span)
    .await
}

/// The assignment a delivery carries, if this agent is to run it; one that is unusable, or
/// addressed to another agent, is rejected here.
async fn accept<H>(shared: &Shared<H>, delivery: &Incoming) -> Option<Envelope<TaskAssignment>> {
    let agent = &shared.settings.id;
    let assignment = match wire::parse_envelope::<TaskAssignment>(&delivery.body, wire::MAX_ENVELOPE_BYTES) {
        Ok(assignment) => assignment,
        Err(err) => {
            error!(
                %agent,
                message_id = ?delivery.message_id,
                error = %err,
                "unusable task assignment: dropped, no result"
            );
            count(agent, "refused");
            // It can never be run, and given back it would come straight back. Agent queues are
            // declared without arguments (README, the contract), so they have no dead-letter
            // exchange: the broker drops a rejected message. The log above is its only trace.
            if let Err(err) = delivery.reject().await {
                warn!(%agent, error = %err, "cannot reject the assignment");
            }
            return None;
        }
    };
    let task = &assignment.payload;
    if task.agent_id != *agent {
        count(agent, "refused");
        // Its result would be reported under this agent's id, and the track stage ignores a result
        // from an agent other than the one the task was routed to: running it would be for nothing.
        // Given back, it would come straight back here.
        error!(
            %agent,
            assigned_to = %task.agent_id,
            task = %task.task.id,
            message_id = ?delivery.message_id,
            "an assignment for another agent: dropped, not run, no result"
        );
        if let Err(err) = delivery.reject().await {
            warn!(%agent, error = %err, "cannot reject the assignment");
        }
        return None;
    }
    Some(assignment)
}

/// Runs an attempt, unless it was stopped before it started; aborts it if it is stopped while
/// it runs. When it started and finished.
async fn run<H: TaskHandler>(
    shared: &Shared<H>,
    task: &TaskAssignment,
) -> (Execution, DateTime<Utc>, DateTime<Utc>) {
    let agent = &shared.settings.id;
    let key = (task.task.id, task.attempt);
    let started = shared.stops.lock().expect("stops lock").start(key);
    debug!(%agent, task = %task.task.id, key = %task.task.key, attempt = task.attempt, "task started");
    let started_at = Utc::now();
    let execution = match started {
        Err(reason) => {
            info!(%agent, task = %task.task.id, attempt = task.attempt, "not run: stopped before it started");
            Execution::failed(format!("cancelled before it started: {reason}"))
        }
        Ok(stop) => {
            // Dropping the handler's run is what stops it: an `exec` command's group is killed.
            let execution = tokio::select! {
                execution = execute(&*shared.handler, task) => execution,
                () = stop.cancelled() => {
                    let reason = shared.stops.lock().expect("stops lock").stopped.get(&key).cloned().unwrap_or_default();
                    info!(%agent, task = %task.task.id, attempt = task.attempt, "aborted: {reason}");
                    Execution::failed(format!("cancelled while running: {reason}"))
                }
            };
            shared.stops.lock().expect("stops lock").finish(&key);
            execution
        }
    };
    let finished_at = Utc::now();
    count(agent, if execution.success { "succeeded" } else { "failed" });
    let took = (finished_at - started_at).to_std().unwrap_or_default();
    metrics().agent_task.get_or_create(&AgentLabels { agent: agent.to_string() }).observe(took.as_secs_f64());
    debug!(
        %agent,
        task = %task.task.id,
        attempt = task.attempt,
        success = execution.success,
        error = execution.error.as_deref().unwrap_or(""),
        "task finished"
    );
    (execution, started_at, finished_at)
}

/// Publishes the attempt's result, then acknowledges the assignment; if the result cannot be
/// published, the assignment goes back to the queue to be run again.
async fn report<H>(
    shared: &Shared<H>,
    delivery: Incoming,
    assignment: &Envelope<TaskAssignment>,
    execution: Execution,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
) {
    let agent = &shared.settings.id;
    let task = &assignment.payload;
    let result = TaskResult {
        plan_id: task.plan_id,
        task_id: task.task.id,
        attempt: task.attempt,
        agent_id: agent.clone(),
        success: execution.success,
        output: truncate_utf8(execution.output, MAX_RESULT_OUTPUT_BYTES),
        error: execution.error.map(|e| truncate_utf8(e, MAX_RESULT_OUTPUT_BYTES)),
        started_at,
        finished_at,
        lease_expired: false,
        usage: execution.usage,
        simulated: execution.simulated,
    };
    let envelope =
        Envelope::derived(assignment.message_id, "result", assignment.request_id, finished_at, result);
    let mut outgoing =
        Outgoing::json(shared.broker.names().of(StageQueue::Results), envelope.message_id, &envelope);
    outgoing.priority = delivery.priority;
    trace::inject(&tracing::Span::current(), &mut outgoing.headers);
    let published = (|| shared.broker.publish(&outgoing))
        .retry(backoff::exponential(
            Duration::from_millis(200),
            Duration::from_secs(5),
            shared.settings.result_attempts,
        ))
        .notify(|err, wait| warn!(%agent, task = %task.task.id, error = %err, ?wait, "result not published, retrying"))
        .await;
    match published {
        Ok(()) => {
            if let Err(err) = delivery.ack().await {
                // The broker will deliver it again; the rerun reports under the same message id.
                warn!(%agent, task = %task.task.id, error = %err, "result published but the ack failed");
            }
        }
        Err(err) => {
            error!(
                %agent,
                task = %task.task.id,
                error = %err,
                "result not published; the assignment goes back to the queue to be run again"
            );
            if let Err(err) = delivery.requeue().await {
                warn!(%agent, error = %err, "cannot give the assignment back; the broker will when the channel closes");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::assignment;

    #[test]
    fn a_stop_aborts_a_running_attempt_and_keeps_one_not_started_from_running() {
        let task = TaskId::from_uuid(uuid::Uuid::new_v4());
        let mut stops = Stops::default();
        let running = stops.start((task, 1)).unwrap();
        assert!(stops.stop((task, 1), "cancelled by ops".into()), "it was running");
        assert!(running.is_cancelled());
        stops.finish(&(task, 1));
        // Two deliveries of one attempt share its stop until both are done.
        let (a, b) = (stops.start((task, 4)).unwrap(), stops.start((task, 4)).unwrap());
        stops.finish(&(task, 4));
        assert!(stops.stop((task, 4), "cancelled".into()), "the second still runs");
        assert!(a.is_cancelled() && b.is_cancelled());
        stops.finish(&(task, 4));
        // Another attempt of the same task is not stopped; a stopped one never starts again.
        assert!(stops.start((task, 2)).is_ok());
        assert!(!stops.stop((task, 3), "cancelled".into()), "not running yet");
        assert_eq!(stops.start((task, 3)).unwrap_err(), "cancelled");
        // The oldest stops are forgotten first.
        for n in 0..Stops::REMEMBERED as u32 {
            stops.stop((TaskId::from_uuid(uuid::Uuid::new_v4()), n), String::new());
        }
        assert!(stops.start((task, 3)).is_ok());
        assert_eq!(stops.stopped.len(), Stops::REMEMBERED);
    }

    struct Panics;

    impl TaskHandler for Panics {
        async fn run(&self, _: &TaskAssignment) -> Execution {
            panic!("boom")
        }
    }

    #[tokio::test]
    async fn a_panicking_handler_is_a_failure() {
        let execution = execute(&Panics, &assignment("1.deploy", "x", 1)).await;
        assert_eq!(execution, Execution::failed("the task handler panicked: boom"));
    }
}
