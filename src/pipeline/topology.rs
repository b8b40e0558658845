//! The broker topology as data: exchanges, queues and bindings, read from `queues/topology.toml`
//! and resolved for one namespace. `broker` declares what this module describes; nothing here
//! talks to the broker.

use std::collections::BTreeSet;

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
                })
                .collect(),
        }
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
