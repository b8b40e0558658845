//! `submit --wait`: follows a request until it completes, fails, or can go no further, with a
//! progress bar on a terminal and a line per state change otherwise.

use std::collections::{BTreeSet, HashMap};
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use switchyard::broker::Broker;
use switchyard::model::domain::TaskStatus;
use switchyard::model::ids::{AgentId, RequestId, TaskId};
use switchyard::ops::{self, Progress};
use switchyard::store::{Lookup, RequestReport, Store, TaskState};

use crate::{Exit, print};

/// Where a followed request ended up.
enum End {
    Completed,
    Failed(String),
    /// Every released task waits in the queue of an agent that nothing consumes: no agent is
    /// running for this plan, so waiting longer cannot help.
    Parked(Vec<String>),
}

/// The wave of each task (0 for no dependencies), from the task states alone.
fn waves(tasks: &[TaskState]) -> HashMap<TaskId, usize> {
    let by_id: HashMap<TaskId, &TaskState> = tasks.iter().map(|t| (t.id, t)).collect();
    let mut wave: HashMap<TaskId, usize> = HashMap::new();
    // Tasks are stored dependencies first, so one pass suffices.
    for task in tasks {
        let w =
            task.depends_on.iter().filter(|d| by_id.contains_key(d)).map(|d| wave[d] + 1).max().unwrap_or(0);
        wave.insert(task.id, w);
    }
    wave
}

/// Tasks done out of total, the current wave (the lowest with unfinished work) out of all.
fn counts(report: &RequestReport) -> (u64, u64, usize, usize) {
    let Some(plan) = &report.plan else { return (0, 0, 0, 0) };
    let waves = waves(&plan.tasks);
    let total_waves = waves.values().max().map_or(0, |w| w + 1);
    let done = plan.tasks.iter().filter(|t| t.status == TaskStatus::Succeeded).count();
    let current = plan
        .tasks
        .iter()
        .filter(|t| t.status != TaskStatus::Succeeded)
        .map(|t| waves[&t.id])
        .min()
        .map_or(total_waves, |w| w + 1);
    (done as u64, plan.tasks.len() as u64, current, total_waves)
}

/// The agent queues that hold this request's dispatched tasks, if no agent runs at all: no agent
/// queue of the fleet (nor of the plan's default agents) has a consumer. While any agent runs,
/// a task of a vanished agent is re-routed to it when its lease expires, so waiting goes on.
async fn parked(report: &RequestReport, store: &Store, broker: &Broker) -> Result<Option<Vec<String>>> {
    let Some(plan) = &report.plan else { return Ok(None) };
    let mut agents: BTreeSet<String> = plan.tasks.iter().filter_map(|t| t.agent_id.clone()).collect();
    agents.extend(store.agents().await?.into_iter().map(|a| a.id.to_string()));
    for agent in &agents {
        let Ok(agent) = agent.parse::<AgentId>() else { continue };
        let queue = broker.names().agent_queue(&agent);
        // A queue that is gone has no consumer either.
        if broker.consumer_count(&queue).await.unwrap_or(0) > 0 {
            return Ok(None);
        }
    }
    let waiting: Vec<String> = plan
        .tasks
        .iter()
        .filter(|t| t.status == TaskStatus::Dispatched)
        .filter_map(|t| t.agent_id.as_deref().and_then(|a| a.parse::<AgentId>().ok()))
        .map(|a| broker.names().agent_queue(&a))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Ok(Some(waiting))
}

fn progress_word(progress: &Progress) -> &'static str {
    match progress {
        Progress::Waiting(_) => "waiting",
        Progress::Dispatched => "dispatched",
        Progress::Completed => "completed",
        Progress::Failed(_) => "failed",
    }
}

/// Follows `request_id` until it ends or `timeout` passes.
pub async fn follow(
    store: &Store,
    broker: &Broker,
    request_id: RequestId,
    timeout: u64,
    json: bool,
) -> Result<Exit> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout);
    let bar = (!json && std::io::stdout().is_terminal()).then(progress_bar);
    let mut last_line = String::new();
    let (end, report) = loop {
        let (report, progress) = look_up(store, request_id).await?;
        if let Some(report) = &report {
            last_line = show(report, bar.as_ref(), json, &last_line);
        }
        let waiting_for = match &progress {
            Progress::Waiting(what) => what.clone(),
            _ => progress_word(&progress).to_owned(),
        };
        match progress {
            Progress::Completed => break (End::Completed, report),
            Progress::Failed(reason) => break (End::Failed(reason), report),
            Progress::Dispatched => {
                if let Some(report) = &report
                    && let Some(queues) = parked(report, store, broker).await?
                {
                    break (End::Parked(queues), Some(report.clone()));
                }
            }
            Progress::Waiting(_) => {}
        }
        if tokio::time::Instant::now() >= deadline {
            return give_up(bar.as_ref(), report.as_ref(), request_id, timeout, json, &waiting_for);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    finish(end, report.as_ref(), bar.as_ref(), &last_line, request_id, json)
}

/// The bar that `--wait` shows on a terminal: tasks done out of all, the wave and the status.
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tasks  {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// The request's report, if it has one yet, and how far it got.
async fn look_up(store: &Store, request_id: RequestId) -> Result<(Option<RequestReport>, Progress)> {
    Ok(match store.lookup(request_id).await? {
        None => (None, Progress::Waiting("submitted".into())),
        Some(Lookup::Refused(refusal)) => {
            let first = refusal.first();
            (None, Progress::Failed(format!("refused at {}: {}", first.stage, first.reason)))
        }
        Some(Lookup::Request(report)) => {
            let progress = ops::progress(&report);
            (Some(*report), progress)
        }
    })
}

/// Shows where the request stands: on the bar, or as a line when it differs from `last_line`.
/// Returns the request's state line.
fn show(report: &RequestReport, bar: Option<&ProgressBar>, json: bool, last_line: &str) -> String {
    let line = print::state_line(report);
    let (done, total, wave, waves) = counts(report);
    let waiting =
        report.plan.iter().flat_map(|p| &p.tasks).filter(|t| t.status == TaskStatus::Waiting).count();
    match bar {
        Some(bar) => {
            bar.set_length(total);
            bar.set_position(done);
            let waiting = match waiting {
                0 => String::new(),
                n => format!("  {n} waiting for an agent"),
            };
            bar.set_message(format!("wave {wave}/{waves}  {}{waiting}", report.status));
        }
        None if !json && line != last_line => println!("{line}"),
        None => {}
    }
    line
}

/// Says that `--wait` gave up, and where the request stood then.
fn give_up(
    bar: Option<&ProgressBar>,
    report: Option<&RequestReport>,
    request_id: RequestId,
    timeout: u64,
    json: bool,
    waiting_for: &str,
) -> Result<Exit> {
    if let Some(bar) = bar {
        bar.abandon();
    }
    if json {
        let status = report.map_or_else(|| "submitted".to_owned(), |r| r.status.to_string());
        let timed_out = json!({ "request_id": request_id, "status": "timeout", "last_status": status,
                                "waiting_for": waiting_for });
        println!("{}", serde_json::to_string_pretty(&timed_out)?);
    }
    eprintln!("gave up waiting after {timeout}s; the request goes on: switchyard status {request_id}");
    Ok(Exit::Timeout)
}

/// Shows how the request ended, and the exit code that says it.
fn finish(
    end: End,
    report: Option<&RequestReport>,
    bar: Option<&ProgressBar>,
    last_line: &str,
    request_id: RequestId,
    json: bool,
) -> Result<Exit> {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if json {
        let shown = match report {
            Some(report) => serde_json::to_value(report)?,
            None => json!({ "request_id": request_id, "status": "refused",
                            "reason": if let End::Failed(reason) = &end { reason.as_str() } else { "" } }),
        };
        println!("{}", serde_json::to_string_pretty(&shown)?);
    } else if bar.is_some() {
        println!("{last_line}");
    }
    Ok(match end {
        End::Completed => {
            if !json {
                println!("completed: every task succeeded");
            }
            Exit::Success
        }
        End::Failed(reason) => {
            if !json {
                println!("failed: {reason}");
            }
            Exit::No
        }
        End::Parked(queues) => {
            if !json {
                println!("every released task is confirmed in its agent's queue");
                println!("no agent consumes {}: the tasks wait there for one", queues.join(", "));
            }
            // Not completed: like a timeout, the request goes on without us.
            Exit::Timeout
        }
    })
}
