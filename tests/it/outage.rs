//! The database goes away while requests arrive: nothing is lost, and everything completes once
//! it is back.

use std::time::Duration;

use switchyard::store;

use crate::helpers::*;

#[tokio::test]
async fn requests_that_arrive_while_the_database_is_down_complete_once_it_is_back() {
    let app = spawn_app().await;
    app.register_agent("homelab-1", &["deployment", "shell"], 8, &[]).await;
    store::admin::set_connections_allowed(&database_url(), &app.database, false).await.unwrap();
    let first = app.submit("Deploy Gitea to the homelab", true).await;
    let second = app.submit("Deploy Nextcloud to the homelab", true).await;

    // The decompose stage cannot write: after its in-process retries it parks both requests in
    // the retry queue, from which the broker brings them back.
    let retry = app.names.queue("requests.retry");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut seen_waiting = false;
    while !seen_waiting && tokio::time::Instant::now() < deadline {
        seen_waiting = app.broker.queue_len(&retry).await.unwrap() > 0;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_waiting, "the requests were never parked for a retry");

    store::admin::set_connections_allowed(&database_url(), &app.database, true).await.unwrap();
    for id in [first, second] {
        let report = app.wait_settled(id).await;
        assert_eq!(report.status.as_str(), "in_progress", "{report:#?}");
        let audit = app.cli(&["audit", &id.to_string()]).await;
        assert!(audit.status.success(), "{}", stdout(&audit));
    }
    assert_eq!(app.drain(&app.agent_queue("homelab-1")).await.len(), 2, "one task per request, none lost");
    assert!(
        app.store.dead_letters_of_stage("decompose").await.unwrap().is_empty(),
        "an outage is not bad input"
    );
}
