//! What happens to a message that fails: a permanent failure is recorded and dead-lettered with
//! its reason, a transient one parked in the retry queue (or requeued); and how a reason and a
//! body are bounded and cleaned so that the record itself cannot fail.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use tracing::{error, warn};

use super::{Handled, Runner};
use crate::broker::{self, Incoming, Outgoing};
use crate::model::ids::{MessageId, RequestId};
use crate::pipeline::stages::Stage;
use crate::store;
use crate::telemetry::metrics::{StageLabels, StageReason, metrics};

/// What went wrong with one message.
#[derive(Debug, Clone, thiserror::Error)]
pub(super) enum Failure {
    /// Retrying cannot help: dead-letter.
    #[error("{0}")]
    Permanent(String),
    /// No agent's queue took a task after every attempt: dead-letter (the stage recorded it).
    #[error("{0}")]
    Undeliverable(String),
    /// The database or the broker is unavailable: try again later.
    #[error("{0}")]
    Transient(String),
    /// Not the named request's message ([`Outcome::Refuse`](crate::pipeline::stages::Outcome)):
    /// dead-letter it, and leave the request as it is.
    #[error("{0}")]
    Refused(String),
}

impl From<store::Error> for Failure {
    fn from(err: store::Error) -> Self {
        let reason = describe(&err);
        if err.is_transient() { Failure::Transient(reason) } else { Failure::Permanent(reason) }
    }
}

impl From<broker::Error> for Failure {
    fn from(err: broker::Error) -> Self {
        let reason = describe(&err);
        if err.is_transient() { Failure::Transient(reason) } else { Failure::Permanent(reason) }
    }
}

/// An error with its causes ("a: b: c"). A dead letter's reason must say what went wrong, and
/// some errors keep that in their source only: tokio-postgres says "db error", and the server's
/// message is its source.
pub(super) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    crate::error_chain(err)
}

impl<S: Stage> Runner<S> {
    /// Records the message as a dead letter, publishes it to `<namespace>.dead` with its reason,
    /// then acknowledges it. If the record or the publish fails (an unroutable one included: the
    /// dead queue is bound, so then it is missing), the message is parked instead.
    pub(super) async fn dead_letter(
        &self,
        delivery: &Incoming,
        message_id: MessageId,
        request_id: Option<RequestId>,
        (reason, class): (&str, &'static str),
        fails_request: bool,
    ) -> Handled {
        let reason = bounded_reason(reason);
        warn!(%reason, "dead-lettering message");
        let body = recorded_body(&delivery.body);
        let recorded = self
            .store
            .record_dead_letter(S::NAME, &self.queue, message_id, request_id, &reason, &body, fails_request)
            .await;
        if let Err(err) = recorded {
            return self.park(delivery, &format!("could not record dead letter: {err}")).await;
        }
        let names = self.broker.names();
        let mut outgoing = Outgoing::to_queue(self.queue.clone(), delivery.body.clone());
        outgoing.exchange = names.dead_exchange();
        outgoing.message_id = delivery.message_id.clone();
        outgoing.headers = BTreeMap::from([
            ("x-switchyard-reason".to_owned(), reason),
            ("x-switchyard-stage".to_owned(), S::NAME.to_owned()),
            ("x-switchyard-queue".to_owned(), self.queue.clone()),
            ("x-switchyard-message-id".to_owned(), message_id.to_string()),
        ]);
        crate::telemetry::trace::inject(&tracing::Span::current(), &mut outgoing.headers);
        match self.broker.publish(&outgoing).await {
            Ok(()) => {
                metrics().dead_letters.get_or_create(&StageReason { stage: S::NAME, reason: class }).inc();
                self.count("dead_lettered");
                self.settle(delivery.ack().await)
            }
            Err(err) => self.park(delivery, &format!("could not publish dead letter: {err}")).await,
        }
    }

    /// Puts a message that failed transiently into the retry queue (the broker brings it back
    /// after the queue's TTL), or back into its queue if that fails too (an unroutable publish
    /// included: the retry queue is missing). Never drops it.
    pub(super) async fn park(&self, delivery: &Incoming, reason: &str) -> Handled {
        let retries = delivery.retries() + 1;
        let parked = match &self.retry_queue {
            Some(retry_queue) => {
                let mut outgoing = Outgoing::to_queue(retry_queue.clone(), delivery.body.clone());
                outgoing.message_id = delivery.message_id.clone();
                outgoing.priority = delivery.priority;
                outgoing.headers = delivery.headers.clone();
                outgoing.headers.insert("x-switchyard-retries".into(), retries.to_string());
                outgoing.headers.insert("x-switchyard-last-error".into(), bounded_reason(reason));
                self.broker.publish(&outgoing).await.map_err(|err| err.to_string())
            }
            None => Err(format!("the topology gives {} no retry queue", self.queue)),
        };
        match parked {
            Ok(()) => {
                metrics().parked.get_or_create(&StageLabels { stage: S::NAME }).inc();
                self.count("parked");
                warn!(%reason, retries, "transient failure; parked for a delayed retry");
                self.settle(delivery.ack().await);
            }
            Err(err) => {
                self.count("requeued");
                error!(%reason, error = %err, "transient failure and the message cannot be parked; requeueing");
                self.settle(delivery.requeue().await);
            }
        }
        Handled::Deferred
    }
}

/// PostgreSQL text cannot hold NUL characters; a hostile message must not make its own dead
/// letter unrecordable.
fn sanitize(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// The longest reason a dead letter (or a parked message) carries, in bytes. The reason travels
/// in a header, and AMQP carries all of a message's headers in one frame (128 KiB by default):
/// a longer header makes the broker close the whole connection, every stage of the worker with
/// it, and the message comes back to do it again. A reason may quote the message (an unknown
/// field's name, an invalid agent id), so it can be as long as the message.
const MAX_REASON_BYTES: usize = 2048;

/// `reason` as a dead letter records it: no NUL characters, and at most [`MAX_REASON_BYTES`],
/// the start and the end of a longer one kept with how much was cut between them (an error
/// says what is wrong first, and often what was expected last).
fn bounded_reason(reason: &str) -> String {
    let reason = sanitize(reason);
    if reason.len() <= MAX_REASON_BYTES {
        return reason;
    }
    let (head, tail) = (MAX_REASON_BYTES * 3 / 4, MAX_REASON_BYTES / 8);
    let head_end = floor_char_boundary(&reason, head);
    let tail_start = ceil_char_boundary(&reason, reason.len() - tail);
    let cut = tail_start - head_end;
    format!("{} […{cut} bytes cut…] {}", &reason[..head_end], &reason[tail_start..])
}

/// The most of a dead letter's body that its row keeps, in bytes. The copy in `<ns>.dead` is
/// the whole message; the row is what people read, and a client may send up to the broker's
/// largest message (128 MiB by default), which the database would otherwise hold as text.
const MAX_RECORDED_BODY_BYTES: usize = 64 * 1024;

/// A dead letter's body as its row keeps it: as text (bytes that are not UTF-8 replaced, NUL
/// characters too), at most [`MAX_RECORDED_BODY_BYTES`] of it, with how much more there was.
fn recorded_body(body: &[u8]) -> String {
    let mut end = body.len().min(MAX_RECORDED_BODY_BYTES);
    // Not in the middle of a character: a UTF-8 character has at most 3 continuation bytes.
    for _ in 0..3 {
        if end < body.len() && end > 0 && body[end] & 0xC0 == 0x80 {
            end -= 1;
        }
    }
    let mut text = sanitize(&String::from_utf8_lossy(&body[..end]));
    if end < body.len() {
        text.push_str(&format!(
            " […{} more bytes; the whole message is in the dead queue]",
            body.len() - end
        ));
    }
    text
}

fn floor_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn ceil_char_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index += 1;
    }
    index
}

/// The message id and request id of a message that could not be parsed, where they can be read
/// from it, so that the dead letter matches the other records and shows in the request's status.
///
/// Only these two fields are read: the rest of the message is skipped without being built, so a
/// body over the size limit costs no memory beyond itself, and what made the message unusable
/// elsewhere in it (nesting deeper than a parser recurses, bytes that are not UTF-8 in another
/// field) does not hide its ids.
pub(super) fn sniff_ids(body: &[u8]) -> (Option<MessageId>, Option<RequestId>) {
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow, default)]
        message_id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        request_id: Option<&'a RawValue>,
    }
    fn text(raw: Option<&RawValue>) -> Option<String> {
        serde_json::from_str(raw?.get()).ok()
    }
    let Ok(ids) = serde_json::from_slice::<Ids>(body) else {
        return (None, None);
    };
    (text(ids.message_id).and_then(|id| id.parse().ok()), text(ids.request_id).and_then(|id| id.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ids_of_an_unusable_message_are_read_past_what_makes_it_unusable() {
        let (message, request) = (MessageId::random(), RequestId::random());
        let ids = |rest: &str| -> Vec<u8> {
            format!(r#"{{"message_id":"{message}",{rest},"request_id":"{request}"}}"#).into_bytes()
        };
        let both = (Some(message), Some(request));
        assert_eq!(sniff_ids(&ids(r#""payload":{"plan_id":7}"#)), both);
        // Deeper than serde_json recurses (128): skipped without recursion.
        let deep = format!(r#""payload":{}{}"#, "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(sniff_ids(&ids(&deep)), both);
        // Bytes that are not UTF-8, in a field that is not read.
        let mut body = ids(r#""payload":"PLACEHOLDER""#);
        let at = body.windows(11).position(|w| w == b"PLACEHOLDER").unwrap();
        body.splice(at..at + 11, [0xff, 0xfe]);
        assert_eq!(sniff_ids(&body), both);
        // Ids that are not UUIDs, or not strings, are not ids.
        assert_eq!(sniff_ids(br#"{"message_id":"42; DROP TABLE x","request_id":[[1]]}"#), (None, None));
        assert_eq!(sniff_ids(br#"{"message_id":null}"#), (None, None));
        for unreadable in [&b"not json"[..], b"", b"[1,2]", b"{\"message_id\": \"x\"", b"\xff\xfe"] {
            assert_eq!(sniff_ids(unreadable), (None, None), "{}", String::from_utf8_lossy(unreadable));
        }
    }

    #[test]
    fn a_dead_letter_s_row_keeps_the_start_of_a_large_body() {
        assert_eq!(recorded_body(b"{\"text\": \"deploy\""), "{\"text\": \"deploy\"");
        assert_eq!(recorded_body(b"a\0\xffb"), "a\u{FFFD}\u{FFFD}b");
        let large = format!("{}{}", "x".repeat(MAX_RECORDED_BODY_BYTES - 1), "é".repeat(5_000_000));
        let kept = recorded_body(large.as_bytes());
        // The "é" across the limit is left out whole, not cut into a replacement character.
        let head = "x".repeat(MAX_RECORDED_BODY_BYTES - 1);
        assert_eq!(kept, format!("{head} […10000000 more bytes; the whole message is in the dead queue]"));
        let exactly = "y".repeat(MAX_RECORDED_BODY_BYTES);
        assert_eq!(recorded_body(exactly.as_bytes()), exactly);
    }

    #[test]
    fn a_reason_is_bounded_keeping_its_start_and_end() {
        assert_eq!(bounded_reason("malformed JSON: EOF"), "malformed JSON: EOF");
        assert_eq!(bounded_reason("a\0b"), "a\u{FFFD}b");
        // What serde says of a field named with 200,000 characters.
        let name = "é".repeat(100_000);
        let reason =
            format!("schema violation: unknown field `{name}`, expected one of `text`, `request_id`");
        let bounded = bounded_reason(&reason);
        assert!(bounded.len() <= MAX_REASON_BYTES, "{}", bounded.len());
        assert!(bounded.starts_with("schema violation: unknown field `éé"), "{bounded}");
        assert!(bounded.ends_with("éé`, expected one of `text`, `request_id`"), "{bounded}");
        // What was kept and what was cut add up to the whole.
        let (head, rest) = bounded.split_once(" […").unwrap();
        let (cut, tail) = rest.split_once(" bytes cut…] ").unwrap();
        assert_eq!(head.len() + cut.parse::<usize>().unwrap() + tail.len(), reason.len());
    }
}
