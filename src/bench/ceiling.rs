//! The broker's own ceiling: how fast messages go through a chain of queues when every hop does
//! what a stage does to the broker (consume with manual acks and a prefetch, publish the output
//! persistent and mandatory, wait for its confirm, then ack the input) and nothing else. A
//! pipeline's rate over this one, measured in the same run on the same broker, says how much of
//! the broker's capacity the stages' own work leaves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt, TryStreamExt};
use tokio::task::{JoinError, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Error, Incoming, Outgoing, Subscription};
use crate::pipeline::topology::Names;

/// What to push through the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CeilingSettings {
    /// Messages per round.
    pub messages: usize,
    /// Rounds go on until this long has been measured, or [`CeilingSettings::max_messages`]
    /// have gone through; at least one. A short ceiling moves with whatever else the machine
    /// does for a second or two; ten seconds of rounds, and their spread, say how steady it is.
    pub min_duration: Duration,
    /// The most messages of all the rounds together (once one round has run).
    pub max_messages: usize,
    pub hops: usize,
    /// The prefetch of every relay and of the consumer counting arrivals.
    pub prefetch: u16,
    pub body_bytes: usize,
}

fn secs<S: serde::Serializer>(elapsed: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64((elapsed.as_secs_f64() * 1000.0).round() / 1000.0)
}

/// What [`measure`] found.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ceiling {
    /// Messages of all the rounds.
    pub messages: usize,
    pub hops: usize,
    /// In each round, from the first publish into the first queue to the arrival of the last
    /// message in the last one; summed over the rounds.
    #[serde(rename = "elapsed_secs", serialize_with = "secs")]
    pub elapsed: Duration,
    /// Messages through all hops per second.
    pub messages_per_sec: f64,
    /// Deliveries (messages × hops) per second.
    pub hop_messages_per_sec: f64,
    /// Each round's deliveries per second, in the order they ran: their spread says how steady
    /// the broker was.
    pub rounds_hop_messages_per_sec: Vec<f64>,
}

impl Ceiling {
    /// The slowest and the fastest round, in deliveries per second.
    pub fn spread(&self) -> (f64, f64) {
        let rounds = &self.rounds_hop_messages_per_sec;
        let min = rounds.iter().copied().fold(f64::INFINITY, f64::min);
        let max = rounds.iter().copied().fold(0.0, f64::max);
        if rounds.is_empty() { (0.0, 0.0) } else { (min, max) }
    }
}

/// How many messages the source keeps unconfirmed at once while it fills the first queue.
const PUBLISH_WINDOW: usize = 1_000;

/// Declares `hops + 1` durable queues `<ns>.ceiling.<i>` in `names`' namespace (a fresh one: the
/// queues are deleted at the end), starts one relay per hop, publishes `messages` persistent
/// messages of `body_bytes` into queue 0 with confirms (a thousand in flight) and measures from
/// the first publish until the last message has arrived in queue `hops`, counted by a consumer
/// of that queue that acks. Then it stops the relays and deletes the queues, whatever happened;
/// if the future is dropped before it finishes (a timeout), a task spawned on the runtime
/// deletes them.
///
/// A relay consumes queue `i` with manual acks and `prefetch`; for each delivery it publishes
/// the body, persistent and mandatory, to queue `i + 1` and waits for the confirm, up to
/// `prefetch` deliveries at once, their confirms awaited together. It acks a delivery only
/// after its confirm, in delivery order, a quarter of the prefetch at a time by one multiple
/// ack, and whatever is confirmed as soon as nothing more is ready. On a 2-core machine with a
/// prefetch of 200 that relayed 1.7 times what an ack per delivery did (5 hops: about 4,200
/// against 2,400 messages per second; 1 hop: 10,000 against 4,800), and a ceiling is the best a
/// plain relay does. Each relay has a connection (so a publishing channel) of its own, as
/// separate stage processes would: that was as fast as one connection shared by every relay on
/// 5 and 7 hops, and 5–20% faster on one.
///
/// That is one round; rounds of `messages` follow each other on the same queues until
/// `min_duration` has been measured or `max_messages` have gone through, and the rates are those
/// of all the rounds together, each round's kept beside them.
///
/// A relay that fails fails the measure. With no messages, nothing is measured: the elapsed time
/// and the rates are zero.
pub async fn measure(amqp_url: &str, names: &Names, settings: &CeilingSettings) -> Result<Ceiling, Error> {
    let queues = Queues {
        amqp_url: amqp_url.to_owned(),
        names: names.clone(),
        queues: (0..=settings.hops).map(|i| names.queue(&format!("ceiling.{i}"))).collect(),
        deleted: false,
    };
    let rounds = run(amqp_url, names, &queues.queues, settings).await;
    let deleted = queues.delete().await;
    let rounds = rounds?;
    deleted?;
    let elapsed: Duration = rounds.iter().sum();
    let messages = settings.messages * rounds.len();
    let per_sec = |count: usize, elapsed: Duration| {
        let secs = elapsed.as_secs_f64();
        if secs > 0.0 { count as f64 / secs } else { 0.0 }
    };
    Ok(Ceiling {
        messages,
        hops: settings.hops,
        elapsed,
        messages_per_sec: per_sec(messages, elapsed),
        hop_messages_per_sec: per_sec(messages * settings.hops, elapsed),
        rounds_hop_messages_per_sec: rounds
            .iter()
            .map(|round| per_sec(settings.messages * settings.hops, *round))
            .collect(),
    })
}

/// Declares the queues, runs the relays, pushes the messages through round after round, stops
/// the relays and closes the connections; returns the time each round took.
async fn run(
    amqp_url: &str,
    names: &Names,
    queues: &[String],
    settings: &CeilingSettings,
) -> Result<Vec<Duration>, Error> {
    let side = Arc::new(Broker::connect(amqp_url, names.clone()).await?);
    for queue in queues {
        side.declare_queue(queue).await?;
    }
    if settings.messages == 0 {
        side.close().await;
        return Ok(Vec::new());
    }
    let last = &queues[queues.len() - 1];
    let concurrency = usize::from(settings.prefetch).max(1);
    let ack_every = (concurrency / 4).max(1);
    let stop = CancellationToken::new();
    let mut relays = JoinSet::new();
    let mut connections = vec![side.clone()];
    let started = async {
        for hop in queues.windows(2) {
            let broker = Arc::new(Broker::connect(amqp_url, names.clone()).await?);
            connections.push(broker.clone());
            let consumer = broker.subscribe(&hop[0], settings.prefetch).await?;
            let (from, to) = (hop[0].clone(), hop[1].clone());
            relays.spawn(relay(broker, consumer, from, to, concurrency, ack_every, stop.clone()));
        }
        side.consume(last, settings.prefetch).await
    };
    let outcome = match started.await {
        Ok(mut arrivals) => {
            let mut rounds = Vec::new();
            loop {
                let started = Instant::now();
                let body = vec![0; settings.body_bytes];
                let pushed = futures::future::try_join(
                    fill(&side, &queues[0], body, settings.messages),
                    count(&mut arrivals, last, settings.messages, started, ack_every),
                );
                let round = tokio::select! {
                    pushed = pushed => pushed.map(|((), elapsed)| elapsed),
                    Some(ended) = relays.join_next() => Err(relay_failure(ended)),
                };
                match round {
                    Ok(elapsed) => rounds.push(elapsed),
                    Err(err) => break Err(err),
                }
                let measured: Duration = rounds.iter().sum();
                if measured >= settings.min_duration
                    || settings.messages * rounds.len() >= settings.max_messages
                {
                    break Ok(rounds);
                }
            }
        }
        Err(err) => Err(err),
    };
    stop.cancel();
    let mut stopped = Ok(());
    while let Some(ended) = relays.join_next().await {
        if let Err(err) = unpanic(ended) {
            stopped = stopped.and(Err(err));
        }
    }
    for connection in connections {
        connection.close().await;
    }
    let rounds = outcome?;
    stopped?;
    Ok(rounds)
}

/// One hop: every delivery of `from` published to `to`, up to `concurrency` at once, each
/// acknowledged after its confirm (see [`ack_in_order`]), until `stop`. The deliveries in hand
/// when it stops are finished: the subscription keeps their channel open until then, which the
/// stream alone would not, being dropped as soon as it ends.
async fn relay(
    broker: Arc<Broker>,
    (_subscription, deliveries): (Subscription, impl Stream<Item = Result<Incoming, Error>>),
    from: String,
    to: String,
    concurrency: usize,
    ack_every: usize,
    stop: CancellationToken,
) -> Result<(), Error> {
    let (broker, to) = (&broker, &to);
    let confirmed = deliveries
        .take_until(stop.cancelled())
        .map_ok(|mut incoming| async move {
            let body = std::mem::take(&mut incoming.body);
            broker.publish(&Outgoing::to_queue(to.clone(), body)).await?;
            Ok(incoming)
        })
        .try_buffered(concurrency);
    ack_in_order(confirmed, ack_every).await?;
    if stop.is_cancelled() { Ok(()) } else { Err(Error::ConsumerEnded(from)) }
}

/// Acknowledges deliveries of one consumer that come in the order they were delivered: every
/// `ack_every`-th by a multiple ack that covers the ones before it, and the last one whenever no
/// more are ready, so that none waits for the next.
async fn ack_in_order(
    done: impl Stream<Item = Result<Incoming, Error>>,
    ack_every: usize,
) -> Result<(), Error> {
    let mut done = std::pin::pin!(done);
    let mut pending: Option<Incoming> = None;
    let mut unacked = 0;
    loop {
        let next = match done.next().now_or_never() {
            Some(next) => next,
            None => {
                if let Some(incoming) = pending.take() {
                    incoming.ack_up_to().await?;
                    unacked = 0;
                }
                done.next().await
            }
        };
        let Some(incoming) = next.transpose()? else { break };
        unacked += 1;
        if unacked >= ack_every {
            incoming.ack_up_to().await?;
            unacked = 0;
            pending = None;
        } else {
            pending = Some(incoming);
        }
    }
    if let Some(incoming) = pending {
        incoming.ack_up_to().await?;
    }
    Ok(())
}

/// Publishes `messages` copies of `body` into `queue`, `PUBLISH_WINDOW` awaiting their confirms
/// at once.
async fn fill(broker: &Broker, queue: &str, body: Vec<u8>, messages: usize) -> Result<(), Error> {
    futures::stream::iter(0..messages)
        .map(|_| {
            let message = Outgoing::to_queue(queue, body.clone());
            async move { broker.publish(&message).await }
        })
        .buffer_unordered(PUBLISH_WINDOW)
        .try_collect()
        .await
}

/// Takes `messages` deliveries of the last queue, acknowledging them as a relay does, and
/// returns the time from `started` to the last one's arrival.
async fn count(
    arrivals: impl Stream<Item = Result<Incoming, Error>>,
    queue: &str,
    messages: usize,
    started: Instant,
    ack_every: usize,
) -> Result<Duration, Error> {
    let mut arrived = 0;
    let mut elapsed = None;
    let counted = arrivals.take(messages).inspect_ok(|_| {
        arrived += 1;
        if arrived == messages {
            elapsed = Some(started.elapsed());
        }
    });
    ack_in_order(counted, ack_every).await?;
    elapsed.ok_or_else(|| Error::ConsumerEnded(queue.to_owned()))
}

/// A relay's task ended: its error, or its panic carried on.
fn unpanic(ended: Result<Result<(), Error>, JoinError>) -> Result<(), Error> {
    match ended {
        Ok(result) => result,
        Err(err) if err.is_panic() => std::panic::resume_unwind(err.into_panic()),
        Err(err) => panic!("a relay was aborted: {err}"),
    }
}

/// A relay ended before every message arrived. Relays end without an error only once stopped,
/// so this is an error; the `Ok` arm is there for completeness.
fn relay_failure(ended: Result<Result<(), Error>, JoinError>) -> Error {
    match unpanic(ended) {
        Err(err) => err,
        Ok(()) => Error::ConsumerEnded("a relay's queue".into()),
    }
}

/// The queues of one measure, deleted by [`Queues::delete`] or, failing that, when dropped.
struct Queues {
    amqp_url: String,
    names: Names,
    queues: Vec<String>,
    deleted: bool,
}

impl Queues {
    async fn delete(mut self) -> Result<(), Error> {
        self.deleted = true;
        delete(&self.amqp_url, &self.names, &self.queues).await
    }
}

impl Drop for Queues {
    fn drop(&mut self) {
        if self.deleted {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (url, names, queues) =
                (self.amqp_url.clone(), self.names.clone(), std::mem::take(&mut self.queues));
            runtime.spawn(async move {
                if let Err(err) = delete(&url, &names, &queues).await {
                    tracing::warn!(error = %err, "the ceiling's queues were not deleted");
                }
            });
        }
    }
}

/// Deletes `queues` on a connection of its own: the measure's may be what failed.
async fn delete(amqp_url: &str, names: &Names, queues: &[String]) -> Result<(), Error> {
    let broker = Broker::connect(amqp_url, names.clone()).await?;
    let deleted = broker.delete_queues(queues).await;
    broker.close().await;
    deleted
}
