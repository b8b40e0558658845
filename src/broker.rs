//! RabbitMQ: the only module that imports lapin. It connects (once: callers pace their
//! retries), declares the topology described by `topology`, publishes with publisher confirms
//! (all outputs of a message awaited together), and hands out deliveries as [`Incoming`] values
//! that the runner acknowledges once their effects are durable, as few frames as it can (in
//! `settle`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::AMQPUri;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

mod settle;

use self::settle::{How, Settler};
use crate::model::ids::AgentId;
use crate::pipeline::topology::{self, Argument, Names, Queue, Storage, Topology, TopologySettings};

/// What went wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused the login: a wrong user or password, or a user without access to the
    /// virtual host. Refused again until someone changes the broker's users.
    #[error("broker: {0}")]
    Login(lapin::Error),
    #[error("the broker refused the message (publisher nack) for {0}")]
    Nacked(String),
    /// Nothing is bound to take the message: a mandatory publish came back.
    #[error("unroutable: no queue takes messages for {routing_key} ({reply})")]
    Unroutable { routing_key: String, reply: String },
    /// The URL cannot work; it is shown redacted.
    #[error("invalid broker URL {0}")]
    Url(String),
    /// A consumer's deliveries stopped without an error (the broker cancelled it, say) while its
    /// owner still expected messages from the queue named.
    #[error("the consumer of {0} ended")]
    ConsumerEnded(String),
    /// The consumer's channel went before the delivery's acknowledgement could be sent: the
    /// broker delivers the message again.
    #[error("the delivery was not settled: its consumer is gone")]
    NotSettled,
}

impl Error {
    /// Whether retrying the same operation can help. An unroutable message stays unroutable until
    /// someone declares the queue, which is the caller's business (the runner waits for it, a
    /// dispatch gives up); a bad URL stays bad; the rest is the broker being unavailable.
    pub fn is_transient(&self) -> bool {
        // A permission refused later (a 403 on a queue) may be granted meanwhile: what it held
        // waits, parked. A refused login is for the one who configured it to mend.
        !matches!(self, Error::Unroutable { .. } | Error::Url(_) | Error::Login(_))
    }

    /// Whether the broker's host name does not resolve. It may, later (a service whose name is
    /// not published yet), so it is transient for a process that waits; a command fails at once.
    pub fn is_unknown_host(&self) -> bool {
        crate::error_chain(self).contains(crate::UNKNOWN_HOST)
    }

    /// Whether the broker refused the operation to this user (403, ACCESS_REFUSED): its
    /// permissions do not cover the exchange or queue.
    pub fn is_access_refused(&self) -> bool {
        match self {
            Error::Amqp(err) | Error::Login(err) => access_refused(err),
            _ => false,
        }
    }

    /// Whether what was asked about does not exist (404, NOT_FOUND): a passive declare of a
    /// queue that was never declared, say.
    pub fn is_not_found(&self) -> bool {
        self.is_soft(lapin::protocol::AMQPSoftError::NOTFOUND)
    }

    /// Whether the broker refused because a condition did not hold (406, PRECONDITION_FAILED):
    /// deleting a queue that is in use or not empty when asked to only if it is neither, say.
    pub fn is_precondition_failed(&self) -> bool {
        self.is_soft(lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
    }

    fn is_soft(&self, soft: lapin::protocol::AMQPSoftError) -> bool {
        match self {
            Error::Amqp(err) => matches!(
                err.kind(),
                lapin::ErrorKind::ProtocolError(amqp)
                    if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(kind) if *kind == soft)
            ),
            _ => false,
        }
    }
}

/// Whether the broker said 403, ACCESS_REFUSED.
fn access_refused(err: &lapin::Error) -> bool {
    matches!(
        err.kind(),
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(lapin::protocol::AMQPSoftError::ACCESSREFUSED))
    )
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// `""` for the default exchange, which routes by queue name.
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub priority: Option<u8>,
    pub headers: BTreeMap<String, String>,
    /// Ask the broker to return the message if no queue takes it. Without it, a message to a
    /// queue that does not exist is confirmed, then dropped.
    pub mandatory: bool,
}

impl Outgoing {
    /// A persistent message straight to `queue` through the default exchange, mandatory: a
    /// missing queue is an [`Error::Unroutable`], never a silent loss.
    pub fn to_queue(queue: impl Into<String>, body: Vec<u8>) -> Self {
        Outgoing {
            exchange: String::new(),
            routing_key: queue.into(),
            body,
            message_id: None,
            priority: None,
            headers: BTreeMap::new(),
            mandatory: true,
        }
    }

    /// A message of `body` as JSON to `queue` (as [`Outgoing::to_queue`]) under `message_id`: the
    /// one way a message with an id is made, so that none goes out without one.
    pub fn json(
        queue: impl Into<String>,
        message_id: impl std::fmt::Display,
        body: &impl serde::Serialize,
    ) -> Self {
        let mut outgoing = Outgoing::to_queue(queue, serde_json::to_vec(body).expect("messages serialize"));
        outgoing.message_id = Some(message_id.to_string());
        outgoing
    }
}

/// A received message. Dropping it without settling leaves it unacknowledged: the broker
/// redelivers it when the channel closes.
#[derive(Debug)]
pub struct Incoming {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub priority: Option<u8>,
    pub headers: BTreeMap<String, String>,
    acker: lapin::Acker,
    /// The channel's number for this delivery.
    tag: u64,
    /// The settler of a subscription's deliveries: acks that come together go in one frame.
    settler: Option<Settler>,
}

impl Incoming {
    pub async fn ack(&self) -> Result<(), Error> {
        self.settle(How::Ack).await
    }

    /// Acknowledges this delivery and, with it, every earlier delivery of its consumer that is
    /// not settled yet (`basic.ack` with `multiple`): one frame for many messages. Only for a
    /// consumer that settles its deliveries in the order they came.
    pub async fn ack_up_to(&self) -> Result<(), Error> {
        self.settle(How::AckUpTo).await
    }

    /// Gives the message back to its queue, to be delivered again.
    pub async fn requeue(&self) -> Result<(), Error> {
        self.settle(How::Requeue).await
    }

    /// Refuses the message for good (a nack without requeue). A queue with a dead-letter exchange
    /// sends it there; a queue without one (an agent's queue) drops it.
    pub async fn reject(&self) -> Result<(), Error> {
        self.settle(How::Reject).await
    }

    async fn settle(&self, how: How) -> Result<(), Error> {
        match &self.settler {
            Some(settler) => settler.settle(self.tag, how, &self.acker).await,
            None => Ok(settle::send(&self.acker, how, how == How::AckUpTo).await?),
        }
    }

    /// How many times the runner parked the message in a retry queue (the
    /// `x-switchyard-retries` header it sets when parking).
    pub fn retries(&self) -> u64 {
        self.headers.get("x-switchyard-retries").and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

/// The arguments of `queue` as AMQP declares them.
fn arguments(queue: &Queue) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in queue.arguments() {
        let value = match value {
            Argument::Text(text) => AMQPValue::LongString(text.as_str().into()),
            Argument::Number(n) => AMQPValue::LongUInt(n),
        };
        table.insert(name.into(), value);
    }
    table
}

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        AMQPValue::ShortInt(n) => Some(n.to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn incoming(delivery: lapin::message::Delivery, settler: Option<&Settler>) -> Incoming {
    let props = &delivery.properties;
    let headers = props
        .headers()
        .as_ref()
        .map(|table| {
            table
                .inner()
                .iter()
                .filter_map(|(k, v)| header_text(v).map(|v| (k.as_str().to_owned(), v)))
                .collect()
        })
        .unwrap_or_default();
    Incoming {
        message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
        priority: *props.priority(),
        headers,
        body: delivery.data,
        acker: delivery.acker,
        tag: delivery.delivery_tag,
        settler: settler.cloned(),
    }
}

/// The consumer of a [`Broker::subscribe`]. The channel stays open while this value (or its
/// stream) lives: deliveries are acknowledged on it, and closing it gives every unacknowledged
/// delivery back to its queue.
pub struct Subscription {
    channel: Channel,
    tag: ShortString,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").field("tag", &self.tag.as_str()).finish()
    }
}

impl Subscription {
    /// Asks the broker for no more deliveries (basic.cancel). Those in hand can still be settled.
    pub async fn cancel(&self) -> Result<(), Error> {
        self.channel.basic_cancel(self.tag.clone(), BasicCancelOptions::default()).await?;
        Ok(())
    }

    /// Closes the consumer's channel and waits for the broker to confirm it (at most 5 s): what
    /// is left unacknowledged goes back to its queue. Closed before the connection, so that the
    /// connection's close does not race a channel still closing (lapin logs that as an error).
    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.channel.close(200, "done".into())).await;
    }
}

/// What [`Broker::queue_state`] tells of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueState {
    /// Messages ready for delivery (not those delivered and not yet acknowledged).
    pub messages: u32,
    pub consumers: u32,
}

/// A connection with a publishing channel in confirm mode. Consumers get channels of their own;
/// so can publishers ([`Broker::with_own_channel`]).
pub struct Broker {
    connection: Arc<Connection>,
    /// Whether this broker connected (and closes the connection) or shares another's.
    owns_connection: bool,
    publisher: Channel,
    names: Names,
    /// How the queues it declares are stored (`[topology]`).
    settings: TopologySettings,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").field("namespace", self.names.namespace()).finish()
    }
}

/// The URL with anything that could be a password masked, for logs and errors.
pub fn redact(url: &str) -> String {
    crate::redact::password(url)
}

/// Parses a broker URL before lapin sees it: lapin's own error for some unusable URLs quotes the
/// URL, password included, and a URL that cannot work should fail at once, not after retries.
fn parse_amqp_url(url: &str) -> Result<AMQPUri, Error> {
    let invalid = |problem: &str| Error::Url(format!("{}: {problem}", redact(url)));
    let parsed = url::Url::parse(url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "amqp" | "amqps") {
        return Err(invalid("the scheme must be amqp or amqps"));
    }
    // Without a TLS stack lapin would speak plain AMQP to an amqps:// URL: asked for encryption,
    // refuse rather than send the password in clear.
    if parsed.scheme() == "amqps" && !cfg!(feature = "tls") {
        return Err(invalid("amqps needs Switchyard built with TLS (cargo build --release --features tls)"));
    }
    if parsed.cannot_be_a_base() || !parsed.has_authority() || parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("no host (the form is amqp://user:password@host:port/vhost)"));
    }
    // What is left to refuse (a bad port or query parameter) is named without the URL.
    url.parse::<AMQPUri>().map_err(|e| invalid(&e))
}

impl Broker {
    /// Connects to `url`, once: whether and how long to try again is the caller's (a command
    /// gives up after its connect timeout, a worker or an agent waits for the broker). A URL that
    /// cannot work fails with [`Error::Url`].
    pub async fn connect(url: &str, names: Names) -> Result<Self, Error> {
        let uri = parse_amqp_url(url)?;
        let connection = Connection::connect_uri(uri, ConnectionProperties::default())
            .await
            .map_err(|err| if access_refused(&err) { Error::Login(err) } else { Error::Amqp(err) })?;
        let publisher = connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Broker {
            connection: Arc::new(connection),
            owns_connection: true,
            publisher,
            names,
            settings: TopologySettings::default(),
        })
    }

    /// The same connection, namespace and settings with a publishing channel of its own. The
    /// broker handles a channel's publishes and confirms one after another, in one process: a
    /// stage that publishes on its own channel neither waits behind the other stages' publishes
    /// nor loses its channel to their channel errors. [`Broker::close`] on it closes only its
    /// channel; the connection closes with the broker it came from.
    pub async fn with_own_channel(&self) -> Result<Broker, Error> {
        let publisher = self.connection.create_channel().await?;
        publisher.confirm_select(ConfirmSelectOptions::default()).await?;
        Ok(Broker {
            connection: self.connection.clone(),
            owns_connection: false,
            publisher,
            names: self.names.clone(),
            settings: self.settings.clone(),
        })
    }

    /// The same broker, declaring its queues as `settings` say (classic by default). Every
    /// process of a namespace must be given the same settings: a queue declared otherwise than
    /// it exists is refused (406 PRECONDITION_FAILED).
    pub fn with_settings(mut self, settings: TopologySettings) -> Self {
        self.settings = settings;
        self
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn settings(&self) -> &TopologySettings {
        &self.settings
    }

    /// Whether the connection and the publishing channel are both open. A channel-level error (a
    /// publish to an exchange that does not exist, say) closes the publishing channel for good:
    /// every later publish fails until a new `Broker` is connected.
    pub fn is_healthy(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }

    /// Declares the standard topology, resolved for this broker's namespace and stored as its
    /// settings say.
    pub async fn declare_topology(&self) -> Result<Topology, Error> {
        let topology = Topology::of_namespace(self.names.namespace(), &self.settings);
        self.declare(&topology).await?;
        Ok(topology)
    }

    /// Declares exchanges, queues and bindings. Idempotent.
    pub async fn declare(&self, topology: &Topology) -> Result<(), Error> {
        let channel = self.connection.create_channel().await?;
        for exchange in &topology.exchanges {
            let kind = match exchange.kind {
                topology::ExchangeKind::Direct => ExchangeKind::Direct,
                topology::ExchangeKind::Fanout => ExchangeKind::Fanout,
                topology::ExchangeKind::Topic => ExchangeKind::Topic,
            };
            channel
                .exchange_declare(
                    exchange.name.as_str().into(),
                    kind,
                    ExchangeDeclareOptions { durable: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
        }
        for queue in &topology.queues {
            channel
                .queue_declare(queue.name.as_str().into(), QueueDeclareOptions::durable(), arguments(queue))
                .await?;
            for exchange in &queue.bind {
                channel
                    .queue_bind(
                        queue.name.as_str().into(),
                        exchange.as_str().into(),
                        queue.name.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
        }
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Declares the queue of an agent as agents themselves do (README): durable, with no
    /// arguments in a classic namespace, `x-queue-type: quorum` only in a quorum one. Any other
    /// arguments would make the two declarations conflict (406 PRECONDITION_FAILED). It uses a
    /// channel of its own, because such an error closes the channel it happens on.
    pub async fn declare_agent_queue(&self, agent: &AgentId) -> Result<String, Error> {
        let name = self.names.agent_queue(agent);
        self.declare_queue(&name).await?;
        Ok(name)
    }

    /// Declares a durable queue named in full (no namespace is added), as an agent's queue is
    /// (see [`Broker::declare_agent_queue`]), on a channel of its own: a conflicting declaration
    /// (406) closes that channel only. Idempotent.
    pub async fn declare_queue(&self, name: &str) -> Result<(), Error> {
        let queue = self.settings.agent_queue(name);
        let channel = self.connection.create_channel().await?;
        channel.queue_declare(name.into(), QueueDeclareOptions::durable(), arguments(&queue)).await?;
        let _ = channel.close(200, "declared".into()).await;
        Ok(())
    }

    /// Publishes one persistent message and waits for the broker's confirm.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), Error> {
        let mut properties =
            BasicProperties::default().with_delivery_mode(2).with_content_type("application/json".into());
        if let Some(id) = &message.message_id {
            properties = properties.with_message_id(id.as_str().into());
        }
        if let Some(p) = message.priority {
            properties = properties.with_priority(p);
        }
        if !message.headers.is_empty() {
            let mut table = FieldTable::default();
            for (k, v) in &message.headers {
                table.insert(
                    ShortString::from(k.as_str()),
                    AMQPValue::LongString(LongString::from(v.as_str())),
                );
            }
            properties = properties.with_headers(table);
        }
        let confirm = self
            .publisher
            .basic_publish(
                message.exchange.as_str().into(),
                message.routing_key.as_str().into(),
                BasicPublishOptions { mandatory: message.mandatory, ..Default::default() },
                &message.body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(Error::Unroutable {
                routing_key: message.routing_key.clone(),
                reply: format!("{} {}", returned.reply_code, returned.reply_text),
            }),
            Confirmation::Nack(_) => Err(Error::Nacked(message.routing_key.clone())),
        }
    }

    /// Publishes several messages and waits for all their confirms together.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), Error> {
        futures::future::try_join_all(messages.iter().map(|m| self.publish(m))).await?;
        Ok(())
    }

    /// Consumes `queue` with manual acks and at most `prefetch` unacknowledged deliveries.
    /// Acknowledgements that come together are sent as one frame where they can be (see
    /// `settle`): a stage's batch is acked by one `basic.ack` with `multiple`.
    pub async fn consume(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<impl Stream<Item = Result<Incoming, Error>> + Send + Unpin + use<>, Error> {
        let channel = self.connection.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        // The stream keeps the channel alive for as long as it is consumed.
        let settler = Settler::start();
        Ok(consumer.map(move |delivery| {
            let _keep = &channel;
            delivery.map(|d| incoming(d, Some(&settler))).map_err(Error::from)
        }))
    }

    /// As [`Broker::consume`], with a [`Subscription`] that stops the deliveries without closing
    /// the channel, so that the deliveries in hand can still be acknowledged (an agent finishing
    /// its tasks on shutdown). The stream ends once the broker confirms the cancellation.
    pub async fn subscribe(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<(Subscription, impl Stream<Item = Result<Incoming, Error>> + Send + Unpin + use<>), Error>
    {
        let channel = self.connection.create_channel().await?;
        channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let subscription = Subscription { channel: channel.clone(), tag: consumer.tag() };
        let settler = Settler::start();
        Ok((
            subscription,
            consumer.map(move |delivery| {
                let _keep = &channel;
                delivery.map(|d| incoming(d, Some(&settler))).map_err(Error::from)
            }),
        ))
    }

    /// Takes one message from `queue` without a consumer (tests, tools). Acknowledged at once.
    pub async fn get(&self, queue: &str) -> Result<Option<Incoming>, Error> {
        let Some(message) = self.publisher.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await?
        else {
            return Ok(None);
        };
        Ok(Some(incoming(message.delivery, None)))
    }

    /// The ready messages and the consumers of `queue`, by a passive declare: an error if the
    /// queue does not exist. The declare runs on a channel of its own, which that error closes.
    pub async fn queue_state(&self, queue: &str) -> Result<QueueState, Error> {
        let channel = self.connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions { passive: true, ..Default::default() },
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "checked".into()).await;
        Ok(QueueState { messages: declared.message_count(), consumers: declared.consumer_count() })
    }

    /// The number of ready messages in `queue`: see [`Broker::queue_state`].
    pub async fn queue_len(&self, queue: &str) -> Result<u32, Error> {
        Ok(self.queue_state(queue).await?.messages)
    }

    /// The number of consumers of `queue`: see [`Broker::queue_state`].
    pub async fn consumer_count(&self, queue: &str) -> Result<u32, Error> {
        Ok(self.queue_state(queue).await?.consumers)
    }

    /// Deletes queues (test teardown, tools); a queue that does not exist is fine.
    pub async fn delete_queues(&self, queues: &[String]) -> Result<(), Error> {
        for queue in queues {
            self.publisher.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await?;
        }
        Ok(())
    }

    /// Deletes the durable queue `queue` (an agent's) if nothing consumes it and no message waits
    /// in it, and says how it was and whether it went. Declaring it first, as its agent does,
    /// tells its state without an error when it does not exist; the broker checks both conditions
    /// again as it deletes, and a queue that changed meanwhile is kept.
    ///
    /// Quorum queues do not support those conditions on RabbitMQ 3.x (a delete with them is
    /// refused as not implemented, which closes the whole connection): one found idle is deleted
    /// without them, so a message published between the look and the delete would go with it.
    /// Only an agent's queue is deleted so, once nothing is routed to that agent any more.
    pub async fn delete_queue_if_idle(&self, queue: &str) -> Result<(QueueState, bool), Error> {
        let declared_as = self.settings.agent_queue(queue);
        let channel = self.connection.create_channel().await?;
        let declared = channel
            .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments(&declared_as))
            .await?;
        let state = QueueState { messages: declared.message_count(), consumers: declared.consumer_count() };
        if state.messages > 0 || state.consumers > 0 {
            let _ = channel.close(200, "kept".into()).await;
            return Ok((state, false));
        }
        let conditional = !matches!(declared_as.storage, Storage::Quorum { .. });
        let options =
            QueueDeleteOptions { if_unused: conditional, if_empty: conditional, ..Default::default() };
        match channel.queue_delete(queue.into(), options).await {
            Ok(_) => {
                let _ = channel.close(200, "deleted".into()).await;
                Ok((state, true))
            }
            // 406: a message or a consumer came since; the refusal closed the channel.
            Err(err) if Error::from(err.clone()).is_precondition_failed() => {
                Ok((self.queue_state(queue).await?, false))
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Deletes exchanges (test teardown, tools).
    pub async fn delete_exchanges(&self, exchanges: &[String]) -> Result<(), Error> {
        for exchange in exchanges {
            self.publisher
                .exchange_delete(exchange.as_str().into(), lapin::options::ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Closes the publishing channel, then the connection (each at most 5 s): in that order, so
    /// that no frame of a channel still closing meets a closed connection. A broker that does not
    /// answer (a stalled channel holds up the close) must not hold up a reconnect; whatever was
    /// not acknowledged goes back to its queues either way.
    pub async fn close(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.publisher.close(200, "bye".into())).await;
        // A broker made by `with_own_channel` shares the connection of the one that connected.
        if self.owns_connection {
            let _ =
                tokio::time::timeout(Duration::from_secs(5), self.connection.close(200, "bye".into())).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_masks_passwords_only() {
        assert_eq!(redact("amqp://guest:secret@127.0.0.1:5672/%2f"), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(redact("amqp://127.0.0.1:5672"), "amqp://127.0.0.1:5672");
        assert_eq!(redact("postgres:///switchyard?host=/tmp"), "postgres:///switchyard?host=/tmp");
        assert_eq!(redact("::not a url"), "<unparsable URL>");
    }

    #[test]
    fn redact_hides_urls_whose_password_is_not_in_the_authority() {
        for (url, shown) in [
            ("amqp:guest:s3cret@127.0.0.1:5672", "<URL without a host>"),
            ("postgres:postgres:s3cret@host/db", "<URL without a host>"),
            ("amqp:/guest:s3cret@host", "<URL without a host>"),
            ("amqp://guest:12/s3cret@host", "<URL with an @ after its host>"),
            (
                "postgres://u@db/x?sslmode=disable&password=s3cret",
                "postgres://u@db/x?sslmode=disable&password=***",
            ),
        ] {
            assert_eq!(redact(url), shown, "{url}");
        }
    }

    #[test]
    fn unusable_broker_urls_are_refused_without_their_password() {
        for (url, problem) in [
            ("amqp:guest:s3cret@127.0.0.1:5672", "no host"),
            ("amqp:/guest:s3cret@127.0.0.1:5672", "no host"),
            ("http://guest:s3cret@127.0.0.1:5672", "the scheme must be amqp or amqps"),
            ("amqp://guest:s3cret@127.0.0.1:5672/%2f?heartbeat=often", "invalid digit"),
            ("amqp://guest:s3cret@127.0.0.1:99999", "invalid port"),
            ("guest:s3cret", "the scheme must be amqp or amqps"),
        ] {
            let err = parse_amqp_url(url).unwrap_err();
            let text = err.to_string();
            assert!(matches!(err, Error::Url(_)) && !err.is_transient(), "{url}: {text}");
            assert!(text.contains(problem), "{url}: {text}");
            assert!(!text.contains("s3cret"), "{url}: {text}");
        }
        let amqps = parse_amqp_url("amqps://guest:s3cret@rabbit.example/prod");
        if cfg!(feature = "tls") {
            assert!(amqps.is_ok());
        } else {
            let text = amqps.unwrap_err().to_string();
            assert!(
                text.contains("amqps needs Switchyard built with TLS") && !text.contains("s3cret"),
                "{text}"
            );
        }
    }
}
