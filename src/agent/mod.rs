//! The agent runtime: what runs tasks at the end of the pipeline.
//!
//! An [`Agent`] declares its queue `<ns>.agent.<id>`, announces itself on `<ns>.heartbeats` at
//! start and every few seconds, consumes its queue with a prefetch equal to its capacity, runs
//! each assignment with its [`TaskHandler`] (up to its capacity at a time) and publishes a
//! [`TaskResult`](crate::model::wire::TaskResult) to `<ns>.results` with publisher confirms. It acknowledges an assignment only
//! once the broker confirmed its result: an agent that dies mid-task leaves the assignment to be
//! redelivered, never lost; one that loses its connection aborts its running tasks at once, since
//! their assignments come back anyway. An assignment addressed to another agent is rejected
//! unrun. It speaks AMQP only; it needs no database.
//!
//! Apart from its tasks, an agent consumes `<ns>.agent.<id>.control`, where `switchyard cancel`
//! tells it to stop an attempt of a cancelled request: a running one is aborted at once (an
//! `exec` command's whole process group killed, an `llm` call dropped), one not yet started is
//! never run. Either way the agent reports the attempt as failed, "cancelled", and the track
//! stage, which knows the task cancelled, ignores it.
//!
//! Here: the agent, its settings and its loops (consuming, heartbeats); one attempt, from its
//! delivery to its result, and the stops in `attempt`; the executors beside them.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use switchyard::agent::{AgentBuilder, Simulate};
//! # async fn example(broker: Arc<switchyard::broker::Broker>) -> Result<(), switchyard::agent::Error> {
//! let agent = AgentBuilder::new("homelab-1".parse().unwrap())
//!     .capabilities(["deployment", "shell"])
//!     .capacity(4)
//!     .label("target", "homelab")
//!     .build(Simulate::default())?;
//! agent.run(broker, tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```

mod attempt;
mod exec;
mod executor;
pub mod host;
mod llm;
mod simulate;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use chrono::Utc;
use futures::{Stream, StreamExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use exec::{Exec, ExecCommand, ExecConfig, STDERR_TAIL_BYTES};
pub use executor::{Execution, Executor, TaskHandler, truncate_utf8};
pub use llm::{Llm, SYSTEM_PROMPT};
pub use simulate::{SIMULATED_FAILURE, Simulate};

use self::attempt::{Stops, handle, take_control};
use crate::broker::{self, Broker, Incoming, Outgoing, Subscription};
use crate::model::domain::Resources;
use crate::model::ids::AgentId;
use crate::model::wire::Heartbeat;
use crate::telemetry::health::Health;
use crate::telemetry::metrics::{AgentLabels, metrics};

/// Why an agent cannot start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is out of range; the message names it.
    #[error("invalid agent setting: {0}")]
    Invalid(String),
    #[error(transparent)]
    Broker(#[from] broker::Error),
    /// The broker stopped delivering (the connection closed, the queue was deleted): the caller
    /// may connect again and run the agent anew.
    #[error("the broker stopped delivering from {0}")]
    ConsumerEnded(String),
}

/// Settings of an [`Agent`]; `build` checks them.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    id: AgentId,
    capabilities: BTreeSet<String>,
    capacity: u32,
    labels: BTreeMap<String, String>,
    resources: Resources,
    heartbeat_every: Duration,
    shutdown_grace: Duration,
    result_attempts: usize,
}

impl AgentBuilder {
    /// An agent with no capabilities, a capacity of 1, no labels, the resources of the machine
    /// it runs on ([`host::resources`]), a heartbeat every 5 s and 30 s to finish its tasks on
    /// shutdown.
    pub fn new(id: AgentId) -> Self {
        AgentBuilder {
            id,
            capabilities: BTreeSet::new(),
            capacity: 1,
            labels: BTreeMap::new(),
            resources: host::resources(),
            heartbeat_every: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(30),
            result_attempts: 5,
        }
    }

    /// Adds capabilities (a task is routed here only if it needs none that are missing).
    pub fn capabilities(mut self, capabilities: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.capabilities.extend(capabilities.into_iter().map(Into::into));
        self
    }

    /// How many tasks run at once (1 to 65535): the prefetch of the agent's consumer.
    pub fn capacity(mut self, capacity: u32) -> Self {
        self.capacity = capacity;
        self
    }

    /// A label (`target=homelab`); tasks with a matching affinity prefer this agent.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn labels(mut self, labels: impl IntoIterator<Item = (String, String)>) -> Self {
        self.labels.extend(labels);
        self
    }

    /// What this agent offers; tasks that need more are not routed here.
    pub fn resources(mut self, resources: Resources) -> Self {
        self.resources = resources;
        self
    }

    /// How often to heartbeat; keep it well under the routing's heartbeat TTL (30 s by default).
    pub fn heartbeat_every(mut self, every: Duration) -> Self {
        self.heartbeat_every = every;
        self
    }

    /// How long a requested shutdown waits for running tasks. Those still running then are
    /// abandoned: their assignments go back to the queue when the channel closes. When the broker
    /// stops delivering, there is no grace: the running tasks are aborted at once.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// Attempts to publish a result (with backoff) before the assignment is given back to the
    /// queue to be run again.
    pub fn result_attempts(mut self, attempts: usize) -> Self {
        self.result_attempts = attempts;
        self
    }

    /// The agent, running tasks with `handler`, if the settings pass [`AgentBuilder::check`].
    pub fn build<H: TaskHandler>(self, handler: H) -> Result<Agent<H>, Error> {
        self.check()?;
        Ok(Agent {
            settings: Arc::new(self),
            handler: Arc::new(handler),
            stops: Arc::default(),
            health: Health::new(),
        })
    }

    /// Whether the settings are in range: a capacity of 1 to 65535, a positive heartbeat
    /// interval, at least one attempt to publish a result, no empty capability and a CPU count
    /// that is a number, not negative. `build` checks them, and so does `switchyard agents register`.
    pub fn check(&self) -> Result<(), Error> {
        if self.capacity == 0 || self.capacity > u32::from(u16::MAX) {
            return Err(Error::Invalid(format!("capacity must be 1 to 65535, not {}", self.capacity)));
        }
        if self.heartbeat_every.is_zero() {
            return Err(Error::Invalid("the heartbeat interval must be positive".into()));
        }
        if self.result_attempts == 0 {
            return Err(Error::Invalid("at least one attempt to publish a result is needed".into()));
        }
        if let Some(bad) = self.capabilities.iter().find(|c| c.trim().is_empty()) {
            return Err(Error::Invalid(format!("empty capability {bad:?}")));
        }
        let cpu = self.resources.cpu;
        if !cpu.is_finite() || cpu < 0.0 {
            return Err(Error::Invalid(format!("cpu must be a number of cores, 0 or more, not {cpu}")));
        }
        Ok(())
    }

    pub fn id(&self) -> &AgentId {
        &self.id
    }

    /// The heartbeat of an agent with these settings and `in_flight` tasks running.
    pub fn heartbeat(&self, in_flight: u32) -> Heartbeat {
        heartbeat(self, in_flight)
    }
}

/// An agent, ready to run: see the [module](self) documentation. Cloning is cheap (the handler
/// is shared), so a caller can run it again on a new connection after [`Error::ConsumerEnded`].
pub struct Agent<H> {
    settings: Arc<AgentBuilder>,
    handler: Arc<H>,
    /// The stops it was told, shared by its clones: run again on a new connection, it still
    /// does not run an attempt it was told to stop (the broker delivers it again).
    stops: Arc<std::sync::Mutex<Stops>>,
    /// What it reports its connection and consumers to.
    health: Health,
}

impl<H> Clone for Agent<H> {
    fn clone(&self) -> Self {
        Agent {
            settings: self.settings.clone(),
            handler: self.handler.clone(),
            stops: self.stops.clone(),
            health: self.health.clone(),
        }
    }
}

impl<H> std::fmt::Debug for Agent<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("settings", &self.settings).finish_non_exhaustive()
    }
}

/// What the running parts of an agent share.
struct Shared<H> {
    settings: Arc<AgentBuilder>,
    handler: Arc<H>,
    broker: Arc<Broker>,
    in_flight: AtomicU32,
    stops: Arc<std::sync::Mutex<Stops>>,
}

impl<H> Agent<H> {
    pub fn id(&self) -> &AgentId {
        &self.settings.id
    }

    /// Reports to `health` while it runs: its broker connection and its consumers.
    pub fn reporting_to(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    pub fn capacity(&self) -> u32 {
        self.settings.capacity
    }

    /// The heartbeat this agent sends with `in_flight` tasks running.
    pub fn heartbeat(&self, in_flight: u32) -> Heartbeat {
        heartbeat(&self.settings, in_flight)
    }
}

impl<H: TaskHandler> Agent<H> {
    /// Runs until `shutdown` is cancelled (then returns `Ok`) or the broker stops delivering.
    ///
    /// On shutdown it stops consuming, gives back the deliveries it had not started, waits up to
    /// the shutdown grace for the running tasks to finish and report, and stops heartbeating.
    /// When the broker stops delivering (the connection is lost, say), it aborts the running tasks
    /// at once, since their deliveries can no longer be acknowledged: the broker gives them back
    /// and they are run again.
    pub async fn run(self, broker: Arc<Broker>, shutdown: CancellationToken) -> Result<(), Error> {
        let id = self.settings.id.clone();
        // The namespace's topology too (idempotent): an agent that starts before any worker must
        // not lose its first heartbeats and results to queues that do not exist yet. An agent
        // whose account may not declare them (least privilege) relies on the workers to.
        match broker.declare_topology().await {
            Ok(_) => {}
            Err(err) if err.is_access_refused() => {
                info!(agent = %id, "not permitted to declare the namespace's queues; the workers declare them");
            }
            Err(err) => return Err(err.into()),
        }
        let queue = broker.declare_agent_queue(&id).await?;
        // Not ready until its task queue is consumed (and its control queue, if it may).
        self.health.expect_consumers(2);
        self.health.broker(&broker);
        let slots = AgentLabels { agent: id.to_string() };
        metrics().agent_slots_total.get_or_create(&slots).set(i64::from(self.settings.capacity));
        let shared = Arc::new(Shared {
            settings: self.settings.clone(),
            handler: self.handler.clone(),
            broker: broker.clone(),
            in_flight: AtomicU32::new(0),
            stops: self.stops.clone(),
        });
        // Told apart from the tasks, so that a stop does not wait behind the tasks queued.
        let control_queue = broker.names().agent_control_queue(&id);
        let control = match broker.declare_queue(&control_queue).await {
            Ok(()) => Some(broker.subscribe(&control_queue, 16).await?),
            Err(err) if err.is_access_refused() => {
                warn!(agent = %id, queue = %control_queue, "not permitted to use its control queue: cancelled tasks run to their end");
                None
            }
            Err(err) => return Err(err.into()),
        };
        self.health.expect_consumers(if control.is_some() { 2 } else { 1 });
        let control_receiving = control.is_some().then(|| self.health.consuming());
        let (control_subscription, control) = control.unzip();
        let mut control = futures::stream::iter(control).flatten().fuse();
        let stop_heartbeats = CancellationToken::new();
        let heartbeats = tokio::spawn(send_heartbeats(shared.clone(), stop_heartbeats.clone()));
        // Checked in `build`.
        let prefetch = u16::try_from(self.settings.capacity).expect("capacity fits a prefetch");
        let (subscription, deliveries) = match broker.subscribe(&queue, prefetch).await {
            Ok(subscribed) => subscribed,
            Err(err) => {
                stop_heartbeats.cancel();
                let _ = heartbeats.await;
                return Err(err.into());
            }
        };
        let mut deliveries = deliveries.fuse();
        let receiving = self.health.consuming();
        info!(agent = %id, %queue, capacity = self.settings.capacity, "agent running");
        let mut running = JoinSet::new();
        let outcome = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                Some(joined) = running.join_next() => log_join(joined),
                Some(next) = control.next() => match next {
                    Ok(delivery) => take_control(&shared, delivery).await,
                    Err(err) => break Err(Error::Broker(err)),
                },
                next = deliveries.next() => match next {
                    Some(Ok(delivery)) => {
                        running.spawn(handle(shared.clone(), delivery));
                    }
                    Some(Err(err)) => break Err(Error::Broker(err)),
                    None => break Err(Error::ConsumerEnded(queue.clone())),
                },
            }
        };
        // Not ready from here on: it takes no more tasks.
        drop((receiving, control_receiving));
        match &outcome {
            Ok(()) => {
                info!(agent = %id, running = running.len(), "shutting down: finishing the running tasks");
                finish_running(
                    &id,
                    &subscription,
                    &mut deliveries,
                    &mut running,
                    self.settings.shutdown_grace,
                )
                .await;
            }
            Err(err) => {
                // The deliveries of the running tasks cannot be acknowledged any more: their results
                // would be published for nothing. They come back to the queue and are run again
                // (their results keep their message ids, which the track stage deduplicates).
                warn!(
                    agent = %id,
                    error = %err,
                    aborted = running.len(),
                    "the broker stopped delivering: running tasks aborted, their assignments go back to the queue"
                );
                running.shutdown().await;
            }
        }
        stop_heartbeats.cancel();
        let _ = heartbeats.await;
        // Closing the channels gives back anything left unsettled to the queues.
        drop((deliveries, control));
        subscription.close().await;
        if let Some(control) = control_subscription {
            control.close().await;
        }
        self.health.no_broker();
        info!(agent = %id, "agent stopped");
        outcome
    }
}

/// A requested shutdown: stops consuming, gives back the deliveries not started, and waits up to
/// `grace` for the running tasks to report; those still running then are aborted.
async fn finish_running(
    id: &AgentId,
    subscription: &Subscription,
    deliveries: &mut (impl Stream<Item = Result<Incoming, broker::Error>> + Unpin),
    running: &mut JoinSet<()>,
    grace: Duration,
) {
    // Stop consuming, and give back what came before the broker took the cancel in.
    if let Err(err) = subscription.cancel().await {
        debug!(agent = %id, error = %err, "cannot cancel the consumer");
    }
    let give_back = async {
        while let Some(Ok(delivery)) = deliveries.next().await {
            if let Err(err) = delivery.requeue().await {
                debug!(agent = %id, error = %err, "cannot give a delivery back");
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), give_back).await;
    let finish = async {
        while let Some(joined) = running.join_next().await {
            log_join(joined);
        }
    };
    if tokio::time::timeout(grace, finish).await.is_err() {
        warn!(
            agent = %id,
            abandoned = running.len(),
            "tasks still running after the shutdown grace; abandoned, their assignments go back to the queue"
        );
        running.shutdown().await;
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(err) = joined
        && err.is_panic()
    {
        error!(error = %err, "a task of the agent panicked");
    }
}

fn heartbeat(settings: &AgentBuilder, in_flight: u32) -> Heartbeat {
    Heartbeat {
        agent_id: settings.id.clone(),
        capabilities: settings.capabilities.clone(),
        capacity: settings.capacity,
        in_flight,
        labels: settings.labels.clone(),
        resources: settings.resources,
        sent_at: Some(Utc::now()),
        every_secs: Some(
            u32::try_from(settings.heartbeat_every.as_secs_f64().ceil() as u64).unwrap_or(u32::MAX).max(1),
        ),
    }
}

/// Heartbeats at once, then every `heartbeat_every`, until `stop`. A failed heartbeat is logged
/// and the next one tried in time: the agent's tasks do not depend on them.
async fn send_heartbeats<H>(shared: Arc<Shared<H>>, stop: CancellationToken) {
    let settings = &shared.settings;
    let mut ticks = tokio::time::interval(settings.heartbeat_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let queue = shared.broker.names().heartbeats();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let beat = heartbeat(settings, shared.in_flight.load(Ordering::SeqCst));
        let outgoing =
            Outgoing::to_queue(queue.clone(), serde_json::to_vec(&beat).expect("heartbeats serialize"));
        tokio::select! {
            () = stop.cancelled() => return,
            sent = shared.broker.publish(&outgoing) => {
                match sent {
                    Ok(()) => debug!(agent = %settings.id, in_flight = beat.in_flight, "heartbeat"),
                    Err(err) => warn!(agent = %settings.id, error = %err, "heartbeat not sent"),
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::domain::Task;
    use crate::model::ids::{RequestId, WorkType};
    use crate::model::wire::{self, TaskAssignment};

    /// An assignment of a deployment task to `homelab-1`, attempt 1.
    pub(crate) fn assignment(key: &str, description: &str, duration_secs: u32) -> TaskAssignment {
        let plan_id = RequestId::random().plan_id();
        let task_id = plan_id.task_id(key);
        TaskAssignment {
            plan_id,
            attempt: 1,
            decision_id: task_id.decision_id(1),
            agent_id: AgentId::parse("homelab-1").unwrap(),
            task: Task {
                id: task_id,
                key: key.into(),
                work_type: WorkType::parse("deployment").unwrap(),
                description: description.into(),
                estimated_duration_secs: duration_secs,
                resources: Resources { cpu: 1.0, memory_mb: 512, gpu: 0 },
                capabilities: ["deployment".to_owned()].into(),
                depends_on: Vec::new(),
                affinity: BTreeMap::new(),
            },
        }
    }

    fn builder() -> AgentBuilder {
        AgentBuilder::new(AgentId::parse("homelab-1").unwrap())
    }

    #[test]
    fn the_builder_checks_its_settings() {
        assert!(builder().capacity(0).build(Simulate::default()).is_err());
        assert!(builder().capacity(70_000).build(Simulate::default()).is_err());
        assert!(builder().heartbeat_every(Duration::ZERO).build(Simulate::default()).is_err());
        assert!(builder().result_attempts(0).build(Simulate::default()).is_err());
        assert!(builder().capabilities([" "]).build(Simulate::default()).is_err());
        for cpu in [-1.0, f64::NAN, f64::INFINITY] {
            let resources = Resources { cpu, memory_mb: 1024, gpu: 0 };
            assert!(builder().resources(resources).check().is_err(), "{cpu}");
        }
        assert!(builder().resources(Resources { cpu: 0.0, memory_mb: 0, gpu: 0 }).check().is_ok());
        assert!(builder().capacity(65_535).build(Simulate::default()).is_ok());
    }

    #[test]
    fn the_heartbeat_says_what_the_agent_offers() {
        let agent = builder()
            .capabilities(["deployment", "shell"])
            .capabilities(["docker"])
            .capacity(4)
            .label("target", "homelab")
            .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 1 })
            .build(Simulate::default())
            .unwrap();
        let beat = agent.heartbeat(2);
        assert_eq!(beat.agent_id.as_str(), "homelab-1");
        assert_eq!(beat.capabilities, ["deployment", "docker", "shell"].map(String::from).into());
        assert_eq!((beat.capacity, beat.in_flight), (4, 2));
        assert_eq!(beat.labels["target"], "homelab");
        assert_eq!(beat.resources.gpu, 1);
        assert!(beat.sent_at.is_some());
        // What the heartbeat stage accepts.
        let body = serde_json::to_vec(&beat).unwrap();
        assert_eq!(wire::parse_heartbeat(&body, 4096).unwrap(), beat);
    }

    #[tokio::test]
    async fn the_executor_enum_dispatches() {
        let task = assignment("1.deploy", "x", 0);
        let simulate: Executor = Simulate::new(0.0, 1.0).unwrap().into();
        assert_eq!(simulate.run(&task).await.error.as_deref(), Some(SIMULATED_FAILURE));
        let exec: Executor = Exec::new(Duration::from_secs(1)).into();
        assert!(exec.run(&task).await.error.unwrap().starts_with("no command configured"));
    }
}
