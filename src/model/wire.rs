//! The messages on the wire: what anyone may publish to `<namespace>.requests` and
//! `<namespace>.heartbeats`, and the versioned envelope that travels between stages.
//!
//! Parsing is where untrusted bytes become typed values, so every check that makes a message
//! permanently unusable lives here: size, JSON syntax, schema version, schema, empty text. A
//! [`Error`] is always permanent: the runner dead-letters the message with the error as its
//! reason. The JSON Schemas in `queues/schemas/` are generated from these types
//! ([`schemas`]) and a test keeps them current.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::decisions::fallback::Infeasible;
use crate::model::domain::{Decomposition, Plan, Resources, Task};
use crate::model::ids::{AgentId, DecisionId, MessageId, PlanId, RequestId, TaskId};
use crate::understanding::complexity::Complexity;

/// The envelope version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// Default largest accepted message body.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 256 * 1024;

/// Largest accepted message between stages, unless the configured limit is larger. A stage's
/// message carries the request several times over (its text, its intents' clauses, its tasks'
/// descriptions), so it cannot be held to the limit of what clients send: a request under that
/// limit would be accepted, then refused by the next stage and left stuck. 16 MiB is the largest
/// message that RabbitMQ accepts by default.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024 * 1024;

/// Why a message can never be processed. All of these are permanent: retrying cannot help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed JSON: {0}")]
    Malformed(String),
    #[error("unknown schema version {0} (this worker reads version {SCHEMA_VERSION})")]
    UnknownVersion(u32),
    #[error("schema violation: {0}")]
    Schema(String),
    #[error("empty request text")]
    EmptyText,
}

/// What a client publishes to `<namespace>.requests`, with any AMQP client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// The request in plain language.
    pub text: String,
    /// Idempotency key: the same id submitted twice makes one request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<RequestId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    /// 0 (lowest) to 9.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 9))]
    pub priority: Option<u8>,
    /// Ask for approval without a person, if the configuration allows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_approve: Option<bool>,
}

/// What travels with a request through every stage, so that no stage has to look it up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RequestMeta {
    pub request_id: RequestId,
    pub text: String,
    pub submitted_by: Option<String>,
    pub priority: u8,
    pub auto_approve: bool,
}

/// A parsed, validated submission and the id of the message that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub message_id: MessageId,
    pub request: RequestMeta,
}

/// The version-1 envelope of every message between stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope<P> {
    pub message_id: MessageId,
    pub schema_version: u32,
    pub request_id: RequestId,
    /// The message whose processing produced this one.
    pub causation_id: Option<MessageId>,
    pub timestamp: DateTime<Utc>,
    pub payload: P,
}

impl<P> Envelope<P> {
    /// A message that no other message caused (a person's approval, a cancellation, a lease
    /// that ran out), under the id its sender chose.
    pub fn new(message_id: MessageId, request_id: RequestId, now: DateTime<Utc>, payload: P) -> Self {
        Envelope {
            message_id,
            schema_version: SCHEMA_VERSION,
            request_id,
            causation_id: None,
            timestamp: now,
            payload,
        }
    }

    /// A message caused by `cause`, with an id derived from it and `label`, so that processing
    /// the same input twice produces the same message.
    pub fn derived(
        cause: MessageId,
        label: &str,
        request_id: RequestId,
        now: DateTime<Utc>,
        payload: P,
    ) -> Self {
        Envelope {
            message_id: cause.derive(label),
            schema_version: SCHEMA_VERSION,
            request_id,
            causation_id: Some(cause),
            timestamp: now,
            payload,
        }
    }
}

/// decompose → plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Decomposed {
    pub request: RequestMeta,
    pub decomposition: Decomposition,
}

/// plan → fallback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Planned {
    pub request: RequestMeta,
    /// A bare score in messages from before the terms were kept.
    #[serde(deserialize_with = "crate::understanding::complexity::score_or_terms")]
    pub complexity: Complexity,
    pub plan: Plan,
    /// Tasks that no agent of the fleet could run: the fallback stage sends them to an external
    /// provider or marks the plan infeasible.
    #[serde(default)]
    pub infeasible: Vec<Infeasible>,
}

/// fallback (auto-approval) or `switchyard approve` → route: route the plan's ready tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RouteTasks {
    pub plan_id: PlanId,
    pub priority: u8,
    /// Who or what approved the plan ("policy", or the approver's name).
    pub approved_by: String,
}

/// route → dispatch: one task, its chosen agent and the decision that chose it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DispatchTask {
    pub plan_id: PlanId,
    pub priority: u8,
    pub attempt: u32,
    pub decision_id: DecisionId,
    pub agent_id: AgentId,
    pub task: Task,
}

/// dispatch → `<namespace>.agent.<agent_id>`: what an agent receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskAssignment {
    pub plan_id: PlanId,
    pub attempt: u32,
    pub decision_id: DecisionId,
    pub agent_id: AgentId,
    pub task: Task,
}

/// Largest task output carried in a result; an agent truncates longer output to this.
pub const MAX_RESULT_OUTPUT_BYTES: usize = 64 * 1024;

/// agent → `<namespace>.results`: how one attempt of a task ended. Its message id derives from
/// the assignment's (`assignment.derive("result")`), so an agent that runs a redelivered
/// assignment again reports under the same id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskResult {
    pub plan_id: PlanId,
    pub task_id: TaskId,
    pub attempt: u32,
    pub agent_id: AgentId,
    pub success: bool,
    /// What the task printed or produced, at most [`MAX_RESULT_OUTPUT_BYTES`].
    #[serde(default)]
    pub output: String,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Set by Switchyard, never by agents: no result came within the attempt's lease.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lease_expired: bool,
    /// The tokens an external model really used for this attempt, as its API reported them.
    /// Settles the plan's quota reservation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<TokenUsage>,
    /// Nothing really ran: a simulated agent (the `simulate` executor) made the result up. It
    /// counts like any other, but no duration is learnt from it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub simulated: bool,
}

/// → `<namespace>.place`: room may have opened for the tasks waiting in line (a result or an
/// expired lease freed a slot, an agent came or grew, tasks joined the line), or a periodic look.
/// Not about one request: no envelope. A copy of one wake-up (same `message_id`) is handled once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wake {
    pub message_id: MessageId,
    /// What happened, for the logs: "result", "agent", "queued", "cancel", "periodic"…
    pub cause: String,
    pub at: DateTime<Utc>,
}

/// Parses a wake-up from `<namespace>.place`.
pub fn parse_wake(body: &[u8], limit: usize) -> Result<Wake, Error> {
    check_size(body, limit)?;
    let wake: Wake = serde_json::from_slice(body).map_err(classify)?;
    if wake.cause.len() > 200 {
        return Err(Error::Schema("cause is longer than 200 characters".into()));
    }
    Ok(wake)
}

/// `switchyard cancel` → `<namespace>.agent.<agent_id>.control`: stop this attempt of a task,
/// running or not yet started; its request was cancelled. An agent's control queue is apart from
/// its task queue, so that this reaches it at once, not behind the tasks queued there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TaskAbort {
    pub plan_id: PlanId,
    pub task_id: TaskId,
    pub attempt: u32,
    pub agent_id: AgentId,
    pub reason: String,
}

/// Tokens used by a model, as its API reported them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What an agent publishes to `<namespace>.heartbeats` every few seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Heartbeat {
    pub agent_id: AgentId,
    pub capabilities: BTreeSet<String>,
    /// How many tasks the agent takes at once: 1 to 65,535.
    #[schemars(range(min = 1, max = 65535))]
    pub capacity: u32,
    #[serde(default)]
    pub in_flight: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub resources: Resources,
    /// When the agent sent it; the receiver's clock is used when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<DateTime<Utc>>,
    /// How often the agent heartbeats, in whole seconds (rounded up): a heartbeat much older
    /// than this says that it went silent. Absent from a registration by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub every_secs: Option<u32>,
}

/// Checks the size, and that the body is a JSON object: serde would also read a struct from an
/// array, which the contract does not allow.
fn check_size(body: &[u8], limit: usize) -> Result<(), Error> {
    if body.len() > limit {
        return Err(Error::TooLarge { size: body.len(), limit });
    }
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        Some(b'[') => Err(Error::Schema("expected a JSON object, found an array".into())),
        _ => serde_json::from_slice::<serde_json::Value>(body)
            .map_err(classify)
            .and(Err(Error::Schema("expected a JSON object".into()))),
    }
}

/// Tells a JSON syntax error from a well-formed document of the wrong shape.
fn classify(err: serde_json::Error) -> Error {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => Error::Malformed(err.to_string()),
        Category::Data => Error::Schema(err.to_string()),
    }
}

/// Namespace of the ids that Switchyard derives for messages that carry none.
const ENTRY_NAMESPACE: Uuid = Uuid::from_u128(0x6b1f_3c7e_9d2a_4e58_a1c4_0f3b_7e9d_2c51);

/// The id under which an entry message (a request, a heartbeat) is deduplicated: its
/// `request_id` if it has one, else its AMQP `message_id` property, else its bytes. A client
/// that sets neither and publishes identical bytes twice gets one request.
pub fn entry_message_id(key: Option<&str>, body: &[u8]) -> MessageId {
    match key {
        Some(key) => MessageId::from_uuid(Uuid::new_v5(&ENTRY_NAMESPACE, key.as_bytes())),
        None => MessageId::from_uuid(Uuid::new_v5(&ENTRY_NAMESPACE, body)),
    }
}

/// The id under which a submission that names its request is deduplicated. Keyed by the text too:
/// the same request sent again is one message, while another text under the same id is a message
/// of its own, for the decompose stage to refuse.
pub fn request_message_id(request_id: RequestId, text: &str) -> MessageId {
    entry_message_id(Some(&format!("request:{request_id}:{}", text.trim())), b"")
}

/// Parses a submission from `<namespace>.requests`. `amqp_message_id` is the AMQP property.
pub fn parse_submission(
    body: &[u8],
    limit: usize,
    amqp_message_id: Option<&str>,
) -> Result<Submission, Error> {
    check_size(body, limit)?;
    let submit: SubmitRequest = serde_json::from_slice(body).map_err(classify)?;
    let text = submit.text.trim();
    if text.is_empty() {
        return Err(Error::EmptyText);
    }
    // PostgreSQL text cannot hold NUL: refused here with a reason, not by the database.
    if text.contains('\0') || submit.submitted_by.as_ref().is_some_and(|s| s.contains('\0')) {
        return Err(Error::Schema("text and submitted_by cannot contain NUL characters".into()));
    }
    let priority = submit.priority.unwrap_or(0);
    if priority > 9 {
        return Err(Error::Schema(format!("priority {priority} is outside 0-9")));
    }
    if submit.submitted_by.as_ref().is_some_and(|s| s.len() > 200) {
        return Err(Error::Schema("submitted_by is longer than 200 characters".into()));
    }
    let (message_id, request_id) = match submit.request_id {
        Some(id) => (request_message_id(id, text), id),
        None => {
            let message_id = entry_message_id(amqp_message_id, body);
            // The request id follows from the message id, so a redelivery maps to the same request.
            (message_id, RequestId::from_uuid(message_id.as_uuid()))
        }
    };
    Ok(Submission {
        message_id,
        request: RequestMeta {
            request_id,
            text: text.to_owned(),
            submitted_by: submit.submitted_by,
            priority,
            auto_approve: submit.auto_approve.unwrap_or(false),
        },
    })
}

/// The most tasks an agent may take at once: the prefetch of its consumer, an AMQP short.
pub const MAX_CAPACITY: u32 = u16::MAX as u32;

/// Parses a heartbeat from `<namespace>.heartbeats`. Its figures must be ones the agents table
/// can hold as they are, not wrapped around into other (negative) ones.
pub fn parse_heartbeat(body: &[u8], limit: usize) -> Result<Heartbeat, Error> {
    check_size(body, limit)?;
    let heartbeat: Heartbeat = serde_json::from_slice(body).map_err(classify)?;
    let schema = |reason: String| Err(Error::Schema(reason));
    let Resources { cpu, memory_mb, gpu } = heartbeat.resources;
    if let Some(every) = heartbeat.every_secs
        && !(1..=i32::MAX as u32).contains(&every)
    {
        return schema(format!("every_secs {every} is not a number of seconds from 1 to {}", i32::MAX));
    }
    if heartbeat.capacity == 0 {
        return schema("capacity must be at least 1".into());
    }
    if heartbeat.capacity > MAX_CAPACITY {
        return schema(format!(
            "capacity {} is more than the {MAX_CAPACITY} an agent may have",
            heartbeat.capacity
        ));
    }
    if !(cpu.is_finite() && cpu >= 0.0) {
        return schema(format!("resources.cpu {cpu} is not a number of CPUs"));
    }
    if i64::try_from(memory_mb).is_err() {
        return schema(format!("resources.memory_mb {memory_mb} is more than {}", i64::MAX));
    }
    if i32::try_from(gpu).is_err() {
        return schema(format!("resources.gpu {gpu} is more than {}", i32::MAX));
    }
    Ok(heartbeat)
}

#[derive(Deserialize)]
struct VersionProbe<'a> {
    schema_version: u32,
    #[serde(borrow)]
    #[allow(dead_code)] // only checked for being valid JSON here
    payload: Option<&'a RawValue>,
}

/// Parses a stage-to-stage message, checking size and version before the payload's schema.
pub fn parse_envelope<P: DeserializeOwned>(body: &[u8], limit: usize) -> Result<Envelope<P>, Error> {
    check_size(body, limit)?;
    let probe: VersionProbe = serde_json::from_slice(body).map_err(classify)?;
    if probe.schema_version != SCHEMA_VERSION {
        return Err(Error::UnknownVersion(probe.schema_version));
    }
    serde_json::from_slice(body).map_err(classify)
}

/// Every message type of the public contract with its JSON Schema, named as in `queues/schemas/`.
pub fn schemas() -> Vec<(&'static str, serde_json::Value)> {
    fn schema<T: JsonSchema>() -> serde_json::Value {
        serde_json::to_value(schemars::schema_for!(T)).expect("schemas serialize")
    }
    vec![
        ("request.json", schema::<SubmitRequest>()),
        ("heartbeat.json", schema::<Heartbeat>()),
        ("wake.json", schema::<Wake>()),
        ("decomposed.json", schema::<Envelope<Decomposed>>()),
        ("planned.json", schema::<Envelope<Planned>>()),
        ("route.json", schema::<Envelope<RouteTasks>>()),
        ("dispatch.json", schema::<Envelope<DispatchTask>>()),
        ("task.json", schema::<Envelope<TaskAssignment>>()),
        ("result.json", schema::<Envelope<TaskResult>>()),
        ("abort.json", schema::<Envelope<TaskAbort>>()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submission_with_request_id_is_keyed_by_it() {
        let id = RequestId::random();
        let body = serde_json::to_vec(&serde_json::json!({"text": " Deploy it ", "request_id": id})).unwrap();
        let a = parse_submission(&body, 1024, None).unwrap();
        let other_body =
            serde_json::to_vec(&serde_json::json!({"request_id": id, "text": "Deploy it"})).unwrap();
        let b = parse_submission(&other_body, 1024, Some("ignored")).unwrap();
        assert_eq!(a.request.request_id, id);
        assert_eq!(a.message_id, b.message_id, "same request id, same message");
        assert_eq!(a.request.text, "Deploy it");
        assert_eq!(a.request.priority, 0);
        assert!(!a.request.auto_approve);
    }

    #[test]
    fn submission_without_ids_is_keyed_by_message_id_then_bytes() {
        let body = br#"{"text":"Deploy it"}"#;
        let by_bytes = parse_submission(body, 1024, None).unwrap();
        assert_eq!(by_bytes.message_id, parse_submission(body, 1024, None).unwrap().message_id);
        let m1 = parse_submission(body, 1024, Some("m1")).unwrap();
        let m2 = parse_submission(body, 1024, Some("m2")).unwrap();
        assert_ne!(m1.request.request_id, m2.request.request_id);
        assert_eq!(m1.request.request_id.as_uuid(), m1.message_id.as_uuid());
    }

    #[test]
    fn submissions_are_refused_with_a_reason() {
        type Expect = fn(&Error) -> bool;
        let cases: &[(&[u8], Expect)] = &[
            (b"{not json", |e| matches!(e, Error::Malformed(_))),
            (br#"{"text":"   "}"#, |e| *e == Error::EmptyText),
            (br#"{"txt":"x"}"#, |e| matches!(e, Error::Schema(m) if m.contains("txt"))),
            (br#"{"text":"x","priority":12}"#, |e| matches!(e, Error::Schema(_))),
            (br#"{"text":"x","request_id":"nope"}"#, |e| matches!(e, Error::Schema(_))),
            (br#"["text"]"#, |e| matches!(e, Error::Schema(_))),
            (br#"{"text":"deploy \u0000 x"}"#, |e| matches!(e, Error::Schema(m) if m.contains("NUL"))),
            (
                br#"{"text":"x","submitted_by":"a\u0000"}"#,
                |e| matches!(e, Error::Schema(m) if m.contains("NUL")),
            ),
        ];
        for (body, expected) in cases {
            let err = parse_submission(body, 1024, None).unwrap_err();
            assert!(expected(&err), "{}: {err:?}", String::from_utf8_lossy(body));
        }
        let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(2000));
        assert_eq!(
            parse_submission(big.as_bytes(), 1024, None).unwrap_err(),
            Error::TooLarge { size: big.len(), limit: 1024 }
        );
    }

    #[test]
    fn envelope_version_is_checked_before_the_payload() {
        let body = br#"{"schema_version": 7, "payload": {"whatever": true}}"#;
        assert_eq!(parse_envelope::<RouteTasks>(body, 1024).unwrap_err(), Error::UnknownVersion(7));
        let cause = MessageId::random();
        let request = RequestId::random();
        let env = Envelope::derived(
            cause,
            "route",
            request,
            Utc::now(),
            RouteTasks { plan_id: request.plan_id(), priority: 3, approved_by: "policy".into() },
        );
        assert_eq!(env.message_id, cause.derive("route"));
        let body = serde_json::to_vec(&env).unwrap();
        assert_eq!(parse_envelope::<RouteTasks>(&body, 4096).unwrap(), env);
        let err = parse_envelope::<DispatchTask>(&body, 4096).unwrap_err();
        assert!(matches!(err, Error::Schema(_)), "{err:?}");
    }

    #[test]
    fn heartbeat_needs_capacity() {
        let ok = br#"{"agent_id":"a1","capabilities":["deployment"],"capacity":2}"#;
        let hb = parse_heartbeat(ok, 1024).unwrap();
        assert_eq!(hb.in_flight, 0);
        let zero = br#"{"agent_id":"a1","capabilities":[],"capacity":0}"#;
        assert!(matches!(parse_heartbeat(zero, 1024), Err(Error::Schema(_))));
        let bad_id = br#"{"agent_id":"A 1","capabilities":[],"capacity":1}"#;
        assert!(matches!(parse_heartbeat(bad_id, 1024), Err(Error::Schema(_))));
        // An interval the agents table cannot hold is refused with a reason, not by the database.
        let never = br#"{"agent_id":"a1","capabilities":[],"capacity":1,"every_secs":0}"#;
        let err = parse_heartbeat(never, 1024).unwrap_err();
        assert!(err.to_string().contains("every_secs 0 is not a number of seconds"), "{err}");
        let every = br#"{"agent_id":"a1","capabilities":[],"capacity":1,"every_secs":5}"#;
        assert_eq!(parse_heartbeat(every, 1024).unwrap().every_secs, Some(5));
    }

    #[test]
    fn nesting_deeper_than_any_stack_is_refused_or_skipped_without_recursing() {
        // On a stack smaller than a tokio worker's (2 MiB): 100,000 levels handled by recursion
        // would overflow it and abort the process, not fail a test.
        let checked = std::thread::Builder::new()
            .stack_size(1024 * 1024)
            .spawn(|| {
                let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
                let limit = 1 << 20;
                // A field that the message does not have is refused at once.
                let body = format!(r#"{{"text":"Deploy Gitea","deep":{deep}}}"#);
                let err = parse_submission(body.as_bytes(), limit, None).unwrap_err();
                assert!(matches!(&err, Error::Schema(m) if m.contains("unknown field `deep`")), "{err}");
                // One that a newer version may add is skipped, without recursion.
                let heartbeat = format!(r#"{{"agent_id":"a1","capabilities":[],"capacity":1,"deep":{deep}}}"#);
                assert!(parse_heartbeat(heartbeat.as_bytes(), limit).is_ok());
                let plan = RequestId::random().plan_id();
                let route = format!(
                    r#"{{"message_id":"{}","schema_version":1,"request_id":"{}","causation_id":null,
                        "timestamp":"2025-01-01T00:00:00Z",
                        "payload":{{"plan_id":"{plan}","priority":0,"approved_by":"policy","deep":{deep}}}}}"#,
                    MessageId::random(),
                    RequestId::random()
                );
                assert_eq!(parse_envelope::<RouteTasks>(route.as_bytes(), limit).unwrap().payload.plan_id, plan);
                // What is read as a value stops at serde_json's recursion limit (128).
                let planned = route.replace(r#""plan_id""#, &format!(r#""complexity":{deep},"plan_id""#));
                let err = parse_envelope::<Planned>(planned.as_bytes(), limit).unwrap_err();
                assert!(matches!(&err, Error::Malformed(m) if m.starts_with("recursion limit exceeded")), "{err}");
            })
            .unwrap()
            .join();
        assert!(checked.is_ok(), "the checks failed: see above");
    }

    #[test]
    fn heartbeat_figures_fit_where_they_are_stored() {
        let with = |fields: &str| format!(r#"{{"agent_id":"a1","capabilities":[],"capacity":1,{fields}}}"#);
        let largest = with(r#""resources":{"cpu":64.5,"memory_mb":9223372036854775807,"gpu":2147483647}"#);
        assert!(parse_heartbeat(largest.as_bytes(), 1024).is_ok());
        let most = format!(r#"{{"agent_id":"a1","capabilities":[],"capacity":{MAX_CAPACITY}}}"#);
        assert_eq!(parse_heartbeat(most.as_bytes(), 1024).unwrap().capacity, 65_535);
        let cases = [
            (
                r#"{"agent_id":"a1","capabilities":[],"capacity":65536}"#.to_owned(),
                "capacity 65536 is more than the 65535",
            ),
            (
                with(r#""resources":{"cpu":-4,"memory_mb":0,"gpu":0}"#),
                "resources.cpu -4 is not a number of CPUs",
            ),
            (
                with(r#""resources":{"cpu":1,"memory_mb":18446744073709551615,"gpu":0}"#),
                "resources.memory_mb 18446744073709551615 is more than 9223372036854775807",
            ),
            (
                with(r#""resources":{"cpu":1,"memory_mb":1,"gpu":4294967295}"#),
                "resources.gpu 4294967295 is more than 2147483647",
            ),
        ];
        for (body, reason) in cases {
            let err = parse_heartbeat(body.as_bytes(), 1024).unwrap_err();
            assert!(matches!(&err, Error::Schema(m) if m.starts_with(reason)), "{body}: {err}");
        }
    }

    #[test]
    fn every_schema_names_its_fields() {
        let schemas = schemas();
        let request = &schemas.iter().find(|(n, _)| *n == "request.json").unwrap().1;
        assert!(request["properties"]["text"].is_object());
        assert_eq!(request["required"], serde_json::json!(["text"]));
        let wake = &schemas.iter().find(|(n, _)| *n == "wake.json").unwrap().1;
        assert_eq!(wake["required"], serde_json::json!(["message_id", "cause", "at"]));
        // The rest travel between stages, in envelopes.
        for (name, schema) in &schemas[3..] {
            assert!(schema["properties"]["payload"].is_object(), "{name}");
            assert!(schema["properties"]["schema_version"].is_object(), "{name}");
        }
    }
}
