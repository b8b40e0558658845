//! `switchyard why`: a task's attempts, each candidate's verdict with its score term by term, the
//! winner and why it won, why a waiting task waits now, and `--rescore` against today's fleet,
//! all read from the rows the pipeline wrote and writing none.

use std::time::Duration;

use serde_json::Value;
use switchyard::model::ids::{RequestId, TaskId};

use crate::helpers::*;
use crate::tracking::{assignments, report};

/// Maintenance: `1.snapshot` (needing `maintenance` and `shell`) is released first.
const RESTART: &str = "Restart Jellyfin";
const MAINTENANCE: &[&str] = &["maintenance", "shell"];

fn snapshot(id: RequestId) -> TaskId {
    id.plan_id().task_id("1.snapshot")
}

/// Runs `switchyard why ARGS`, which must succeed, and returns what it printed.
async fn why(app: &TestApp, args: &[&str]) -> String {
    let output = app.cli(&[&["why"], args].concat()).await;
    assert!(
        output.status.success(),
        "why {args:?}: {}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    stdout(&output)
}

async fn why_json(app: &TestApp, args: &[&str]) -> Value {
    serde_json::from_str(&why(app, &[args, &["--json"]].concat()).await).expect("JSON")
}

/// Every scored candidate's terms add up to its score, and name its weights as applied.
fn assert_terms_make_the_scores(candidates: &Value) {
    let mut scored = 0;
    for c in candidates.as_array().unwrap().iter().filter(|c| c["verdict"] == "scored") {
        let terms = &c["terms"];
        let sum: f64 = ["load", "success", "affinity"]
            .iter()
            .map(|t| {
                let term = &terms[t];
                let (value, weight) = (term["value"].as_f64().unwrap(), term["weight"].as_f64().unwrap());
                assert_eq!(term["contribution"].as_f64().unwrap(), value * weight, "{c:#}");
                assert_eq!(c["weights"][t], term["weight"], "{c:#}");
                value * weight
            })
            .sum();
        assert!((sum - c["score"].as_f64().unwrap()).abs() < 1e-12, "{c:#}");
        scored += 1;
    }
    assert!(scored > 0, "no scored candidate: {candidates:#}");
}

#[tokio::test]
async fn why_a_routed_task_went_where_it_went_term_by_term() {
    let app = spawn_app().await;
    app.register_agent("alpha", MAINTENANCE, 4, &[]).await;
    app.register_agent("bravo", MAINTENANCE, 4, &[]).await;
    app.register_agent("no-shell", &["maintenance"], 4, &[]).await;
    // Equal, so alpha by its id; then bravo, now less loaded.
    let first = app.submit(RESTART, true).await;
    app.wait_settled(first).await;
    let second = app.submit(RESTART, true).await;
    app.wait_settled(second).await;

    let text = why(&app, &[&first.to_string(), "1.snapshot"]).await;
    assert!(text.contains("attempt 1: routed to alpha, best score "), "{text}");
    assert!(text.contains("tied with bravo: the lowest id wins"), "{text}");

    let text = why(&app, &[&snapshot(second).to_string()]).await;
    assert!(text.contains("task      1.snapshot (maintenance)"), "{text}");
    assert!(text.contains("attempt 1: routed to bravo, best score 0.850, ahead of alpha at 0.725"), "{text}");
    assert!(text.contains("weights: load 0.50, success 0.30, affinity 0.20"), "{text}");
    assert!(
        text.contains("* bravo    0.850 = 1.00×0.50=0.500 + 0.50×0.30=0.150 + 1.00×0.20=0.200"),
        "{text}"
    );
    assert!(text.contains("  alpha    0.725 = 0.75×0.50=0.375 + "), "{text}");
    assert!(text.contains("  no-shell rejected: missing capabilities: shell"), "{text}");
    assert!(text.contains("dispatched at "), "{text}");
    assert!(!text.contains("now ("), "nothing judged now unless asked: {text}");

    let json = why_json(&app, &[&second.to_string(), "1.snapshot"]).await;
    assert_eq!(json["status"], "dispatched");
    let attempts = json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{json:#}");
    let decision = &attempts[0]["decision"];
    assert_eq!(decision["agent_id"], "bravo");
    assert_eq!(decision["choice"]["by"], "best_score");
    assert_eq!(decision["choice"]["runner_up"]["agent_id"], "alpha");
    assert_eq!(decision["terms_recorded"], true);
    assert_terms_make_the_scores(&decision["candidates"]);
    assert!(attempts[0]["now"].is_null());

    // A decision recorded before the weights were kept has its terms' values only.
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .execute(
            "UPDATE routing_decisions SET candidates =
                 (SELECT jsonb_agg(c - 'weights') FROM jsonb_array_elements(candidates) c)
             WHERE task_id = $1",
            &[&snapshot(second).as_uuid()],
        )
        .await
        .unwrap();
    let text = why(&app, &[&snapshot(second).to_string()]).await;
    assert!(text.contains("recorded before the weights of the scores were kept"), "{text}");
    assert!(text.contains("* bravo    0.850   1.00"), "{text}");
    let json = why_json(&app, &[&snapshot(second).to_string()]).await;
    let decision = &json["attempts"][0]["decision"];
    assert_eq!(decision["terms_recorded"], false);
    assert!(decision["candidates"][1]["terms"].is_null(), "{decision:#}");
    assert_eq!(decision["candidates"][1]["load"], 1.0);
}

#[tokio::test]
async fn why_a_retried_task_shows_both_attempts_and_the_failure_between() {
    let app = spawn_app().await;
    app.register_agent("flaky", MAINTENANCE, 2, &[]).await;
    app.register_agent("steady", MAINTENANCE, 1, &[]).await;
    let id = app.submit(RESTART, true).await;
    let first = assignments(&app, "flaky").await;
    report(&app, &first[0], false).await;
    let second = assignments(&app, "steady").await;
    assert_eq!(second[0]["payload"]["attempt"], 2);

    let text = why(&app, &[&id.to_string(), "1.snapshot"]).await;
    let (one, two) = text.split_once("\nattempt 2: ").unwrap_or_else(|| panic!("{text}"));
    assert!(one.contains("attempt 1: routed to flaky, best score"), "{text}");
    assert!(one.contains("failed on flaky after "), "{text}");
    assert!(one.contains(": exit code 1"), "{text}");
    assert!(two.starts_with("routed to steady, best score"), "{text}");
    assert!(two.contains("the only eligible agent"), "{text}");
    assert!(two.contains("  flaky  rejected: failed an earlier attempt of this task"), "{text}");

    let json = why_json(&app, &[&snapshot(id).to_string()]).await;
    let attempts = json["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{json:#}");
    assert_eq!(attempts[0]["results"][0]["success"], false);
    assert_eq!(attempts[1]["decision"]["agent_id"], "steady");
    assert!(attempts[1]["results"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn why_a_waiting_task_waits_says_why_no_agent_fits_now() {
    let app = spawn_app_with(|c| {
        c.routing.default_agents.clear();
        c.routing.recheck_secs = 1;
    })
    .await;
    app.register_agent("no-shell", &["maintenance"], 4, &[]).await;
    let id = app.submit(RESTART, true).await;
    app.wait_for(id, |r| r.plan.as_ref().is_some_and(|p| p.tasks[0].status.as_str() == "waiting")).await;

    let text = why(&app, &[&id.to_string(), "1.snapshot"]).await;
    assert!(text.contains("status    waiting: no agent has capability shell"), "{text}");
    assert!(text.contains("attempt 1: waiting in line for "), "{text}");
    assert!(text.contains("began to wait at "), "{text}");
    assert!(text.contains("): would wait: no agent has capability shell"), "{text}");
    // Side by side: the verdict when it began to wait, and now.
    assert!(text.contains("    AGENT          VERDICT\n"), "{text}");
    assert!(text.contains("  no-shell then  rejected: missing capabilities: shell"), "{text}");
    assert!(text.contains("           now   rejected: missing capabilities: shell"), "{text}");

    let json = why_json(&app, &[&snapshot(id).to_string()]).await;
    let attempt = &json["attempts"][0];
    assert!(attempt["decision"].is_null());
    assert_eq!(attempt["waited"]["reason"], "no agent has capability shell");
    assert_eq!(attempt["now"]["agent_id"], Value::Null);
    assert_eq!(attempt["now"]["choice"]["by"], "no_agent");
    assert_eq!(attempt["now"]["candidates"][0]["reasons"][0], "missing capabilities: shell");

    // An agent that fits comes: `why` says where the task would go now, before it is placed.
    // Two slots: if the task is placed on one while `why` reads, the other still fits it.
    app.register_agent("shell-1", MAINTENANCE, 2, &[]).await;
    let json = why_json(&app, &[&snapshot(id).to_string()]).await;
    let now = &json["attempts"][0]["now"];
    if json["status"] == "waiting" {
        assert_eq!(now["agent_id"], "shell-1", "{json:#}");
    }
}

#[tokio::test]
async fn rescore_puts_today_s_fleet_beside_the_record_and_writes_nothing() {
    let app = spawn_app().await;
    app.register_agent("alpha", MAINTENANCE, 4, &[]).await;
    let id = app.submit(RESTART, true).await;
    app.wait_settled(id).await;
    // Since then: a newcomer, idle, and alpha holds the task's slot.
    app.register_agent("zulu", MAINTENANCE, 4, &[]).await;
    // Let the pipeline settle, so that only `why` could write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = app.dump_rows().await;

    let text = why(&app, &[&id.to_string(), "1.snapshot", "--rescore"]).await;
    assert!(text.contains("attempt 1: routed to alpha, best score 0.850, the only eligible agent"), "{text}");
    assert!(text.contains("): would go to zulu, best score 0.850, ahead of alpha at 0.725"), "{text}");
    assert!(text.contains("(now, alpha's load counts the slot that this attempt holds)"), "{text}");
    assert!(text.contains("* alpha then  0.850 = 1.00×0.50=0.500"), "{text}");
    assert!(text.contains("        now   0.725 = 0.75×0.50=0.375"), "{text}");
    assert!(text.contains("  zulu  then  not a candidate"), "{text}");
    assert!(text.contains("*       now   0.850 = 1.00×0.50=0.500"), "{text}");

    let json = why_json(&app, &[&snapshot(id).to_string(), "--rescore"]).await;
    let attempt = &json["attempts"][0];
    assert_eq!(attempt["decision"]["agent_id"], "alpha");
    assert_eq!(attempt["now"]["agent_id"], "zulu");
    assert_terms_make_the_scores(&attempt["now"]["candidates"]);
    assert_eq!(app.dump_rows().await, before, "why --rescore wrote nothing");
}

#[tokio::test]
async fn why_an_unknown_task_exits_2_and_says_what_there_is() {
    let app = spawn_app().await;
    app.register_agent("alpha", MAINTENANCE, 4, &[]).await;
    let id = app.submit(RESTART, true).await;
    app.wait_settled(id).await;
    let failing = async |args: &[&str]| {
        let output = app.cli(&[&["why"], args].concat()).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}: {}", stdout(&output));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let unknown = RequestId::random().to_string();
    assert!(failing(&[&unknown]).await.contains(&format!("no task {unknown}")));
    assert!(failing(&[&unknown, "1.snapshot"]).await.contains(&format!("no request {unknown}")));
    let error = failing(&[&id.to_string(), "9.nope"]).await;
    assert!(
        error.contains(&format!(
            "request {id} has no task \"9.nope\"; its tasks: 1.snapshot, 1.apply, 1.verify"
        )),
        "{error}"
    );
    let error = failing(&[&id.to_string()]).await;
    assert!(error.contains("is a request, not a task"), "{error}");
    assert!(failing(&["not-a-uuid"]).await.contains("invalid value"));
}
