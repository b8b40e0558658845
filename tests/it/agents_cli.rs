//! `switchyard agents list` and `agents remove` as an operator sees them: health from the
//! heartbeat, the track record in counts, and removing an agent that is gone for good.

use std::process::Output;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde_json::Value;
use switchyard::agent::{AgentBuilder, Simulate};
use switchyard::model::ids::AgentId;

use crate::helpers::*;

const MAINTENANCE: &[&str] = &["maintenance", "shell"];

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `agent.removed` events of the audit log: (actor, detail).
async fn removals(app: &TestApp) -> Vec<(String, Value)> {
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows = client
        .query("SELECT actor, detail FROM audit_log WHERE event = 'agent.removed' ORDER BY id", &[])
        .await
        .unwrap();
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// The cells of a line of `agents list`: columns are two spaces apart or more.
fn cells(line: &str) -> Vec<String> {
    line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_owned).collect()
}

/// Registers an agent whose last heartbeat is `secs_ago` old, announcing `every_secs`, with a
/// track record.
async fn agent_with(app: &TestApp, id: &str, secs_ago: i64, every_secs: Option<u32>, record: (i64, i64)) {
    let mut heartbeat = app.heartbeat(id, MAINTENANCE, 2, &[]);
    heartbeat.sent_at = Some(Utc::now() - TimeDelta::seconds(secs_ago));
    heartbeat.every_secs = every_secs;
    app.store.register_agent("tests", heartbeat).await.unwrap();
    let (client, connection) =
        tokio_postgres::connect(&app.config.database_url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
        .execute("UPDATE agents SET succeeded = $2, failed = $3 WHERE id = $1", &[&id, &record.0, &record.1])
        .await
        .unwrap();
}

#[tokio::test]
async fn agents_list_shows_counts_rates_heartbeat_ages_and_health() {
    let app = spawn_app().await;
    agent_with(&app, "a-perfect", 0, Some(5), (5, 0)).await;
    agent_with(&app, "b-new", 1, Some(5), (0, 0)).await;
    agent_with(&app, "c-flaky", 2, Some(5), (3, 1)).await;
    agent_with(&app, "d-quiet", 12, Some(5), (1, 0)).await;
    agent_with(&app, "e-gone", 300, Some(5), (0, 2)).await;
    agent_with(&app, "f-by-hand", 20, None, (0, 0)).await;

    let list = app.cli(&["agents", "list"]).await;
    assert_eq!(list.status.code(), Some(0), "{}", stderr(&list));
    let out = stdout(&list);
    let mut lines: Vec<Vec<String>> = out.lines().map(cells).collect();
    let row = |cells: &[&str]| cells.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    assert_eq!(
        lines[0],
        row(&["AGENT", "HEALTH", "HEARTBEAT", "SLOTS", "SUCCEEDED", "ROUTED AS", "CAPABILITIES"])
    );
    // How long ago each beat, in seconds: at least what it was when registered, and a few seconds
    // more at most however slow the machine.
    for (line, registered) in lines[1..].iter_mut().zip([0, 1, 2, 12, 300, 20]) {
        let heartbeat = line.remove(2);
        if registered == 300 {
            assert_eq!(heartbeat, "5 min ago");
            continue;
        }
        let secs: i64 = heartbeat.strip_suffix(" s ago").unwrap().parse().unwrap();
        assert!((registered..registered + 4).contains(&secs), "{out}");
    }
    assert_eq!(lines[1], row(&["a-perfect", "online", "0/2", "5/5, 100%", "86%", "maintenance,shell"]));
    assert_eq!(lines[2], row(&["b-new", "online", "0/2", "-", "50%", "maintenance,shell"]));
    assert_eq!(lines[3], row(&["c-flaky", "online", "0/2", "3/4, 75%", "67%", "maintenance,shell"]));
    assert_eq!(lines[4], row(&["d-quiet", "silent", "0/2", "1/1, 100%", "67%", "maintenance,shell"]));
    assert_eq!(lines[5], row(&["e-gone", "offline", "0/2", "0/2, 0%", "25%", "maintenance,shell"]));
    assert_eq!(lines[6], row(&["f-by-hand", "online", "0/2", "-", "50%", "maintenance,shell"]));
    assert_eq!(lines.len(), 7, "{out}");

    let json = app.cli(&["agents", "list", "--json"]).await;
    assert_eq!(json.status.code(), Some(0), "{}", stderr(&json));
    let agents: Value = serde_json::from_slice(&json.stdout).unwrap();
    let health: Vec<&str> =
        agents.as_array().unwrap().iter().map(|a| a["health"].as_str().unwrap()).collect();
    assert_eq!(health, ["online", "online", "online", "silent", "offline", "online"]);
    assert_eq!(agents[0]["succeeded"], 5);
    assert_eq!(agents[0]["heartbeat_every_secs"], 5);
    assert!((12..16).contains(&agents[3]["heartbeat_age_secs"].as_i64().unwrap()), "{agents:#}");
    assert!((agents[0]["routed_success_rate"].as_f64().unwrap() - 6.0 / 7.0).abs() < 1e-9);
    assert_eq!(agents[5]["heartbeat_every_secs"], Value::Null);
}

#[tokio::test]
async fn agents_list_shows_a_stopped_agent_silent_well_before_the_ttl() {
    let app = spawn_app().await;
    let builder = AgentBuilder::new(AgentId::parse("stops").unwrap())
        .capabilities(["maintenance"])
        .heartbeat_every(Duration::from_secs(2));
    let agent = app.start_agent(builder, Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "stops").await;
    let health = |out: String| cells(out.lines().nth(1).unwrap())[1].clone();
    assert_eq!(health(stdout(&app.cli(&["agents", "list"]).await)), "online");

    agent.stop().await.unwrap();
    // Every 2 s, it said: 3 s without a beat is a missed one, long before the 30 s TTL.
    tokio::time::sleep(Duration::from_millis(3_600)).await;
    assert_eq!(health(stdout(&app.cli(&["agents", "list"]).await)), "silent");
}

async fn agent_ids(app: &TestApp) -> Vec<String> {
    app.store.agents().await.unwrap().into_iter().map(|a| a.id.as_str().to_owned()).collect()
}

#[tokio::test]
async fn agents_remove_is_refused_while_tasks_are_in_flight_then_removes_and_audits() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", MAINTENANCE, 2, &[]).await;
    app.register_agent("spare", MAINTENANCE, 1, &[("target", "elsewhere")]).await;
    for agent in ["homelab-1", "spare"] {
        // What `agents register` and a running agent declare besides.
        app.broker.declare_queue(&format!("{}.control", app.agent_queue(agent))).await.unwrap();
    }
    let id = app.submit("Restart Jellyfin on the homelab", true).await;
    let report = app.wait_settled(id).await;
    let task = &report.plan.as_ref().unwrap().tasks[0];
    assert_eq!(task.status.as_str(), "dispatched", "{report:#?}");
    let busy = task.agent_id.clone().unwrap();
    let idle = if busy == "homelab-1" { "spare" } else { "homelab-1" };

    let refused = app.cli(&["agents", "remove", &busy, "--by", "ops"]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stdout(&refused));
    let said = stderr(&refused);
    assert!(
        said.contains(&format!("agent {busy} has 1 task in flight; remove it once it has finished")),
        "{said}"
    );
    assert!(said.contains(&format!("of request {id} (dispatched)")), "{said}");
    assert!(refused.stdout.is_empty());
    assert!(agent_ids(&app).await.contains(&busy));
    assert!(removals(&app).await.is_empty());

    // Nothing runs on the other one: its row and its empty queues go.
    let removed = app.cli(&["agents", "remove", idle, "--by", "ops"]).await;
    assert_eq!(removed.status.code(), Some(0), "{}", stderr(&removed));
    let out = stdout(&removed);
    assert!(
        out.starts_with(&format!("agent {idle} removed by ops (0 succeeded, 0 failed; last heartbeat ")),
        "{out}"
    );
    assert!(out.contains(&format!("queue {} deleted", app.agent_queue(idle))), "{out}");
    assert!(out.contains(&format!("queue {}.control deleted", app.agent_queue(idle))), "{out}");
    let gone = app.broker.queue_state(&app.agent_queue(idle)).await;
    assert!(gone.is_err_and(|e| e.is_not_found()), "the queue is deleted");
    assert_eq!(agent_ids(&app).await, std::slice::from_ref(&busy));

    // Once its task is no longer in flight, the busy one goes too; the task it was sent still
    // sits in its queue, which is kept for whoever looks.
    let cancel = app.cli(&["cancel", &id.to_string(), "--reason", "moving house"]).await;
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    let removed = app.cli(&["agents", "remove", &busy, "--by", "ops"]).await;
    assert_eq!(removed.status.code(), Some(0), "{}", stderr(&removed));
    let out = stdout(&removed);
    assert!(out.contains(&format!("queue {} kept: 1 message waits in it", app.agent_queue(&busy))), "{out}");
    assert!(agent_ids(&app).await.is_empty());

    let audited = removals(&app).await;
    assert_eq!(audited.len(), 2, "{audited:?}");
    assert_eq!(audited[0].0, "ops");
    assert_eq!(audited[0].1["agent_id"], idle);
    assert_eq!(audited[0].1["capacity"], 1);
    assert_eq!(audited[1].1["agent_id"], busy.as_str());

    let unknown = app.cli(&["agents", "remove", "ghost"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(stderr(&unknown).contains("no agent ghost"), "{}", stderr(&unknown));
    assert_eq!(removals(&app).await.len(), 2);
}
