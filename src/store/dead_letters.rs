//! Recording a dead letter: a message that a stage refused, with why, and, when asked, the
//! failure of the request it belongs to.

use uuid::Uuid;

use super::cached::Cached;
use super::{Error, Store};
use crate::model::domain::{PlanStatus, RequestStatus};
use crate::model::ids::{MessageId, PlanId, RequestId};

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
            let under_way: Vec<&str> = RequestStatus::UNDER_WAY.map(|s| s.as_str()).to_vec();
            let failure = format!("a message of this request was dead-lettered at {stage}: {reason}");
            let failed = tx
                .execute_cached(
                    "UPDATE requests SET status = $2, failure_reason = $3, updated_at = now()
                     WHERE id = $1 AND status = ANY($4)",
                    &[&request_id.as_uuid(), &RequestStatus::Failed.as_str(), &failure, &under_way],
                )
                .await?;
            if failed == 1 {
                let detail =
                    serde_json::json!({ "reason": failure, "stage": stage, "message_id": message_id });
                super::apply::audit(&tx, stage, "request.failed", Some(request_id), None, None, detail)
                    .await?;
                // Its plan, if it has one under way, ends with it: nothing more of it will run,
                // and what it reserved of a provider's quota goes back.
                let ended = tx
                    .query_opt_cached(
                        "UPDATE plans SET status = $2, updated_at = now()
                         WHERE request_id = $1 AND status = ANY($3) RETURNING id",
                        &[
                            &request_id.as_uuid(),
                            &PlanStatus::Failed.as_str(),
                            &[PlanStatus::Planned, PlanStatus::AwaitingApproval, PlanStatus::Approved]
                                .map(|s| s.as_str())
                                .as_slice(),
                        ],
                    )
                    .await?;
                if let Some(row) = ended {
                    let plan_id = PlanId::from_uuid(row.get(0));
                    super::apply::cancel_pending(&tx, plan_id, "cancelled: the request failed").await?;
                    super::quota::settle(&tx, stage, request_id, plan_id, "quota.settled").await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }
}
