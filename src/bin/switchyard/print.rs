//! Text output of the command line.

use std::collections::HashMap;

use chrono::{DateTime, TimeDelta, Utc};
use switchyard::decisions::fallback::FallbackDecision;
use switchyard::model::domain::{Agent, PlanStatus, RequestStatus, TaskStatus};
use switchyard::model::ids::TaskId;
use switchyard::store::{
    DeadLetter, ListedAgent, PlanReport, QuotaReport, RequestReport, RequestSummary, StoredReservation,
    TaskState,
};
use switchyard::understanding::complexity::Complexity;

use crate::agents::Health;

/// One line that changes whenever the request or one of its tasks moves.
pub fn state_line(report: &RequestReport) -> String {
    let mut line = format!("request {}", report.status);
    if let Some(plan) = &report.plan {
        let tasks: Vec<String> = plan.tasks.iter().map(|t| format!("{}={}", t.key, t.status)).collect();
        line.push_str(&format!(" | plan {} | {}", plan.status, tasks.join(" ")));
        if report.status == RequestStatus::AwaitingApproval {
            // What to do next, ready to paste.
            let id = report.request_id;
            line.push_str(&format!(
                "\nto run it: switchyard approve {id}    to refuse it: switchyard reject {id} --reason \"…\""
            ));
        }
    }
    line
}

/// Reasons as said once: a reason that repeats one already said (a task cancelled because the
/// plan failed, with the plan's reason in it) says "(as above)" where the repeat was.
#[derive(Default)]
struct Said(Vec<String>);

impl Said {
    fn once(&mut self, reason: &str) -> String {
        // Long enough to be a reason, not a word that happens to recur.
        let long = |text: &str| text.len() > 20;
        if long(reason) && self.0.iter().any(|said| said.contains(reason)) {
            return "(as above)".to_owned();
        }
        let shortened = self
            .0
            .iter()
            .filter(|said| long(said))
            .fold(reason.to_owned(), |text, said| text.replace(said.as_str(), "as above"));
        if shortened == reason {
            self.0.push(reason.to_owned());
        }
        shortened
    }
}

/// An amount of micros in currency units: at least two decimals, up to the six that micros have
/// (30,000 micros: "0.03"; 3,085: "0.003085"; 12,500,000: "12.50"). `--json` gives the micros.
pub fn units(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let micros = micros.unsigned_abs();
    let fraction = format!("{:06}", micros % 1_000_000);
    let fraction = fraction.trim_end_matches('0');
    format!("{sign}{}.{fraction:0<2}", micros / 1_000_000)
}

/// A time, to the second, in UTC.
fn at(time: DateTime<Utc>) -> String {
    time.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The report of a request; `waits` says why each waiting task waits, as things stand now.
pub fn report(report: &RequestReport, waits: &HashMap<TaskId, String>) {
    let mut said = Said::default();
    println!("request   {}", report.request_id);
    println!("status    {}", report.status);
    if let Some(reason) = &report.failure_reason {
        println!("reason    {}", said.once(reason));
    }
    println!("created   {}", at(report.created_at));
    println!("text      {}", report.text);
    if let Some(by) = &report.submitted_by {
        println!("by        {by}");
    }
    if let Some(decomposer) = &report.decomposer {
        let intents = report.intents.as_ref().and_then(|v| v.as_array()).map_or(0, Vec::len);
        let confidence = report.confidence.map_or(String::new(), |c| format!(", confidence {c:.2}"));
        println!("decomposed by {decomposer} into {intents} intent(s){confidence}");
        if let Some(why) = &report.decomposer_fallback {
            println!("          {why}");
        }
    }
    if let Some(p) = &report.plan {
        plan(p, waits, &mut said);
    }
    for dead in &report.dead_letters {
        println!("dead letter at {} ({}): {}", dead.stage, dead.queue, said.once(&dead.reason));
    }
}

/// A plan: its complexity, fallback, quota and approval, then its tasks.
fn plan(plan: &PlanReport, waits: &HashMap<TaskId, String>, said: &mut Said) {
    println!("plan      {} ({}, complexity {:.3})", plan.plan_id, plan.status, plan.complexity);
    if !plan.complexity_terms.is_empty() {
        let complexity = Complexity { score: plan.complexity, terms: plan.complexity_terms.clone() };
        println!("          complexity {}", complexity.explain());
    }
    for stuck in &plan.infeasible {
        println!("          no agent can run {}: {}", stuck.key, stuck.reason);
    }
    if let Some(f) = &plan.fallback {
        let target = match f {
            FallbackDecision::Local { .. } => "local",
            FallbackDecision::External { .. } => "external",
            FallbackDecision::Infeasible { .. } => "infeasible",
        };
        println!("fallback  {target}: {}", f.reason());
    }
    if let Some(r) = &plan.reservation {
        println!("quota     {}", reservation(r));
    }
    if let Some(a) = &plan.approval {
        let verdict = if a.approved { "approved" } else { "rejected" };
        println!("approval  {verdict} by {}: {}", a.decided_by, a.reason);
    }
    println!("tasks");
    for t in &plan.tasks {
        task(t, plan, waits, said);
    }
}

/// A task's line, its description, why it waits if it does, when each attempt went out, and
/// each attempt's result.
fn task(t: &TaskState, plan: &PlanReport, waits: &HashMap<TaskId, String>, said: &mut Said) {
    // Tasks of a plan rejected or cancelled before its tasks were closed with it were left
    // pending: they will never run, and say so.
    let ended = matches!(plan.status, PlanStatus::Rejected | PlanStatus::Cancelled)
        && matches!(t.status, TaskStatus::Pending | TaskStatus::Waiting);
    let status = if ended { format!("{} (never run)", plan.status) } else { t.status.to_string() };
    println!(
        "  {:<24} {:<16} {:<15} attempt {} agent {}",
        t.key,
        t.work_type,
        status,
        t.attempt,
        t.agent_id.as_deref().unwrap_or("-")
    );
    println!("  {:<24} {}", "", t.description);
    match (t.waiting_since, waits.get(&t.id).or(t.reason.as_ref())) {
        (Some(since), Some(reason)) => {
            let waited = (Utc::now() - since).num_seconds().max(0);
            println!("  {:<24} waiting {waited} s: {}", "", said.once(reason));
        }
        (_, Some(reason)) => println!("  {:<24} {}", "", said.once(reason)),
        (_, None) => {}
    }
    for d in plan.dispatches.iter().filter(|d| d.task_id == t.id) {
        println!("  {:<24} attempt {} dispatched to {} at {}", "", d.attempt, d.agent_id, at(d.confirmed_at));
    }
    let results = &plan.results;
    for r in results.iter().filter(|r| r.task_id == t.id) {
        let outcome = if r.success { "succeeded" } else { "failed" };
        let took = (r.finished_at - r.started_at).num_milliseconds();
        let detail = match (&r.error, r.output.lines().next()) {
            (Some(error), _) => error.clone(),
            (None, Some(first)) => first.to_owned(),
            (None, None) => String::new(),
        };
        println!(
            "  {:<24} attempt {} on {}: {outcome} in {took} ms, finished at {} ({}) {}",
            "",
            r.attempt,
            r.agent_id,
            at(r.finished_at),
            r.source,
            said.once(&detail)
        );
    }
}

pub fn dead_letters<'a>(dead_letters: impl IntoIterator<Item = &'a DeadLetter>) {
    for dead in dead_letters {
        println!("dead letter at {} ({}): {}", dead.stage, dead.queue, dead.reason);
    }
}

/// The agents of `agents list`, one line each (see its help for the columns).
pub fn agents(agents: &[ListedAgent], ttl_secs: u64, now: DateTime<Utc>) {
    if agents.is_empty() {
        println!("no agents registered");
        return;
    }
    println!(
        "{:<24}  {:<7}  {:<10}  {:>7}  {:>12}  {:>9}  CAPABILITIES",
        "AGENT", "HEALTH", "HEARTBEAT", "SLOTS", "SUCCEEDED", "ROUTED AS"
    );
    for listed in agents {
        let agent = &listed.agent;
        let since = now - agent.last_heartbeat;
        let health = Health::of(since, listed.heartbeat_every_secs, ttl_secs);
        let caps: Vec<&str> = agent.capabilities.iter().map(String::as_str).collect();
        println!(
            "{:<24}  {:<7}  {:<10}  {:>7}  {:>12}  {:>8.0}%  {}",
            agent.id.as_str(),
            health.to_string(),
            format!("{} ago", age(since)),
            format!("{}/{}", agent.in_flight, agent.capacity),
            succeeded(agent),
            agent.success_rate() * 100.0,
            caps.join(",")
        );
    }
}

/// An agent's successful results of all, and their share: "5/5, 100%"; "-" before any.
pub fn succeeded(agent: &Agent) -> String {
    let results = agent.succeeded + agent.failed;
    if results == 0 {
        return "-".to_owned();
    }
    // Rounded down: 100% means every one.
    format!("{}/{results}, {}%", agent.succeeded, u128::from(agent.succeeded) * 100 / u128::from(results))
}

/// A plan's reservation in one line: how much, in which window, what was used, what went back.
pub fn reservation(r: &StoredReservation) -> String {
    let mut line = format!(
        "{} of {} reserved in the {} window from {}; {} spent ({} input, {} output tokens)",
        units(r.amount_micros),
        r.provider,
        r.window,
        r.window_start.format("%Y-%m-%d"),
        units(r.spent_micros),
        r.input_tokens,
        r.output_tokens
    );
    match (r.settled_at, r.released_micros) {
        (Some(at), Some(released)) => {
            line.push_str(&format!(
                "; settled {}, {} released",
                at.format("%Y-%m-%d %H:%M:%S UTC"),
                units(released)
            ));
        }
        _ => line.push_str(&format!("; {} still reserved", units(r.outstanding_micros()))),
    }
    line
}

/// Each provider's quota in its current window, one line each.
pub fn quotas(quotas: &[QuotaReport]) {
    if quotas.is_empty() {
        println!(
            "no provider has a quota: configure [[fallback.providers]] and start a worker (or run `switchyard migrate`)"
        );
        return;
    }
    println!(
        "{:<20} {:<8} {:>14} {:>14} {:>14} {:>14}  RESETS (currency units; micros in --json)",
        "PROVIDER", "WINDOW", "LIMIT", "RESERVED", "SPENT", "REMAINING"
    );
    for q in quotas {
        println!("{}", quota_line(q));
    }
}

/// One provider's quota: figures in currency units, and when the window ends. A limit set by `quota set`
/// that differs from the configured one says so.
pub fn quota_line(q: &QuotaReport) -> String {
    let mut line = format!(
        "{:<20} {:<8} {:>14} {:>14} {:>14} {:>14}  {}",
        q.provider,
        q.window.to_string(),
        units(q.limit_micros),
        units(q.reserved_micros),
        units(q.spent_micros),
        units(q.remaining_micros),
        q.window_end.format("%Y-%m-%d %H:%M UTC")
    );
    if q.limit_micros != q.configured_micros {
        line.push_str(&format!(" (configured limit {})", units(q.configured_micros)));
    }
    line
}

/// The figures of a benchmark run, one per line.
pub fn bench(r: &switchyard::bench::Report) {
    let rate = r.rate.map_or("full speed".to_owned(), |rate| format!("{rate} requests/s"));
    println!(
        "{} requests of {} tasks onto {} agents × {} slots, {}, {}: {:.2} s",
        r.requests, r.tasks_per_request, r.agents, r.agent_capacity, r.mode, rate, r.elapsed_secs
    );
    println!("throughput       {:.1} requests/s, {:.1} tasks/s", r.requests_per_sec, r.tasks_per_sec);
    for (what, l) in
        [("to last dispatch", &r.latency_to_last_dispatch), ("to completed", &r.latency_to_completed)]
    {
        println!(
            "latency {what:<16} p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.p50_ms, l.p95_ms, l.p99_ms, l.max_ms
        );
    }
    let w = &r.wait_to_dispatch;
    println!(
        "wait ready→dispatch     p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        w.p50_ms, w.p95_ms, w.p99_ms, w.max_ms
    );
    if let Some(utilisation) = r.utilisation {
        println!(
            "fleet            {:.1}% of the slots busy while work waited for one ({} ms tasks)",
            utilisation * 100.0,
            r.task_ms
        );
    }
    let rss: Vec<String> = r.peak_rss_mib.iter().map(|m| format!("{m:.1} MiB")).collect();
    println!("peak memory      {}", rss.join(", "));
    println!(
        "pipeline         {} deliveries, {:.0} deliveries/s",
        r.pipeline_deliveries, r.pipeline_deliveries_per_sec
    );
    let (slowest, fastest) = r.ceiling.spread();
    println!(
        "ceiling          {} messages through {} hops in {:.1} s, {:.0} deliveries/s \
         ({} rounds, {:.0} to {:.0})",
        r.ceiling.messages,
        r.ceiling.hops,
        r.ceiling.elapsed.as_secs_f64(),
        r.ceiling.hop_messages_per_sec,
        r.ceiling.rounds_hop_messages_per_sec.len(),
        slowest,
        fastest
    );
    println!("ratio            {:.1}% of the ceiling", r.ratio_to_ceiling * 100.0);
}

/// How long ago, in its largest whole unit: "12 s", "5 min", "3 h", "2 d".
pub fn age(elapsed: TimeDelta) -> String {
    let secs = elapsed.num_seconds().max(0);
    match secs {
        0..60 => format!("{secs} s"),
        60..3_600 => format!("{} min", secs / 60),
        3_600..86_400 => format!("{} h", secs / 3_600),
        _ => format!("{} d", secs / 86_400),
    }
}

/// Cuts `text` to `width` characters, marking the cut.
fn clip(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(width.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}

/// The requests of `switchyard list`, one line each.
pub fn requests(requests: &[RequestSummary], now: DateTime<Utc>) {
    if requests.is_empty() {
        println!("no requests");
        return;
    }
    println!("{:<36}  {:<17} {:>6} {:>7}  REASON", "REQUEST", "STATUS", "AGE", "TASKS");
    for r in requests {
        let tasks =
            if r.tasks_total == 0 { "-".to_owned() } else { format!("{}/{}", r.tasks_done, r.tasks_total) };
        let reason = r.reason.as_deref().map(|reason| clip(reason.lines().next().unwrap_or(""), 80));
        println!(
            "{:<36}  {:<17} {:>6} {:>7}  {}",
            r.request_id.to_string(),
            r.status.as_str(),
            age(now - r.created_at),
            tasks,
            reason.unwrap_or_default()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard::model::ids::AgentId;

    #[test]
    fn successes_are_counts_and_a_share_rounded_down_or_a_dash() {
        let agent = |succeeded, failed| Agent {
            id: AgentId::parse("a").unwrap(),
            capabilities: Default::default(),
            capacity: 1,
            in_flight: 0,
            labels: Default::default(),
            resources: Default::default(),
            last_heartbeat: Utc::now(),
            succeeded,
            failed,
        };
        assert_eq!(succeeded(&agent(0, 0)), "-");
        assert_eq!(succeeded(&agent(5, 0)), "5/5, 100%");
        assert_eq!(succeeded(&agent(999, 1)), "999/1000, 99%");
        assert_eq!(succeeded(&agent(0, 3)), "0/3, 0%");
    }

    #[test]
    fn ages_are_in_their_largest_whole_unit() {
        assert_eq!(age(TimeDelta::milliseconds(-500)), "0 s");
        assert_eq!(age(TimeDelta::seconds(59)), "59 s");
        assert_eq!(age(TimeDelta::seconds(60)), "1 min");
        assert_eq!(age(TimeDelta::seconds(3_599)), "59 min");
        assert_eq!(age(TimeDelta::hours(5)), "5 h");
        assert_eq!(age(TimeDelta::days(3)), "3 d");
    }

    #[test]
    fn micros_read_as_currency_units_with_two_to_six_decimals() {
        assert_eq!(units(0), "0.00");
        assert_eq!(units(30_000), "0.03");
        assert_eq!(units(3_085), "0.003085");
        assert_eq!(units(12_500_000), "12.50");
        assert_eq!(units(1), "0.000001");
        assert_eq!(units(-7_000), "-0.007");
    }
}
