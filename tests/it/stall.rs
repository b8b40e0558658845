//! A consumer that stops receiving without anything being closed is noticed and replaced. The
//! broker's process serving the consumer's channel is suspended: the connection stays up and
//! says nothing, and messages wait in the queue. The worker notices, connects again, and the
//! new consumer takes what waits.

use std::time::{Duration, Instant};

use switchyard::pipeline::worker::StageName;

use crate::helpers::*;

/// Runs Erlang code on the broker node, returning what it printed.
fn broker_eval(code: &str) -> String {
    let output =
        std::process::Command::new("rabbitmqctl").args(["-q", "eval", code]).output().expect("rabbitmqctl");
    assert!(output.status.success(), "{code}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Suspends the channel processes of `queue`'s consumers; returns them, for [`resume`].
fn suspend_consumers(queue: &str) -> Vec<String> {
    let printed = broker_eval(&format!(
        r#"{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)),
           Pids = [element(1, C) || C <- rabbit_amqqueue:consumers(Q)],
           [sys:suspend(P) || P <- Pids],
           string:join([pid_to_list(P) || P <- Pids], " ")."#
    ));
    printed.trim_matches('"').split_whitespace().map(str::to_owned).collect()
}

fn resume(pids: &[String]) {
    for pid in pids {
        let _ = broker_eval(&format!(r#"catch sys:resume(list_to_pid("{pid}"))."#));
    }
}

#[tokio::test]
async fn a_consumer_that_stops_receiving_is_noticed_and_replaced() {
    // A prefetch of 1: the first message goes to the stalled consumer, the next waits ready.
    let mut app = spawn_bare_app(|c| {
        c.worker.stall_after_secs = 2;
        c.worker.prefetch = 1;
    })
    .await;
    app.start_worker(&[StageName::Decompose]).await;
    let queue = app.names.queue("requests");
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.broker.consumer_count(&queue).await.unwrap() == 0 {
        assert!(Instant::now() < deadline, "the stage never consumed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let suspended = suspend_consumers(&queue);
    assert_eq!(suspended.len(), 1, "{suspended:?}");

    let held = app.submit("Deploy Gitea to the homelab", true).await;
    let waiting = app.submit("Deploy Uptime Kuma to the homelab", true).await;
    // Noticing takes the patience, then the stalled channel's cancel and close go unanswered
    // for a few seconds each before the worker connects again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let report = app.store.report(waiting).await.unwrap();
        if report.as_ref().is_some_and(|r| r.status.as_str() == "decomposed") {
            break;
        }
        assert!(Instant::now() < deadline, "the waiting request was never taken: {report:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The message the stalled consumer held goes back to the queue once its channel is gone.
    resume(&suspended);
    app.wait_for(held, |r| r.status.as_str() == "decomposed").await;
}
