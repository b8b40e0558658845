//! The namespace as RabbitMQ definitions (the JSON that `rabbitmqctl import_definitions`, the
//! management API and `load_definitions` at a node's boot read), in two parts:
//!
//! - [`topology`]: its exchanges, queues (with the arguments `broker` declares them with, so
//!   that workers starting later find them equal) and bindings; safe to import again and again;
//! - [`users`]: the least-privilege users and permissions of README's Security section, with no
//!   password (no `password` nor `password_hash`): an import creates them without one and an
//!   operator sets it (`rabbitmqctl change_password`), so that no secret is ever generated into
//!   a file. Imported once: importing a user again clears the password set since (RabbitMQ
//!   3.10), which is why the users are a part of their own, kept out of what a node loads at
//!   every boot.
//!
//! Pure: it builds values and talks to nothing.

use serde_json::{Value, json};

use crate::model::ids::{AgentId, Namespace};
use crate::pipeline::topology::{ExchangeKind, Topology, TopologySettings};

/// The user of the workers: declares the namespace's topology, consumes its queues, publishes to
/// them and to the agents' queues.
pub const WORKER_USER: &str = "switchyard-worker";
/// The user of a client that only submits requests.
pub const SUBMIT_USER: &str = "switchyard-submit";

/// The user of the agent `agent`: `agent-<id>`.
pub fn agent_user(agent: &AgentId) -> String {
    format!("agent-{agent}")
}

/// What the definitions are made for.
#[derive(Debug, Clone)]
pub struct Scope<'a> {
    pub namespace: &'a Namespace,
    pub settings: &'a TopologySettings,
    /// The virtual host everything is declared in (`/` by default).
    pub vhost: &'a str,
    /// Agents to give a user of their own (and their queues, declared as they declare them).
    pub agents: &'a [AgentId],
}

/// The scope's virtual host, exchanges, queues and bindings, as RabbitMQ definitions.
pub fn topology(scope: &Scope<'_>) -> Value {
    let Scope { namespace, settings, vhost, agents } = *scope;
    let topology = Topology::of_namespace(namespace, settings);
    let exchanges: Vec<Value> = topology
        .exchanges
        .iter()
        .map(|exchange| {
            let kind = match exchange.kind {
                ExchangeKind::Direct => "direct",
                ExchangeKind::Fanout => "fanout",
                ExchangeKind::Topic => "topic",
            };
            json!({
                "name": exchange.name,
                "vhost": vhost,
                "type": kind,
                "durable": true,
                "auto_delete": false,
                "internal": false,
                "arguments": {},
            })
        })
        .collect();
    let names = crate::pipeline::topology::Names::new(namespace.clone());
    let agent_queues = agents.iter().flat_map(|agent| {
        [names.agent_queue(agent), names.agent_control_queue(agent)].map(|name| settings.agent_queue(name))
    });
    let queues: Vec<Value> = topology
        .queues
        .iter()
        .cloned()
        .chain(agent_queues)
        .map(|queue| {
            json!({
                "name": queue.name,
                "vhost": vhost,
                "durable": true,
                "auto_delete": false,
                "arguments": queue.arguments(),
            })
        })
        .collect();
    let bindings: Vec<Value> = topology
        .queues
        .iter()
        .flat_map(|queue| {
            queue.bind.iter().map(move |exchange| {
                json!({
                    "source": exchange,
                    "vhost": vhost,
                    "destination": queue.name,
                    "destination_type": "queue",
                    "routing_key": queue.name,
                    "arguments": {},
                })
            })
        })
        .collect();
    json!({
        "vhosts": [{ "name": vhost }],
        // None: what the queues need is declared with them (their arguments), which every worker
        // declares again at start; a policy would be a second place to keep in step.
        "policies": [],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    })
}

/// The scope's users (the workers', a submitting client's, each agent's) and their
/// permissions, as RabbitMQ definitions, without passwords.
pub fn users(scope: &Scope<'_>) -> Value {
    let Scope { namespace, vhost, agents, .. } = *scope;
    let ns = namespace.as_str();
    let mut users = vec![user(WORKER_USER), user(SUBMIT_USER)];
    let mut permissions = vec![
        // Declares, consumes and publishes in the namespace, through the default exchange too.
        permission(
            WORKER_USER,
            vhost,
            &format!("^{ns}\\."),
            &format!("^({ns}\\..*|amq\\.default)$"),
            &format!("^{ns}\\."),
        ),
        // Publishes requests through the default exchange, and nothing else.
        permission(SUBMIT_USER, vhost, "^$", "^amq\\.default$", "^$"),
    ];
    for agent in agents {
        let name = agent_user(agent);
        // Its own queues (tasks, control) only; writes through the default exchange (results,
        // heartbeats), which RabbitMQ cannot narrow to those queues.
        let own = format!("^{ns}\\.agent\\.{agent}(\\.control)?$");
        permissions.push(permission(&name, vhost, &own, "^amq\\.default$", &own));
        users.push(user(&name));
    }
    json!({
        "vhosts": [{ "name": vhost }],
        "users": users,
        "permissions": permissions,
    })
}

fn user(name: &str) -> Value {
    json!({ "name": name, "tags": [] })
}

fn permission(user: &str, vhost: &str, configure: &str, write: &str, read: &str) -> Value {
    json!({ "user": user, "vhost": vhost, "configure": configure, "write": write, "read": read })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::topology::QueueType;

    fn of(settings: &TopologySettings, agents: &[AgentId]) -> Value {
        let namespace = Namespace::parse("prod").unwrap();
        topology(&Scope { namespace: &namespace, settings, vhost: "/", agents })
    }

    fn users_of(agents: &[AgentId]) -> Value {
        let namespace = Namespace::parse("prod").unwrap();
        let settings = TopologySettings::default();
        users(&Scope { namespace: &namespace, settings: &settings, vhost: "/", agents })
    }

    #[test]
    fn every_queue_exchange_and_binding_of_the_namespace_is_there_as_declared() {
        let settings = TopologySettings { queue_type: QueueType::Quorum, delivery_limit: 20 };
        let defs = of(&settings, &[]);
        let topology = Topology::of_namespace(&Namespace::parse("prod").unwrap(), &settings);
        let queues = defs["queues"].as_array().unwrap();
        assert_eq!(queues.len(), topology.queues.len());
        for (queue, declared) in queues.iter().zip(&topology.queues) {
            assert_eq!(queue["name"], declared.name.as_str());
            assert_eq!(queue["vhost"], "/");
            assert_eq!(queue["durable"], true);
            assert_eq!(queue["arguments"], serde_json::to_value(declared.arguments()).unwrap());
        }
        let requests = queues.iter().find(|q| q["name"] == "prod.requests").unwrap();
        assert_eq!(requests["arguments"]["x-queue-type"], "quorum");
        assert_eq!(requests["arguments"]["x-delivery-limit"], 20);
        assert_eq!(requests["arguments"]["x-dead-letter-exchange"], "prod.dead");
        assert!(requests["arguments"].get("x-max-priority").is_none());
        assert_eq!(defs["exchanges"][0]["name"], "prod.dead");
        assert_eq!(defs["exchanges"][0]["type"], "fanout");
        assert_eq!(
            defs["bindings"],
            json!([{"source": "prod.dead", "vhost": "/", "destination": "prod.dead",
                    "destination_type": "queue", "routing_key": "prod.dead", "arguments": {}}])
        );
        let classic = of(&TopologySettings::default(), &[]);
        let requests =
            classic["queues"].as_array().unwrap().iter().find(|q| q["name"] == "prod.requests").unwrap();
        assert_eq!(requests["arguments"]["x-queue-version"], 2);
        assert_eq!(requests["arguments"]["x-max-priority"], 9);
    }

    #[test]
    fn users_are_those_of_the_security_section_without_passwords() {
        let agent = AgentId::parse("homelab-1").unwrap();
        let defs = users_of(std::slice::from_ref(&agent));
        let text = defs.to_string();
        assert!(!text.contains("password"), "{text}");
        let users: Vec<&str> =
            defs["users"].as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
        assert_eq!(users, ["switchyard-worker", "switchyard-submit", "agent-homelab-1"]);
        // As README's Security section gives them for the namespace `prod`.
        assert_eq!(
            defs["permissions"],
            json!([
                {"user": "switchyard-worker", "vhost": "/", "configure": "^prod\\.",
                 "write": "^(prod\\..*|amq\\.default)$", "read": "^prod\\."},
                {"user": "switchyard-submit", "vhost": "/", "configure": "^$", "write": "^amq\\.default$", "read": "^$"},
                {"user": "agent-homelab-1", "vhost": "/", "configure": "^prod\\.agent\\.homelab-1(\\.control)?$",
                 "write": "^amq\\.default$", "read": "^prod\\.agent\\.homelab-1(\\.control)?$"},
            ])
        );
        assert_eq!(defs["vhosts"], json!([{"name": "/"}]));
        assert!(defs.get("queues").is_none(), "the users are imported once, the topology at every boot");
        assert!(of(&TopologySettings::default(), &[]).get("users").is_none());

        // The agent's queues, declared as the agent declares them: no arguments when classic.
        let defs = of(&TopologySettings::default(), std::slice::from_ref(&agent));
        let queues = defs["queues"].as_array().unwrap();
        let agent_queue = queues.iter().find(|q| q["name"] == "prod.agent.homelab-1").unwrap();
        assert_eq!(agent_queue["arguments"], json!({}));
        assert!(queues.iter().any(|q| q["name"] == "prod.agent.homelab-1.control"));
        assert_eq!(defs["vhosts"], json!([{"name": "/"}]));
        assert_eq!(defs["policies"], json!([]));
    }
}
