//! Quota as a scheduled resource: each provider has a limit per window (a UTC day or month), and
//! each window its own figures (`quota_windows`: reserved, spent), created on demand, so that a
//! new window starts whole without any job. A fallback decision reserves its estimated cost in a
//! window; each attempt's real use (`quota_usage`, once per task and attempt) moves its cost from
//! reserved to spent; when the plan ends (or is rejected) its reservation is settled: whatever is
//! still reserved goes back.
//!
//! The window kind of a provider is the one stored with its quota (from the configuration at
//! worker start): reads and reservations use it, so that every process agrees on the windows.

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use serde::Serialize;
use serde_json::json;

use super::apply::Tx;
use super::cached::Cached;
use super::{Error, Store};
use crate::decisions::providers::{QuotaSnapshot, Window};
use crate::model::effect::write;
use crate::model::effect::{Attempt, Reservation};
use crate::model::ids::{PlanId, RequestId};

/// Every kind of window, for queries that look at the current window of each provider.
const WINDOWS: [Window; 2] = [Window::Daily, Window::Monthly];
// A new kind of window must be added to `WINDOWS` (and to the CHECKs of the schema): this stops
// compiling until it is.
const _: () = match Window::Daily {
    Window::Daily | Window::Monthly => {}
};

/// A provider's quota in the window that a given moment falls in: `switchyard quota`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QuotaReport {
    pub provider: String,
    pub window: Window,
    pub window_start: DateTime<Utc>,
    /// When the next window starts, whole: the quota "resets" then.
    pub window_end: DateTime<Utc>,
    /// The limit in force: the configured one, or the one `switchyard quota set` set since.
    pub limit_micros: i64,
    /// The limit in the configuration the workers last started with.
    pub configured_micros: i64,
    pub reserved_micros: i64,
    pub spent_micros: i64,
    /// limit - reserved - spent; below 0 when real use overran the limit, or the limit was
    /// lowered under what was already taken.
    pub remaining_micros: i64,
}

/// A plan's quota reservation as stored: `status` and the audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredReservation {
    pub provider: String,
    pub window: Window,
    pub window_start: DateTime<Utc>,
    /// The estimated cost reserved.
    pub amount_micros: i64,
    /// Real use reported against it so far; may exceed the amount.
    pub spent_micros: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// When the plan ended (or was rejected) and the reservation was closed.
    pub settled_at: Option<DateTime<Utc>>,
    /// What went back to the window at settlement.
    pub released_micros: Option<i64>,
}

impl StoredReservation {
    /// What the reservation still holds of its window's quota: 0 once settled.
    pub fn outstanding_micros(&self) -> i64 {
        if self.settled_at.is_some() { 0 } else { outstanding(self.amount_micros, self.spent_micros) }
    }
}

/// What a reservation of `amount` still holds once `spent` was used against it.
fn outstanding(amount: i64, spent: i64) -> i64 {
    amount.saturating_sub(spent).max(0)
}

/// How much of a use costing `cost` comes off what a reservation of `amount`, with `spent` used
/// against it before, still holds: all of it while the reservation covers it, then what is left,
/// then nothing. A settled reservation holds nothing any more.
fn from_reserved(amount: i64, spent: i64, cost: i64, settled: bool) -> i64 {
    if settled { 0 } else { outstanding(amount, spent).min(cost.max(0)) }
}

/// A token count as stored (bigint), saturated.
fn tokens(count: u64) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX)
}

fn parse_window(value: &str) -> Result<Window, Error> {
    value.parse().map_err(|_| Error::Corrupt(format!("unknown quota window {value:?}")))
}

/// The window kind of `provider`'s quota, if it has one.
async fn window_of(tx: &Transaction<'_>, provider: &str) -> Result<Option<Window>, Error> {
    let row = tx.query_opt_cached("SELECT window_kind FROM quotas WHERE provider = $1", &[&provider]).await?;
    row.map(|r| parse_window(r.get(0))).transpose()
}

/// Creates the row of a window if it has none yet: a window starts whole.
async fn open_window(
    tx: &Transaction<'_>,
    provider: &str,
    window: Window,
    start: DateTime<Utc>,
) -> Result<(), Error> {
    tx.execute_cached(
        "INSERT INTO quota_windows (provider, window_kind, window_start) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
        &[&provider, &window.to_string(), &start],
    )
    .await?;
    Ok(())
}

/// Reserves `reservation` for `plan_id` in its window if what is left there covers it: the
/// quota left afterwards, or why not (a conflict: the stage decides again).
pub(super) async fn reserve(
    tx: &Transaction<'_>,
    plan_id: PlanId,
    reservation: &Reservation,
) -> Result<Result<i64, String>, Error> {
    let Reservation { provider, amount_micros, window_start } = reservation;
    let Some(window) = window_of(tx, provider).await? else {
        return Ok(Err(format!("quota of {provider} is unknown: it has no quota row")));
    };
    let start = window.start(*window_start);
    open_window(tx, provider, window, start).await?;
    // Under the window row's lock: of two reservations for the last of a quota, the second finds
    // the first's and fails the guard.
    let left = tx
        .query_opt_cached(
            "UPDATE quota_windows w SET reserved_micros = w.reserved_micros + $4, updated_at = now()
             FROM quotas q
             WHERE w.provider = $1 AND w.window_kind = $2 AND w.window_start = $3 AND q.provider = w.provider
               AND q.limit_micros - w.reserved_micros - w.spent_micros >= $4
             RETURNING q.limit_micros - w.reserved_micros - w.spent_micros",
            &[provider, &window.to_string(), &start, amount_micros],
        )
        .await?;
    let Some(left) = left else {
        return Ok(Err(format!(
            "quota of {provider} no longer covers {amount_micros} micros in the {window} window from {start}"
        )));
    };
    tx.execute_cached(
        "INSERT INTO quota_reservations (plan_id, provider, amount_micros, window_kind, window_start)
         VALUES ($1, $2, $3, $4, $5)",
        &[&plan_id.as_uuid(), provider, amount_micros, &window.to_string(), &start],
    )
    .await?;
    Ok(Ok(left.get(0)))
}

/// Records an attempt's real use (see `Write::QuotaUsed`); nothing if it was recorded before.
#[allow(clippy::too_many_arguments)]
pub(super) async fn record_use(tx: &Tx<'_, '_>, actor: &str, w: &write::QuotaUsed) -> Result<(), Error> {
    let write::QuotaUsed {
        attempt: Attempt { request_id, plan_id, task_id, number: attempt },
        provider,
        usage,
        cost_micros,
        used_at,
    } = w;
    let (request_id, plan_id, task_id, attempt, cost_micros, used_at) =
        (*request_id, *plan_id, *task_id, *attempt, *cost_micros, *used_at);
    let cost = cost_micros.max(0);
    let (input, output) = (tokens(usage.input_tokens), tokens(usage.output_tokens));
    // Locked: the plan's other uses and its settlement wait for this one.
    let reservation = tx
        .query_opt_cached(
            "SELECT window_kind, window_start, amount_micros, spent_micros, settled_at IS NOT NULL
             FROM quota_reservations WHERE plan_id = $1 AND provider = $2 FOR UPDATE",
            &[&plan_id.as_uuid(), &provider],
        )
        .await?;
    let (window, taken) = match &reservation {
        Some(row) => {
            let window = parse_window(row.get(0))?;
            let taken = from_reserved(row.get(2), row.get(3), cost, row.get(4));
            (Some((window, row.get::<_, DateTime<Utc>>(1))), taken)
        }
        // Use that nothing reserved (a provider the plan was not decided for) is spent all the
        // same, in the provider's window that the use falls in.
        None => (window_of(tx, provider).await?.map(|w| (w, w.start(used_at))), 0),
    };
    let inserted = tx
        .execute_cached(
            "INSERT INTO quota_usage (task_id, attempt, plan_id, provider, input_tokens, output_tokens,
                 cost_micros, window_kind, window_start, from_reserved_micros)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
            &[
                &task_id.as_uuid(),
                &(attempt as i32),
                &plan_id.as_uuid(),
                &provider,
                &input,
                &output,
                &cost,
                &window.map(|(w, _)| w.to_string()),
                &window.map(|(_, start)| start),
                &taken,
            ],
        )
        .await?;
    if inserted == 0 {
        // This attempt's use is counted already (a redelivered result).
        return Ok(());
    }
    // Sums saturate: a model server reporting absurd usage must not make a finished attempt's
    // result fail to record (an overflowing bigint is a permanent error).
    if reservation.is_some() {
        tx.execute_cached(
            "UPDATE quota_reservations
             SET spent_micros = LEAST(spent_micros::numeric + $3::bigint, 9223372036854775807)::bigint,
                 input_tokens = LEAST(input_tokens::numeric + $4::bigint, 9223372036854775807)::bigint,
                 output_tokens = LEAST(output_tokens::numeric + $5::bigint, 9223372036854775807)::bigint
             WHERE plan_id = $1 AND provider = $2",
            &[&plan_id.as_uuid(), &provider, &cost, &input, &output],
        )
        .await?;
    }
    if let Some((window, start)) = window {
        open_window(tx, provider, window, start).await?;
        tx.execute_cached(
            "UPDATE quota_windows SET spent_micros = LEAST(spent_micros::numeric + $4::bigint, 9223372036854775807)::bigint,
                 reserved_micros = GREATEST(reserved_micros - $5, 0), updated_at = now()
             WHERE provider = $1 AND window_kind = $2 AND window_start = $3",
            &[&provider, &window.to_string(), &start, &cost, &taken],
        )
        .await?;
    }
    let detail = json!({
        "provider": provider, "attempt": attempt, "input_tokens": input, "output_tokens": output,
        "cost_micros": cost, "from_reserved_micros": taken, "reserved": reservation.is_some(),
        "window": window.map(|(w, _)| w), "window_start": window.map(|(_, start)| start),
    });
    tx.audit(actor, "quota.used", Some(request_id), Some(plan_id), Some(task_id), detail);
    Ok(())
}

/// Settles `plan_id`'s reservation, if it has one still open: what it still holds goes back to
/// its window. Audited as `event` (`quota.settled` at plan end, `quota.released` on rejection).
pub(super) async fn settle(
    tx: &Tx<'_, '_>,
    actor: &str,
    request_id: RequestId,
    plan_id: PlanId,
    event: &'static str,
) -> Result<(), Error> {
    let Some(row) = tx
        .query_opt_cached(
            "SELECT provider, window_kind, window_start, amount_micros, spent_micros
             FROM quota_reservations WHERE plan_id = $1 AND settled_at IS NULL FOR UPDATE",
            &[&plan_id.as_uuid()],
        )
        .await?
    else {
        return Ok(());
    };
    let (provider, window, start): (String, String, DateTime<Utc>) = (row.get(0), row.get(1), row.get(2));
    let (amount, spent): (i64, i64) = (row.get(3), row.get(4));
    let released = outstanding(amount, spent);
    tx.execute_cached(
        "UPDATE quota_reservations SET settled_at = now(), released_micros = $2 WHERE plan_id = $1",
        &[&plan_id.as_uuid(), &released],
    )
    .await?;
    tx.execute_cached(
        "UPDATE quota_windows SET reserved_micros = GREATEST(reserved_micros - $4, 0), updated_at = now()
         WHERE provider = $1 AND window_kind = $2 AND window_start = $3",
        &[&provider, &window, &start, &released],
    )
    .await?;
    let mut detail = json!({
        "provider": provider, "window": window, "window_start": start,
        "reserved_micros": amount, "spent_micros": spent, "released_micros": released,
    });
    if event == "quota.released" {
        // What this event said before settlements had figures: the amount given back.
        detail["amount_micros"] = json!(released);
    }
    tx.audit(actor, event, Some(request_id), Some(plan_id), None, detail);
    Ok(())
}

impl Store {
    /// What is left of `provider`'s quota in the window that `now` falls in (the whole limit in
    /// a window nothing was taken from yet); `None` if the provider has no quota row.
    pub async fn quota(&self, provider: &str, now: DateTime<Utc>) -> Result<Option<QuotaSnapshot>, Error> {
        let report = self.quota_reports(Some(provider), now).await?;
        Ok(report
            .into_iter()
            .next()
            .map(|r| QuotaSnapshot { provider: r.provider, remaining_micros: r.remaining_micros }))
    }

    /// Every provider's quota in the window that `now` falls in, by provider name.
    pub async fn quota_report(&self, now: DateTime<Utc>) -> Result<Vec<QuotaReport>, Error> {
        self.quota_reports(None, now).await
    }

    async fn quota_reports(
        &self,
        provider: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<Vec<QuotaReport>, Error> {
        let kinds: Vec<String> = WINDOWS.iter().map(Window::to_string).collect();
        let starts: Vec<DateTime<Utc>> = WINDOWS.iter().map(|w| w.start(now)).collect();
        let client = self.client().await?;
        let rows = client
            .query_cached(
                "SELECT q.provider, q.window_kind, q.limit_micros, q.configured_micros,
                        COALESCE(w.reserved_micros, 0), COALESCE(w.spent_micros, 0)
                 FROM quotas q
                 JOIN unnest($1::text[], $2::timestamptz[]) AS current (kind, start) ON current.kind = q.window_kind
                 LEFT JOIN quota_windows w ON w.provider = q.provider AND w.window_kind = q.window_kind
                     AND w.window_start = current.start
                 WHERE $3::text IS NULL OR q.provider = $3
                 ORDER BY q.provider",
                &[&kinds, &starts, &provider],
            )
            .await?;
        rows.iter()
            .map(|row| {
                let window = parse_window(row.get(1))?;
                let window_start = window.start(now);
                let (limit, reserved, spent): (i64, i64, i64) = (row.get(2), row.get(4), row.get(5));
                Ok(QuotaReport {
                    provider: row.get(0),
                    window,
                    window_start,
                    window_end: window.next(window_start),
                    limit_micros: limit,
                    configured_micros: row.get(3),
                    reserved_micros: reserved,
                    spent_micros: spent,
                    remaining_micros: limit.saturating_sub(reserved).saturating_sub(spent),
                })
            })
            .collect()
    }

    /// Creates the quota row of a configured provider, or brings it in line with the
    /// configuration: a configured limit that changed since the last start replaces the limit in
    /// force; an unchanged one leaves it, so that `switchyard quota set` outlives restarts. The
    /// window kind is the configured one (a changed kind starts a fresh account of its own).
    /// What is reserved and spent stays as it is.
    pub async fn ensure_quota(&self, provider: &str, limit_micros: i64, window: Window) -> Result<(), Error> {
        if limit_micros < 0 {
            return Err(Error::Refused(format!(
                "the quota of {provider} cannot be negative ({limit_micros})"
            )));
        }
        let client = self.client().await?;
        client
            .execute_cached(
                "INSERT INTO quotas (provider, limit_micros, configured_micros, window_kind) VALUES ($1, $2, $2, $3)
                 ON CONFLICT (provider) DO UPDATE SET
                     limit_micros = CASE WHEN quotas.configured_micros <> EXCLUDED.configured_micros
                         THEN EXCLUDED.limit_micros ELSE quotas.limit_micros END,
                     configured_micros = EXCLUDED.configured_micros,
                     window_kind = EXCLUDED.window_kind,
                     updated_at = now()
                 WHERE quotas.configured_micros <> EXCLUDED.configured_micros
                    OR quotas.window_kind <> EXCLUDED.window_kind",
                &[&provider, &limit_micros, &window.to_string()],
            )
            .await?;
        Ok(())
    }

    /// Sets `provider`'s limit (audited as `quota.limit_set`, by `by`): false if it has no quota
    /// row. The limit stays until this is done again or the workers start with another
    /// configured limit.
    pub async fn set_quota_limit(&self, provider: &str, limit_micros: i64, by: &str) -> Result<bool, Error> {
        if limit_micros < 0 {
            return Err(Error::Refused(format!("a quota cannot be negative ({limit_micros})")));
        }
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = tx
            .query_opt_cached(
                "SELECT limit_micros, configured_micros FROM quotas WHERE provider = $1 FOR UPDATE",
                &[&provider],
            )
            .await?
        else {
            return Ok(false);
        };
        let (before, configured): (i64, i64) = (row.get(0), row.get(1));
        tx.execute_cached(
            "UPDATE quotas SET limit_micros = $2, updated_at = now() WHERE provider = $1",
            &[&provider, &limit_micros],
        )
        .await?;
        let detail = json!({ "provider": provider, "from_micros": before, "to_micros": limit_micros,
                             "configured_micros": configured });
        let audited = Tx::new(&tx);
        audited.audit(by, "quota.limit_set", None, None, None, detail);
        audited.flush().await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The quota reservation of a plan, if its fallback decision made one.
    pub async fn reservation(&self, plan_id: PlanId) -> Result<Option<StoredReservation>, Error> {
        let client = self.client().await?;
        let row = client
            .query_opt_cached(
                "SELECT provider, window_kind, window_start, amount_micros, spent_micros, input_tokens,
                        output_tokens, settled_at, released_micros
                 FROM quota_reservations WHERE plan_id = $1",
                &[&plan_id.as_uuid()],
            )
            .await?;
        row.map(|row| {
            Ok(StoredReservation {
                provider: row.get(0),
                window: parse_window(row.get(1))?,
                window_start: row.get(2),
                amount_micros: row.get(3),
                spent_micros: row.get(4),
                input_tokens: row.get(5),
                output_tokens: row.get(6),
                settled_at: row.get(7),
                released_micros: row.get(8),
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_use_comes_off_the_reservation_until_it_is_used_up() {
        // 30,000 reserved: a use of 7,000 comes off it whole.
        assert_eq!(from_reserved(30_000, 0, 7_000, false), 7_000);
        // 25,000 used before: only 5,000 is left to take; the rest is spent beyond it.
        assert_eq!(from_reserved(30_000, 25_000, 7_000, false), 5_000);
        // Used up, or overrun: nothing left.
        assert_eq!(from_reserved(30_000, 30_000, 7_000, false), 0);
        assert_eq!(from_reserved(30_000, 45_000, 7_000, false), 0);
        // Settled: it holds nothing any more.
        assert_eq!(from_reserved(30_000, 0, 7_000, true), 0);
        // A negative cost (a misconfigured price) takes nothing.
        assert_eq!(from_reserved(30_000, 0, -5, false), 0);
    }

    #[test]
    fn settlement_gives_back_what_was_not_spent() {
        assert_eq!(outstanding(30_000, 7_000), 23_000);
        assert_eq!(outstanding(30_000, 0), 30_000);
        assert_eq!(outstanding(30_000, 30_000), 0);
        assert_eq!(outstanding(30_000, 31_000), 0);
        assert_eq!(outstanding(0, i64::MAX), 0);
        let reservation = StoredReservation {
            provider: "bigmodel".into(),
            window: Window::Daily,
            window_start: Utc::now(),
            amount_micros: 30_000,
            spent_micros: 7_000,
            input_tokens: 100,
            output_tokens: 200,
            settled_at: None,
            released_micros: None,
        };
        assert_eq!(reservation.outstanding_micros(), 23_000);
        let settled =
            StoredReservation { settled_at: Some(Utc::now()), released_micros: Some(23_000), ..reservation };
        assert_eq!(settled.outstanding_micros(), 0);
    }

    #[test]
    fn token_counts_saturate_into_bigint() {
        assert_eq!(tokens(1_234), 1_234);
        assert_eq!(tokens(u64::MAX), i64::MAX);
    }

    #[test]
    fn window_kinds_read_as_stored() {
        for window in WINDOWS {
            assert_eq!(parse_window(&window.to_string()).unwrap(), window);
        }
        assert_eq!(Window::Daily.to_string(), "daily");
        assert_eq!(Window::Monthly.to_string(), "monthly");
        assert!(matches!(parse_window("weekly"), Err(Error::Corrupt(_))));
    }
}
