//! A person's verdict on a plan that awaits approval: checked against where the plan and its
//! request stand, then applied as a `Write::Approval`.

use super::cached::Cached;
use super::read::parse_status;
use super::{Applied, Error, Store};
use crate::model::domain::{PlanStatus, RequestStatus};
use crate::model::effect::{Write, write};
use crate::model::ids::{PlanId, RequestId};

/// What `approve` or `reject` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalOutcome {
    pub request_id: RequestId,
    pub priority: u8,
    /// The plan already had this verdict: nothing was changed.
    pub already: bool,
    /// The trace context its request was recorded with, which the approval continues.
    pub traceparent: Option<String>,
}

impl Store {
    /// Approves (`approved`) or rejects a plan that awaits approval. Idempotent: the same verdict
    /// again changes nothing; the opposite verdict is refused.
    pub async fn decide_approval(
        &self,
        plan_id: PlanId,
        approved: bool,
        by: &str,
        reason: &str,
    ) -> Result<ApprovalOutcome, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT p.request_id, p.status, r.priority, a.approved, r.status, r.failure_reason, r.traceparent
                 FROM plans p JOIN requests r ON r.id = p.request_id
                 LEFT JOIN approvals a ON a.plan_id = p.id WHERE p.id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?
            .ok_or_else(|| Error::NotFound(format!("no plan {plan_id}")))?;
        let request_id = RequestId::from_uuid(row.get(0));
        let status: PlanStatus = parse_status(row.get(1))?;
        let priority = row.get::<_, i16>(2) as u8;
        let existing: Option<bool> = row.get(3);
        let request_status: RequestStatus = parse_status(row.get(4))?;
        let traceparent: Option<String> = row.get(6);
        if existing.is_none() && request_status == RequestStatus::Failed {
            let why: Option<String> = row.get(5);
            return Err(Error::Refused(format!(
                "request {request_id} has failed ({}); its plan can no longer be decided",
                why.as_deref().unwrap_or("no reason recorded")
            )));
        }
        match existing {
            Some(verdict) if verdict == approved => {
                return Ok(ApprovalOutcome { request_id, priority, already: true, traceparent });
            }
            Some(_) => {
                return Err(Error::Refused(format!("plan {plan_id} is already {status}")));
            }
            None if status != PlanStatus::AwaitingApproval => {
                return Err(Error::Refused(format!("plan {plan_id} is {status}, not awaiting approval")));
            }
            None => {}
        }
        drop(client);
        let write = Write::Approval(write::Approval {
            request_id,
            plan_id,
            approved,
            by: by.to_owned(),
            reason: reason.to_owned(),
        });
        match self.apply(by, None, std::slice::from_ref(&write)).await? {
            Applied::Done => Ok(ApprovalOutcome { request_id, priority, already: false, traceparent }),
            // The opposite verdict was recorded between the check above and this write.
            Applied::Conflict(reason) => Err(Error::Refused(reason)),
            other => Err(Error::Corrupt(format!("approval of {plan_id} applied as {other:?}"))),
        }
    }
}
