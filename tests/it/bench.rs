//! `switchyard bench`, run small: it measures the whole pipeline and the broker's ceiling in the
//! same run, ends with one JSON line of figures, and leaves nothing behind.

use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn bench_measures_the_pipeline_and_the_ceiling_and_cleans_up() {
    let app = spawn_bare_app(|_| {}).await;
    let run = app
        .cli(&[
            "bench",
            "--requests",
            "20",
            "--tasks",
            "3",
            "--in-process",
            "--timeout",
            "120",
            "--ceiling-secs",
            "1",
        ])
        .await;
    let text = stdout(&run);
    assert!(run.status.success(), "{text}{}", String::from_utf8_lossy(&run.stderr));
    let report: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(report["requests"], 20);
    assert_eq!(report["tasks_per_request"], 3);
    assert_eq!(report["mode"], "in-process");
    // By default the fleet has a slot for every task of the run: nothing waits for one.
    assert_eq!((report["agents"].as_u64(), report["agent_capacity"].as_u64()), (Some(2), Some(30)));
    assert!(text.contains("onto 2 agents × 30 slots"), "{text}");
    // Per request: its entry, decomposition, plan and route messages, then per task a dispatch,
    // an assignment and a result.
    assert_eq!(report["pipeline_deliveries"], 20 * (4 + 3 * 3));
    assert!(report["requests_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["tasks_per_sec"].as_f64().unwrap() > 0.0);
    for latency in ["latency_to_last_dispatch", "latency_to_completed"] {
        let l = &report[latency];
        let (p50, p99, max) =
            (l["p50_ms"].as_f64().unwrap(), l["p99_ms"].as_f64().unwrap(), l["max_ms"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}: {l}");
    }
    assert!(
        report["latency_to_last_dispatch"]["p50_ms"].as_f64()
            <= report["latency_to_completed"]["p50_ms"].as_f64()
    );
    assert!(report["peak_rss_mib"][0].as_f64().unwrap() > 0.0);
    assert_eq!(report["ceiling"]["hops"], 7);
    // Rounds of the pipeline's deliveries, for at least a second.
    let per_round = (20 * 13_u64).div_ceil(7);
    let rounds = report["ceiling"]["rounds_hop_messages_per_sec"].as_array().unwrap();
    assert!(!rounds.is_empty());
    assert_eq!(report["ceiling"]["messages"], per_round * rounds.len() as u64);
    assert!(report["ceiling"]["elapsed_secs"].as_f64().unwrap() >= 1.0, "{report}");
    assert!(text.contains(&format!("({} rounds, ", rounds.len())), "{text}");
    assert!(report["ceiling"]["hop_messages_per_sec"].as_f64().unwrap() > 0.0);
    assert!(report["ratio_to_ceiling"].as_f64().unwrap() > 0.0);
    assert!(text.contains("of the ceiling"), "{text}");

    // Its own database and queues are gone, and the caller's database was not touched.
    let namespace = report["namespace"].as_str().unwrap();
    assert!(app.broker.queue_state(&format!("{namespace}.requests")).await.is_err(), "a queue left behind");
    let (client, connection) = tokio_postgres::connect(&database_url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let left = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&report["database"].as_str().unwrap()])
        .await
        .unwrap();
    assert!(left.is_none(), "the run's database was left behind");
    assert!(!app.dump_rows().await.iter().any(|r| r.contains("benchmark request")));
}
