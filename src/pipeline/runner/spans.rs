//! What the handling of a message is known by: its span (named after its stage, with the
//! request, plan, task and attempt it is about, and its trace), which continues the trace that
//! the message carries and passes it on to every message it sends; and the log line of each
//! change of a request's state, said once, after the change is committed.

use tracing::field::Empty;
use tracing::{Span, info, info_span, warn};

use crate::model::effect::Write;
use crate::model::ids::RequestId;
use crate::telemetry::trace;

/// The span of `stage`'s handling of a message that carries `headers`: a child of the span that
/// sent it when they carry a trace context, a root otherwise; with its trace id recorded, so
/// that every log line inside names its trace. A trace shows it by the stage's name (`otel.name`).
pub(super) fn handling(stage: &'static str, headers: &std::collections::BTreeMap<String, String>) -> Span {
    let span = info_span!(
        "message",
        otel.name = stage,
        stage,
        message_id = Empty,
        request_id = Empty,
        plan_id = Empty,
        task_id = Empty,
        attempt = Empty,
        trace_id = Empty
    );
    trace::adopt(&span, headers);
    if let Some(trace_id) = trace::trace_id(&span) {
        span.record("trace_id", trace_id);
    }
    span
}

/// The span of `stage` sending a message of `body` in the trace of `traceparent` rather than in
/// the trace of the handling that sends it (the current span), to which it is linked: a task
/// placed from the line is dispatched in its request's trace, not in the wake-up's.
pub(super) fn on_behalf(stage: &'static str, traceparent: &str, body: &[u8]) -> Span {
    let headers = std::collections::BTreeMap::from([(trace::TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let span = handling(stage, &headers);
    trace::link(&span, &Span::current());
    let (message_id, request_id) = super::failure::sniff_ids(body);
    if let Some(message_id) = message_id {
        span.record("message_id", tracing::field::display(message_id));
    }
    describe(&span, request_id, body);
    span
}

/// Has a new request keep the trace of the handling that records it (the current span), so
/// that what is done for it later on another message's behalf continues its trace.
pub(super) fn keep_trace(writes: &mut [Write]) {
    if writes.iter().any(|w| matches!(w, Write::Request(_)))
        && let Some(traceparent) = trace::traceparent(&Span::current())
    {
        writes.iter_mut().for_each(|w| w.keep_trace(&traceparent));
    }
}

/// Records on `span` what the message is about: its request, and the plan, task and attempt
/// its payload names (read from the body, as far as they are there).
pub(super) fn describe(span: &Span, request_id: Option<RequestId>, body: &[u8]) {
    if let Some(request_id) = request_id {
        span.record("request_id", tracing::field::display(request_id));
    }
    let subject = Subject::sniff(body);
    if let Some(plan_id) = subject.plan_id {
        span.record("plan_id", plan_id);
    }
    if let Some(task_id) = subject.task_id {
        span.record("task_id", task_id);
    }
    if let Some(attempt) = subject.attempt {
        span.record("attempt", attempt);
    }
}

/// The plan, task and attempt an envelope's payload names: `plan_id` or `plan.id`, `task_id` or
/// `task.id`, `attempt`. Read past everything else without building it.
#[derive(Debug, Default, PartialEq)]
struct Subject {
    plan_id: Option<String>,
    task_id: Option<String>,
    attempt: Option<u32>,
}

impl Subject {
    fn sniff(body: &[u8]) -> Subject {
        #[derive(serde::Deserialize)]
        struct Envelope {
            #[serde(default)]
            payload: Option<Payload>,
        }
        #[derive(serde::Deserialize)]
        struct Payload {
            #[serde(default)]
            plan_id: Option<uuid::Uuid>,
            #[serde(default)]
            plan: Option<Id>,
            #[serde(default)]
            task_id: Option<uuid::Uuid>,
            #[serde(default)]
            task: Option<Id>,
            #[serde(default)]
            attempt: Option<u32>,
        }
        #[derive(serde::Deserialize)]
        struct Id {
            #[serde(default)]
            id: Option<uuid::Uuid>,
        }
        let Ok(Envelope { payload: Some(payload) }) = serde_json::from_slice::<Envelope>(body) else {
            return Subject::default();
        };
        Subject {
            plan_id: payload.plan_id.or(payload.plan.and_then(|p| p.id)).map(|id| id.to_string()),
            task_id: payload.task_id.or(payload.task.and_then(|t| t.id)).map(|id| id.to_string()),
            attempt: payload.attempt,
        }
    }
}

/// The changes of a request's state that `writes` make, to be said once they are committed.
pub(super) struct StateChanges(Vec<(RequestId, Change)>);

enum Change {
    Received,
    Planned { tasks: usize },
    AwaitingApproval,
    Rejected { reason: String },
    Completed,
    Failed { reason: String },
    Cancelled { reason: String },
}

impl StateChanges {
    pub(super) fn of(writes: &[Write]) -> Self {
        let changes = writes
            .iter()
            .filter_map(|write| match write {
                Write::Request(request) => Some((request.meta.request_id, Change::Received)),
                Write::Plan(plan) => {
                    Some((plan.plan.request_id, Change::Planned { tasks: plan.plan.tasks().len() }))
                }
                Write::AwaitingApproval(awaiting) => Some((awaiting.request_id, Change::AwaitingApproval)),
                Write::Approval(approval) if !approval.approved => {
                    Some((approval.request_id, Change::Rejected { reason: approval.reason.clone() }))
                }
                Write::RequestFailed(failed) => {
                    Some((failed.request_id, Change::Failed { reason: failed.reason.clone() }))
                }
                Write::PlanFinished(finished) => Some((
                    finished.request_id,
                    match &finished.failure {
                        None => Change::Completed,
                        Some(reason) => Change::Failed { reason: reason.clone() },
                    },
                )),
                Write::Cancel(cancel) => {
                    Some((cancel.request_id, Change::Cancelled { reason: cancel.reason.clone() }))
                }
                _ => None,
            })
            .collect();
        StateChanges(changes)
    }

    /// One line each, at info (a failure at warn).
    pub(super) fn say(self) {
        for (request_id, change) in self.0 {
            let request_id = tracing::field::display(request_id);
            match change {
                Change::Received => info!(request_id, "request received"),
                Change::Planned { tasks } => info!(request_id, tasks, "request planned"),
                Change::AwaitingApproval => info!(request_id, "request awaits approval"),
                Change::Rejected { reason } => info!(request_id, %reason, "request rejected"),
                Change::Completed => info!(request_id, "request completed"),
                Change::Failed { reason } => warn!(request_id, %reason, "request failed"),
                Change::Cancelled { reason } => info!(request_id, %reason, "request cancelled"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subject_of_a_message_is_read_from_its_payload() {
        let (plan, task) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        let result = format!(
            r#"{{"message_id":"x","payload":{{"plan_id":"{plan}","task_id":"{task}","attempt":2}}}}"#
        );
        let subject = Subject::sniff(result.as_bytes());
        assert_eq!(
            subject,
            Subject { plan_id: Some(plan.to_string()), task_id: Some(task.to_string()), attempt: Some(2) }
        );
        let assignment = format!(
            r#"{{"payload":{{"plan_id":"{plan}","task":{{"id":"{task}","key":"1.a"}},"attempt":1}}}}"#
        );
        assert_eq!(Subject::sniff(assignment.as_bytes()).task_id, Some(task.to_string()));
        let planned = format!(r#"{{"payload":{{"plan":{{"id":"{plan}","tasks":[]}}}}}}"#);
        assert_eq!(Subject::sniff(planned.as_bytes()).plan_id, Some(plan.to_string()));
        for nothing in [&b"not json"[..], b"{}", br#"{"payload":{"plan_id":"not a uuid"}}"#, b"[]"] {
            assert_eq!(Subject::sniff(nothing), Subject::default());
        }
    }
}
