//! Every metric a process exports, with its name and help text, in this one file; and how the
//! writes a stage committed count in them ([`Metrics::committed`]).
//!
//! The metrics are process-wide, as Prometheus sees a process: one registry, made on first use.
//! A process that serves no endpoint counts all the same, which costs an atomic add per event.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::model::effect::Write;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageOutcome {
    pub stage: &'static str,
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageKind {
    pub stage: &'static str,
    /// `writes` or `deliveries`: the committer's two kinds of batch.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageReason {
    pub stage: &'static str,
    /// The class of a dead letter's reason: `unreadable`, `permanent`, `refused`,
    /// `undeliverable`.
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    pub provider: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentLabels {
    pub agent: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AgentOutcome {
    pub agent: String,
    pub outcome: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Seconds, from a millisecond to about half an hour.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 22))
}

/// Messages in one batch, from 1 to 128 (the committer's largest).
fn batch_sizes() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 8))
}

/// The metrics of a Switchyard process; workers and agents fill different ones.
pub struct Metrics {
    registry: Registry,
    /// What a query names each metric by (see [`exported_names`]).
    names: Vec<String>,
    pub messages: Family<StageOutcome, Counter>,
    pub handling: Histograms<StageLabels>,
    pub batch_size: Histograms<StageKind>,
    pub commit: Histograms<StageKind>,
    pub retries: Family<StageLabels, Counter>,
    pub parked: Family<StageLabels, Counter>,
    pub dead_letters: Family<StageReason, Counter>,
    pub routing_decisions: Family<OutcomeLabels, Counter>,
    pub waiting_tasks: Gauge,
    pub task_wait: Histogram,
    pub quota_reserved: Family<ProviderLabels, Counter>,
    pub quota_spent: Family<ProviderLabels, Counter>,
    pub requests: Histograms<OutcomeLabels>,
    pub broker_reconnects: Counter,
    pub database_connections: Family<StateLabels, Gauge>,
    pub consumers_running: Gauge,
    pub agent_slots_used: Family<AgentLabels, Gauge>,
    pub agent_slots_total: Family<AgentLabels, Gauge>,
    pub agent_tasks: Family<AgentOutcome, Counter>,
    pub agent_task: Histograms<AgentLabels>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let mut metrics = Metrics {
            messages: Family::default(),
            handling: Family::new_with_constructor(seconds),
            batch_size: Family::new_with_constructor(batch_sizes),
            commit: Family::new_with_constructor(seconds),
            retries: Family::default(),
            parked: Family::default(),
            dead_letters: Family::default(),
            routing_decisions: Family::default(),
            waiting_tasks: Gauge::default(),
            task_wait: seconds(),
            quota_reserved: Family::default(),
            quota_spent: Family::default(),
            requests: Family::new_with_constructor(seconds),
            broker_reconnects: Counter::default(),
            database_connections: Family::default(),
            consumers_running: Gauge::default(),
            agent_slots_used: Family::default(),
            agent_slots_total: Family::default(),
            agent_tasks: Family::default(),
            agent_task: Family::new_with_constructor(seconds),
            registry: Registry::default(),
            names: Vec::new(),
        };
        // Counters get `_total` appended when they are written out.
        let r = &mut registry;
        let names = &mut metrics.names;
        add(
            r,
            names,
            "switchyard_messages",
            "Messages a stage handled, by how its handling ended: done, duplicate (handled before), \
             ignored, dead_lettered, parked (for a delayed retry), requeued",
            metrics.messages.clone(),
        );
        add(
            r,
            names,
            "switchyard_handling_seconds",
            "Time from a delivery to its settlement (acknowledged, dead-lettered or parked), per stage",
            metrics.handling.clone(),
        );
        add(
            r,
            names,
            "switchyard_batch_size",
            "Messages committed in one transaction, per stage and kind of batch (writes, deliveries)",
            metrics.batch_size.clone(),
        );
        add(
            r,
            names,
            "switchyard_commit_seconds",
            "Time to apply and commit one batch, per stage and kind of batch",
            metrics.commit.clone(),
        );
        add(
            r,
            names,
            "switchyard_retries",
            "In-process attempts again after a transient failure (or a failed delivery), per stage",
            metrics.retries.clone(),
        );
        add(
            r,
            names,
            "switchyard_parked",
            "Messages parked in their queue's retry queue after a transient failure, per stage",
            metrics.parked.clone(),
        );
        add(
            r,
            names,
            "switchyard_dead_letters",
            "Messages dead-lettered, per stage and reason: unreadable, permanent, refused, undeliverable",
            metrics.dead_letters.clone(),
        );
        add(
            r,
            names,
            "switchyard_routing_decisions",
            "Routing decisions recorded: assigned (to an agent), waiting (for room), failed",
            metrics.routing_decisions.clone(),
        );
        add(
            r,
            names,
            "switchyard_waiting_tasks",
            "Tasks waiting in line for an agent, as the place stage last counted them",
            metrics.waiting_tasks.clone(),
        );
        add(
            r,
            names,
            "switchyard_task_wait_seconds",
            "Time from a task being ready to its routing to an agent (its wait in line included)",
            metrics.task_wait.clone(),
        );
        add(
            r,
            names,
            "switchyard_quota_reserved_micros",
            "External-model quota reserved by fallback decisions, in micro-units of currency, per provider",
            metrics.quota_reserved.clone(),
        );
        add(
            r,
            names,
            "switchyard_quota_spent_micros",
            "External-model quota spent, as providers reported it, in micro-units of currency, per provider",
            metrics.quota_spent.clone(),
        );
        add(
            r,
            names,
            "switchyard_request_seconds",
            "Time from a request's receipt to its end in a stage, by how it ended: completed, failed",
            metrics.requests.clone(),
        );
        add(
            r,
            names,
            "switchyard_broker_reconnects",
            "Connections to the broker made again after one was lost or a consumer failed",
            metrics.broker_reconnects.clone(),
        );
        add(
            r,
            names,
            "switchyard_database_connections",
            "Connections of the database pool: in_use, idle",
            metrics.database_connections.clone(),
        );
        add(
            r,
            names,
            "switchyard_consumers_running",
            "Consumers of this process that are receiving from their queues",
            metrics.consumers_running.clone(),
        );
        add(
            r,
            names,
            "switchyard_agent_slots_used",
            "Tasks an agent is running now",
            metrics.agent_slots_used.clone(),
        );
        add(
            r,
            names,
            "switchyard_agent_slots_total",
            "Tasks an agent may run at once (its capacity)",
            metrics.agent_slots_total.clone(),
        );
        add(
            r,
            names,
            "switchyard_agent_tasks",
            "Task attempts an agent reported, by outcome: succeeded, failed, refused (not its own)",
            metrics.agent_tasks.clone(),
        );
        add(
            r,
            names,
            "switchyard_agent_task_seconds",
            "Time an agent spent on one task attempt",
            metrics.agent_task.clone(),
        );
        metrics.registry = registry;
        metrics
    }

    /// Counts what `writes`, committed by `stage` at `now`, decided: routing decisions and the
    /// wait before them, quota reserved and spent. Requests that end are counted by the caller,
    /// which can read how long they took ([`Metrics::request_ended`]).
    pub fn committed(&self, stage: &'static str, writes: &[Write], now: DateTime<Utc>) {
        for write in writes {
            match write {
                Write::Route(route) => {
                    self.routing_decisions.get_or_create(&OutcomeLabels { outcome: "assigned" }).inc();
                    let waited = (now - route.ready_at).to_std().unwrap_or_default();
                    self.task_wait.observe(waited.as_secs_f64());
                }
                Write::TaskWaiting(_) => {
                    self.routing_decisions.get_or_create(&OutcomeLabels { outcome: "waiting" }).inc();
                }
                Write::WaitExpired(_) => {
                    self.routing_decisions.get_or_create(&OutcomeLabels { outcome: "failed" }).inc();
                }
                // The route stage fails a task that no agent could ever take.
                Write::TaskFailed(_) if stage == "route" => {
                    self.routing_decisions.get_or_create(&OutcomeLabels { outcome: "failed" }).inc();
                }
                Write::Fallback(fallback) => {
                    if let Some(reservation) = &fallback.reserve {
                        self.quota_reserved
                            .get_or_create(&ProviderLabels { provider: reservation.provider.clone() })
                            .inc_by(u64::try_from(reservation.amount_micros).unwrap_or(0));
                    }
                }
                Write::QuotaUsed(used) => {
                    self.quota_spent
                        .get_or_create(&ProviderLabels { provider: used.provider.clone() })
                        .inc_by(u64::try_from(used.cost_micros).unwrap_or(0));
                }
                _ => {}
            }
        }
    }

    /// A request ended `outcome` (completed, failed, rejected, cancelled) `took` after its
    /// receipt.
    pub fn request_ended(&self, outcome: &str, took: std::time::Duration) {
        let outcome = match outcome {
            "completed" => "completed",
            "cancelled" => "cancelled",
            "rejected" => "rejected",
            _ => "failed",
        };
        self.requests.get_or_create(&OutcomeLabels { outcome }).observe(took.as_secs_f64());
    }
}

/// The ids of the requests that `writes` end, if any.
pub fn ended_requests(writes: &[Write]) -> impl Iterator<Item = crate::model::ids::RequestId> + '_ {
    writes.iter().filter_map(|write| match write {
        Write::PlanFinished(finished) => Some(finished.request_id),
        Write::RequestFailed(failed) => Some(failed.request_id),
        Write::Cancel(cancel) => Some(cancel.request_id),
        Write::Approval(approval) if !approval.approved => Some(approval.request_id),
        _ => None,
    })
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

/// Every metric in the text format Prometheus scrapes (OpenMetrics).
pub fn render() -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &METRICS.registry)
        .expect("writing into a String cannot fail");
    text
}

/// The names of the metrics this process exports, as a query names them: a counter's with its
/// `_total`, a histogram's without the `_bucket`, `_sum` and `_count` of its series.
pub fn exported_names() -> Vec<String> {
    METRICS.names.clone()
}

/// Registers `metric` as `name`, and keeps the name a query will use.
fn add<M: prometheus_client::registry::Metric + prometheus_client::encoding::EncodeMetric>(
    registry: &mut Registry,
    names: &mut Vec<String>,
    name: &str,
    help: &str,
    metric: M,
) {
    let counter = matches!(metric.metric_type(), prometheus_client::metrics::MetricType::Counter);
    names.push(if counter { format!("{name}_total") } else { name.to_owned() });
    registry.register(name, help, metric);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_named_once_with_the_switchyard_prefix_and_has_help() {
        let names = exported_names();
        assert_eq!(names.len(), 20, "{names:?}");
        assert_eq!(names.iter().collect::<std::collections::BTreeSet<_>>().len(), names.len(), "{names:?}");
        assert!(names.contains(&"switchyard_messages_total".to_owned()), "{names:?}");
        assert!(names.contains(&"switchyard_handling_seconds".to_owned()), "{names:?}");
        // A metric without a series yet is not written out; one that always has one is, with help.
        let text = render();
        assert!(text.contains("# HELP switchyard_waiting_tasks Tasks waiting"), "{text}");
        assert!(text.contains("# TYPE switchyard_broker_reconnects counter"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn request_outcomes_are_a_closed_set() {
        let metrics = Metrics::new();
        metrics.request_ended("completed", std::time::Duration::from_millis(20));
        metrics.request_ended("cancelled", std::time::Duration::from_millis(20));
        metrics.request_ended("anything else", std::time::Duration::from_millis(20));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &metrics.registry).unwrap();
        assert!(text.contains("switchyard_request_seconds_count{outcome=\"completed\"} 1"), "{text}");
        assert!(text.contains("switchyard_request_seconds_count{outcome=\"failed\"} 1"), "{text}");
        assert!(!text.contains("anything else"), "{text}");
    }
}
