//! The queue types of `[topology]`: a namespace of quorum queues (what a RabbitMQ cluster runs)
//! carries a request to its end as classic queues do, and the broker itself says which type
//! each queue is: a declaration with other arguments than a queue was declared with is refused
//! (406 PRECONDITION_FAILED), naming the first argument that differs, and the queue's type is
//! one of those it compares.

use std::time::Duration;

use switchyard::agent::{AgentBuilder, Simulate};
use switchyard::model::domain::Resources;
use switchyard::model::ids::AgentId;
use switchyard::pipeline::topology::{Queue, QueueType, Storage, Topology, TopologySettings};

use crate::helpers::*;

const UPTIME_KUMA: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";

fn quorum() -> TopologySettings {
    TopologySettings { queue_type: QueueType::Quorum, ..TopologySettings::default() }
}

/// What the broker says to a declaration of `queue`.
async fn redeclare(app: &TestApp, queue: Queue) -> String {
    let topology = Topology { exchanges: Vec::new(), queues: vec![queue] };
    match app.broker.declare(&topology).await {
        Ok(()) => "accepted".into(),
        Err(err) => err.to_string(),
    }
}

#[tokio::test]
async fn a_quorum_namespace_runs_the_sample_request_to_completion_on_quorum_queues() {
    let app = spawn_app_with(|config| config.topology = quorum()).await;
    let agent = AgentBuilder::new(AgentId::parse("homelab-1").unwrap())
        .capabilities(["deployment", "monitoring", "shell", "docker"])
        .capacity(2)
        .label("target", "homelab")
        .resources(Resources { cpu: 4.0, memory_mb: 8192, gpu: 0 })
        .heartbeat_every(Duration::from_millis(500));
    let agent = app.start_agent(agent, Simulate::new(0.0, 0.0).unwrap()).await;
    wait_registered(&app, "homelab-1").await;

    let id = app.submit(UPTIME_KUMA, true).await;
    let report = app.wait_for(id, |r| matches!(r.status.as_str(), "completed" | "failed" | "rejected")).await;
    assert_eq!(report.status.as_str(), "completed", "{report:#?}");
    let plan = report.plan.as_ref().expect("a plan");
    assert_eq!(plan.tasks.len(), 5, "{plan:#?}");
    assert!(plan.tasks.iter().all(|t| t.status.as_str() == "succeeded"), "{plan:#?}");
    let audit = app.cli(&["audit", &id.to_string()]).await;
    assert!(audit.status.success(), "{}", stdout(&audit));

    // Every queue of the namespace, and the agent's two, are quorum queues: declared as quorum
    // queues again they are accepted (what every worker does at start), declared as classic
    // ones they are refused.
    let topology = Topology::of_namespace(app.names.namespace(), &quorum());
    let agent_id = AgentId::parse("homelab-1").unwrap();
    let agent_queues = [app.names.agent_queue(&agent_id), app.names.agent_control_queue(&agent_id)]
        .map(|name| quorum().agent_queue(name));
    for queue in topology.queues.iter().cloned().chain(agent_queues) {
        assert!(matches!(queue.storage, Storage::Quorum { .. }), "{queue:?}");
        assert_eq!(redeclare(&app, queue.clone()).await, "accepted", "{}", queue.name);
        let classic = redeclare(&app, Queue { storage: Storage::ClassicV2, ..queue.clone() }).await;
        assert!(classic.contains("PRECONDITION_FAILED"), "{}: {classic}", queue.name);
        if queue.dead_letter_exchange.is_none() {
            // Nothing else tells it from a classic queue: the broker names the type.
            let plain = redeclare(&app, Queue::named(&queue.name)).await;
            assert!(plain.contains("inequivalent arg 'x-queue-type'"), "{}: {plain}", queue.name);
        }
    }
    app.broker.declare_agent_queue(&agent_id).await.expect("the agent's queue, as the agent declares it");
    assert!(app.broker.is_healthy());

    // The command line declares them as its configuration says: the wrong type is refused.
    let classic = app.cli(&["topology", "--queue-type", "classic"]).await;
    assert!(!classic.status.success());
    assert!(String::from_utf8_lossy(&classic.stderr).contains("PRECONDITION_FAILED"), "{classic:?}");
    let declared = app.cli(&["topology", "--queue-type", "quorum"]).await;
    assert!(declared.status.success(), "{declared:?}");
    assert!(stdout(&declared).contains(&format!("{}.requests", app.names.namespace())));

    // An agent gone for good is removed, its quorum queues with it (quorum queues refuse a
    // conditional delete: the removal must not try one).
    agent.stop().await.expect("the agent stops");
    let dir = std::env::temp_dir().join(format!("switchyard-cluster-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("switchyard.toml");
    std::fs::write(&config, "[topology]\nqueue_type = \"quorum\"\n").unwrap();
    let removed = app.cli(&["--config", config.to_str().unwrap(), "agents", "remove", "homelab-1"]).await;
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(removed.status.success(), "{removed:?}");
    let gone = app.broker.queue_state(&app.names.agent_queue(&agent_id)).await.unwrap_err();
    assert!(gone.is_not_found(), "{gone}");
}

#[tokio::test]
async fn classic_queues_are_declared_as_version_2_and_agent_queues_without_arguments() {
    let app = spawn_app().await;
    let topology = Topology::of_namespace(app.names.namespace(), &TopologySettings::default());
    for queue in &topology.queues {
        assert_eq!(queue.storage, Storage::ClassicV2);
        // The same queue but for its version: the broker names the version.
        let refused = redeclare(&app, Queue { storage: Storage::Default, ..queue.clone() }).await;
        assert!(refused.contains("inequivalent arg 'x-queue-version'"), "{}: {refused}", queue.name);
    }
    // An agent's queue is what the contract tells agents to declare: durable, no arguments.
    let queue = app.declare_agent_queue("homelab-1").await;
    assert_eq!(redeclare(&app, Queue::named(queue)).await, "accepted");
}
