//! Why an agent was rejected for a task, as a value that becomes text only in the audit record.
//!
//! A decision over a large fleet rejects thousands of agents, and writing a sentence for each of
//! them while routing used to cost more than the rest of the decision. So a [`Reason`] holds the
//! facts, and its text is written when the candidates are serialised. The JSON is the same as when
//! reasons were strings: one sentence per reason (`"missing capabilities: docker, gpu"`). Reading a
//! sentence back recovers the value; a sentence in words this version does not write (an older
//! version's, say) is kept word for word as [`Reason::Other`], so that no stored decision becomes
//! unreadable or changes when written again.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

/// Why an agent may not take a task. In JSON, the sentence that [`Display`](fmt::Display) writes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "String")]
pub enum Reason {
    /// "missing capabilities: docker, gpu": the task's capabilities that the agent lacks, in the
    /// task's order. Agents that lack the same ones share one list.
    MissingCapabilities(Arc<[String]>),
    /// "heartbeat 30.25s old exceeds the 30s TTL". The age is rounded *up* to the millisecond, so
    /// that an age just over the TTL never reads as equal to it ("30.001s", not "30s").
    StaleHeartbeat { age_millis: u64, ttl_secs: u64 },
    /// "no spare capacity (4/4 in flight)".
    NoSpareCapacity { in_flight: u32, capacity: u32 },
    /// "insufficient resources: needs 2 GPU, has 0".
    InsufficientResources(Shortfall),
    /// "failed an earlier attempt of this task".
    FailedBefore,
    /// A reason read back from a stored decision, in words this version does not write.
    Other(String),
}

/// The resources an agent lacks for a task; only those it lacks are set.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Shortfall {
    pub cpu: Option<Lack<f64>>,
    pub memory_mb: Option<Lack<u64>>,
    pub gpu: Option<Lack<u32>>,
}

/// How much of one resource a task needs and an agent has.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lack<T> {
    pub needs: T,
    pub has: T,
}

const MISSING: &str = "missing capabilities: ";
const HEARTBEAT: &str = "heartbeat ";
const EXCEEDS: &str = "s old exceeds the ";
const TTL: &str = "s TTL";
const NO_CAPACITY: &str = "no spare capacity (";
const IN_FLIGHT: &str = " in flight)";
const INSUFFICIENT: &str = "insufficient resources: ";
const FAILED_BEFORE: &str = "failed an earlier attempt of this task";

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::MissingCapabilities(names) => {
                f.write_str(MISSING)?;
                for (i, name) in names.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(name)?;
                }
                Ok(())
            }
            Reason::StaleHeartbeat { age_millis, ttl_secs } => {
                let (secs, millis) = (age_millis / 1000, age_millis % 1000);
                write!(f, "{HEARTBEAT}{secs}")?;
                // Milliseconds without trailing zeros: "30.25s", "30.001s", "30s".
                match millis {
                    0 => {}
                    _ if millis % 100 == 0 => write!(f, ".{}", millis / 100)?,
                    _ if millis % 10 == 0 => write!(f, ".{:02}", millis / 10)?,
                    _ => write!(f, ".{millis:03}")?,
                }
                write!(f, "{EXCEEDS}{ttl_secs}{TTL}")
            }
            Reason::NoSpareCapacity { in_flight, capacity } => {
                write!(f, "{NO_CAPACITY}{in_flight}/{capacity}{IN_FLIGHT}")
            }
            Reason::InsufficientResources(Shortfall { cpu, memory_mb, gpu }) => {
                f.write_str(INSUFFICIENT)?;
                let mut separator = "";
                if let Some(Lack { needs, has }) = cpu {
                    write!(f, "needs {needs} CPU, has {has}")?;
                    separator = "; ";
                }
                if let Some(Lack { needs, has }) = memory_mb {
                    write!(f, "{separator}needs {needs} MiB memory, has {has}")?;
                    separator = "; ";
                }
                if let Some(Lack { needs, has }) = gpu {
                    write!(f, "{separator}needs {needs} GPU, has {has}")?;
                }
                Ok(())
            }
            Reason::FailedBefore => f.write_str(FAILED_BEFORE),
            Reason::Other(text) => f.write_str(text),
        }
    }
}

/// The sentence, written straight into the output.
impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A plain string, written in place: the audit schema is the same as when reasons were strings.
impl JsonSchema for Reason {
    fn inline_schema() -> bool {
        true
    }

    fn schema_name() -> Cow<'static, str> {
        "Reason".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        String::json_schema(generator)
    }
}

/// Reads a reason's sentence back. A sentence that does not read back as the very same text is
/// kept as it is ([`Reason::Other`]), so that the text survives a round trip whatever it says.
impl From<String> for Reason {
    fn from(text: String) -> Self {
        match read(&text) {
            Some(reason) if reason.to_string() == text => reason,
            _ => Reason::Other(text),
        }
    }
}

/// The reason a sentence of [`Reason`]'s `Display` states, if it has that form.
fn read(text: &str) -> Option<Reason> {
    if text == FAILED_BEFORE {
        return Some(Reason::FailedBefore);
    }
    if let Some(names) = text.strip_prefix(MISSING) {
        return Some(Reason::MissingCapabilities(names.split(", ").map(str::to_owned).collect()));
    }
    if let Some(rest) = text.strip_prefix(HEARTBEAT) {
        let (age, ttl) = rest.split_once(EXCEEDS)?;
        let ttl_secs = ttl.strip_suffix(TTL)?.parse().ok()?;
        let (secs, fraction) = age.split_once('.').unwrap_or((age, ""));
        // "25" is 250 ms: pad to three digits on the right.
        let millis = if fraction.is_empty() { 0 } else { format!("{fraction:0<3}").parse::<u64>().ok()? };
        let age_millis = secs.parse::<u64>().ok()?.checked_mul(1000)?.checked_add(millis)?;
        return Some(Reason::StaleHeartbeat { age_millis, ttl_secs });
    }
    if let Some(rest) = text.strip_prefix(NO_CAPACITY) {
        let (in_flight, capacity) = rest.strip_suffix(IN_FLIGHT)?.split_once('/')?;
        return Some(Reason::NoSpareCapacity {
            in_flight: in_flight.parse().ok()?,
            capacity: capacity.parse().ok()?,
        });
    }
    if let Some(rest) = text.strip_prefix(INSUFFICIENT) {
        let mut shortfall = Shortfall::default();
        for part in rest.split("; ") {
            let (needs, has) = part.strip_prefix("needs ")?.split_once(", has ")?;
            if let Some(needs) = needs.strip_suffix(" CPU") {
                shortfall.cpu = Some(Lack { needs: needs.parse().ok()?, has: has.parse().ok()? });
            } else if let Some(needs) = needs.strip_suffix(" MiB memory") {
                shortfall.memory_mb = Some(Lack { needs: needs.parse().ok()?, has: has.parse().ok()? });
            } else if let Some(needs) = needs.strip_suffix(" GPU") {
                shortfall.gpu = Some(Lack { needs: needs.parse().ok()?, has: has.parse().ok()? });
            } else {
                return None;
            }
        }
        return Some(Reason::InsufficientResources(shortfall));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(names: &[&str]) -> Reason {
        Reason::MissingCapabilities(names.iter().map(|n| (*n).to_owned()).collect())
    }

    fn lack<T>(needs: T, has: T) -> Option<Lack<T>> {
        Some(Lack { needs, has })
    }

    /// Every form of reason, with the exact sentence the audit record holds for it.
    fn examples() -> Vec<(Reason, &'static str)> {
        vec![
            (missing(&["docker", "gpu"]), "missing capabilities: docker, gpu"),
            (missing(&["ssh"]), "missing capabilities: ssh"),
            (
                Reason::StaleHeartbeat { age_millis: 45_000, ttl_secs: 30 },
                "heartbeat 45s old exceeds the 30s TTL",
            ),
            (
                Reason::StaleHeartbeat { age_millis: 30_250, ttl_secs: 30 },
                "heartbeat 30.25s old exceeds the 30s TTL",
            ),
            (
                Reason::StaleHeartbeat { age_millis: 30_001, ttl_secs: 30 },
                "heartbeat 30.001s old exceeds the 30s TTL",
            ),
            (
                Reason::StaleHeartbeat { age_millis: 30_500, ttl_secs: 0 },
                "heartbeat 30.5s old exceeds the 0s TTL",
            ),
            (
                Reason::StaleHeartbeat { age_millis: 30_090, ttl_secs: 7 },
                "heartbeat 30.09s old exceeds the 7s TTL",
            ),
            (Reason::NoSpareCapacity { in_flight: 4, capacity: 4 }, "no spare capacity (4/4 in flight)"),
            (
                Reason::InsufficientResources(Shortfall { gpu: lack(2, 0), ..Shortfall::default() }),
                "insufficient resources: needs 2 GPU, has 0",
            ),
            (
                Reason::InsufficientResources(Shortfall {
                    cpu: lack(2.0, 0.5),
                    memory_mb: lack(1024, 512),
                    gpu: lack(2, 1),
                }),
                "insufficient resources: needs 2 CPU, has 0.5; needs 1024 MiB memory, has 512; needs 2 GPU, has 1",
            ),
            (
                Reason::InsufficientResources(Shortfall {
                    memory_mb: lack(16_384, 8_192),
                    ..Shortfall::default()
                }),
                "insufficient resources: needs 16384 MiB memory, has 8192",
            ),
            (Reason::FailedBefore, "failed an earlier attempt of this task"),
        ]
    }

    #[test]
    fn each_reason_is_its_sentence_in_json_and_reads_back_as_the_same_value() {
        for (reason, text) in examples() {
            assert_eq!(reason.to_string(), text);
            let json = serde_json::to_value(&reason).unwrap();
            assert_eq!(json, serde_json::Value::from(text));
            assert_eq!(serde_json::from_value::<Reason>(json).unwrap(), reason, "{text}");
        }
    }

    #[test]
    fn a_sentence_that_does_not_read_back_exactly_is_kept_word_for_word() {
        for text in [
            "the agent is on fire",
            "heartbeat 30.2500s old exceeds the 30s TTL",
            "heartbeat 30.s old exceeds the 30s TTL",
            "no spare capacity (+4/4 in flight)",
            "insufficient resources: needs 1e3 MiB memory, has 512",
            "insufficient resources: needs 2 GPU, has 0; needs 2 GPU, has 1",
            "insufficient resources: ",
            "insufficient resources: needs 2 disks, has 0",
        ] {
            let reason: Reason = serde_json::from_value(text.into()).unwrap();
            assert_eq!(reason, Reason::Other(text.to_owned()));
            assert_eq!(serde_json::to_value(&reason).unwrap(), text);
        }
    }

    #[test]
    fn the_audit_schema_still_says_a_reason_is_a_string() {
        let schema = serde_json::to_value(schemars::schema_for!(Vec<Reason>)).unwrap();
        assert_eq!(schema["items"], serde_json::json!({"type": "string"}), "{schema}");
    }
}
