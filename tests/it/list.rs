//! `switchyard list`: the requests a user has, newest first, filtered by status, age and count.

use std::process::Output;

use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{TestApp, spawn_app, stdout};

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Records a request that ended long ago, as the stages would have left it.
async fn ended_request(app: &TestApp, status: &str, reason: Option<&str>, hours_ago: i32) -> Uuid {
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let id = Uuid::new_v4();
    client
        .execute(
            "INSERT INTO requests (id, text, submitted_by, priority, auto_approve, status, failure_reason,
                                   created_at, updated_at)
             VALUES ($1, 'an old request', 'tests', 0, true, $2, $3,
                     now() - make_interval(hours => $4), now() - make_interval(hours => $4))",
            &[&id, &status, &reason, &hours_ago],
        )
        .await
        .unwrap();
    id
}

/// The first word of each line after the header: the request ids, in the order listed.
fn listed(output: &Output) -> Vec<String> {
    assert_eq!(output.status.code(), Some(0), "{}", stderr(output));
    let out = stdout(output);
    if out == "no requests\n" {
        return Vec::new();
    }
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("REQUEST") && header.contains("REASON"), "{out}");
    lines.map(|line| line.split_whitespace().next().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn list_shows_requests_newest_first_filtered_by_status_since_and_limit() {
    let app = spawn_app().await;
    let fresh = app.submit("Deploy Uptime Kuma to the homelab and send alerts to Discord", false).await;
    let report = app.wait_for(fresh, |r| r.status.as_str() == "awaiting_approval").await;
    let plan = report.plan.as_ref().unwrap();
    let failed =
        ended_request(&app, "failed", Some("task 1.deploy failed every attempt: disk full"), 3).await;
    let completed = ended_request(&app, "completed", None, 50).await;

    let all = app.cli(&["list"]).await;
    assert_eq!(listed(&all), [fresh.to_string(), failed.to_string(), completed.to_string()]);
    let out = stdout(&all);
    let line = |id: &str| out.lines().find(|l| l.starts_with(id)).unwrap().to_owned();
    let fresh_line = line(&fresh.to_string());
    let words: Vec<&str> = fresh_line.split_whitespace().collect();
    assert_eq!(words[1], "awaiting_approval", "{out}");
    assert_eq!(words[4], format!("0/{}", plan.tasks.len()), "{out}");
    assert!(fresh_line.ends_with(&format!("awaits approval: switchyard approve {}", plan.plan_id)), "{out}");
    let failed_line = line(&failed.to_string());
    assert!(failed_line.contains(" failed ") && failed_line.contains(" 3 h "), "{out}");
    assert!(failed_line.ends_with("task 1.deploy failed every attempt: disk full"), "{out}");
    let completed_line = line(&completed.to_string());
    assert!(completed_line.contains(" completed ") && completed_line.contains(" 2 d "), "{out}");

    assert_eq!(listed(&app.cli(&["list", "--status", "failed"]).await), [failed.to_string()]);
    assert_eq!(listed(&app.cli(&["list", "--status", "in_progress"]).await), Vec::<String>::new());
    assert_eq!(listed(&app.cli(&["list", "--since", "15m"]).await), [fresh.to_string()]);
    assert_eq!(listed(&app.cli(&["list", "--since", "4h"]).await), [fresh.to_string(), failed.to_string()]);
    assert_eq!(listed(&app.cli(&["list", "--limit", "2"]).await), [fresh.to_string(), failed.to_string()]);
    assert_eq!(
        listed(&app.cli(&["list", "--since", "3d", "--status", "completed", "--limit", "1"]).await),
        [completed.to_string()]
    );

    let json = app.cli(&["list", "--json", "--since", "4h"]).await;
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let rows: Value = serde_json::from_slice(&json.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["request_id"], fresh.to_string());
    assert_eq!(rows[0]["status"], "awaiting_approval");
    assert_eq!(rows[0]["plan_id"], plan.plan_id.to_string());
    assert_eq!(rows[0]["tasks_total"], plan.tasks.len());
    assert_eq!(rows[1]["status"], "failed");
    assert_eq!(rows[1]["reason"], "task 1.deploy failed every attempt: disk full");
}

#[tokio::test]
async fn list_refuses_bad_filters_with_exit_2_and_says_why() {
    let app = spawn_app().await;
    let empty = app.cli(&["list"]).await;
    assert_eq!(empty.status.code(), Some(0), "{}", stderr(&empty));
    assert_eq!(stdout(&empty), "no requests\n");

    for (args, says) in [
        (&["list", "--since", "2x"][..], "unknown unit \"x\""),
        (&["list", "--since", "15"], "has no unit"),
        (&["list", "--status", "done"], "a request is one of: received, decomposed"),
        (&["list", "--limit", "0"], "--limit"),
    ] {
        let output = app.cli(args).await;
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(stderr(&output).contains(says), "{args:?}: {}", stderr(&output));
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}
