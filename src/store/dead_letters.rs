//! Recording a dead letter: a message that a stage refused, with why, and, when asked, the
//! failure of the request it belongs to.

use uuid::Uuid;

use super::cached::Cached;
use super::{Error, Store};
use crate::model::ids::{MessageId, RequestId};

impl Store {
    /// Records a dead letter; a second record of the same message at the same stage is ignored.
    /// With `fail_request`, the request it belongs to, if it exists and is still under way, fails
    /// with the same reason: whoever follows the request sees why it stopped instead of waiting
    /// for ever.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_dead_letter(
        &self,
        stage: &str,
        queue: &str,
        message_id: MessageId,
        request_id: Option<RequestId>,
        reason: &str,
        body: &str,
        fail_request: bool,
    ) -> Result<(), Error> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let inserted = tx
            .execute_cached(
                "INSERT INTO dead_letters (message_id, stage, queue, request_id, reason, body)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[&message_id.as_uuid(), &stage, &queue, &request_id.map(Uuid::from), &reason, &body],
            )
            .await?;
        if let (1, Some(request_id), true) = (inserted, request_id, fail_request) {
            let failure = format!("a message of this request was dead-lettered at {stage}: {reason}");
            let detail = serde_json::json!({ "reason": failure, "stage": stage, "message_id": message_id });
            let audited = super::apply::Tx::new(&tx);
            super::apply::fail_request(&audited, stage, request_id, &failure, detail).await?;
            audited.flush().await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
