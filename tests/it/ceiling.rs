//! The broker's ceiling: messages relayed through a chain of queues with confirms and acks, and
//! nothing left behind.

use std::time::{Duration, Instant};

use switchyard::bench::ceiling::{self, Ceiling, CeilingSettings};
use switchyard::broker::{self, Broker};
use switchyard::model::ids::Namespace;
use switchyard::pipeline::topology::Names;

use crate::helpers::amqp_url;

fn fresh_names(label: &str) -> Names {
    let id = uuid::Uuid::new_v4().simple().to_string();
    Names::new(Namespace::parse(format!("t{}-{label}", &id[..12])).unwrap())
}

/// Asserts that no queue of the chain is left (a passive declare fails).
async fn assert_no_queues(names: &Names, hops: usize) {
    let broker = Broker::connect(&amqp_url(), names.clone()).await.expect("the broker");
    for i in 0..=hops + 1 {
        let queue = names.queue(&format!("ceiling.{i}"));
        let err = broker.queue_state(&queue).await.expect_err(&format!("{queue} is left behind"));
        assert!(err.to_string().contains("NOT_FOUND"), "{queue}: {err}");
    }
    broker.close().await;
}

/// Settings of one round; the test gives the rest.
fn one_round() -> CeilingSettings {
    CeilingSettings {
        messages: 0,
        min_duration: Duration::ZERO,
        max_messages: usize::MAX,
        hops: 1,
        prefetch: 200,
        body_bytes: 256,
    }
}

#[tokio::test]
async fn rounds_follow_each_other_until_enough_messages_went_through_and_each_is_reported() {
    let names = fresh_names("rounds");
    // Never long enough: the messages end it, after three rounds.
    let settings = CeilingSettings {
        messages: 300,
        min_duration: Duration::from_secs(3600),
        max_messages: 900,
        hops: 2,
        prefetch: 200,
        body_bytes: 256,
    };
    let ceiling = ceiling::measure(&amqp_url(), &names, &settings).await.expect("a ceiling");
    assert_eq!(ceiling.messages, 900, "{ceiling:?}");
    assert_eq!(ceiling.rounds_hop_messages_per_sec.len(), 3, "{ceiling:?}");
    let (slowest, fastest) = ceiling.spread();
    assert!(0.0 < slowest && slowest <= ceiling.hop_messages_per_sec, "{ceiling:?}");
    assert!(ceiling.hop_messages_per_sec <= fastest, "{ceiling:?}");
    let expected = 900.0 * 2.0 / ceiling.elapsed.as_secs_f64();
    assert!((ceiling.hop_messages_per_sec - expected).abs() < 1e-6, "{ceiling:?}");
    assert_no_queues(&names, 2).await;
}

#[tokio::test]
async fn every_message_goes_through_every_hop_and_no_queue_is_left() {
    let names = fresh_names("ceiling");
    let settings =
        CeilingSettings { messages: 2_000, hops: 5, prefetch: 200, body_bytes: 256, ..one_round() };
    let ceiling = ceiling::measure(&amqp_url(), &names, &settings).await.expect("a ceiling");

    let Ceiling { messages, hops, elapsed, messages_per_sec, hop_messages_per_sec, .. } = ceiling.clone();
    assert_eq!((messages, hops), (2_000, 5));
    assert_eq!(ceiling.rounds_hop_messages_per_sec, [hop_messages_per_sec], "one round");
    assert!(!elapsed.is_zero());
    assert!(messages_per_sec > 0.0 && hop_messages_per_sec > 0.0, "{ceiling:?}");
    let expected = messages_per_sec * 5.0;
    assert!((hop_messages_per_sec - expected).abs() <= expected * 1e-9, "{ceiling:?}");
    assert!((messages_per_sec - 2_000.0 / elapsed.as_secs_f64()).abs() < 1e-6, "{ceiling:?}");
    assert_no_queues(&names, 5).await;
}

#[tokio::test]
async fn a_measure_dropped_midway_leaves_no_queue() {
    let names = fresh_names("dropped");
    let settings =
        CeilingSettings { messages: 1_000_000, hops: 3, prefetch: 200, body_bytes: 256, ..one_round() };
    let measured =
        tokio::time::timeout(Duration::from_millis(1500), ceiling::measure(&amqp_url(), &names, &settings))
            .await;
    assert!(measured.is_err(), "a million messages in a second and a half: {measured:?}");
    // The queues are deleted by a task of their own, soon.
    let broker = Broker::connect(&amqp_url(), names.clone()).await.expect("the broker");
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..=3 {
        let queue = names.queue(&format!("ceiling.{i}"));
        while broker.queue_state(&queue).await.is_ok() {
            assert!(Instant::now() < deadline, "{queue} is left behind");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    broker.close().await;
    assert_no_queues(&names, 3).await;
}

#[tokio::test]
async fn a_relay_that_fails_fails_the_measure_and_no_queue_is_left() {
    let names = fresh_names("failing");
    let settings =
        CeilingSettings { messages: 1_000_000, hops: 3, prefetch: 200, body_bytes: 256, ..one_round() };
    let url = amqp_url();
    let measuring = tokio::spawn({
        let names = names.clone();
        async move { ceiling::measure(&url, &names, &settings).await }
    });
    // Once the middle relay consumes, its queue goes: the relay before it cannot deliver, and
    // the broker cancels the relay's consumer.
    let broker = Broker::connect(&amqp_url(), names.clone()).await.expect("the broker");
    let middle = names.queue("ceiling.1");
    let deadline = Instant::now() + Duration::from_secs(20);
    while broker.queue_state(&middle).await.map_or(true, |state| state.consumers == 0) {
        assert!(Instant::now() < deadline, "the relays never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    broker.delete_queues(std::slice::from_ref(&middle)).await.unwrap();
    broker.close().await;

    let measured = tokio::time::timeout(Duration::from_secs(20), measuring).await.expect("the measure ends");
    let err = measured.unwrap().expect_err("a relay failed");
    assert!(matches!(err, broker::Error::ConsumerEnded(_) | broker::Error::Unroutable { .. }), "{err}");
    assert_no_queues(&names, 3).await;
}

/// The figures of a few runs, for the record (build with `--release`):
/// `cargo nextest run --release --run-ignored only -E 'test(ceiling_figures)' --no-capture`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a test: run it on its own"]
async fn ceiling_figures() {
    for (messages, hops) in [(10_000, 5), (2_000, 7), (10_000, 1)] {
        let names = fresh_names("figures");
        let settings = CeilingSettings { messages, hops, prefetch: 200, body_bytes: 256, ..one_round() };
        let c = ceiling::measure(&amqp_url(), &names, &settings).await.unwrap();
        println!(
            "{messages} messages x {hops} hops: {:.2?}, {:.0} msgs/s, {:.0} hop-msgs/s",
            c.elapsed, c.messages_per_sec, c.hop_messages_per_sec
        );
        assert_no_queues(&names, hops).await;
    }
}
