//! A worker process: prepares the database (create, migrate, quotas), then runs the chosen
//! stages, each with its own consumer on a shared connection, and rebuilds the connection when a
//! consumer fails, until shutdown. Several workers of one stage share its queue.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backoff::Pauses;
use crate::broker::{self, Broker, Outgoing, redact};
use crate::config::Config;
use crate::model::ids::MessageId;
use crate::model::wire;
use crate::pipeline::runner::{self, Runner};
use crate::pipeline::stages::{
    Decompose, Dispatch, Fallback, HeartbeatStage, Place, PlanStage, Route, Stage, Track,
};
use crate::pipeline::sweeper;
use crate::pipeline::topology::StageQueue;
use crate::pipeline::topology::{Names, Topology};
use crate::store::{self, Store};
use crate::telemetry::health::Health;
use crate::telemetry::metrics::metrics;
use crate::understanding::catalog::{self, Catalog};
use crate::understanding::decomposer::{self, Decomposer};

/// A stage that a worker can run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    strum::EnumString,
    strum::Display,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[strum(serialize_all = "snake_case")]
pub enum StageName {
    Decompose,
    Plan,
    Fallback,
    Route,
    Place,
    Dispatch,
    Track,
    Heartbeat,
}

impl StageName {
    pub fn all() -> &'static [StageName] {
        <StageName as strum::VariantArray>::VARIANTS
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Broker(#[from] broker::Error),
    #[error(transparent)]
    Catalog(#[from] catalog::Error),
    #[error(transparent)]
    Policy(#[from] crate::decisions::fallback::Error),
    #[error(transparent)]
    Runner(#[from] runner::Error),
    #[error(transparent)]
    Decomposer(#[from] decomposer::ConfigError),
}

/// Creates the database if needed, connects, migrates, and creates or updates the quota row of
/// every configured provider (see [`Store::ensure_quota`]).
pub async fn prepare_store(config: &Config) -> Result<Store, Error> {
    // A provider that would be refused gets no quota row.
    let catalog = Catalog::load(config.catalog.as_deref())?;
    config.fallback.validate(|w| catalog.get(w).is_some())?;
    store::ensure_database(&config.database_url).await?;
    let store = Store::connect(&config.database_url, config.database_pool_size).await?;
    store.migrate().await?;
    for provider in &config.fallback.providers {
        store.ensure_quota(&provider.name, provider.quota_micros, provider.window).await?;
    }
    Ok(store)
}

/// [`prepare_store`], waiting for the database while it is unreachable or restarting (retrying
/// with backoff, as the broker connection does), so that a worker started during a database
/// restart comes up once the database is back instead of exiting. `None` if `shutdown` came
/// first; an error only if waiting cannot help (a bad URL, a refused migration).
pub async fn prepare_store_patiently(
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<Store>, Error> {
    let mut pauses = Pauses::new(Duration::from_secs(10));
    loop {
        let prepared = tokio::select! {
            prepared = prepare_store(config) => prepared,
            () = shutdown.cancelled() => return Ok(None),
        };
        match prepared {
            Ok(store) => return Ok(Some(store)),
            Err(Error::Store(err)) if err.is_transient() => {
                let pause = pauses.next_pause();
                error!(database = %redact(&config.database_url), error = %crate::error_chain(&err), ?pause, "cannot prepare the database; trying again");
                if !sleep_unless_cancelled(pause, shutdown).await {
                    return Ok(None);
                }
            }
            Err(err) => return Err(err),
        }
    }
}

/// Everything the stages need, injected: tests build it with their own store and namespace.
#[derive(Clone)]
pub struct Worker {
    pub config: Config,
    pub store: Store,
    pub catalog: Arc<Catalog>,
    /// The configured decomposer, when it is not the rules.
    pub decomposer: Option<Arc<dyn Decomposer>>,
    /// What it reports its connection, its database and its consumers to.
    pub health: Health,
}

impl Worker {
    /// Loads the catalog, checks the fallback policy and builds the configured decomposer, its API
    /// key read from the environment: settings that cannot work are an error here, at startup.
    pub fn new(config: Config, store: Store) -> Result<Self, Error> {
        let catalog = Arc::new(Catalog::load(config.catalog.as_deref())?);
        config.fallback.validate(|w| catalog.get(w).is_some())?;
        let decomposer = config
            .decomposer
            .build(catalog.clone(), |name| std::env::var(name))?
            .map(|llm| Arc::new(llm) as Arc<dyn Decomposer>);
        let health = Health::new();
        health.database(&store);
        Ok(Worker { config, store, catalog, decomposer, health })
    }

    /// Reports to `health` (which the caller serves) instead of a health of its own.
    pub fn reporting_to(mut self, health: Health) -> Self {
        health.database(&self.store);
        self.health = health;
        self
    }

    fn names(&self) -> Names {
        Names::new(self.config.namespace.clone())
    }

    /// Runs `stages` until `shutdown` is cancelled. A failed connection, topology declaration or
    /// consumer is rebuilt after a pause; the deliveries it held go back to their queues. Only a
    /// broker URL that cannot work ends it with an error.
    pub async fn run(&self, stages: &[StageName], shutdown: CancellationToken) -> Result<(), Error> {
        let mut pauses = Pauses::new(Duration::from_secs(30));
        self.health.expect_consumers(stages.len());
        let mut connections = 0u64;
        loop {
            let connected = tokio::select! {
                connected = self.connect(stages) => connected,
                () = shutdown.cancelled() => return Ok(()),
            };
            let (broker, topology, publishers) = match connected {
                Ok(connected) => connected,
                // Waiting will not mend a bad URL or a refused password.
                Err(err) if !err.is_transient() => return Err(err.into()),
                // The broker may be down or restarting, or a declaration conflicts with what an
                // operator declared by hand (406): keep trying, loudly, as a service should.
                Err(err) => {
                    let pause = pauses.next_pause();
                    let error = crate::error_chain(&err);
                    if err.is_precondition_failed() {
                        // A queue of the namespace exists with other arguments: declared by an
                        // earlier Switchyard (before classic queues were version 2), with another
                        // `[topology] queue_type` or `delivery_limit`, or by hand.
                        error!(broker = %redact(&self.config.amqp_url), %error, ?pause, queue_type = %self.config.topology.queue_type,
                            "a queue exists with other arguments than this configuration declares: drain and delete it, \
                             or use a new namespace (README: Configuration, [topology]); trying again");
                    } else {
                        error!(broker = %redact(&self.config.amqp_url), %error, ?pause, "cannot set up the broker; trying again");
                    }
                    if !sleep_unless_cancelled(pause, &shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            };
            pauses.reset();
            connections += 1;
            if connections > 1 {
                metrics().broker_reconnects.inc();
            }
            self.health.broker(&broker);
            let session = shutdown.child_token();
            let mut runners = JoinSet::new();
            for (stage, publisher) in stages.iter().zip(&publishers) {
                self.spawn(&mut runners, *stage, publisher, &topology, session.clone())?;
            }
            drop(publishers);
            if stages.contains(&StageName::Track) {
                // Expired leases are reported by the workers that track results.
                let (store, broker, policy, session) =
                    (self.store.clone(), broker.clone(), self.config.leases.clone(), session.clone());
                let ttl = self.config.routing.heartbeat_ttl_secs;
                runners.spawn(async move {
                    sweeper::sweep(store, &broker, &policy, ttl, session).await;
                    Ok(())
                });
            }
            if stages.contains(&StageName::Place) {
                // The safety net of the line: a look every few seconds while tasks wait.
                let (store, broker, session) = (self.store.clone(), broker.clone(), session.clone());
                let every = Duration::from_secs(self.config.routing.recheck_secs.max(1));
                runners.spawn(async move {
                    recheck(store, &broker, every, session).await;
                    Ok(())
                });
            }
            info!(namespace = %self.config.namespace, stages = ?stages, "worker running");
            let mut failed = false;
            while let Some(result) = runners.join_next().await {
                let failure = match result {
                    Ok(Ok(())) => None,
                    Ok(Err(err)) => Some(err.to_string()),
                    Err(err) => Some(format!("stage task ended abnormally: {err}")),
                };
                if let Some(failure) = failure {
                    if !shutdown.is_cancelled() {
                        warn!(error = %failure, "a stage stopped; reconnecting");
                        failed = true;
                    }
                    session.cancel();
                }
            }
            self.health.no_broker();
            broker.close().await;
            if !failed || shutdown.is_cancelled() {
                return Ok(());
            }
            if !sleep_unless_cancelled(pauses.next_pause(), &shutdown).await {
                return Ok(());
            }
        }
    }

    /// Connects, declares the topology and opens a publishing channel for each of `stages`, so
    /// that no stage's publishes and confirms queue behind another's on the broker.
    async fn connect(
        &self,
        stages: &[StageName],
    ) -> Result<(Arc<Broker>, Topology, Vec<Arc<Broker>>), broker::Error> {
        let broker = Broker::connect(&self.config.amqp_url, self.names())
            .await?
            .with_settings(self.config.topology.clone());
        let set_up = async {
            let topology = broker.declare_topology().await?;
            let mut publishers = Vec::with_capacity(stages.len());
            for _ in stages {
                publishers.push(Arc::new(broker.with_own_channel().await?));
            }
            Ok((topology, publishers))
        };
        match set_up.await {
            Ok((topology, publishers)) => Ok((Arc::new(broker), topology, publishers)),
            Err(err) => {
                broker.close().await;
                Err(err)
            }
        }
    }

    fn spawn(
        &self,
        runners: &mut JoinSet<Result<(), runner::Error>>,
        stage: StageName,
        broker: &Arc<Broker>,
        topology: &Topology,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        fn start<S: Stage>(
            runners: &mut JoinSet<Result<(), runner::Error>>,
            stage: S,
            worker: &Worker,
            broker: &Arc<Broker>,
            topology: &Topology,
            shutdown: CancellationToken,
        ) -> Result<(), Error> {
            let runner = Runner::new(
                stage,
                broker.clone(),
                worker.store.clone(),
                topology,
                worker.config.worker.clone(),
            )?
            .reporting_to(worker.health.clone());
            runners.spawn(runner.run(shutdown));
            Ok(())
        }
        let config = &self.config;
        match stage {
            StageName::Decompose => start(
                runners,
                Decompose { catalog: self.catalog.clone(), decomposer: self.decomposer.clone() },
                self,
                broker,
                topology,
                shutdown,
            ),
            StageName::Plan => start(
                runners,
                PlanStage::new(self.catalog.clone(), self.config.planning.clone()),
                self,
                broker,
                topology,
                shutdown,
            ),
            StageName::Fallback => start(
                runners,
                Fallback { fallback: config.fallback.clone(), approval: config.approval.clone() },
                self,
                broker,
                topology,
                shutdown,
            ),
            StageName::Route => {
                start(runners, Route { policy: config.routing.clone() }, self, broker, topology, shutdown)
            }
            StageName::Dispatch => start(
                runners,
                Dispatch { names: self.names(), leases: config.leases.clone() },
                self,
                broker,
                topology,
                shutdown,
            ),
            StageName::Track => start(
                runners,
                Track { policy: config.tracking.clone(), fallback: config.fallback.clone() },
                self,
                broker,
                topology,
                shutdown,
            ),
            StageName::Place => {
                start(runners, Place { policy: config.routing.clone() }, self, broker, topology, shutdown)
            }
            StageName::Heartbeat => start(
                runners,
                HeartbeatStage { heartbeat_ttl_secs: config.routing.heartbeat_ttl_secs },
                self,
                broker,
                topology,
                shutdown,
            ),
        }
    }
}

/// Wakes the `place` stage every `every` while tasks wait in line, until `shutdown`: a wake-up lost
/// on the way (a result recorded just as a task joined the line) delays a task by this much at
/// most, and a task that waits too long gives up on time. Nothing is sent while nothing waits.
async fn recheck(store: Store, broker: &Broker, every: Duration, shutdown: CancellationToken) {
    loop {
        if !sleep_unless_cancelled(every, &shutdown).await {
            return;
        }
        match store.waiting_count().await {
            Ok(count) => {
                metrics().waiting_tasks.set(count);
                if count == 0 {
                    continue;
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot look at the line of waiting tasks");
                continue;
            }
        }
        let wake =
            wire::Wake { message_id: MessageId::random(), cause: "periodic".into(), at: chrono::Utc::now() };
        let outgoing = Outgoing::json(broker.names().of(StageQueue::Place), wake.message_id, &wake);
        if let Err(err) = broker.publish(&outgoing).await {
            warn!(error = %err, "cannot wake the placement of waiting tasks; trying again in a moment");
        }
    }
}

/// Sleeps for `pause`; false if `shutdown` came first.
async fn sleep_unless_cancelled(pause: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(pause) => true,
        () = shutdown.cancelled() => false,
    }
}
