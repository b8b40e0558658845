//! Plans fitted to the fleet: estimated durations learnt from the tasks that finished.

use switchyard::agent::Simulate;

use crate::helpers::*;

#[tokio::test]
async fn estimates_are_learnt_from_finished_tasks_once_there_are_enough() {
    let app = spawn_app_with(|c| {
        c.planning.min_duration_samples = 3;
        c.planning.history_refresh_secs = 0;
    })
    .await;
    let builder =
        switchyard::agent::AgentBuilder::new(switchyard::model::ids::AgentId::parse("deployer").unwrap())
            .capabilities(["deployment", "shell", "docker"])
            .capacity(4)
            .resources(switchyard::model::domain::Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
            .heartbeat_every(std::time::Duration::from_millis(500));
    // Simulated work at no speed: every task takes (close to) no time at all.
    let _deployer = app.start_agent(builder, Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "deployer").await;

    let mut estimates = Vec::new();
    for _ in 0..4 {
        let id = app.submit("Deploy Gitea", true).await;
        let report = app.wait_for(id, |r| r.status.is_terminal()).await;
        assert_eq!(report.status.as_str(), "completed", "{report:#?}");
        let plan = app.store.plan(id.plan_id()).await.unwrap().unwrap().plan;
        estimates.push(plan.tasks().iter().map(|t| t.estimated_duration_secs).collect::<Vec<_>>());
    }
    // The catalog's 120 s, 300 s and 60 s until three of each step finished, then the duration 90% of them finished within,
    // at least a second.
    assert_eq!(estimates[..3], [vec![120, 300, 60], vec![120, 300, 60], vec![120, 300, 60]]);
    assert_eq!(estimates[3], [1, 1, 1]);
    let rows = app.dump_rows().await;
    // Recorded on each of the three tasks, and in the audit log's account of the plan.
    assert_eq!(
        rows.iter().filter(|r| r.contains("90th percentile of 3 finished tasks")).count(),
        4,
        "{rows:#?}"
    );
}
