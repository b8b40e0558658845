//! The cost of one routing decision as the fleet grows.
//!
//! Each case routes over a fleet of N agents (10 to 10,000) built from a fixed formula, so every
//! run sees the same fleet: varied capabilities, labels, loads, resources and track records, so
//! that every filter and every score term does real work, and fresh heartbeats, so that no agent
//! is dismissed on its heartbeat alone. The agents come sorted by id, as the store reads them.
//!
//! Only `route_tasks` is timed, together with dropping the routes it returns (each holds every
//! candidate's verdict for the audit); building the fleet and the tasks is not.
//!
//! Run with `cargo bench --bench routing`.

use std::collections::{BTreeMap, BTreeSet};
use std::hint::black_box;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, TimeZone, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchyard::decisions::routing::{Placement, RoutingPolicy, Verdict, route_tasks};
use switchyard::model::domain::{Agent, Resources, Task};
use switchyard::model::ids::{AgentId, RequestId, WorkType};
use uuid::Uuid;

const FLEET_SIZES: [usize; 4] = [10, 100, 1_000, 10_000];
/// The fleet size of the batch case: a wave routes several ready tasks at once.
const BATCH_FLEET: usize = 10_000;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap()
}

/// A well-mixed 64-bit value from a counter (SplitMix64), so that an agent's attributes are varied
/// but the same on every run.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Picks one of `options` with the bits of `h` that `salt` selects.
fn pick<T: Copy>(h: u64, salt: u32, options: &[T]) -> T {
    options[(h.rotate_right(salt) % options.len() as u64) as usize]
}

/// Whether the agent has a property held by `percent` % of the fleet.
fn chance(h: u64, salt: u32, percent: u64) -> bool {
    h.rotate_right(salt) % 100 < percent
}

fn agent(i: usize) -> Agent {
    let h = mix(i as u64);
    let mut capabilities = BTreeSet::new();
    for (name, salt, percent) in [
        ("ssh", 0, 90),
        ("docker", 7, 75),
        ("systemd", 13, 60),
        ("prometheus", 19, 30),
        ("kubectl", 23, 25),
        ("cuda", 29, 10),
    ] {
        if chance(h, salt, percent) {
            capabilities.insert(name.to_owned());
        }
    }
    let labels = BTreeMap::from([
        ("target".to_owned(), pick(h, 31, &["homelab", "cloud", "edge"]).to_owned()),
        ("zone".to_owned(), pick(h, 37, &["eu", "us", "ap"]).to_owned()),
        ("rack".to_owned(), format!("r{:02}", h.rotate_right(41) % 32)),
        ("os".to_owned(), "linux".to_owned()),
    ]);
    let capacity = pick(h, 43, &[2, 4, 4, 8, 8, 16]);
    // About one agent in ten is full; the others have anything from no load to one slot left.
    let in_flight =
        if chance(h, 47, 10) { capacity } else { (h.rotate_right(53) % u64::from(capacity)) as u32 };
    let resources = Resources {
        cpu: pick(h, 3, &[1.0, 2.0, 4.0, 4.0, 8.0, 16.0]),
        memory_mb: pick(h, 11, &[1_024, 2_048, 4_096, 8_192, 16_384, 32_768]),
        gpu: pick(h, 17, &[0, 0, 0, 0, 1, 2]),
    };
    Agent {
        id: AgentId::parse(format!("agent-{i:05}")).unwrap(),
        capabilities,
        capacity,
        in_flight,
        labels,
        resources,
        // Within the default 30 s TTL: every heartbeat is fresh.
        last_heartbeat: now() - TimeDelta::milliseconds((h.rotate_right(59) % 29_000) as i64),
        succeeded: h.rotate_right(5) % 1_000,
        failed: h.rotate_right(61) % 100,
    }
}

/// `n` agents, sorted by id.
fn fleet(n: usize) -> Vec<Agent> {
    (0..n).map(agent).collect()
}

fn task(
    key: &str,
    work_type: &str,
    capabilities: &[&str],
    resources: Resources,
    affinity: &[(&str, &str)],
) -> Task {
    let plan = RequestId::from_uuid(Uuid::from_u128(0x5317_c4ad)).plan_id();
    Task {
        id: plan.task_id(key),
        key: key.to_owned(),
        work_type: WorkType::parse(work_type).unwrap(),
        description: format!("{key} ({work_type})"),
        estimated_duration_secs: 120,
        resources,
        capabilities: capabilities.iter().map(|c| (*c).to_owned()).collect(),
        depends_on: Vec::new(),
        affinity: affinity.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    }
}

/// The task of the single-decision cases: a deployment with two capabilities, resources and a
/// preference for two labels.
fn deploy_task() -> Task {
    task(
        "1.deploy",
        "deployment",
        &["docker", "ssh"],
        Resources { cpu: 2.0, memory_mb: 2_048, gpu: 0 },
        &[("target", "homelab"), ("zone", "eu")],
    )
}

/// A wave of five tasks of different kinds.
fn wave() -> Vec<Task> {
    vec![
        deploy_task(),
        task(
            "2.monitor",
            "monitoring",
            &["prometheus", "ssh"],
            Resources { cpu: 1.0, memory_mb: 1_024, gpu: 0 },
            &[("target", "homelab")],
        ),
        task(
            "3.backup",
            "backup",
            &["ssh", "systemd"],
            Resources { cpu: 1.0, memory_mb: 4_096, gpu: 0 },
            &[("zone", "eu")],
        ),
        task(
            "4.train",
            "training",
            &["cuda", "docker"],
            Resources { cpu: 8.0, memory_mb: 16_384, gpu: 1 },
            &[("target", "cloud")],
        ),
        task("5.build", "build", &["docker"], Resources { cpu: 4.0, memory_mb: 8_192, gpu: 0 }, &[]),
    ]
}

/// What the fleet made of a route, printed once per case so the figures can be read against it.
fn describe(n: usize, placed: &[Placement]) {
    for placement in placed {
        let Placement::Routed(route) = placement else {
            eprintln!("{n} agents: the task waits");
            continue;
        };
        let eligible = route.candidates.iter().filter(|c| c.verdict.score().is_some()).count();
        let reasons: usize = route
            .candidates
            .iter()
            .map(|c| match &c.verdict {
                Verdict::Rejected { reasons } => reasons.len(),
                Verdict::Scored { .. } => 0,
            })
            .sum();
        eprintln!(
            "{n} agents: {eligible} eligible, {} rejected ({reasons} reasons); chose {}",
            n - eligible,
            route.agent_id
        );
    }
}

fn single_decision(c: &mut Criterion) {
    let policy = RoutingPolicy::default();
    let task = deploy_task();
    let mut group = c.benchmark_group("route_one_task");
    group.sample_size(30).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for n in FLEET_SIZES {
        let agents = fleet(n);
        describe(n, &route_tasks(&[&task], &agents, now(), &policy));
        // Per-element throughput is per agent: constant across sizes means linear growth.
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &agents, |b, agents| {
            b.iter(|| route_tasks(black_box(&[&task]), black_box(agents), now(), &policy))
        });
    }
    group.finish();
}

fn batch_decision(c: &mut Criterion) {
    let policy = RoutingPolicy::default();
    let tasks = wave();
    let tasks: Vec<&Task> = tasks.iter().collect();
    let agents = fleet(BATCH_FLEET);
    describe(BATCH_FLEET, &route_tasks(&tasks, &agents, now(), &policy));
    let mut group = c.benchmark_group("route_five_tasks");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    // One verdict per task and agent.
    group.throughput(Throughput::Elements((tasks.len() * BATCH_FLEET) as u64));
    group.bench_with_input(BenchmarkId::from_parameter(BATCH_FLEET), &agents, |b, agents| {
        b.iter(|| route_tasks(black_box(&tasks), black_box(agents), now(), &policy))
    });
    group.finish();
}

criterion_group!(benches, single_decision, batch_decision);
criterion_main!(benches);
