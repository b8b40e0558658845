//! The public contract: the checked-in JSON Schemas and the topology on the broker.

use crate::helpers::*;

#[tokio::test]
async fn checked_in_schemas_match_the_message_types() {
    let app = spawn_app().await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/queues/schemas");
    let output = app.cli(&["schemas", "--check", dir]).await;
    assert!(output.status.success(), "stale schemas: {}", stdout(&output));
}

#[tokio::test]
async fn topology_command_declares_every_queue_under_the_namespace() {
    let app = spawn_app().await;
    let output = app.cli(&["topology"]).await;
    assert!(output.status.success());
    let queues: Vec<String> = stdout(&output).lines().map(str::to_owned).collect();
    let prefix = format!("{}.", app.names.namespace());
    assert!(queues.iter().all(|q| q.starts_with(&prefix)), "{queues:?}");
    for queue in
        ["requests", "decomposed", "planned", "route", "dispatch", "heartbeats", "dead", "requests.retry"]
    {
        let name = app.names.queue(queue);
        assert!(queues.contains(&name), "{name} missing from {queues:?}");
        app.broker.queue_len(&name).await.unwrap_or_else(|e| panic!("{name} is not on the broker: {e}"));
    }
}
