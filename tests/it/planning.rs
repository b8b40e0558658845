//! Plans fitted to the fleet: estimated durations learnt from the tasks that really ran.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use switchyard::agent::{Execution, Simulate, TaskHandler};
use switchyard::model::wire::TaskAssignment;

use crate::helpers::*;

/// An agent that simulates its work until told to run it: then it "runs" each task at once,
/// as an agent whose work really ran and took (close to) no time.
struct Switchable {
    simulating: Arc<AtomicBool>,
    simulate: Simulate,
}

impl TaskHandler for Switchable {
    async fn run(&self, task: &TaskAssignment) -> Execution {
        if self.simulating.load(Ordering::SeqCst) {
            self.simulate.run(task).await
        } else {
            Execution::succeeded(format!("ran {}", task.task.key))
        }
    }
}

#[tokio::test]
async fn estimates_are_learnt_from_tasks_that_really_ran_once_there_are_enough_never_from_simulated_ones() {
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
    let simulating = Arc::new(AtomicBool::new(true));
    // Simulated work at no speed: every task takes (close to) no time at all.
    let handler = Switchable { simulating: simulating.clone(), simulate: Simulate::new(0.0, 0.0).unwrap() };
    let _deployer = app.start_agent(builder, handler).await;
    wait_registered(&app, "deployer").await;

    let mut estimates = Vec::new();
    let mut sources = Vec::new();
    for run in 0..8 {
        if run == 4 {
            simulating.store(false, Ordering::SeqCst);
        }
        let id = app.submit("Deploy Gitea", true).await;
        let report = app.wait_for(id, |r| r.status.is_terminal()).await;
        assert_eq!(report.status.as_str(), "completed", "{report:#?}");
        let plan = app.store.plan(id.plan_id()).await.unwrap().unwrap().plan;
        estimates.push(plan.tasks().iter().map(|t| t.estimated_duration_secs).collect::<Vec<_>>());
        let results = &report.plan.as_ref().unwrap().results;
        sources.push(results.iter().map(|r| r.source.clone()).collect::<Vec<_>>());
    }
    // Four plans' worth of simulated results (twelve tasks, four of each step) teach nothing:
    // the catalog's 120 s, 300 s and 60 s stand. Then three of each step really ran, and the
    // next plan takes the duration 90% of them finished within, at least a second.
    let catalog = vec![120, 300, 60];
    assert_eq!(estimates[..7], vec![catalog; 7]);
    assert_eq!(estimates[7], [1, 1, 1]);
    assert_eq!(sources[0], ["simulated"; 3]);
    assert_eq!(sources[4], ["agent"; 3]);
    let rows = app.dump_rows().await;
    // Recorded on each of the three tasks, and in the audit log's account of the plan.
    assert_eq!(
        rows.iter().filter(|r| r.contains("90th percentile of 3 finished tasks")).count(),
        4,
        "{rows:#?}"
    );

    // A user sees which results were made up.
    let status = app.cli(&["status", &oldest_request(&app, 0).await]).await;
    assert!(stdout(&status).contains("(simulated) simulated "), "{}", stdout(&status));
}

/// The id of the `n`-th oldest request.
async fn oldest_request(app: &TestApp, n: usize) -> String {
    let mut ids: Vec<_> = app
        .store
        .list_requests(&switchyard::store::RequestFilter { status: None, since: None, limit: 100 })
        .await
        .unwrap();
    ids.reverse();
    ids[n].request_id.to_string()
}
