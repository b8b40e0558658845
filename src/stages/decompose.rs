//! decompose: a submitted request → its intents, by the rule catalog.

use std::sync::Arc;

use chrono::{DateTime, Utc};

use super::{AmqpMeta, Destination, Inbound, Outcome, Publish, Stage};
use crate::catalog::Catalog;
use crate::effect::Write;
use crate::wire::{self, Decomposed, Envelope, RequestMeta};

pub struct Decompose {
    pub catalog: Arc<Catalog>,
}

impl Stage for Decompose {
    type Input = RequestMeta;
    type Context = ();
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
            request_id: Some(submission.request.request_id),
            priority: submission.request.priority,
            payload: submission.request,
        })
    }

    fn decide(&self, input: &Inbound<RequestMeta>, _: (), now: DateTime<Utc>) -> Outcome {
        let request = &input.payload;
        match self.catalog.decompose(&request.text) {
            Ok(decomposition) => {
                let writes = vec![
                    Write::Request(request.clone()),
                    Write::Decomposition {
                        request_id: request.request_id,
                        decomposition: decomposition.clone(),
                    },
                ];
                let envelope = Envelope::derived(
                    input.message_id,
                    "decomposed",
                    request.request_id,
                    now,
                    Decomposed { request: request.clone(), decomposition },
                );
                let publish =
                    Publish::envelope(Destination::Queue("decomposed".into()), input.priority, &envelope);
                Outcome::Forward { writes, publish: vec![publish] }
            }
            Err(err) => {
                let reason = format!("decomposition failed: {err}");
                Outcome::Reject {
                    writes: vec![
                        Write::Request(request.clone()),
                        Write::RequestFailed { request_id: request.request_id, reason: reason.clone() },
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
    use crate::ids::RequestId;

    fn input(text: &str) -> Inbound<RequestMeta> {
        let request_id = RequestId::random();
        Inbound {
            message_id: crate::ids::MessageId::random(),
            request_id: Some(request_id),
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

    #[test]
    fn a_request_becomes_a_decomposition_for_the_plan_queue() {
        let stage = Decompose { catalog: Arc::new(Catalog::default()) };
        let input = input("Deploy Uptime Kuma to the homelab and send alerts to Discord");
        let Outcome::Forward { writes, publish } = stage.decide(&input, (), Utc::now()) else {
            panic!("expected forward");
        };
        assert!(matches!(&writes[0], Write::Request(r) if r.request_id == input.payload.request_id));
        let Write::Decomposition { decomposition, .. } = &writes[1] else { panic!("{writes:?}") };
        let types: Vec<&str> = decomposition.intents.iter().map(|i| i.work_type.as_str()).collect();
        assert_eq!(types, ["deployment", "monitoring"]);
        assert_eq!(publish.len(), 1);
        assert_eq!(publish[0].destination, Destination::Queue("decomposed".into()));
        assert_eq!(publish[0].message_id, input.message_id.derive("decomposed"));
        assert_eq!(publish[0].priority, 4);
        assert_eq!(publish[0].body["payload"]["request"]["auto_approve"], true);
    }

    #[test]
    fn an_unrecognised_request_fails_with_its_reason() {
        let stage = Decompose { catalog: Arc::new(Catalog::default()) };
        let input = input("hello there");
        let Outcome::Reject { writes, reason } = stage.decide(&input, (), Utc::now()) else {
            panic!("expected reject");
        };
        assert!(reason.starts_with("decomposition failed: "), "{reason}");
        assert!(matches!(&writes[1], Write::RequestFailed { reason: r, .. } if *r == reason));
    }
}
