//! `switchyard agents list` and `agents remove` as an operator sees them: health from the
//! heartbeat, the track record in counts, and removing an agent that is gone for good.

use std::process::Output;

use serde_json::Value;

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
