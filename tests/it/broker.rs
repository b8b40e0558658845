//! The broker: URLs that cannot work, publishes that no queue takes, a publishing channel or a
//! topology declaration that fails. Nothing is lost, nothing is shown that should not be.

use std::future::Future;
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use switchyard::broker::{Broker, Outgoing, QueueState};
use switchyard::model::ids::{AgentId, MessageId, Namespace, RequestId};
use switchyard::model::wire::{self, SubmitRequest};
use switchyard::ops::{self, Progress};
use switchyard::pipeline::runner::Runner;
use switchyard::pipeline::stages::{AmqpMeta, Inbound, NoRequest, Outcome, Stage};
use switchyard::pipeline::topology::{Names, Topology};
use switchyard::pipeline::worker::{StageName, Worker};
use switchyard::store::Store;
use tokio_util::sync::CancellationToken;

use crate::helpers::*;

/// Runs the `switchyard` binary with `env` over the local services' defaults.
pub async fn switchyard(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args(args)
        .env("AMQP_URL", amqp_url())
        .env("DATABASE_URL", database_url())
        .env_remove("SWITCHYARD_NAMESPACE")
        .env_remove("SWITCHYARD_CONFIG")
        .env("RUST_LOG", "info");
    for (name, value) in env {
        command.env(name, value);
    }
    command.output().await.expect("the switchyard binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A namespace of its own next to the app's, for a worker that runs only some stages. Its queues
/// are deleted at the end of the test by [`Side::teardown`].
struct Side {
    names: Names,
    broker: Broker,
    amqp_url: String,
}

impl Side {
    async fn new(app: &TestApp) -> Side {
        let namespace = Namespace::parse(format!("{}-side", app.names.namespace())).unwrap();
        let names = Names::new(namespace);
        let broker = Broker::connect(&app.config.amqp_url, names.clone()).await.expect("the broker");
        Side { names, broker, amqp_url: app.config.amqp_url.clone() }
    }

    /// A worker running `stages` in this namespace on the app's database.
    fn start_worker(
        &self,
        app: &TestApp,
        stages: &'static [StageName],
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), switchyard::pipeline::worker::Error>> {
        let mut config = app.config.clone();
        config.namespace = self.names.namespace().clone();
        let worker = Worker::new(config, app.store.clone()).expect("a worker");
        let shutdown = shutdown.clone();
        tokio::spawn(async move { worker.run(stages, shutdown).await })
    }

    /// Waits until the queue exists (a passive declare succeeds).
    async fn wait_queue(&self, queue: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.broker.queue_len(queue).await.is_err() {
            assert!(Instant::now() < deadline, "{queue} was never declared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn teardown(self) {
        let topology = Topology::standard().resolve(self.names.namespace());
        let queues: Vec<String> = topology.queues.iter().map(|q| q.name.clone()).collect();
        let exchanges: Vec<String> = topology.exchanges.iter().map(|e| e.name.clone()).collect();
        self.broker.close().await;
        // A connection of its own: a test may have broken the side broker's channel on purpose.
        let broker = Broker::connect(&self.amqp_url, self.names.clone()).await.expect("the broker");
        let _ = broker.delete_queues(&queues).await;
        let _ = broker.delete_exchanges(&exchanges).await;
        broker.close().await;
    }
}

fn request(text: &str) -> SubmitRequest {
    SubmitRequest {
        text: text.into(),
        request_id: None,
        submitted_by: Some("tests".into()),
        priority: None,
        auto_approve: Some(true),
    }
}

#[tokio::test]
async fn urls_without_a_host_fail_fast_and_never_show_their_password() {
    let started = Instant::now();
    let topology = switchyard(&[("AMQP_URL", "amqp:guest:s3cretpw@127.0.0.1:5672")], &["topology"]).await;
    assert_eq!(topology.status.code(), Some(2), "{}", stderr(&topology));
    assert!(stderr(&topology).contains("invalid broker URL <URL without a host>"), "{}", stderr(&topology));

    let status = switchyard(
        &[("DATABASE_URL", "postgres:postgres:s3cretpw@127.0.0.1/x")],
        &["status", &RequestId::random().to_string()],
    )
    .await;
    assert_eq!(status.status.code(), Some(2), "{}", stderr(&status));
    assert!(stderr(&status).contains("<URL without a host>"), "{}", stderr(&status));

    for output in [&topology, &status] {
        let shown = format!("{}{}", stdout(output), stderr(output));
        assert!(!shown.contains("s3cretpw"), "the password is shown: {shown}");
    }
    assert!(started.elapsed() < Duration::from_secs(10), "not retried: {:?}", started.elapsed());
}

#[tokio::test]
async fn submitting_to_a_namespace_without_queues_fails_and_says_why() {
    let namespace = format!("t{}-none", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let output =
        switchyard(&[("SWITCHYARD_NAMESPACE", &namespace)], &["submit", "Deploy nginx to the homelab"]).await;
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let expected = format!(
        "no queue {namespace}.requests takes requests: is the namespace right? \
         `switchyard topology` or a worker declares it"
    );
    assert!(stderr(&output).contains(&expected), "{}", stderr(&output));
    assert!(stdout(&output).is_empty(), "no request id for a request nobody will see: {}", stdout(&output));
}

#[tokio::test]
async fn an_output_whose_queue_is_missing_waits_for_it_instead_of_being_lost() {
    let app = spawn_app().await;
    let side = Side::new(&app).await;
    let shutdown = CancellationToken::new();
    // Only decompose runs, so nothing declares `decomposed` again while it is missing.
    let worker = side.start_worker(&app, &[StageName::Decompose], &shutdown);
    let decomposed = side.names.queue("decomposed");
    let retry = side.names.queue("requests.retry");
    side.wait_queue(&side.names.queue("heartbeats.retry")).await; // the last one declared
    side.broker.delete_queues(std::slice::from_ref(&decomposed)).await.unwrap();

    let id = ops::submit(&side.broker, request("Deploy nginx to the homelab")).await.unwrap();
    // Decompose records the request, cannot publish its output, and parks its input.
    let deadline = Instant::now() + Duration::from_secs(10);
    while side.broker.queue_len(&retry).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the request was not parked: it was acknowledged and lost");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(app.store.report(id).await.unwrap().is_some(), "decompose recorded the request");

    // Once the queue is back, the input returns from the retry queue and its output goes through.
    side.broker.declare_topology().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        if let Some(message) = side.broker.get(&decomposed).await.unwrap() {
            break message;
        }
        assert!(Instant::now() < deadline, "the output never reached {decomposed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body: serde_json::Value = serde_json::from_slice(&message.body).unwrap();
    assert_eq!(body["request_id"], id.to_string());
    assert!(app.store.dead_letters_of_stage("decompose").await.unwrap().is_empty());

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    side.teardown().await;
}

#[tokio::test]
async fn a_closed_publishing_channel_makes_the_worker_reconnect() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 4, &[("target", "homelab")]).await;
    // A first request through every stage: the worker is up, its topology declared.
    let first = app.submit("Deploy nginx to the homelab", true).await;
    app.wait_settled(first).await;
    // Publishing a dead letter to an exchange that does not exist is a channel error (404): it
    // closes the worker's publishing channel, on which every stage publishes.
    app.broker.delete_exchanges(&[app.names.dead_exchange()]).await.unwrap();
    app.publish_raw("requests", b"{ not json").await;

    // The worker reconnects, declares the topology again (the exchange included) and the message
    // comes back, to be dead-lettered this time.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        if let Some(message) = app.broker.get(&app.names.dead_queue()).await.unwrap() {
            break message;
        }
        assert!(Instant::now() < deadline, "the dead letter never arrived: the worker is stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(dead.headers["x-switchyard-reason"].starts_with("malformed JSON"), "{:?}", dead.headers);

    let id = app.submit("Deploy Gitea to the homelab", true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{report:#?}");
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 2);
}

#[tokio::test]
async fn a_topology_that_cannot_be_declared_is_retried_until_it_can() {
    let app = spawn_app().await;
    let side = Side::new(&app).await;
    // An operator's `requests` queue without the priority and dead-letter arguments of the
    // standard topology: declaring the standard one fails with 406 PRECONDITION_FAILED.
    let requests = side.names.queue("requests");
    let plain = Topology::parse("[[queue]]\nname = \"requests\"\n").unwrap().resolve(side.names.namespace());
    side.broker.declare(&plain).await.unwrap();

    let shutdown = CancellationToken::new();
    let worker = side.start_worker(&app, &[StageName::Decompose], &shutdown);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!worker.is_finished(), "the worker gave up: {:?}", worker.await);

    side.broker.delete_queues(std::slice::from_ref(&requests)).await.unwrap();
    side.wait_queue(&side.names.queue("heartbeats.retry")).await;
    let id = ops::submit(&side.broker, request("Deploy nginx to the homelab")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.store.report(id).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the worker never consumed the request");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    shutdown.cancel();
    worker.await.unwrap().unwrap();
    side.teardown().await;
}

#[tokio::test]
async fn an_agent_queue_declared_by_the_agent_is_compatible_and_a_conflict_breaks_nothing() {
    let app = spawn_app().await;
    // The agent declares its queue as the README says: durable, no arguments.
    let agent_declared = Topology::parse("[[queue]]\nname = \"agent.homelab-1\"\n").unwrap();
    app.broker.declare(&agent_declared.resolve(app.names.namespace())).await.unwrap();
    let register =
        app.cli(&["agents", "register", "--id", "homelab-1", "--capabilities", "deployment,shell"]).await;
    assert!(register.status.success(), "{}", stderr(&register));
    app.declare_agent_queue("homelab-1").await; // so that the test deletes it

    // A queue declared with other arguments conflicts: the declaration fails, on a channel of its
    // own, so the broker's publishing channel carries on.
    let odd = Topology::parse("[[queue]]\nname = \"agent.odd\"\nmax_priority = 3\n").unwrap();
    app.broker.declare(&odd.resolve(app.names.namespace())).await.unwrap();
    let err = app.broker.declare_agent_queue(&AgentId::parse("odd").unwrap()).await.unwrap_err();
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");
    app.broker.delete_queues(&[app.agent_queue("odd")]).await.unwrap();
    assert!(app.broker.is_healthy());
    let id = app.submit("Deploy nginx to the homelab", true).await;
    let report = app.wait_settled(id).await;
    assert_eq!(ops::progress(&report), Progress::Dispatched, "{report:#?}");
}

#[tokio::test]
async fn the_state_of_a_queue_counts_its_ready_messages_and_its_consumers() {
    let namespace = Namespace::parse(format!("t{}-state", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    let broker = Broker::connect(&amqp_url(), Names::new(namespace.unwrap())).await.expect("the broker");
    let queue = broker.declare_agent_queue(&AgentId::parse("homelab-1").unwrap()).await.unwrap();
    assert_eq!(broker.queue_state(&queue).await.unwrap(), QueueState { messages: 0, consumers: 0 });
    for body in ["one", "two"] {
        broker.publish(&Outgoing::to_queue(queue.clone(), body.as_bytes().to_vec())).await.unwrap();
    }
    assert_eq!(broker.queue_state(&queue).await.unwrap(), QueueState { messages: 2, consumers: 0 });
    // A consumer with a prefetch of 1 holds one message unacknowledged: one is left ready.
    let (subscription, _deliveries) = broker.subscribe(&queue, 1).await.unwrap();
    let expected = QueueState { messages: 1, consumers: 1 };
    let deadline = Instant::now() + Duration::from_secs(10);
    while broker.queue_state(&queue).await.unwrap() != expected {
        assert!(Instant::now() < deadline, "{:?}", broker.queue_state(&queue).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (broker.queue_len(&queue).await.unwrap(), broker.consumer_count(&queue).await.unwrap()),
        (1, 1)
    );
    drop(subscription);
    let missing = broker.names().queue("missing");
    assert!(broker.queue_state(&missing).await.unwrap_err().to_string().contains("NOT_FOUND"));
    assert!(broker.is_healthy(), "the passive declare failed on a channel of its own");
    broker.delete_queues(&[queue]).await.unwrap();
    broker.close().await;
}

/// A stage with bugs: it panics parsing `parse` and deciding about `decide`.
struct Buggy;

impl Stage for Buggy {
    type Input = String;
    type Request = NoRequest;
    type Context = ();
    const NAME: &'static str = "buggy";

    fn parse(
        &self,
        body: &[u8],
        _: &AmqpMeta<'_>,
        _: usize,
    ) -> Result<Inbound<String, NoRequest>, wire::Error> {
        let text = String::from_utf8_lossy(body).into_owned();
        if text == "parse" {
            panic!("cannot parse {text:?}");
        }
        Ok(Inbound { message_id: MessageId::random(), request_id: NoRequest, priority: 0, payload: text })
    }

    fn load(
        &self,
        _: &Store,
        _: &Inbound<String, NoRequest>,
    ) -> impl Future<Output = Result<(), switchyard::store::Error>> + Send {
        std::future::ready(Ok(()))
    }

    fn decide(&self, input: &Inbound<String, NoRequest>, (): (), _: DateTime<Utc>) -> Outcome {
        if input.payload == "decide" {
            panic!("cannot decide {:?}", input.payload);
        }
        Outcome::Forward { writes: Vec::new(), publish: Vec::new() }
    }
}

#[tokio::test]
async fn a_stage_that_panics_dead_letters_the_message_and_goes_on() {
    let app = spawn_app().await;
    let side = Side::new(&app).await;
    let topology = Topology::parse(
        r#"
[[exchange]]
name = "dead"
kind = "fanout"
[[queue]]
name = "dead"
bind = ["dead"]
[[queue]]
name = "buggy"
consumer = "buggy"
"#,
    )
    .unwrap()
    .resolve(side.names.namespace());
    side.broker.declare(&topology).await.unwrap();
    let broker = Broker::connect(&app.config.amqp_url, side.names.clone()).await.unwrap();
    let runner =
        Runner::new(Buggy, Arc::new(broker), app.store.clone(), &topology, app.config.worker.clone())
            .unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(runner.run(shutdown.clone()));

    let queue = side.names.queue("buggy");
    for body in ["decide", "parse", "fine"] {
        side.broker.publish(&Outgoing::to_queue(queue.clone(), body.as_bytes().to_vec())).await.unwrap();
    }
    let dead = app.wait_dead_letters("buggy", 2).await;
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        ["stage panicked: cannot decide \"decide\"", "stage panicked: cannot parse \"parse\""]
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while side.broker.queue_len(&side.names.dead_queue()).await.unwrap() < 2
        || side.broker.queue_len(&queue).await.unwrap() > 0
    {
        assert!(Instant::now() < deadline, "the messages were not all settled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!running.is_finished(), "the runner goes on after a panic");

    shutdown.cancel();
    running.await.unwrap().unwrap();
    side.broker.delete_queues(&[queue]).await.unwrap();
    side.teardown().await;
}

/// A consumer's acks that come together go as one frame (`basic.ack` with `multiple`), which
/// must never settle a delivery still in hand or one given back. Forty deliveries settled out of
/// order, some requeued, some rejected, a few held to the end: each is settled once (a second
/// ack of a tag would close the channel, and every later settle would fail), exactly the
/// requeued ones are in the queue afterwards, and closing the channel gives nothing more back
/// (an ack that was lost would).
#[tokio::test]
async fn deliveries_settled_together_and_out_of_order_are_each_settled_once_as_asked() {
    let app = spawn_bare_app(|_| {}).await;
    let queue = app.declare_agent_queue("settling").await;
    for i in 0..40u32 {
        app.broker.publish(&Outgoing::to_queue(queue.clone(), i.to_string().into_bytes())).await.unwrap();
    }
    let broker = Broker::connect(&app.config.amqp_url, app.names.clone()).await.unwrap();
    let (subscription, deliveries) = broker.subscribe(&queue, 40).await.unwrap();
    let deliveries: Vec<_> = deliveries.take(40).map(Result::unwrap).collect().await;
    // No more deliveries: what is requeued stays in the queue to be counted.
    subscription.cancel().await.unwrap();
    let number =
        |d: &switchyard::broker::Incoming| -> u32 { std::str::from_utf8(&d.body).unwrap().parse().unwrap() };
    let (held, settled_now): (Vec<_>, Vec<_>) =
        deliveries.iter().partition(|d| (10..14).contains(&number(d)));
    // Settled concurrently, in an order that is not the deliveries'.
    let settling = settled_now.iter().rev().map(|d| async move {
        match number(d) {
            n if n % 5 == 0 => d.requeue().await,
            n if n % 7 == 0 => d.reject().await,
            _ => d.ack().await,
        }
    });
    for settled in futures::future::join_all(settling).await {
        settled.expect("settled");
    }
    for d in held {
        d.ack().await.expect("a held delivery is acked");
    }
    let requeued = (0..40u32).filter(|n| !(10..14).contains(n) && n % 5 == 0).count() as u32;
    // The frames are sent; the broker takes them in a moment.
    let ready = || async { app.broker.queue_state(&queue).await.unwrap().messages };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready().await != requeued && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ready().await, requeued, "exactly the requeued messages are back in the queue");
    subscription.close().await;
    broker.close().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(ready().await, requeued, "closing the channel gave no unsettled message back");
}
