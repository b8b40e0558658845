//! Quota as a scheduled resource, against the real database: reservations per window, the
//! rollover to a new window, real use settling a reservation, and `switchyard quota`.

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::Value;
use switchyard::decisions::fallback::FallbackDecision;
use switchyard::decisions::providers::Window;
use switchyard::model::domain::Plan;
use switchyard::model::effect::{Attempt, Reservation, Write, write};
use switchyard::model::ids::RequestId;
use switchyard::model::wire::{RequestMeta, TokenUsage};
use switchyard::store::{Applied, QuotaReport};
use switchyard::understanding::catalog::Catalog;

use crate::helpers::*;

const PROVIDER: &str = "bigmodel";
/// Three code-generation tasks.
const TEXT: &str = "Write a Python script that exports Postgres, Redis and Nextcloud metrics to the NAS";

/// A request, its decomposition and its plan, written as the stages before fallback would.
async fn new_plan(app: &TestApp) -> (RequestId, Plan) {
    let catalog = Catalog::default();
    let request_id = RequestId::random();
    let decomposition = catalog.decompose(TEXT).unwrap();
    let plan = catalog.plan(request_id, &decomposition).unwrap();
    let meta = RequestMeta {
        request_id,
        text: TEXT.into(),
        submitted_by: Some("tests".into()),
        priority: 0,
        auto_approve: false,
    };
    let writes = [
        Write::Request(write::Request { meta, traceparent: None }),
        Write::Decomposition(write::Decomposition { request_id, decomposition }),
        Write::Plan(write::Plan {
            plan: plan.clone(),
            complexity: switchyard::understanding::complexity::Complexity { score: 0.8, terms: Vec::new() },
            infeasible: Vec::new(),
            duration_basis: Default::default(),
        }),
    ];
    assert_eq!(app.store.apply("tests", None, &writes).await.unwrap(), Applied::Done);
    (request_id, plan)
}

/// The fallback stage's write sending `plan` to `provider`, reserving `amount` in the window
/// that `at` falls in.
fn fallback(request_id: RequestId, plan: &Plan, provider: &str, amount: i64, at: DateTime<Utc>) -> Write {
    Write::Fallback(write::Fallback {
        request_id,
        decision: FallbackDecision::External {
            plan_id: plan.id,
            provider: provider.into(),
            tasks: plan.tasks().iter().map(|t| t.id).collect(),
            reason: "complex enough".into(),
            complexity: 0.8,
            cost_micros: amount,
            // What the store records is the figure after the reservation, not this.
            quota_left_micros: 0,
        },
        reserve: Some(Reservation { provider: provider.into(), amount_micros: amount, window_start: at }),
    })
}

/// A plan sent to [`PROVIDER`] with `amount` reserved in the window of `at`, and approved.
async fn reserved_plan(app: &TestApp, amount: i64, at: DateTime<Utc>) -> (RequestId, Plan) {
    let (request_id, plan) = new_plan(app).await;
    let approval = Write::Approval(write::Approval {
        request_id,
        plan_id: plan.id,
        approved: true,
        by: "tests".into(),
        reason: "go".into(),
    });
    let applied = app
        .store
        .apply("fallback", None, &[fallback(request_id, &plan, PROVIDER, amount, at), approval])
        .await;
    assert_eq!(applied.unwrap(), Applied::Done);
    (request_id, plan)
}

fn used(request_id: RequestId, plan: &Plan, task: usize, attempt: u32, cost_micros: i64) -> Write {
    used_at(request_id, plan, task, attempt, cost_micros, Utc::now())
}

fn used_at(
    request_id: RequestId,
    plan: &Plan,
    task: usize,
    attempt: u32,
    cost_micros: i64,
    at: DateTime<Utc>,
) -> Write {
    Write::QuotaUsed(write::QuotaUsed {
        attempt: Attempt { request_id, plan_id: plan.id, task_id: plan.tasks()[task].id, number: attempt },
        provider: PROVIDER.into(),
        usage: TokenUsage { input_tokens: 1_200, output_tokens: 350 },
        cost_micros,
        used_at: at,
    })
}

async fn report_of(app: &TestApp, provider: &str, now: DateTime<Utc>) -> QuotaReport {
    let reports = app.store.quota_report(now).await.unwrap();
    reports.into_iter().find(|q| q.provider == provider).expect("the provider's quota")
}

/// (reserved, spent, remaining) of [`PROVIDER`] in the window of `now`.
async fn figures(app: &TestApp, now: DateTime<Utc>) -> (i64, i64, i64) {
    let q = report_of(app, PROVIDER, now).await;
    (q.reserved_micros, q.spent_micros, q.remaining_micros)
}

#[tokio::test]
async fn two_plans_racing_for_the_last_quota_reserve_it_once() {
    let app = spawn_app().await;
    let now = Utc::now();
    // Several rounds, each on a quota of its own that covers one of the two plans only.
    for round in 0..5 {
        let provider = format!("race-{round}");
        app.store.ensure_quota(&provider, 50_000, Window::Daily).await.unwrap();
        let (a, plan_a) = new_plan(&app).await;
        let (b, plan_b) = new_plan(&app).await;
        let (write_a, write_b) =
            (fallback(a, &plan_a, &provider, 30_000, now), fallback(b, &plan_b, &provider, 30_000, now));
        let (first, second) = tokio::join!(
            app.store.apply("fallback", None, std::slice::from_ref(&write_a)),
            app.store.apply("fallback", None, std::slice::from_ref(&write_b)),
        );
        let outcomes = [first.unwrap(), second.unwrap()];
        let done: Vec<usize> = (0..2).filter(|&i| outcomes[i] == Applied::Done).collect();
        assert_eq!(done.len(), 1, "exactly one reservation wins: {outcomes:?}");
        let lost = &outcomes[1 - done[0]];
        assert!(
            matches!(lost, Applied::Conflict(reason) if reason.contains("no longer covers 30000 micros")),
            "{lost:?}"
        );

        let q = report_of(&app, &provider, now).await;
        assert_eq!(
            (q.limit_micros, q.reserved_micros, q.spent_micros, q.remaining_micros),
            (50_000, 30_000, 0, 20_000)
        );
        let (winner, loser) = if done[0] == 0 { (&plan_a, &plan_b) } else { (&plan_b, &plan_a) };
        let reservation = app.store.reservation(winner.id).await.unwrap().expect("the winner's reservation");
        assert_eq!((reservation.provider.as_str(), reservation.amount_micros), (provider.as_str(), 30_000));
        let decision = app.store.fallback_decision(winner.id).await.unwrap().unwrap();
        assert_eq!(decision.quota_left_micros(), Some(20_000), "the figure after the reservation");
        // The loser's transaction wrote nothing: its stage decides again on fresh figures.
        assert_eq!(app.store.reservation(loser.id).await.unwrap(), None);
        assert_eq!(app.store.fallback_decision(loser.id).await.unwrap(), None);
    }
}

#[tokio::test]
async fn a_new_window_starts_whole_and_the_old_one_keeps_its_figures() {
    let app = spawn_app().await;
    app.store.ensure_quota(PROVIDER, 100_000, Window::Daily).await.unwrap();
    let late = Utc.with_ymd_and_hms(2030, 1, 15, 23, 30, 0).unwrap();
    let midnight = Utc.with_ymd_and_hms(2030, 1, 16, 0, 0, 0).unwrap();
    let next_day = late + Duration::hours(1);

    // Reserved at 23:30: in the window of the 15th, whatever moment of it the write names.
    let (_, first) = reserved_plan(&app, 30_000, late).await;
    let reservation = app.store.reservation(first.id).await.unwrap().unwrap();
    assert_eq!((reservation.window, reservation.window_start), (Window::Daily, midnight - Duration::days(1)));
    assert_eq!(app.store.quota(PROVIDER, late).await.unwrap().unwrap().remaining_micros, 70_000);

    // An hour later it is the 16th: the whole limit again, with no job run.
    assert_eq!(app.store.quota(PROVIDER, next_day).await.unwrap().unwrap().remaining_micros, 100_000);
    let q = report_of(&app, PROVIDER, next_day).await;
    assert_eq!((q.window_start, q.window_end), (midnight, midnight + Duration::days(1)));
    assert_eq!((q.reserved_micros, q.spent_micros), (0, 0));
    // All of it can be reserved in the new window.
    reserved_plan(&app, 100_000, next_day).await;
    assert_eq!(figures(&app, next_day).await, (100_000, 0, 0));

    // The 15th keeps its own figures.
    let q = report_of(&app, PROVIDER, late).await;
    assert_eq!((q.window_start, q.window_end), (midnight - Duration::days(1), midnight));
    assert_eq!((q.reserved_micros, q.spent_micros, q.remaining_micros), (30_000, 0, 70_000));

    // No quota row, no snapshot.
    assert_eq!(app.store.quota("nobody", late).await.unwrap(), None);

    // A monthly window rolls over at the first of the month.
    app.store.ensure_quota("monthly", 10_000, Window::Monthly).await.unwrap();
    let end_of_january = Utc.with_ymd_and_hms(2030, 1, 31, 23, 59, 59).unwrap();
    let q = report_of(&app, "monthly", end_of_january).await;
    assert_eq!(q.window, Window::Monthly);
    assert_eq!(q.window_start, Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0).unwrap());
    assert_eq!(q.window_end, Utc.with_ymd_and_hms(2030, 2, 1, 0, 0, 0).unwrap());
}

#[tokio::test]
async fn real_use_moves_its_cost_from_reserved_to_spent_once_per_attempt() {
    let app = spawn_app().await;
    app.store.ensure_quota(PROVIDER, 100_000, Window::Monthly).await.unwrap();
    let now = Utc::now();
    let (request_id, plan) = reserved_plan(&app, 30_000, now).await;
    assert_eq!(figures(&app, now).await, (30_000, 0, 70_000));

    let use_1 = used(request_id, &plan, 0, 1, 7_000);
    assert_eq!(app.store.apply("track", None, std::slice::from_ref(&use_1)).await.unwrap(), Applied::Done);
    assert_eq!(figures(&app, now).await, (23_000, 7_000, 70_000));
    // A redelivered result reports the same attempt again: nothing counts twice.
    assert_eq!(app.store.apply("track", None, std::slice::from_ref(&use_1)).await.unwrap(), Applied::Done);
    assert_eq!(figures(&app, now).await, (23_000, 7_000, 70_000));
    let reservation = app.store.reservation(plan.id).await.unwrap().unwrap();
    assert_eq!(
        (reservation.spent_micros, reservation.input_tokens, reservation.output_tokens),
        (7_000, 1_200, 350)
    );
    assert_eq!(reservation.outstanding_micros(), 23_000);

    // Another attempt of the same task is another use; this one overruns the reservation: all of
    // it is spent, and what was reserved just reaches 0.
    let use_2 = used(request_id, &plan, 0, 2, 30_000);
    app.store.apply("track", None, std::slice::from_ref(&use_2)).await.unwrap();
    assert_eq!(figures(&app, now).await, (0, 37_000, 63_000));
    let reservation = app.store.reservation(plan.id).await.unwrap().unwrap();
    assert_eq!((reservation.spent_micros, reservation.outstanding_micros()), (37_000, 0));

    let events = app.store.audit_events(request_id).await.unwrap();
    let uses: Vec<&Value> = events.iter().filter(|(_, e, _)| e == "quota.used").map(|(_, _, d)| d).collect();
    assert_eq!(uses.len(), 2, "one audit row per counted use: {events:#?}");
    assert_eq!(uses[0]["cost_micros"], 7_000);
    assert_eq!(uses[0]["from_reserved_micros"], 7_000);
    assert_eq!(uses[1]["from_reserved_micros"], 23_000);
    assert_eq!(uses[1]["input_tokens"], 1_200);
}

#[tokio::test]
async fn use_without_a_reservation_is_spent_in_the_window_it_happened_in_however_late_recorded() {
    let app = spawn_app().await;
    app.store.ensure_quota(PROVIDER, 100_000, Window::Monthly).await.unwrap();
    let (request_id, plan) = new_plan(&app).await;
    let end_of_january = Utc.with_ymd_and_hms(2030, 1, 31, 23, 59, 59).unwrap();
    let february = Utc.with_ymd_and_hms(2030, 2, 1, 0, 0, 1).unwrap();

    // Recorded, and recorded again (a redelivered result), in February, as far as the clock goes.
    let late = used_at(request_id, &plan, 1, 1, 500, end_of_january);
    for _ in 0..2 {
        assert_eq!(app.store.apply("track", None, std::slice::from_ref(&late)).await.unwrap(), Applied::Done);
    }

    let january = report_of(&app, PROVIDER, end_of_january).await;
    assert_eq!((january.reserved_micros, january.spent_micros), (0, 500));
    let february = report_of(&app, PROVIDER, february).await;
    assert_eq!((february.reserved_micros, february.spent_micros), (0, 0));
}

#[tokio::test]
async fn absurd_reported_use_saturates_instead_of_losing_the_result() {
    let app = spawn_app().await;
    app.store.ensure_quota(PROVIDER, 100_000, Window::Monthly).await.unwrap();
    let now = Utc::now();
    let (request_id, plan) = reserved_plan(&app, 30_000, now).await;
    // Two attempts that each claim to have cost all the money there is.
    for attempt in [1, 2] {
        let huge = used(request_id, &plan, 0, attempt, i64::MAX);
        assert_eq!(app.store.apply("track", None, &[huge]).await.unwrap(), Applied::Done);
    }
    let reservation = app.store.reservation(plan.id).await.unwrap().unwrap();
    assert_eq!((reservation.spent_micros, reservation.outstanding_micros()), (i64::MAX, 0));
}

#[tokio::test]
async fn the_end_of_a_plan_gives_back_what_it_reserved_and_did_not_spend() {
    let app = spawn_app().await;
    let limit = 100_000;
    app.store.ensure_quota(PROVIDER, limit, Window::Monthly).await.unwrap();
    let now = Utc::now();
    let (request_id, plan) = reserved_plan(&app, 30_000, now).await;
    app.store.apply("track", None, &[used(request_id, &plan, 0, 1, 7_000)]).await.unwrap();

    let finished = Write::PlanFinished(write::PlanFinished { request_id, plan_id: plan.id, failure: None });
    assert_eq!(app.store.apply("track", None, std::slice::from_ref(&finished)).await.unwrap(), Applied::Done);
    assert_eq!(figures(&app, now).await, (0, 7_000, limit - 7_000));
    let reservation = app.store.reservation(plan.id).await.unwrap().unwrap();
    assert!(reservation.settled_at.is_some());
    assert_eq!(reservation.released_micros, Some(23_000));
    assert_eq!(reservation.outstanding_micros(), 0);
    // The report of `status` carries it.
    let report = app.store.report(request_id).await.unwrap().unwrap();
    assert_eq!(report.status.as_str(), "completed");
    assert_eq!(report.plan.unwrap().reservation, Some(reservation));

    // Settled once: the same end again, or a late use, gives nothing back twice.
    app.store.apply("track", None, std::slice::from_ref(&finished)).await.unwrap();
    assert_eq!(figures(&app, now).await, (0, 7_000, limit - 7_000));
    app.store.apply("track", None, &[used(request_id, &plan, 1, 1, 1_000)]).await.unwrap();
    assert_eq!(figures(&app, now).await, (0, 8_000, limit - 8_000), "late use is spent, nothing released");

    let events = app.store.audit_events(request_id).await.unwrap();
    let settled: Vec<&Value> =
        events.iter().filter(|(_, e, _)| e == "quota.settled").map(|(_, _, d)| d).collect();
    assert_eq!(settled.len(), 1, "{events:#?}");
    assert_eq!(settled[0]["provider"], PROVIDER);
    assert_eq!(settled[0]["window"], "monthly");
    assert_eq!(
        (&settled[0]["reserved_micros"], &settled[0]["spent_micros"], &settled[0]["released_micros"]),
        (&Value::from(30_000), &Value::from(7_000), &Value::from(23_000))
    );
    let order: Vec<&str> =
        events.iter().map(|(_, e, _)| e.as_str()).filter(|e| e.starts_with("quota.")).collect();
    assert_eq!(order, ["quota.used", "quota.settled", "quota.used"]);

    // A failed plan settles the same way: nothing was used, all of it goes back.
    let (failed_id, failed) = reserved_plan(&app, 10_000, now).await;
    assert_eq!(figures(&app, now).await, (10_000, 8_000, limit - 18_000));
    let failure = Write::PlanFinished(write::PlanFinished {
        request_id: failed_id,
        plan_id: failed.id,
        failure: Some("boom".into()),
    });
    app.store.apply("track", None, &[failure]).await.unwrap();
    assert_eq!(figures(&app, now).await, (0, 8_000, limit - 8_000));
    assert_eq!(app.store.reservation(failed.id).await.unwrap().unwrap().released_micros, Some(10_000));
}

#[tokio::test]
async fn a_limit_set_by_hand_outlives_an_unchanged_configuration_but_not_a_changed_one() {
    let app = spawn_app().await;
    let now = Utc::now();
    app.store.ensure_quota(PROVIDER, 100_000, Window::Monthly).await.unwrap();
    assert!(app.store.set_quota_limit(PROVIDER, 250_000, "ops").await.unwrap());
    assert!(!app.store.set_quota_limit("nobody", 1, "ops").await.unwrap());
    // A worker restarting with the same configuration.
    app.store.ensure_quota(PROVIDER, 100_000, Window::Monthly).await.unwrap();
    let q = report_of(&app, PROVIDER, now).await;
    assert_eq!((q.limit_micros, q.configured_micros), (250_000, 100_000));
    // A changed configuration wins.
    app.store.ensure_quota(PROVIDER, 120_000, Window::Monthly).await.unwrap();
    let q = report_of(&app, PROVIDER, now).await;
    assert_eq!((q.limit_micros, q.configured_micros), (120_000, 120_000));
    // A changed window kind keeps the limit and starts an account of its own.
    reserved_plan(&app, 20_000, now).await;
    app.store.ensure_quota(PROVIDER, 120_000, Window::Daily).await.unwrap();
    let q = report_of(&app, PROVIDER, now).await;
    assert_eq!((q.window, q.limit_micros, q.reserved_micros), (Window::Daily, 120_000, 0));
}

#[tokio::test]
async fn switchyard_quota_shows_and_sets_limits() {
    let app = spawn_app().await;
    let empty = app.cli(&["quota"]).await;
    assert!(empty.status.success(), "{}", String::from_utf8_lossy(&empty.stderr));
    assert!(stdout(&empty).starts_with("no provider has a quota"), "{}", stdout(&empty));

    app.store.ensure_quota("alpha", 5_000_000, Window::Daily).await.unwrap();
    app.store.ensure_quota(PROVIDER, 100_000, Window::Monthly).await.unwrap();
    let now = Utc::now();
    let (request_id, plan) = reserved_plan(&app, 30_000, now).await;
    app.store.apply("track", None, &[used(request_id, &plan, 0, 1, 7_000)]).await.unwrap();

    let text = app.cli(&["quota"]).await;
    assert_eq!(text.status.code(), Some(0), "{}", String::from_utf8_lossy(&text.stderr));
    let out = stdout(&text);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "a header and a line per provider: {out}");
    assert!(lines[0].starts_with("PROVIDER") && lines[0].contains("REMAINING"), "{out}");
    let words = |line: &str| line.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    // In currency units (the micros are in --json).
    assert_eq!(words(lines[1])[..6], ["alpha", "daily", "5.00", "0.00", "0.00", "5.00"]);
    assert_eq!(words(lines[2])[..6], ["bigmodel", "monthly", "0.10", "0.023", "0.007", "0.07"]);
    let resets = Window::Monthly.next(Window::Monthly.start(now)).format("%Y-%m-%d 00:00 UTC").to_string();
    assert!(lines[2].ends_with(&resets), "{out}");

    let json = app.cli(&["quota", "--json"]).await;
    assert!(json.status.success());
    let quotas: Value = serde_json::from_slice(&json.stdout).unwrap();
    let quotas = quotas.as_array().unwrap();
    assert_eq!(quotas.len(), 2);
    assert_eq!(quotas[1]["provider"], PROVIDER);
    assert_eq!(quotas[1]["window"], "monthly");
    let figures = ["limit_micros", "reserved_micros", "spent_micros", "remaining_micros"]
        .map(|field| quotas[1][field].as_i64().unwrap());
    assert_eq!(figures, [100_000, 23_000, 7_000, 70_000]);
    assert!(quotas[1]["window_end"].as_str().unwrap().starts_with(&resets[..10]), "{quotas:?}");

    let set = app.cli(&["quota", "set", PROVIDER, "250_000", "--by", "ops"]).await;
    assert_eq!(set.status.code(), Some(0), "{}", String::from_utf8_lossy(&set.stderr));
    assert!(
        stdout(&set).starts_with(
            "quota of bigmodel set to 0.25 (250000 micros) per monthly window by ops; 0.22 remain until "
        ),
        "{}",
        stdout(&set)
    );
    let after = app.cli(&["quota", "--json"]).await;
    let quotas: Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(
        (&quotas[1]["limit_micros"], &quotas[1]["configured_micros"]),
        (&Value::from(250_000), &Value::from(100_000))
    );
    let text = stdout(&app.cli(&["quota"]).await);
    assert!(text.lines().nth(2).unwrap().ends_with("(configured limit 0.10)"), "{text}");
    let set_json = app.cli(&["quota", "set", "alpha", "1000", "--by", "ops", "--json"]).await;
    let alpha: Value = serde_json::from_slice(&set_json.stdout).unwrap();
    assert_eq!((&alpha["provider"], &alpha["limit_micros"]), (&Value::from("alpha"), &Value::from(1000)));

    // `status` shows the plan's reservation and its use.
    let status = stdout(&app.cli(&["status", &request_id.to_string()]).await);
    let line = status.lines().find(|l| l.starts_with("quota ")).unwrap_or_else(|| panic!("{status}"));
    let month = Window::Monthly.start(now).format("%Y-%m-%d");
    assert_eq!(
        line,
        format!(
            "quota     0.03 of bigmodel reserved in the monthly window from {month}; \
             0.007 spent (1200 input, 350 output tokens); 0.023 still reserved"
        )
    );

    let unknown = app.cli(&["quota", "set", "nosuch", "1"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains(r#"no provider "nosuch"; known providers: alpha, bigmodel"#), "{stderr}");
    let decimal = app.cli(&["quota", "set", PROVIDER, "12.50"]).await;
    assert_eq!(decimal.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&decimal.stderr).contains("12.50 is 12_500_000"));
    let q = report_of(&app, PROVIDER, now).await;
    assert_eq!(q.limit_micros, 250_000, "refused limits change nothing");
}
