//! Identifiers. Every id is its own type so that a task id can never be passed where a plan id is
//! expected (the system this replaces validated a plan-level decision against a task id).
//!
//! UUID ids of derived things are derived deterministically (UUID v5) from their parent, so that
//! a redelivered input produces the very same ids and the unique keys in the store catch the copy.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a UUID: {0:?}")]
    NotUuid(String),
    #[error(
        "invalid {kind} {value:?}: use 1 to 64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    InvalidName { kind: &'static str, value: String },
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh random id (UUID v4).
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Uuid::parse_str(s.trim()).map(Self).map_err(|_| Error::NotUuid(s.to_owned()))
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }
    };
}

uuid_id!(
    /// A request: the idempotency key of a submission.
    RequestId
);
uuid_id!(
    /// A work plan. Derived from its request: one request has at most one plan.
    PlanId
);
uuid_id!(
    /// A task of a plan. Derived from the plan and the task's key within it.
    TaskId
);
uuid_id!(
    /// A message between stages. Derived messages get ids derived from their cause.
    MessageId
);
uuid_id!(
    /// A routing decision: one per task and attempt.
    DecisionId
);

impl RequestId {
    /// The plan of this request. One request has one plan, so the id is a function of it.
    pub fn plan_id(&self) -> PlanId {
        PlanId(Uuid::new_v5(&self.0, b"plan"))
    }
}

impl PlanId {
    /// The id of the task with `key` (unique within the plan).
    pub fn task_id(&self, key: &str) -> TaskId {
        TaskId(Uuid::new_v5(&self.0, format!("task:{key}").as_bytes()))
    }
}

impl TaskId {
    /// The routing decision of this task's `attempt`.
    pub fn decision_id(&self, attempt: u32) -> DecisionId {
        DecisionId(Uuid::new_v5(&self.0, format!("route:{attempt}").as_bytes()))
    }
}

impl MessageId {
    /// The id of a message caused by this one. `label` tells apart the outputs of one input.
    pub fn derive(&self, label: &str) -> MessageId {
        MessageId(Uuid::new_v5(&self.0, label.as_bytes()))
    }
}

fn valid_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// A validated name, shared rather than copied: cloning one only bumps a reference count, which
/// matters because a routing decision clones an agent id into every candidate of its audit record,
/// thousands of times per decision. In JSON it is a plain string, validated when read.
macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, JsonSchema)]
        #[serde(try_from = "String")]
        #[schemars(with = "String")]
        pub struct $name(Arc<str>);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, Error> {
                let s = s.into();
                if valid_name(&s) {
                    Ok(Self(s.into()))
                } else {
                    Err(Error::InvalidName { kind: $kind, value: s })
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.as_ref().to_owned()
            }
        }

        /// Written straight from the shared text, with no copy into a `String` first.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}

name_id!(
    /// An agent. Part of its queue's name, hence the restricted alphabet.
    AgentId,
    "agent id"
);
name_id!(
    /// A kind of work (deployment, monitoring, …), as named in the catalog.
    WorkType,
    "work type"
);
name_id!(
    /// The prefix of every exchange and queue name, so environments and tests can share a broker.
    Namespace,
    "namespace"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_deterministic_and_distinct() {
        let request = RequestId::random();
        assert_eq!(request.plan_id(), request.plan_id());
        let plan = request.plan_id();
        assert_eq!(plan.task_id("1.deploy"), plan.task_id("1.deploy"));
        assert_ne!(plan.task_id("1.deploy"), plan.task_id("1.verify"));
        assert_ne!(RequestId::random().plan_id(), plan);
    }

    #[test]
    fn names_are_validated() {
        assert!(AgentId::parse("homelab-1").is_ok());
        assert!(AgentId::parse("a_b").is_ok());
        for bad in ["", "-x", "Upper", "with space", "dot.ted", &"x".repeat(65)] {
            assert!(AgentId::parse(bad).is_err(), "{bad:?} accepted");
        }
        let err = serde_json::from_str::<AgentId>("\"a b\"").unwrap_err();
        assert!(err.to_string().contains("invalid agent id"), "{err}");
    }

    #[test]
    fn names_are_plain_strings_in_json_and_clones_share_their_text() {
        let id = AgentId::parse("homelab-1").unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"homelab-1\"");
        assert_eq!(serde_json::from_str::<AgentId>("\"homelab-1\"").unwrap(), id);
        let schema = serde_json::to_value(schemars::schema_for!(AgentId)).unwrap();
        assert_eq!(schema["type"], "string", "{schema}");

        let copy = id.clone();
        assert!(std::ptr::eq(copy.as_str(), id.as_str()));
        assert_eq!(String::from(copy), "homelab-1");
    }

    #[test]
    fn uuid_ids_parse() {
        let id = RequestId::random();
        assert_eq!(id.to_string().parse::<RequestId>().unwrap(), id);
        assert!(matches!("nope".parse::<PlanId>(), Err(Error::NotUuid(_))));
    }
}
