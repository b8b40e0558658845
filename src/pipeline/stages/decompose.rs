//! decompose: a submitted request → its intents, by the configured decomposer, with the rules
//! standing in when it fails.
//!
//! With `rules` configured, `decide` runs the catalog's rules itself: they need no I/O. With a
//! decomposer that asks a model, `load` asks it (I/O belongs there) and hands `decide` what it
//! answered or why it did not; `decide` uses its decomposition, or the rules' with the reason
//! recorded in `fallback_reason`. A request that neither can read fails, with both reasons.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use tracing::warn;

use super::{AmqpMeta, Destination, Inbound, Outcome, Stage};
use crate::model::domain::Decomposition;
use crate::model::effect::{Write, write};
use crate::model::ids::RequestId;
use crate::model::wire::{self, Decomposed, RequestMeta};
use crate::pipeline::topology::StageQueue;
use crate::store::{self, Store};
use crate::understanding::catalog::Catalog;
use crate::understanding::decomposer::{self, Decomposer};

pub struct Decompose {
    pub catalog: Arc<Catalog>,
    /// The decomposer that `load` asks; `None` for the rules, which `decide` runs itself.
    pub decomposer: Option<Arc<dyn Decomposer>>,
}

/// What the configured decomposer made of the request, when it is not the rules; and the text a
/// request of the same id was recorded with, if one was.
#[derive(Debug, Default)]
pub struct DecomposeContext {
    pub reading: Option<Reading>,
    pub recorded_text: Option<String>,
}

/// A decomposer's answer: its decomposition, or why there is none.
#[derive(Debug)]
pub struct Reading {
    pub decomposer: &'static str,
    pub outcome: Result<Decomposition, decomposer::Error>,
}

impl Decompose {
    /// The decomposition to use, or why there is none: the reading if it succeeded, else the
    /// rules', with the reading's failure as its fallback reason.
    fn decomposition(&self, text: &str, reading: Option<Reading>) -> Result<Decomposition, String> {
        match reading {
            None => self.catalog.decompose(text).map_err(|err| err.to_string()),
            Some(Reading { outcome: Ok(decomposition), .. }) => Ok(decomposition),
            Some(Reading { decomposer, outcome: Err(err) }) => {
                let reason = format!("{decomposer}: {err}");
                match self.catalog.decompose(text) {
                    Ok(rules) => Ok(Decomposition { fallback_reason: Some(reason), ..rules }),
                    Err(rules) => Err(format!("{reason}; and the rules: {rules}")),
                }
            }
        }
    }
}

/// Why a request id submitted again with another text is refused.
pub fn reused_id(request_id: RequestId, recorded: &str) -> String {
    const SHOWN: usize = 80;
    let shown: String = recorded.chars().take(SHOWN).collect();
    let more = if recorded.chars().count() > SHOWN { "…" } else { "" };
    format!(
        "request {request_id} was submitted before with another text (\"{shown}{more}\"): submit this one under another id"
    )
}

impl Stage for Decompose {
    type Input = RequestMeta;
    type Request = RequestId;
    type Context = DecomposeContext;
    const NAME: &'static str = "decompose";

    fn parse(
        &self,
        body: &[u8],
        amqp: &AmqpMeta<'_>,
        limit: usize,
    ) -> Result<Inbound<RequestMeta>, wire::Error> {
        let submission = wire::parse_submission(body, limit, amqp.message_id)?;
        Ok(Inbound {
            message_id: submission.message_id,
            request_id: submission.request.request_id,
            priority: submission.request.priority,
            payload: submission.request,
        })
    }

    /// Asks the configured decomposer, if it is not the rules. Its failure is not an error of
    /// the stage: the rules stand in, in `decide`.
    async fn load(
        &self,
        store: &Store,
        input: &Inbound<RequestMeta>,
    ) -> Result<DecomposeContext, store::Error> {
        let recorded_text = store.request_text(input.payload.request_id).await?;
        let Some(decomposer) = &self.decomposer else {
            return Ok(DecomposeContext { reading: None, recorded_text });
        };
        let outcome = decomposer.decompose(&input.payload.text).await;
        if let Err(err) = &outcome {
            // The error never holds the API key (see `llm`).
            warn!(
                request_id = %input.payload.request_id,
                decomposer = decomposer.name(),
                error = %err,
                "the decomposer failed; the rules read the request instead"
            );
        }
        Ok(DecomposeContext {
            reading: Some(Reading { decomposer: decomposer.name(), outcome }),
            recorded_text,
        })
    }

    /// A message refused here is a request's first, which has no row to fail yet, or another
    /// message naming a request that exists (the same id, sent again malformed): it must not fail
    /// that one. A decomposition that fails fails its request by its own writes.
    fn dead_letter_fails_request(&self) -> bool {
        false
    }

    fn decide(&self, input: &Inbound<RequestMeta>, context: DecomposeContext, now: DateTime<Utc>) -> Outcome {
        let request = &input.payload;
        if let Some(recorded) = context.recorded_text.filter(|t| *t != request.text) {
            // An id names one request: a second text under it is refused, never merged into the
            // first, whose request goes on as it was.
            return Outcome::Refuse { reason: reused_id(request.request_id, &recorded) };
        }
        match self.decomposition(&request.text, context.reading) {
            Ok(decomposition) => {
                let writes = vec![
                    Write::Request(write::Request { meta: request.clone(), traceparent: None }),
                    Write::Decomposition(write::Decomposition {
                        request_id: request.request_id,
                        decomposition: decomposition.clone(),
                    }),
                ];
                let publish = input.forward(
                    Destination::Queue(StageQueue::Decomposed),
                    "decomposed",
                    request.request_id,
                    now,
                    Decomposed { request: request.clone(), decomposition },
                );
                Outcome::Forward { writes, publish: vec![publish] }
            }
            Err(err) => {
                let reason = format!("decomposition failed: {err}");
                Outcome::Reject {
                    writes: vec![
                        Write::Request(write::Request { meta: request.clone(), traceparent: None }),
                        Write::RequestFailed(write::RequestFailed {
                            request_id: request.request_id,
                            reason: reason.clone(),
                        }),
                    ],
                    reason,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ids::RequestId;

    fn input(text: &str) -> Inbound<RequestMeta> {
        let request_id = RequestId::random();
        Inbound {
            message_id: crate::model::ids::MessageId::random(),
            request_id,
            priority: 4,
            payload: RequestMeta {
                request_id,
                text: text.into(),
                submitted_by: Some("ops".into()),
                priority: 4,
                auto_approve: true,
            },
        }
    }

    fn rules() -> Decompose {
        Decompose { catalog: Arc::new(Catalog::default()), decomposer: None }
    }

    fn read_by_llm(outcome: Result<Decomposition, decomposer::Error>) -> DecomposeContext {
        DecomposeContext { reading: Some(Reading { decomposer: "llm", outcome }), ..Default::default() }
    }

    /// The decomposition the stage writes and publishes (they agree).
    fn forwarded(outcome: Outcome) -> Decomposition {
        let Outcome::Forward { writes, publish } = outcome else { panic!("expected forward: {outcome:?}") };
        let Write::Decomposition(write::Decomposition { decomposition, .. }) = &writes[1] else {
            panic!("{writes:?}")
        };
        let published: Decomposition =
            serde_json::from_value(publish[0].body["payload"]["decomposition"].clone()).unwrap();
        assert_eq!(&published, decomposition);
        published
    }

    #[test]
    fn a_request_becomes_a_decomposition_for_the_plan_queue() {
        let stage = rules();
        let input = input("Deploy Uptime Kuma to the homelab and send alerts to Discord");
        let Outcome::Forward { writes, publish } =
            stage.decide(&input, DecomposeContext::default(), Utc::now())
        else {
            panic!("expected forward");
        };
        assert!(matches!(&writes[0], Write::Request(r) if r.meta.request_id == input.payload.request_id));
        let Write::Decomposition(write::Decomposition { decomposition, .. }) = &writes[1] else {
            panic!("{writes:?}")
        };
        let types: Vec<&str> = decomposition.intents.iter().map(|i| i.work_type.as_str()).collect();
        assert_eq!(types, ["deployment", "monitoring"]);
        assert_eq!(publish.len(), 1);
        assert_eq!(publish[0].destination, Destination::Queue(StageQueue::Decomposed));
        assert_eq!(publish[0].message_id, input.message_id.derive("decomposed"));
        assert_eq!(publish[0].priority, 4);
        assert_eq!(publish[0].body["payload"]["request"]["auto_approve"], true);
    }

    #[test]
    fn an_unrecognised_request_fails_with_its_reason() {
        let input = input("hello there");
        let Outcome::Reject { writes, reason } =
            rules().decide(&input, DecomposeContext::default(), Utc::now())
        else {
            panic!("expected reject");
        };
        assert!(reason.starts_with("decomposition failed: "), "{reason}");
        assert!(
            matches!(&writes[1], Write::RequestFailed(write::RequestFailed { reason: r, .. }) if *r == reason)
        );
    }

    #[test]
    fn the_model_s_decomposition_is_used() {
        let model = Decomposition {
            decomposer: "llm".into(),
            intents: vec![crate::model::domain::Intent {
                work_type: crate::model::ids::WorkType::parse("maintenance").unwrap(),
                text: "Make my photo library searchable by faces".into(),
                entities: vec![],
                targets: vec![],
            }],
            confidence: 0.7,
            fallback_reason: None,
        };
        let input = input("Make my photo library searchable by faces");
        let decomposition = forwarded(rules().decide(&input, read_by_llm(Ok(model.clone())), Utc::now()));
        assert_eq!(decomposition, model);
    }

    #[test]
    fn the_rules_stand_in_for_a_failed_model_and_say_why() {
        let text = "Deploy Gitea to the homelab";
        let failure = crate::llm::Error::Timeout { after: std::time::Duration::from_secs(1) };
        let outcome = rules().decide(&input(text), read_by_llm(Err(failure.into())), Utc::now());
        let decomposition = forwarded(outcome);
        assert_eq!(decomposition.decomposer, "rules");
        assert_eq!(decomposition.fallback_reason.as_deref(), Some("llm: no answer within 1s"));
        let by_rules = Catalog::default().decompose(text).unwrap();
        assert_eq!(
            decomposition,
            Decomposition { fallback_reason: decomposition.fallback_reason.clone(), ..by_rules }
        );
        let invalid = decomposer::Error::Schema("intents is empty".into());
        let decomposition = forwarded(rules().decide(&input(text), read_by_llm(Err(invalid)), Utc::now()));
        assert_eq!(
            decomposition.fallback_reason.as_deref(),
            Some("llm: the model's answer does not match the schema: intents is empty")
        );
    }

    #[test]
    fn a_request_neither_can_read_fails_naming_both() {
        let failure = crate::llm::Error::Status { status: 500, message: "boom".into() };
        let input = input("hello there");
        let outcome = rules().decide(&input, read_by_llm(Err(failure.into())), Utc::now());
        let Outcome::Reject { writes, reason } = outcome else { panic!("expected reject: {outcome:?}") };
        assert!(
            reason.starts_with(
                "decomposition failed: llm: the model server answered 500 Internal Server Error: boom; \
                 and the rules: no work type in the catalog matches the request"
            ),
            "{reason}"
        );
        assert!(
            matches!(&writes[1], Write::RequestFailed(write::RequestFailed { reason: r, .. }) if *r == reason)
        );
    }
}
