//! The broker topology as data: exchanges, queues and bindings, read from `queues/topology.toml`
//! and resolved for one namespace, and how its queues are stored (classic or quorum, the
//! `[topology]` settings). `broker` declares what this module describes, and `definitions`
//! exports it; nothing here talks to the broker.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::ids::{AgentId, Namespace};

const STANDARD: &str = include_str!("../../queues/topology.toml");

/// Why a topology description is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("topology is not valid TOML: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("topology: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Queue {
    pub name: String,
    /// The stage that consumes it, if any.
    #[serde(default)]
    pub consumer: Option<String>,
    /// Exchanges it is bound to (with its own name as the routing key).
    #[serde(default)]
    pub bind: Vec<String>,
    #[serde(default)]
    pub max_priority: Option<u8>,
    #[serde(default)]
    pub message_ttl_ms: Option<u32>,
    /// `""` is the default exchange.
    #[serde(default)]
    pub dead_letter_exchange: Option<String>,
    #[serde(default)]
    pub dead_letter_routing_key: Option<String>,
    /// How the broker stores it: set from the `[topology]` settings
    /// ([`Topology::stored_as`]), never written in the data file.
    #[serde(skip)]
    pub storage: Storage,
}

impl Queue {
    /// A durable queue with no wiring (an agent's), stored as the broker's default.
    pub fn named(name: impl Into<String>) -> Self {
        Queue {
            name: name.into(),
            consumer: None,
            bind: Vec::new(),
            max_priority: None,
            message_ttl_ms: None,
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            storage: Storage::Default,
        }
    }

    /// The arguments it is declared with (`x-…`), by name: what `broker` declares and what the
    /// RabbitMQ definitions hold, so that the two never differ. A declaration with other
    /// arguments than the queue has is refused by the broker (406 PRECONDITION_FAILED).
    pub fn arguments(&self) -> BTreeMap<&'static str, Argument> {
        let mut args = BTreeMap::new();
        if let Some(priority) = self.max_priority {
            args.insert("x-max-priority", Argument::Number(u32::from(priority)));
        }
        if let Some(ttl) = self.message_ttl_ms {
            args.insert("x-message-ttl", Argument::Number(ttl));
        }
        if let Some(dlx) = &self.dead_letter_exchange {
            args.insert("x-dead-letter-exchange", Argument::Text(dlx.clone()));
        }
        if let Some(key) = &self.dead_letter_routing_key {
            args.insert("x-dead-letter-routing-key", Argument::Text(key.clone()));
        }
        match self.storage {
            Storage::Default => {}
            Storage::ClassicV2 => {
                args.insert("x-queue-version", Argument::Number(2));
            }
            Storage::Quorum { delivery_limit } => {
                args.insert("x-queue-type", Argument::Text("quorum".into()));
                // Only where a dead-letter exchange takes what goes over the limit: without one,
                // the broker would drop the message. And dead-lettered at least once, so that a
                // message on its way to the dead queue (or back from a retry queue) survives the
                // loss of a node; that strategy needs `reject-publish` (RabbitMQ falls back to at
                // most once without it).
                if self.dead_letter_exchange.is_some() {
                    args.insert("x-delivery-limit", Argument::Number(delivery_limit));
                    args.insert("x-dead-letter-strategy", Argument::Text("at-least-once".into()));
                    args.insert("x-overflow", Argument::Text("reject-publish".into()));
                }
            }
        }
        args
    }
}

/// The value of a queue argument: a string or a whole number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Argument {
    Text(String),
    Number(u32),
}

/// How the broker stores a queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Storage {
    /// No storage argument: the broker's default, a classic queue. Agent queues of a classic
    /// namespace (the contract: durable, no arguments) and topologies written by hand.
    #[default]
    Default,
    /// A classic queue of version 2 (`x-queue-version: 2`, RabbitMQ 3.10 and later).
    ClassicV2,
    /// A quorum queue (replicated over a cluster's nodes); the broker dead-letters a message
    /// delivered more than `delivery_limit` times, where the queue has a dead-letter exchange.
    Quorum { delivery_limit: u32 },
}

/// The type of the queues a namespace declares (`[topology] queue_type`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::Display)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum QueueType {
    /// Classic queues, version 2: one node holds each queue; priorities are honoured.
    #[default]
    Classic,
    /// Quorum queues: replicated over the nodes of a cluster; no priorities (RabbitMQ 3.x).
    Quorum,
}

/// The `[topology]` section of the configuration: how the namespace's queues are stored. A
/// queue keeps the arguments it was declared with: changing these needs new queues (a new
/// namespace, or the old queues deleted once drained), or every declaration fails (406).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologySettings {
    pub queue_type: QueueType,
    /// Quorum queues: deliveries of one message (redeliveries after a crash or a requeue
    /// included) before the broker dead-letters it into `<namespace>.dead`.
    pub delivery_limit: u32,
}

impl Default for TopologySettings {
    fn default() -> Self {
        TopologySettings { queue_type: QueueType::Classic, delivery_limit: 20 }
    }
}

impl TopologySettings {
    /// Why these settings cannot work, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.delivery_limit == 0 {
            return Err("topology.delivery_limit must be at least 1".into());
        }
        Ok(())
    }

    /// How the namespace's own queues are stored (work, retry and dead queues).
    pub fn storage(&self) -> Storage {
        match self.queue_type {
            QueueType::Classic => Storage::ClassicV2,
            QueueType::Quorum => Storage::Quorum { delivery_limit: self.delivery_limit },
        }
    }

    /// How an agent's queues are stored: as the broker's default in a classic namespace, which
    /// is what the contract tells agents of any language to declare (no arguments); quorum in a
    /// quorum namespace (`x-queue-type: quorum` and nothing else, so no delivery limit: an
    /// agent's queue has no dead-letter exchange).
    pub fn agent_storage(&self) -> Storage {
        match self.queue_type {
            QueueType::Classic => Storage::Default,
            QueueType::Quorum => Storage::Quorum { delivery_limit: self.delivery_limit },
        }
    }

    /// The queue `name` of an agent, stored as [`TopologySettings::agent_storage`] says.
    pub fn agent_queue(&self, name: impl Into<String>) -> Queue {
        Queue { storage: self.agent_storage(), ..Queue::named(name) }
    }
}

/// A queue of the standard topology that Switchyard publishes to, named by a variant: a typo is
/// a compile error, not a message that no queue takes, parked as transient for ever. It
/// serialises as the queue's relative name ("route"), the form recorded with a message's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageQueue {
    Requests,
    Decomposed,
    Planned,
    Route,
    Place,
    Dispatch,
    Results,
    Heartbeats,
}

impl StageQueue {
    pub const ALL: [StageQueue; 8] = [
        StageQueue::Requests,
        StageQueue::Decomposed,
        StageQueue::Planned,
        StageQueue::Route,
        StageQueue::Place,
        StageQueue::Dispatch,
        StageQueue::Results,
        StageQueue::Heartbeats,
    ];

    /// Its name relative to the namespace, as `queues/topology.toml` has it.
    pub fn name(self) -> &'static str {
        match self {
            StageQueue::Requests => "requests",
            StageQueue::Decomposed => "decomposed",
            StageQueue::Planned => "planned",
            StageQueue::Route => "route",
            StageQueue::Place => "place",
            StageQueue::Dispatch => "dispatch",
            StageQueue::Results => "results",
            StageQueue::Heartbeats => "heartbeats",
        }
    }
}

/// A topology with relative names, as written in the data file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default, rename = "exchange")]
    pub exchanges: Vec<Exchange>,
    #[serde(default, rename = "queue")]
    pub queues: Vec<Queue>,
}

impl Topology {
    /// The topology shipped in `queues/topology.toml`.
    pub fn standard() -> Self {
        Self::parse(STANDARD).expect("the shipped topology is valid (checked by a unit test)")
    }

    pub fn parse(text: &str) -> Result<Self, Error> {
        let topology: Topology = toml::from_str(text)?;
        topology.check()?;
        Ok(topology)
    }

    fn check(&self) -> Result<(), Error> {
        let exchanges: BTreeSet<&str> = self.exchanges.iter().map(|e| e.name.as_str()).collect();
        let queues: BTreeSet<&str> = self.queues.iter().map(|q| q.name.as_str()).collect();
        if queues.len() != self.queues.len() || exchanges.len() != self.exchanges.len() {
            return Err(Error::Invalid("a name is declared twice".into()));
        }
        for queue in &self.queues {
            for exchange in queue.bind.iter().chain(&queue.dead_letter_exchange) {
                if !exchange.is_empty() && !exchanges.contains(exchange.as_str()) {
                    return Err(Error::Invalid(format!(
                        "queue {} refers to the undeclared exchange {exchange}",
                        queue.name
                    )));
                }
            }
            if let Some(key) = &queue.dead_letter_routing_key
                && !queues.contains(key.as_str())
            {
                return Err(Error::Invalid(format!(
                    "queue {} dead-letters to the undeclared queue {key}",
                    queue.name
                )));
            }
        }
        Ok(())
    }

    /// The same topology with every name prefixed by `namespace`.
    pub fn resolve(&self, namespace: &Namespace) -> Topology {
        let full = |name: &str| {
            if name.is_empty() { String::new() } else { format!("{namespace}.{name}") }
        };
        Topology {
            exchanges: self
                .exchanges
                .iter()
                .map(|e| Exchange { name: full(&e.name), kind: e.kind })
                .collect(),
            queues: self
                .queues
                .iter()
                .map(|q| Queue {
                    name: full(&q.name),
                    consumer: q.consumer.clone(),
                    bind: q.bind.iter().map(|b| full(b)).collect(),
                    max_priority: q.max_priority,
                    message_ttl_ms: q.message_ttl_ms,
                    dead_letter_exchange: q.dead_letter_exchange.as_deref().map(full),
                    dead_letter_routing_key: q.dead_letter_routing_key.as_deref().map(full),
                    storage: q.storage,
                })
                .collect(),
        }
    }

    /// The same topology with every queue stored as `settings` say. Quorum queues have no
    /// priorities on RabbitMQ 3.x, so their priority is left out: their messages are served in
    /// order of arrival.
    pub fn stored_as(mut self, settings: &TopologySettings) -> Topology {
        let storage = settings.storage();
        for queue in &mut self.queues {
            queue.storage = storage;
            if matches!(storage, Storage::Quorum { .. }) {
                queue.max_priority = None;
            }
        }
        self
    }

    /// The standard topology of `namespace`, stored as `settings` say: what a worker declares.
    pub fn of_namespace(namespace: &Namespace, settings: &TopologySettings) -> Topology {
        Topology::standard().resolve(namespace).stored_as(settings)
    }

    /// The queue that `stage` consumes.
    pub fn queue_of(&self, stage: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.consumer.as_deref() == Some(stage))
    }

    /// The queue where a message that failed transiently waits before going back to `queue`.
    pub fn retry_queue_of(&self, queue: &str) -> Option<&Queue> {
        self.queues
            .iter()
            .find(|q| q.message_ttl_ms.is_some() && q.dead_letter_routing_key.as_deref() == Some(queue))
    }
}

/// Full names of the well-known places in a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: Namespace,
}

impl Names {
    pub fn new(namespace: Namespace) -> Self {
        Self { namespace }
    }

    pub fn namespace(&self) -> &Namespace {
        &self.namespace
    }

    /// `<namespace>.<name>`.
    pub fn queue(&self, name: &str) -> String {
        format!("{}.{name}", self.namespace)
    }

    /// The full name of one of the queues Switchyard publishes to.
    pub fn of(&self, queue: StageQueue) -> String {
        self.queue(queue.name())
    }

    pub fn requests(&self) -> String {
        self.of(StageQueue::Requests)
    }

    pub fn heartbeats(&self) -> String {
        self.of(StageQueue::Heartbeats)
    }

    pub fn dead_exchange(&self) -> String {
        self.queue("dead")
    }

    pub fn dead_queue(&self) -> String {
        self.queue("dead")
    }

    /// `<namespace>.agent.<agent_id>`.
    pub fn agent_queue(&self, agent: &AgentId) -> String {
        format!("{}.agent.{agent}", self.namespace)
    }

    /// `<namespace>.agent.<agent_id>.control`: what an agent is told apart from its tasks (stop
    /// this one), so that it does not wait behind them.
    pub fn agent_control_queue(&self, agent: &AgentId) -> String {
        format!("{}.agent.{agent}.control", self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_topology_is_valid_and_complete() {
        let topology = Topology::standard();
        for stage in ["decompose", "plan", "fallback", "route", "place", "dispatch", "track", "heartbeat"] {
            let queue = topology.queue_of(stage).unwrap_or_else(|| panic!("no queue for {stage}"));
            assert_eq!(queue.dead_letter_exchange.as_deref(), Some("dead"), "{stage}");
            let retry = topology.retry_queue_of(&queue.name).expect("a retry queue");
            assert_eq!(retry.dead_letter_exchange.as_deref(), Some(""));
        }
        assert!(topology.queues.iter().any(|q| q.name == "dead" && q.bind == ["dead"]));
    }

    #[test]
    fn resolve_prefixes_every_name_but_the_default_exchange() {
        let ns = Namespace::parse("t1").unwrap();
        let topology = Topology::standard().resolve(&ns);
        let requests = topology.queue_of("decompose").unwrap();
        assert_eq!(requests.name, "t1.requests");
        assert_eq!(requests.dead_letter_exchange.as_deref(), Some("t1.dead"));
        let retry = topology.retry_queue_of("t1.requests").unwrap();
        assert_eq!(retry.name, "t1.requests.retry");
        assert_eq!(retry.dead_letter_exchange.as_deref(), Some(""));
        assert_eq!(retry.dead_letter_routing_key.as_deref(), Some("t1.requests"));
        assert!(topology.queues.iter().all(|q| q.name.starts_with("t1.")));
    }

    #[test]
    fn references_to_undeclared_names_are_refused() {
        let err =
            Topology::parse("[[queue]]\nname = \"a\"\ndead_letter_exchange = \"nowhere\"\n").unwrap_err();
        assert!(err.to_string().contains("undeclared exchange nowhere"), "{err}");
        let err = Topology::parse("[[queue]]\nname = \"a\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn classic_queues_are_version_2_and_keep_their_priorities() {
        let ns = Namespace::parse("t1").unwrap();
        let topology = Topology::of_namespace(&ns, &TopologySettings::default());
        let requests = topology.queue_of("decompose").unwrap();
        let args = requests.arguments();
        assert_eq!(args["x-queue-version"], Argument::Number(2));
        assert_eq!(args["x-max-priority"], Argument::Number(9));
        assert_eq!(args["x-dead-letter-exchange"], Argument::Text("t1.dead".into()));
        assert!(!args.contains_key("x-queue-type") && !args.contains_key("x-delivery-limit"));
        assert!(topology.queues.iter().all(|q| q.storage == Storage::ClassicV2));
        // An agent's queue is declared as the contract tells agents to: no arguments.
        let agent = TopologySettings::default().agent_queue("t1.agent.a");
        assert!(agent.arguments().is_empty());
    }

    #[test]
    fn quorum_queues_have_a_delivery_limit_where_a_dead_letter_exchange_takes_what_goes_over_it() {
        let ns = Namespace::parse("t1").unwrap();
        let settings = TopologySettings { queue_type: QueueType::Quorum, delivery_limit: 7 };
        let topology = Topology::of_namespace(&ns, &settings);
        for queue in &topology.queues {
            let args = queue.arguments();
            assert_eq!(args["x-queue-type"], Argument::Text("quorum".into()), "{}", queue.name);
            assert!(!args.contains_key("x-max-priority") && !args.contains_key("x-queue-version"));
            if queue.dead_letter_exchange.is_some() {
                assert_eq!(args["x-delivery-limit"], Argument::Number(7), "{}", queue.name);
                assert_eq!(args["x-dead-letter-strategy"], Argument::Text("at-least-once".into()));
                assert_eq!(args["x-overflow"], Argument::Text("reject-publish".into()));
            } else {
                assert!(!args.contains_key("x-delivery-limit"), "{} would drop over its limit", queue.name);
            }
        }
        let requests = topology.queue_of("decompose").unwrap();
        assert_eq!(requests.arguments()["x-dead-letter-exchange"], Argument::Text("t1.dead".into()));
        let retry = topology.retry_queue_of("t1.requests").unwrap().arguments();
        assert_eq!(retry["x-message-ttl"], Argument::Number(5000));
        assert_eq!(retry["x-dead-letter-routing-key"], Argument::Text("t1.requests".into()));
        let dead = topology.queues.iter().find(|q| q.name == "t1.dead").unwrap();
        assert_eq!(dead.bind, ["t1.dead"]);
        let agent = settings.agent_queue("t1.agent.a").arguments();
        assert_eq!(
            agent.into_iter().collect::<Vec<_>>(),
            [("x-queue-type", Argument::Text("quorum".into()))]
        );
    }

    #[test]
    fn topology_settings_read_from_toml_with_defaults() {
        let settings: TopologySettings = toml::from_str("queue_type = \"quorum\"\n").unwrap();
        assert_eq!(settings, TopologySettings { queue_type: QueueType::Quorum, delivery_limit: 20 });
        assert!(toml::from_str::<TopologySettings>("queue_type = \"stream\"\n").is_err());
        assert!(TopologySettings { delivery_limit: 0, ..settings }.validate().is_err());
        assert_eq!(TopologySettings::default().queue_type, QueueType::Classic);
    }

    #[test]
    fn names_follow_the_contract() {
        let names = Names::new(Namespace::parse("switchyard").unwrap());
        assert_eq!(names.requests(), "switchyard.requests");
        let agent = AgentId::parse("homelab-1").unwrap();
        assert_eq!(names.agent_queue(&agent), "switchyard.agent.homelab-1");
        assert_eq!(names.agent_control_queue(&agent), "switchyard.agent.homelab-1.control");
    }

    #[test]
    fn every_queue_published_to_by_name_is_in_the_standard_topology_and_reads_as_before() {
        let topology = Topology::standard();
        for queue in StageQueue::ALL {
            assert!(
                topology.queues.iter().any(|q| q.name == queue.name()),
                "{} is not in queues/topology.toml",
                queue.name()
            );
            let json = serde_json::to_value(queue).unwrap();
            assert_eq!(json, queue.name(), "recorded outputs name the queue as before");
            assert_eq!(serde_json::from_value::<StageQueue>(json).unwrap(), queue);
        }
    }
}
