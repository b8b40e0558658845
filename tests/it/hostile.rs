//! Hostile input: a corpus of bad messages (not JSON, invalid UTF-8, wrong types, missing fields,
//! unknown schema versions, 10 MB, deeply nested, blank and 100,000-character text, control
//! characters, SQL fragments, huge arrays, task graphs with a cycle, ids that are not UUIDs, …)
//! published to the entry queue and to the queue of every stage of the topology, with good
//! requests between them. Each case says what must become of it: refused with a reason that
//! names what was wrong (one dead letter, recorded and copied to `<namespace>.dead`), or, where
//! it is valid after all, processed like any other message. No worker crashes or stalls, nothing
//! is parked or dropped, and every good request completes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use switchyard::agent::{AgentBuilder, Simulate};
use switchyard::broker::Outgoing;
use switchyard::model::domain::{Plan, Resources, Task};
use switchyard::model::ids::{AgentId, MessageId, RequestId};
use switchyard::model::wire::{
    self, Decomposed, DispatchTask, Envelope, Planned, RequestMeta, RouteTasks, TaskResult,
};
use switchyard::pipeline::topology::Topology;
use switchyard::understanding::catalog::Catalog;
use switchyard::understanding::complexity::Complexity;
use uuid::Uuid;

use crate::helpers::*;

const GITEA: &str = "Deploy Gitea to the homelab";
/// The simulated agent that runs the good requests' tasks.
const AGENT: &str = "homelab-1";
/// The limit of what clients send (requests, heartbeats): the default.
const LIMIT: usize = wire::DEFAULT_MAX_PAYLOAD_BYTES;
/// Deeper than any parser's recursion should go.
const DEPTH: usize = 100_000;
/// A good request is published after every this many bad messages.
const GOOD_EVERY: usize = 10;
/// How long the whole corpus may take to settle, on a busy machine.
const SETTLE: Duration = Duration::from_secs(60);

/// What a queue carries, by the stage that consumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Requests,
    Decomposed,
    Planned,
    Route,
    Dispatch,
    Results,
    Heartbeats,
    Wake,
}

impl Kind {
    /// Every stage that the topology has must have its cases here.
    fn of_stage(stage: &str) -> Kind {
        match stage {
            "decompose" => Kind::Requests,
            "plan" => Kind::Decomposed,
            "fallback" => Kind::Planned,
            "route" => Kind::Route,
            "dispatch" => Kind::Dispatch,
            "track" => Kind::Results,
            "heartbeat" => Kind::Heartbeats,
            "place" => Kind::Wake,
            other => panic!("the topology has a stage {other} that the hostile corpus has no cases for"),
        }
    }

    /// Whether its messages are envelopes (between stages) rather than entry messages.
    fn is_envelope(self) -> bool {
        !matches!(self, Kind::Requests | Kind::Heartbeats | Kind::Wake)
    }
}

/// A queue of the topology that a stage consumes.
#[derive(Debug, Clone)]
struct Target {
    /// Relative name ("requests").
    queue: String,
    stage: String,
    kind: Kind,
}

/// The queues that stages consume, from the shipped topology.
fn targets() -> Vec<Target> {
    Topology::standard()
        .queues
        .into_iter()
        .filter_map(|q| {
            let stage = q.consumer?;
            Some(Target { kind: Kind::of_stage(&stage), queue: q.name, stage })
        })
        .collect()
}

/// What must become of a message.
#[derive(Debug, Clone)]
enum Expect {
    /// Dead-lettered by the queue's stage, with a reason that contains each of these (ignoring
    /// case). At the entry, no request is made of it.
    Refused(Vec<String>),
    /// A valid request that cannot be done: recorded, failed, and dead-lettered, with a reason
    /// that contains each of these.
    Fails(Vec<String>),
    /// A valid request, done like any other: it completes, its text and submitter as sent.
    Completes,
    /// A valid heartbeat: the agent is registered with its capabilities and labels as sent.
    Registers,
}

fn refused(needles: &[&str]) -> Expect {
    Expect::Refused(needles.iter().map(|n| n.to_string()).collect())
}

fn fails(needles: &[&str]) -> Expect {
    Expect::Fails(needles.iter().map(|n| n.to_string()).collect())
}

/// One message of the corpus: a body and the AMQP properties a client may set.
#[derive(Debug, Clone)]
struct Case {
    name: String,
    body: Vec<u8>,
    message_id: Option<String>,
    priority: Option<u8>,
    headers: BTreeMap<String, String>,
    expect: Expect,
}

impl Case {
    fn new(name: impl Into<String>, body: impl Into<Vec<u8>>, expect: Expect) -> Case {
        Case {
            name: name.into(),
            body: body.into(),
            message_id: None,
            priority: None,
            headers: BTreeMap::new(),
            expect,
        }
    }

    fn json(name: impl Into<String>, body: &Value, expect: Expect) -> Case {
        Case::new(name, serde_json::to_vec(body).unwrap(), expect)
    }

    fn message_id(mut self, id: &str) -> Case {
        self.message_id = Some(id.into());
        self
    }

    fn priority(mut self, priority: u8) -> Case {
        self.priority = Some(priority);
        self
    }

    fn header(mut self, key: &str, value: &str) -> Case {
        self.headers.insert(key.into(), value.into());
        self
    }

    fn is_dead_lettered(&self) -> bool {
        matches!(self.expect, Expect::Refused(_) | Expect::Fails(_))
    }

    /// The id under which a stage records the message: its own `message_id` when it carries a
    /// UUID there; else, for a request that parses, its submission's id, and for a heartbeat
    /// that parses, the id derived from the AMQP message id or the bytes, as for anything else.
    fn dead_letter_id(&self, kind: Kind) -> Uuid {
        let amqp = self.message_id.as_deref();
        if kind == Kind::Requests
            && let Ok(submission) = wire::parse_submission(&self.body, LIMIT, amqp)
        {
            return submission.message_id.as_uuid();
        }
        if kind == Kind::Heartbeats && wire::parse_heartbeat(&self.body, LIMIT).is_ok() {
            return wire::entry_message_id(amqp, &self.body).as_uuid();
        }
        own_message_id(&self.body).unwrap_or_else(|| wire::entry_message_id(amqp, &self.body).as_uuid())
    }

    /// The JSON body, for the cases that are valid.
    fn value(&self) -> Value {
        serde_json::from_slice(&self.body).expect("a valid case is JSON")
    }

    fn outgoing(&self, queue: String) -> Outgoing {
        let mut outgoing = Outgoing::to_queue(queue, self.body.clone());
        outgoing.message_id = self.message_id.clone();
        outgoing.priority = self.priority;
        outgoing.headers = self.headers.clone();
        outgoing
    }
}

/// The top-level `message_id` of a JSON object, if it is a UUID; the rest is not read.
fn own_message_id(body: &[u8]) -> Option<Uuid> {
    #[derive(serde::Deserialize)]
    struct Own<'a> {
        #[serde(borrow, default)]
        message_id: Option<&'a serde_json::value::RawValue>,
    }
    let own: Own = serde_json::from_slice(body).ok()?;
    let text: String = serde_json::from_str(own.message_id?.get()).ok()?;
    text.parse::<MessageId>().ok().map(|id| id.as_uuid())
}

/// `[[[…]]]`, `depth` deep.
fn nested_arrays(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// `{"a":{"a":…1…}}`, `depth` deep.
fn nested_objects(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

/// `body` with `insert` spliced in right after the first `marker`. Deep documents are built as
/// text: a value nested 100,000 deep could not even be dropped without overflowing the stack.
fn splice(body: &Value, marker: &str, insert: &str) -> Vec<u8> {
    let text = serde_json::to_string(body).unwrap();
    let at = text.find(marker).unwrap_or_else(|| panic!("no {marker} in {text}")) + marker.len();
    format!("{}{insert}{}", &text[..at], &text[at..]).into_bytes()
}

/// `value` with the field that `pointer` points at set to `to`.
fn set(value: &Value, pointer: &str, to: Value) -> Value {
    let mut value = value.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    match value.pointer_mut(parent).unwrap_or_else(|| panic!("nothing at {parent}")) {
        Value::Object(object) => {
            object.insert(key.to_owned(), to);
        }
        Value::Array(items) => items[key.parse::<usize>().unwrap()] = to,
        other => panic!("{parent} is {other}"),
    }
    value
}

/// `value` without the field that `pointer` points at.
fn remove(value: &Value, pointer: &str) -> Value {
    let mut value = value.clone();
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let object = value.pointer_mut(parent).and_then(Value::as_object_mut).expect("an object");
    object.remove(key).unwrap_or_else(|| panic!("nothing at {pointer}"));
    value
}

/// Cases that are the same bytes whatever the queue.
fn universal(kind: Kind) -> Vec<Case> {
    let entry = !kind.is_envelope();
    // What a stage says of an object that is not its message: the first field it misses.
    let not_its_message = match kind {
        Kind::Requests | Kind::Wake => "unknown field",
        Kind::Heartbeats => "missing field `agent_id`",
        _ => "missing field `schema_version`",
    };
    let ten_megabytes = format!(r#"{{"text":"{GITEA} {}"}}"#, "x".repeat(10 * 1024 * 1024));
    let too_large = format!("exceeds the limit of {LIMIT} bytes");
    vec![
        Case::new("not JSON", "Deploy Gitea to the homelab, please", refused(&["malformed JSON"])),
        // A wake-up has no `text`: it refuses the unknown field before it reads further.
        Case::new(
            "truncated JSON",
            r#"{"text": "Deploy Gitea"#,
            if kind == Kind::Wake {
                refused(&["unknown field `text`"])
            } else {
                refused(&["malformed JSON", "EOF"])
            },
        ),
        Case::new("empty body", "", refused(&["malformed JSON", "EOF"])),
        Case::new("whitespace-only body", " \r\n\t ", refused(&["malformed JSON", "EOF"])),
        Case::new("invalid UTF-8", vec![0xc3, 0x28, 0xff, 0xfe, 0xfd], refused(&["malformed JSON"])),
        // A stage that ignores the field does not decode it: it refuses what it misses first.
        Case::new(
            "invalid UTF-8 in a string",
            b"{\"text\":\"Deploy \xff\xfe Gitea\"}".to_vec(),
            if kind == Kind::Requests {
                refused(&["malformed JSON", "invalid unicode code point"])
            } else {
                refused(&[not_its_message])
            },
        ),
        Case::new(
            "raw control characters in a string",
            b"{\"text\":\"Deploy \x07\x1b[2J Gitea\"}".to_vec(),
            if kind == Kind::Wake {
                refused(&["unknown field `text`"])
            } else {
                refused(&["malformed JSON", "control character"])
            },
        ),
        Case::new(
            "a byte order mark",
            b"\xef\xbb\xbf{\"text\":\"Deploy Gitea\"}".to_vec(),
            refused(&["malformed JSON"]),
        ),
        Case::new("JSON null", "null", refused(&["expected a JSON object"])),
        Case::new("JSON true", "true", refused(&["expected a JSON object"])),
        Case::new("a JSON string", r#""Deploy Gitea to the homelab""#, refused(&["expected a JSON object"])),
        Case::new("a JSON array", r#"["Deploy Gitea"]"#, refused(&["found an array"])),
        Case::new("a number out of range", "1e999", refused(&["malformed JSON", "number out of range"])),
        Case::new("arrays nested 100,000 deep", nested_arrays(DEPTH), refused(&["found an array"])),
        Case::new("objects nested 40,000 deep", nested_objects(40_000), refused(&["schema violation"])),
        Case::new(
            "a field name of 200,000 characters",
            format!(r#"{{"{}":1}}"#, "f".repeat(200_000)),
            refused(&["schema violation", not_its_message]),
        ),
        // Over the limit of what clients send; a stage's messages may be larger (up to 16 MiB),
        // and this one is not a stage's message. With a message id, as a client may set: the
        // id is derived from it rather than from 10 MB.
        Case::new(
            "10 MB",
            ten_megabytes,
            if entry { refused(&[too_large.as_str()]) } else { refused(&[not_its_message]) },
        )
        .message_id("ten-megabytes"),
        Case::new("forged reason headers", "{forged", refused(&["malformed JSON"]))
            .header("x-switchyard-reason", "all good, nothing to see")
            .header("x-switchyard-retries", "999999999999999999999")
            .header("x-switchyard-stage", "none"),
        Case::new("an AMQP message id with SQL", "{sql", refused(&["malformed JSON"]))
            .message_id("'; DROP TABLE dead_letters; --")
            .priority(255),
    ]
}

/// A request body as a client sends it, with an id to find it by.
fn request(text: &str) -> Value {
    json!({ "text": text, "request_id": RequestId::random(), "auto_approve": true, "submitted_by": "tests" })
}

fn request_cases() -> Vec<Case> {
    // Every case its own request id: two with the same one would be one request.
    let good = || request(GITEA);
    let sql = "'; DROP TABLE requests; --";
    vec![
        Case::json("no text", &remove(&good(), "/text"), refused(&["missing field `text`"])),
        Case::json("text is a number", &set(&good(), "/text", json!(42)), refused(&["invalid type"])),
        Case::json(
            "text is a list",
            &set(&good(), "/text", json!(["Deploy", "Gitea"])),
            refused(&["invalid type"]),
        ),
        Case::json("text is null", &set(&good(), "/text", Value::Null), refused(&["invalid type: null"])),
        Case::json(
            "priority is a word",
            &set(&good(), "/priority", json!("high")),
            refused(&["invalid type"]),
        ),
        Case::json("priority out of range", &set(&good(), "/priority", json!(12)), refused(&["outside 0-9"])),
        Case::json(
            "priority is negative",
            &set(&good(), "/priority", json!(-1)),
            refused(&["invalid value"]),
        ),
        Case::json(
            "priority over a byte",
            &set(&good(), "/priority", json!(256)),
            refused(&["invalid value"]),
        ),
        Case::json(
            "auto_approve is a word",
            &set(&good(), "/auto_approve", json!("yes")),
            refused(&["invalid type"]),
        ),
        Case::json(
            "request id with SQL",
            &set(&good(), "/request_id", json!("1' OR '1'='1")),
            refused(&["schema violation", "UUID"]),
        ),
        Case::json(
            "request id is a number",
            &set(&good(), "/request_id", json!(7)),
            refused(&["invalid type"]),
        ),
        Case::json(
            "an unknown field",
            &set(&good(), "/admin", json!(true)),
            refused(&["unknown field `admin`"]),
        ),
        Case::new(
            "a duplicate field",
            format!(r#"{{"text":"hello","text":"{GITEA}","auto_approve":true}}"#),
            refused(&["duplicate field `text`"]),
        ),
        Case::json("empty text", &set(&good(), "/text", json!("")), refused(&["empty request text"])),
        Case::json(
            "whitespace-only text",
            &set(&good(), "/text", json!(" \n\t\r  ")),
            refused(&["empty request text"]),
        ),
        Case::json(
            "Unicode whitespace only",
            &set(&good(), "/text", json!("\u{a0}\u{2003}\u{3000}\u{2028}")),
            refused(&["empty request text"]),
        ),
        Case::json(
            "a NUL character",
            &set(&good(), "/text", json!("Deploy Gitea\u{0} to the homelab")),
            refused(&["NUL"]),
        ),
        Case::json(
            "submitted_by of 201 characters",
            &set(&good(), "/submitted_by", json!("s".repeat(201))),
            refused(&["longer than 200"]),
        ),
        Case::json("an envelope instead of a request", &envelope(Kind::Route), refused(&["unknown field"])),
        // Valid requests, processed as such.
        Case::json(
            "SQL in the text of a request",
            &set(&good(), "/text", json!(format!("{GITEA}{sql}"))),
            Expect::Completes,
        ),
        Case::json("SQL in submitted_by", &set(&good(), "/submitted_by", json!(sql)), Expect::Completes),
        Case::json(
            "escaped control characters in the text",
            &set(&good(), "/text", json!("Deploy Gitea\u{7}\u{1b}[2J\u{7f}\u{202e} to the homelab")),
            Expect::Completes,
        ),
        Case::json(
            "100,000 characters of text",
            &set(&good(), "/text", json!(format!("{GITEA} {}", "z".repeat(100_000 - GITEA.len() - 1)))),
            Expect::Completes,
        ),
        Case::json("priority and message id properties", &request(GITEA), Expect::Completes)
            .message_id("'; DELETE FROM processed_messages; --")
            .priority(255),
        // Valid, but nothing can be made of them: the request fails and says why.
        Case::json("SQL as the whole text", &set(&good(), "/text", json!(sql)), fails(&["no work type"])),
        Case::json(
            "zero-width characters only",
            &set(&good(), "/text", json!("\u{200b}\u{200c}\u{200d}")),
            fails(&["no work type"]),
        ),
        Case::json(
            "100,000 characters asking for 6,000 things",
            &set(&good(), "/text", json!(asking_for(3000))),
            fails(&["6000 things", "more than the 20"]),
        ),
    ]
}

/// "write script0 and deploy app0 and …": twice `pairs` intents, each deployment after every
/// script before it.
fn asking_for(pairs: usize) -> String {
    (0..pairs).map(|i| format!("write script{i} and deploy app{i}")).collect::<Vec<_>>().join(" and ")
}

/// Wake-ups of the scheduler: a hint each, but a malformed one is refused like any message.
fn wake_cases() -> Vec<Case> {
    let good = || json!({ "message_id": MessageId::random(), "cause": "result", "at": Utc::now() });
    vec![
        Case::json(
            "no message id",
            &remove(&good(), "/message_id"),
            refused(&["missing field `message_id`"]),
        ),
        Case::json(
            "message id with SQL",
            &set(&good(), "/message_id", json!("'; DROP TABLE tasks; --")),
            refused(&["UUID"]),
        ),
        Case::json(
            "message id is a number",
            &set(&good(), "/message_id", json!(7)),
            refused(&["invalid type"]),
        ),
        Case::json("no cause", &remove(&good(), "/cause"), refused(&["missing field `cause`"])),
        Case::json("cause is a number", &set(&good(), "/cause", json!(1)), refused(&["invalid type"])),
        Case::json("cause is null", &set(&good(), "/cause", Value::Null), refused(&["invalid type: null"])),
        Case::json(
            "cause of 201 characters",
            &set(&good(), "/cause", json!("c".repeat(201))),
            refused(&["longer than 200"]),
        ),
        Case::json("no time", &remove(&good(), "/at"), refused(&["missing field `at`"])),
        Case::json("time is a word", &set(&good(), "/at", json!("soon")), refused(&["schema violation"])),
        Case::json("time is a number", &set(&good(), "/at", json!(1e12)), refused(&["invalid type"])),
        Case::json(
            "an unknown field",
            &set(&good(), "/plan_id", json!(true)),
            refused(&["unknown field `plan_id`"]),
        ),
        Case::json("an envelope instead of a wake-up", &envelope(Kind::Route), refused(&["unknown field"])),
        Case::json("a request instead of a wake-up", &request(GITEA), refused(&["unknown field"])),
    ]
}

fn heartbeat_cases() -> Vec<Case> {
    let good = json!({
        "agent_id": "hostile-sql",
        "capabilities": ["'; DROP TABLE agents; --", "Robert'); DELETE FROM tasks;--"],
        "capacity": 2,
        "labels": { "note": "1' OR '1'='1", "bidi": "\u{202e}evil\u{7}" },
        "resources": { "cpu": 1.0, "memory_mb": 512, "gpu": 0 },
    });
    vec![
        Case::json("SQL in capabilities and labels", &good, Expect::Registers),
        Case::json(
            "agent id with SQL",
            &set(&good, "/agent_id", json!("x'; DROP TABLE agents; --")),
            refused(&["invalid agent id"]),
        ),
        Case::json(
            "agent id with capitals and a space",
            &set(&good, "/agent_id", json!("Homelab 1")),
            refused(&["invalid agent id"]),
        ),
        Case::json(
            "agent id of 200,000 characters",
            &set(&good, "/agent_id", json!("a".repeat(200_000))),
            refused(&["invalid agent id"]),
        ),
        Case::json("agent id is a number", &set(&good, "/agent_id", json!(1)), refused(&["invalid type"])),
        Case::json("no agent id", &remove(&good, "/agent_id"), refused(&["missing field `agent_id`"])),
        Case::json(
            "no capabilities",
            &remove(&good, "/capabilities"),
            refused(&["missing field `capabilities`"]),
        ),
        Case::json(
            "capabilities is a word",
            &set(&good, "/capabilities", json!("deployment")),
            refused(&["invalid type"]),
        ),
        Case::json(
            "capacity 0",
            &set(&good, "/capacity", json!(0)),
            refused(&["capacity must be at least 1"]),
        ),
        Case::json("capacity is negative", &set(&good, "/capacity", json!(-1)), refused(&["invalid value"])),
        Case::json("capacity is a word", &set(&good, "/capacity", json!("four")), refused(&["invalid type"])),
        Case::json(
            "capacity over 32 bits",
            &set(&good, "/capacity", json!(1u64 << 32)),
            refused(&["invalid value"]),
        ),
        Case::json(
            "capacity of 4,294,967,295",
            &set(&good, "/capacity", json!(u32::MAX)),
            refused(&["capacity 4294967295 is more than the 65535"]),
        ),
        Case::json(
            "memory of 18,446,744,073,709,551,615 MB",
            &set(&good, "/resources/memory_mb", json!(u64::MAX)),
            refused(&["memory_mb 18446744073709551615 is more than"]),
        ),
        Case::json(
            "4,294,967,295 GPUs",
            &set(&good, "/resources/gpu", json!(u32::MAX)),
            refused(&["gpu 4294967295 is more than"]),
        ),
        Case::json(
            "negative CPUs",
            &set(&good, "/resources/cpu", json!(-4.0)),
            refused(&["cpu -4 is not a number of CPUs"]),
        ),
        Case::json(
            "a label that is a number",
            &set(&good, "/labels/rack", json!(7)),
            refused(&["invalid type"]),
        ),
        Case::json(
            "sent at no time",
            &set(&good, "/sent_at", json!("yesterday")),
            refused(&["schema violation"]),
        ),
        Case::json(
            "a NUL in a label",
            &set(&good, "/labels/note", json!("a\u{0}b")),
            refused(&["database", "\\u0000"]),
        ),
        Case::json(
            "a huge array of capabilities",
            &set(&good, "/capabilities", json!((0..100_000).map(|i| format!("c{i}")).collect::<Vec<_>>())),
            refused(&[format!("exceeds the limit of {LIMIT} bytes").as_str()]),
        ),
        Case::json(
            "an envelope instead of a heartbeat",
            &envelope(Kind::Route),
            refused(&["missing field `agent_id`"]),
        ),
    ]
}

fn meta(request_id: RequestId, text: &str) -> RequestMeta {
    RequestMeta {
        request_id,
        text: text.into(),
        submitted_by: Some("tests".into()),
        priority: 0,
        auto_approve: true,
    }
}

/// A plan of a request that nobody submitted.
fn stray_plan() -> (RequestId, Plan) {
    let catalog = Catalog::default();
    let request_id = RequestId::random();
    let plan = catalog.plan(request_id, &catalog.decompose(GITEA).unwrap()).unwrap();
    (request_id, plan)
}

/// A well-formed message of `kind` between stages, about a request, plan or task that does not
/// exist, with ids of its own.
fn envelope(kind: Kind) -> Value {
    let catalog = Catalog::default();
    let (request_id, plan) = stray_plan();
    let task = plan.tasks()[0].clone();
    let agent = AgentId::parse(AGENT).unwrap();
    let payload = match kind {
        Kind::Decomposed => serde_json::to_value(Decomposed {
            request: meta(request_id, GITEA),
            decomposition: catalog.decompose(GITEA).unwrap(),
        }),
        Kind::Planned => serde_json::to_value(Planned {
            request: meta(request_id, GITEA),
            complexity: Complexity { score: 0.2, terms: Vec::new() },
            plan: plan.clone(),
            infeasible: Vec::new(),
        }),
        Kind::Route | Kind::Requests | Kind::Heartbeats | Kind::Wake => {
            serde_json::to_value(RouteTasks { plan_id: plan.id, priority: 0, approved_by: "policy".into() })
        }
        Kind::Dispatch => serde_json::to_value(DispatchTask {
            plan_id: plan.id,
            priority: 0,
            attempt: 1,
            decision_id: task.id.decision_id(1),
            agent_id: agent,
            task,
        }),
        Kind::Results => serde_json::to_value(TaskResult {
            plan_id: plan.id,
            task_id: task.id,
            attempt: 1,
            agent_id: agent,
            success: true,
            output: "done".into(),
            error: None,
            started_at: Utc::now(),
            finished_at: Utc::now(),
            lease_expired: false,
            usage: None,
            simulated: false,
        }),
    }
    .unwrap();
    serde_json::to_value(Envelope {
        message_id: MessageId::random(),
        schema_version: wire::SCHEMA_VERSION,
        request_id,
        causation_id: None,
        timestamp: Utc::now(),
        payload,
    })
    .unwrap()
}

/// What the stage says of a well-formed message about something that does not exist.
fn stray(kind: Kind) -> Expect {
    match kind {
        Kind::Decomposed => refused(&["no request", "was recorded"]),
        Kind::Planned => refused(&["no plan", "was recorded"]),
        Kind::Route => refused(&["no plan"]),
        Kind::Dispatch => refused(&["no routing decision", "was recorded"]),
        Kind::Results => refused(&["unknown plan"]),
        Kind::Requests | Kind::Heartbeats | Kind::Wake => unreachable!("not an envelope"),
    }
}

/// `envelope` with bytes that are not UTF-8 in a string of its payload that the stage reads.
fn invalid_utf8_in(envelope: &Value, kind: Kind) -> Vec<u8> {
    let pointer = match kind {
        Kind::Decomposed | Kind::Planned => "/payload/request/text",
        Kind::Route => "/payload/approved_by",
        Kind::Dispatch => "/payload/task/description",
        Kind::Results => "/payload/output",
        Kind::Requests | Kind::Heartbeats | Kind::Wake => unreachable!("not an envelope"),
    };
    let text = serde_json::to_string(&set(envelope, pointer, json!("Deploy PLACEHOLDER"))).unwrap();
    let (before, after) = text.split_once("PLACEHOLDER").unwrap();
    [before.as_bytes(), &[0xff, 0xfe], after.as_bytes()].concat()
}

/// A task of `plan` with `key`, depending on the tasks of `plan` with these keys.
fn task_of(plan: &Plan, key: &str, depends_on: &[&str]) -> Value {
    let mut task: Task = plan.tasks()[0].clone();
    task.id = plan.id.task_id(key);
    task.key = key.into();
    task.depends_on = depends_on.iter().map(|d| plan.id.task_id(d)).collect();
    serde_json::to_value(task).unwrap()
}

fn envelope_cases(kind: Kind) -> Vec<Case> {
    // Every case gets a message of its own, so that each has its own id.
    let e = || envelope(kind);
    let mut cases = vec![
        Case::json("well-formed, about something that does not exist", &e(), stray(kind)),
        Case::json(
            "unknown schema version",
            &set(&e(), "/schema_version", json!(2)),
            refused(&["unknown schema version 2"]),
        ),
        Case::json(
            "schema version as text",
            &set(&e(), "/schema_version", json!("1")),
            refused(&["schema violation", "invalid type"]),
        ),
        Case::json(
            "schema version over 32 bits",
            &set(&e(), "/schema_version", json!(1u64 << 32)),
            refused(&["schema violation", "invalid value"]),
        ),
        Case::json(
            "no schema version",
            &remove(&e(), "/schema_version"),
            refused(&["missing field `schema_version`"]),
        ),
        Case::new(
            "a duplicate schema version",
            splice(&e(), r#""schema_version":1"#, r#","schema_version":2"#),
            refused(&["duplicate field `schema_version`"]),
        ),
        Case::json("no payload", &remove(&e(), "/payload"), refused(&["missing field `payload`"])),
        Case::json("payload is null", &set(&e(), "/payload", Value::Null), refused(&["invalid type: null"])),
        Case::json("payload is empty", &set(&e(), "/payload", json!({})), refused(&["missing field"])),
        Case::json("payload is a list", &set(&e(), "/payload", json!([])), refused(&["schema violation"])),
        Case::json(
            "message id is not a UUID",
            &set(&e(), "/message_id", json!("42'; DROP TABLE processed_messages; --")),
            refused(&["schema violation", "UUID"]),
        ),
        Case::json(
            "request id is not a UUID",
            &set(&e(), "/request_id", json!("request-1")),
            refused(&["schema violation", "UUID"]),
        ),
        Case::json(
            "causation id is a number",
            &set(&e(), "/causation_id", json!(12)),
            refused(&["invalid type"]),
        ),
        Case::json(
            "timestamp is not a time",
            &set(&e(), "/timestamp", json!("yesterday")),
            refused(&["schema violation", "invalid characters"]),
        ),
        Case::json(
            "an unknown envelope field",
            &set(&e(), "/admin", json!(true)),
            refused(&["unknown field `admin`"]),
        ),
        Case::new(
            "arrays nested 100,000 deep beside the payload",
            splice(&e(), "{", &format!(r#""nested":{},"#, nested_arrays(DEPTH))),
            refused(&["unknown field `nested`"]),
        ),
        // A payload's unknown fields are skipped (a newer Switchyard may add some), without
        // recursion: the message is then what it would be without them.
        Case::new(
            "arrays nested 100,000 deep in the payload",
            splice(&e(), r#""payload":{"#, &format!(r#""nested":{},"#, nested_arrays(DEPTH))),
            stray(kind),
        ),
        Case::new(
            "invalid UTF-8 in the payload",
            invalid_utf8_in(&e(), kind),
            refused(&["malformed JSON", "invalid unicode"]),
        ),
    ];
    match kind {
        Kind::Decomposed => {
            let intent = e()["payload"]["decomposition"]["intents"][0].clone();
            cases.extend([
                Case::json(
                    "a huge array of intents",
                    &set(&e(), "/payload/decomposition/intents", json!(vec![intent.clone(); 5000])),
                    refused(&["5000 intents", "more than the 20"]),
                ),
                Case::json(
                    "no intents",
                    &set(&e(), "/payload/decomposition/intents", json!([])),
                    refused(&["no task"]),
                ),
                Case::json(
                    "a work type of the future",
                    &set(&e(), "/payload/decomposition/intents/0/work_type", json!("juggling")),
                    refused(&["work type juggling is not in the catalog"]),
                ),
                Case::json(
                    "a work type with SQL",
                    &set(
                        &e(),
                        "/payload/decomposition/intents/0/work_type",
                        json!("'; DROP TABLE tasks; --"),
                    ),
                    refused(&["invalid work type"]),
                ),
                Case::json(
                    "confidence is a word",
                    &set(&e(), "/payload/decomposition/confidence", json!("high")),
                    refused(&["invalid type"]),
                ),
                Case::json(
                    "100,000 characters of text",
                    &set(&e(), "/payload/request/text", json!("t".repeat(100_000))),
                    stray(kind),
                ),
                Case::json(
                    "request id not a UUID",
                    &set(&e(), "/payload/request/request_id", json!("1 OR 1=1")),
                    refused(&["UUID"]),
                ),
            ]);
        }
        Kind::Planned => {
            // The message's plan with these tasks instead of its own.
            let tasks = |tasks: &dyn Fn(&Plan) -> Vec<Value>| {
                let env = e();
                let plan: Plan = serde_json::from_value(env["payload"]["plan"].clone()).unwrap();
                set(&env, "/payload/plan/tasks", json!(tasks(&plan)))
            };
            let huge = |plan: &Plan| (0..2000).map(|i| task_of(plan, &format!("t{i}"), &[])).collect();
            cases.extend([
                Case::json(
                    "a huge array of tasks",
                    &tasks(&huge),
                    refused(&["2000 tasks", "more than the 1000"]),
                ),
                Case::json(
                    "a task graph with a cycle",
                    &tasks(&|p| {
                        vec![task_of(p, "a", &["c"]), task_of(p, "b", &["a"]), task_of(p, "c", &["b"])]
                    }),
                    refused(&["cycle"]),
                ),
                Case::json(
                    "a task that depends on itself",
                    &tasks(&|p| vec![task_of(p, "a", &["a"])]),
                    refused(&["cycle"]),
                ),
                Case::json(
                    "a dependency that is not in the plan",
                    &tasks(&|p| vec![task_of(p, "a", &["elsewhere"])]),
                    refused(&["not in the plan"]),
                ),
                Case::json(
                    "a task twice",
                    &tasks(&|p| vec![task_of(p, "a", &[]), task_of(p, "a", &[])]),
                    refused(&["appears twice"]),
                ),
                Case::json("no tasks", &tasks(&|_| Vec::new()), refused(&["no task"])),
                Case::json(
                    "a task id that is not a UUID",
                    &set(&e(), "/payload/plan/tasks/0/id", json!("task-1")),
                    refused(&["UUID"]),
                ),
                Case::new(
                    "complexity nested 100,000 deep",
                    splice(
                        &remove(&e(), "/payload/complexity"),
                        r#""payload":{"#,
                        &format!(r#""complexity":{},"#, nested_arrays(DEPTH)),
                    ),
                    refused(&["recursion limit exceeded"]),
                ),
                Case::json(
                    "an estimate over 32 bits",
                    &set(&e(), "/payload/plan/tasks/0/estimated_duration_secs", json!(1u64 << 32)),
                    refused(&["invalid value"]),
                ),
            ]);
        }
        Kind::Route => {
            cases.extend([
                Case::json(
                    "plan id is not a UUID",
                    &set(&e(), "/payload/plan_id", json!("plan-1")),
                    refused(&["UUID"]),
                ),
                Case::json(
                    "priority over a byte",
                    &set(&e(), "/payload/priority", json!(256)),
                    refused(&["invalid value"]),
                ),
                Case::json(
                    "approved by a number",
                    &set(&e(), "/payload/approved_by", json!(1)),
                    refused(&["invalid type"]),
                ),
                Case::json(
                    "SQL as the approver",
                    &set(&e(), "/payload/approved_by", json!("'; UPDATE plans SET status = 'approved'; --")),
                    stray(kind),
                ),
                // A route message names a plan; whatever else it carries is not read.
                Case::json(
                    "a huge array of tasks",
                    &set(&e(), "/payload/tasks", {
                        let (_, plan) = stray_plan();
                        json!((0..2000).map(|i| task_of(&plan, &format!("t{i}"), &[])).collect::<Vec<_>>())
                    }),
                    stray(kind),
                ),
            ]);
        }
        Kind::Dispatch => {
            cases.extend([
                Case::json(
                    "agent id with SQL",
                    &set(&e(), "/payload/agent_id", json!("x'; DROP TABLE agents; --")),
                    refused(&["invalid agent id"]),
                ),
                Case::json(
                    "attempt is negative",
                    &set(&e(), "/payload/attempt", json!(-1)),
                    refused(&["invalid value"]),
                ),
                Case::json(
                    "decision id is not a UUID",
                    &set(&e(), "/payload/decision_id", json!("d-1")),
                    refused(&["UUID"]),
                ),
                Case::json(
                    "a task that depends on itself",
                    &{
                        let env = e();
                        set(&env, "/payload/task/depends_on", json!([env["payload"]["task"]["id"]]))
                    },
                    stray(kind),
                ),
                Case::json(
                    "a huge array of dependencies",
                    &set(
                        &e(),
                        "/payload/task/depends_on",
                        json!((0..20_000).map(|_| Uuid::new_v4()).collect::<Vec<_>>()),
                    ),
                    stray(kind),
                ),
            ]);
        }
        Kind::Results => {
            cases.extend([
                Case::json(
                    "success is a word",
                    &set(&e(), "/payload/success", json!("yes")),
                    refused(&["invalid type"]),
                ),
                Case::json(
                    "attempt over 32 bits",
                    &set(&e(), "/payload/attempt", json!(1u64 << 32)),
                    refused(&["invalid value"]),
                ),
                Case::json(
                    "task id is not a UUID",
                    &set(&e(), "/payload/task_id", json!("t-1")),
                    refused(&["UUID"]),
                ),
                Case::json(
                    "agent id with SQL",
                    &set(&e(), "/payload/agent_id", json!("'; DROP TABLE task_results; --")),
                    refused(&["invalid agent id"]),
                ),
                Case::json(
                    "100,000 characters of output",
                    &set(&e(), "/payload/output", json!("o".repeat(100_000))),
                    stray(kind),
                ),
                Case::json(
                    "tokens over 64 bits",
                    &set(&e(), "/payload/usage", json!({ "input_tokens": 1e30, "output_tokens": 1 })),
                    refused(&["invalid type"]),
                ),
            ]);
        }
        Kind::Requests | Kind::Heartbeats | Kind::Wake => unreachable!("not an envelope"),
    }
    cases
}

/// The corpus for one queue.
fn corpus(kind: Kind) -> Vec<Case> {
    let mut cases = universal(kind);
    cases.extend(match kind {
        Kind::Requests => request_cases(),
        Kind::Heartbeats => heartbeat_cases(),
        Kind::Wake => wake_cases(),
        _ => envelope_cases(kind),
    });
    cases
}

/// The stage and message id of every dead letter recorded so far.
async fn dead_letter_keys(app: &TestApp) -> Vec<(String, Uuid)> {
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.expect("the database");
    tokio::spawn(connection);
    let rows = client.query("SELECT stage, message_id FROM dead_letters", &[]).await.expect("dead letters");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn contains_ignoring_case(text: &str, needle: &str) -> bool {
    text.to_lowercase().contains(&needle.to_lowercase())
}

/// A case as published: where, and the id its dead letter carries.
struct Published {
    target: Target,
    case: Case,
    id: Uuid,
}

impl Published {
    fn label(&self) -> String {
        format!("{} / {}", self.target.queue, self.case.name)
    }
}

/// The whole corpus, checked to be what the tests say it is: every queue gets at least 30 bad
/// messages, each a message of its own (two with the same id would be one dead letter).
fn published_corpus() -> Vec<Published> {
    let mut all = Vec::new();
    for target in targets() {
        let cases: Vec<Published> = corpus(target.kind)
            .into_iter()
            .map(|case| Published { id: case.dead_letter_id(target.kind), target: target.clone(), case })
            .collect();
        let bad = cases.iter().filter(|p| p.case.is_dead_lettered()).count();
        assert!(bad >= 30, "{}: only {bad} bad messages", target.queue);
        let names: BTreeSet<&str> = cases.iter().map(|p| p.case.name.as_str()).collect();
        assert_eq!(names.len(), cases.len(), "{}: case names repeat", target.queue);
        let ids: BTreeSet<Uuid> = cases.iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), cases.len(), "{}: two cases share an id", target.queue);
        all.extend(cases);
    }
    all
}

/// Waits until every one of `dead` has its dead letter; panics naming the missing ones after
/// [`SETTLE`].
async fn wait_for_dead_letters(app: &TestApp, dead: &[&Published]) {
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let recorded: BTreeSet<(String, Uuid)> = dead_letter_keys(app).await.into_iter().collect();
        let missing: Vec<String> = dead
            .iter()
            .filter(|p| !recorded.contains(&(p.target.stage.clone(), p.id)))
            .map(|p| p.label())
            .collect();
        if missing.is_empty() {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "not dead-lettered in {SETTLE:?}: {missing:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The id in the body's `request_id`, if it has one that is a UUID.
fn request_id_of(body: &[u8]) -> Option<RequestId> {
    serde_json::from_slice::<Value>(body).ok()?.get("request_id")?.as_str()?.parse().ok()
}

#[tokio::test]
async fn a_corpus_of_hostile_messages_is_refused_with_reasons_and_good_requests_still_complete() {
    let app = spawn_app().await;
    let agent = AgentBuilder::new(AgentId::parse(AGENT).unwrap())
        .capabilities(["deployment", "shell"])
        // Room for every good request's task at once: a full agent would send them to the
        // default agent, which has no queue here.
        .capacity(64)
        .label("target", "homelab")
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500));
    let _agent = app.start_agent(agent, Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, AGENT).await;
    let corpus = published_corpus();

    // Bad messages, with a good request after every few of them.
    let mut good = Vec::new();
    for (index, p) in corpus.iter().enumerate() {
        app.broker.publish(&p.case.outgoing(app.names.queue(&p.target.queue))).await.expect("published");
        if index % GOOD_EVERY == 0 {
            let body = request(GITEA);
            good.push(request_id_of(&serde_json::to_vec(&body).unwrap()).unwrap());
            app.publish_raw("requests", &serde_json::to_vec(&body).unwrap()).await;
        }
    }

    // Every bad message is dead-lettered, and every good request completes.
    let dead: Vec<&Published> = corpus.iter().filter(|p| p.case.is_dead_lettered()).collect();
    wait_for_dead_letters(&app, &dead).await;
    for id in &good {
        let report = app.wait_for(*id, |r| r.status.is_terminal()).await;
        assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    }
    // The workers are still consuming: a last good request goes through.
    let last = app.submit(GITEA, true).await;
    let report = app.wait_for(last, |r| r.status.is_terminal()).await;
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    assert!(app.workers_alive(), "a worker stopped");

    // One dead letter per bad message, and nothing else: none for a good request or a valid
    // case, none twice. Each names what was wrong, for the queue it came from.
    let rows = dead_rows(&app).await;
    let mut problems = Vec::new();
    for p in &dead {
        let Some(row) = rows.iter().find(|r| r.stage == p.target.stage && r.message_id == p.id) else {
            problems.push(format!("{}: no dead letter", p.label()));
            continue;
        };
        let (Expect::Refused(needles) | Expect::Fails(needles)) = &p.case.expect else { unreachable!() };
        if row.queue != app.names.queue(&p.target.queue) {
            problems.push(format!("{}: recorded for queue {}", p.label(), row.queue));
        }
        if row.reason.trim().is_empty() || needles.iter().any(|n| !contains_ignoring_case(&row.reason, n)) {
            problems.push(format!("{}: reason {:?} lacks {needles:?}", p.label(), row.reason));
        }
        // Nothing that says where the broker or the database is.
        if row.reason.contains("amqp://") || row.reason.contains("postgres://") {
            problems.push(format!("{}: reason {:?} names a server", p.label(), row.reason));
        }
        // The row keeps the start of a large body (the dead queue has all of it).
        if row.body.len() > 65 * 1024 {
            problems.push(format!("{}: a row of {} bytes", p.label(), row.body.len()));
        }
    }
    let unexpected: Vec<String> = rows
        .iter()
        .filter(|r| !dead.iter().any(|p| r.stage == p.target.stage && r.message_id == p.id))
        .map(|r| format!("{} {}: {}", r.stage, r.message_id, r.reason))
        .collect();
    assert!(problems.is_empty() && unexpected.is_empty(), "{problems:#?}\nunexpected: {unexpected:#?}");
    assert_eq!(rows.len(), dead.len());

    // ... and copied whole to the dead queue, once each, with the same reason.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut copies = Vec::new();
    while copies.len() < dead.len() {
        assert!(tokio::time::Instant::now() < deadline, "{} copies in the dead queue", copies.len());
        match app.broker.get(&app.names.dead_queue()).await.expect("basic.get") {
            Some(copy) => copies.push((copy.body, copy.headers)),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // ... and no more than that.
    assert!(app.broker.get(&app.names.dead_queue()).await.expect("basic.get").is_none());
    let mut seen = BTreeSet::new();
    for (body, headers) in &copies {
        let key =
            (headers["x-switchyard-stage"].clone(), headers["x-switchyard-message-id"].parse().unwrap());
        let row = rows.iter().find(|r| (&r.stage, &r.message_id) == (&key.0, &key.1)).expect("a dead letter");
        let p = dead.iter().find(|p| (&p.target.stage, &p.id) == (&key.0, &key.1)).expect("a bad message");
        assert_eq!(headers["x-switchyard-reason"], row.reason, "{}", p.label());
        assert!(*body == p.case.body, "{}: the copy is not the message as sent", p.label());
        assert!(seen.insert(key.clone()), "{}: dead-lettered twice", p.label());
    }
    assert_eq!(copies.len(), dead.len());

    // Nothing was parked for a retry: no bad message was taken for a passing failure.
    for queue in Topology::standard().resolve(app.names.namespace()).queues {
        if queue.name.ends_with(".retry") {
            let parked = app.broker.queue_len(&queue.name).await.unwrap();
            assert_eq!(parked, 0, "{} holds parked messages", queue.name);
        }
    }

    // What became of the valid cases, and of the requests that were refused on arrival.
    let mut requests = good.len() as i64 + 1;
    for p in &corpus {
        let (case, name) = (&p.case, p.label());
        match (&case.expect, p.target.kind) {
            (Expect::Completes, _) => {
                requests += 1;
                let sent = case.value();
                let report =
                    app.wait_for(request_id_of(&case.body).unwrap(), |r| r.status.is_terminal()).await;
                assert_eq!(report.status.as_str(), "completed", "{name}: {report:#?}");
                assert_eq!(report.text, sent["text"].as_str().unwrap(), "{name}: the text as sent");
                assert_eq!(report.submitted_by.as_deref(), sent["submitted_by"].as_str(), "{name}");
            }
            (Expect::Fails(needles), Kind::Requests) => {
                requests += 1;
                let report =
                    app.wait_for(request_id_of(&case.body).unwrap(), |r| r.status.is_terminal()).await;
                assert_eq!(report.status.as_str(), "failed", "{name}: {report:#?}");
                let reason = report.failure_reason.unwrap_or_default();
                assert!(needles.iter().all(|n| contains_ignoring_case(&reason, n)), "{name}: {reason}");
            }
            (Expect::Registers, _) => {
                let sent = case.value();
                let agents = app.store.agents().await.unwrap();
                let agent = agents.iter().find(|a| a.id.as_str() == sent["agent_id"]).expect("registered");
                assert_eq!(json!(agent.capabilities), sent["capabilities"], "{name}: as sent");
                assert_eq!(json!(agent.labels), sent["labels"], "{name}: as sent");
            }
            (Expect::Refused(_), Kind::Requests) => {
                if let Some(id) = request_id_of(&case.body) {
                    assert!(
                        app.store.report(id).await.unwrap().is_none(),
                        "{name}: a request was made of it"
                    );
                }
            }
            _ => {}
        }
    }
    let total = request_total(&app).await;
    assert_eq!(total, requests, "one request per valid submission, none for a refused one");

    // The tables are all still there, and every agent has a capacity it could have.
    let tables: BTreeSet<String> = app.tables().await.into_iter().collect();
    for table in
        ["requests", "plans", "tasks", "agents", "dead_letters", "processed_messages", "task_results"]
    {
        assert!(tables.contains(table), "table {table} is gone: {tables:?}");
    }
    for agent in app.store.agents().await.unwrap() {
        assert!((1..=wire::MAX_CAPACITY).contains(&agent.capacity), "{agent:?}");
    }
}
