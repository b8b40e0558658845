//! `why`: why a task went where it went, one block per attempt: every candidate's verdict (the
//! reasons it was rejected, or its score term by term), the winner and why it won; for a task
//! that waits, why no candidate fits now; with `--rescore`, each decision made again against
//! today's fleet, side by side. Reads only.

use anyhow::{Result, bail};
use chrono::{DateTime, Utc};
use clap::Args;
use switchyard::config::Config;
use switchyard::decisions::routing::{Candidate, Choice, Term, Verdict, Weights};
use switchyard::model::domain::TaskStatus;
use switchyard::model::ids::{RequestId, TaskId};
use switchyard::ops::{self, AttemptWhy, Judgement, TaskWhy};
use switchyard::store::Store;
use uuid::Uuid;

use crate::{Exit, connect_store};

#[derive(Args)]
pub struct WhyArgs {
    /// The task's id; or its request's id, followed by the task's key.
    #[arg(value_name = "TASK_ID | REQUEST_ID")]
    id: Uuid,
    /// The task's key in its plan (`1.deploy`), when the first argument is its request's id.
    task_key: Option<String>,
    /// Also make each decision again against the agents as they are now and the configured
    /// routing policy, side by side with the recorded one. Writes nothing.
    #[arg(long)]
    rescore: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub async fn why(config: &Config, args: WhyArgs) -> Result<Exit> {
    let store = connect_store(config).await?;
    let task_id = match &args.task_key {
        None => TaskId::from_uuid(args.id),
        Some(key) => RequestId::from_uuid(args.id).plan_id().task_id(key),
    };
    let Some(why) = ops::why(&store, task_id, &config.routing, Utc::now(), args.rescore).await? else {
        bail!("{}", not_found(&store, args.id, args.task_key.as_deref()).await?);
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&why)?);
    } else {
        print(&why);
    }
    Ok(Exit::Success)
}

/// What to say when no task answers to the arguments: which of them is unknown, and what there is
/// instead.
async fn not_found(store: &Store, id: Uuid, key: Option<&str>) -> Result<String> {
    let request_id = RequestId::from_uuid(id);
    let known = store.request_status(request_id).await?.is_some();
    let keys = || async {
        let tasks = store.task_states(request_id.plan_id()).await?;
        anyhow::Ok(if tasks.is_empty() {
            "it has no plan (yet)".to_owned()
        } else {
            let keys: Vec<&str> = tasks.iter().map(|t| t.key.as_str()).collect();
            format!("its tasks: {}", keys.join(", "))
        })
    };
    Ok(match (key, known) {
        (None, false) => format!("no task {id}"),
        (None, true) => {
            format!(
                "{id} is a request, not a task: name the task too, `switchyard why {id} TASK_KEY`; {}",
                keys().await?
            )
        }
        (Some(_), false) => format!("no request {id}"),
        (Some(key), true) => format!("request {id} has no task {key:?}; {}", keys().await?),
    })
}

fn print(why: &TaskWhy) {
    println!("task      {} ({}) {}", why.key, why.work_type, why.task_id);
    println!("request   {} (plan {})", why.request_id, why.plan_id);
    match &why.reason {
        Some(reason) => println!("status    {}: {reason}", why.status),
        None => println!("status    {}", why.status),
    }
    if why.attempts.is_empty() {
        println!("\nno attempt yet: the task has not been ready to go to an agent");
    }
    let running = matches!(why.status, TaskStatus::Routed | TaskStatus::Dispatched);
    for (i, attempt) in why.attempts.iter().enumerate() {
        println!();
        print_attempt(attempt, why.now, running && i + 1 == why.attempts.len());
    }
}

/// One attempt; `holding` when it is the task's attempt under way, which holds a slot of its agent.
fn print_attempt(a: &AttemptWhy, now: DateTime<Utc>, holding: bool) {
    let n = a.attempt;
    match (&a.decision, &a.waited) {
        (Some(d), _) => match &d.agent_id {
            Some(agent) => println!("attempt {n}: routed to {agent}, {}", choice(&d.choice, &d.reason)),
            None => println!("attempt {n}: gave up waiting: {}", d.reason),
        },
        (None, Some(w)) => {
            let waited = (now - w.since).num_seconds().max(0);
            println!("attempt {n}: waiting in line for {waited} s");
        }
        (None, None) => println!("attempt {n}: no routing decision recorded"),
    }
    if let Some(w) = &a.waited {
        println!("  began to wait at {}: {}", time(w.since), w.reason);
    }
    if let Some(d) = &a.decision {
        println!("  decided at {}", time(d.decided_at));
    }
    if let Some(d) = &a.dispatch {
        println!("  dispatched at {} into {}", time(d.confirmed_at), d.queue);
    }
    for r in &a.results {
        let took = (r.finished_at - r.started_at).num_milliseconds();
        match (r.success, r.source.as_str()) {
            (true, _) => println!("  succeeded on {} in {took} ms", r.agent_id),
            (false, "lease") => println!(
                "  failed on {}: {}",
                r.agent_id,
                r.error.as_deref().unwrap_or("its lease expired without a result")
            ),
            (false, _) => {
                println!(
                    "  failed on {} after {took} ms: {}",
                    r.agent_id,
                    r.error.as_deref().unwrap_or("no error given")
                )
            }
        }
    }
    let then: Option<&[Candidate]> = match (&a.decision, &a.waited) {
        (Some(d), _) => Some(d.candidates.as_slice()),
        (None, Some(w)) => Some(w.candidates.as_slice()),
        (None, None) => None,
    };
    if let Some(j) = &a.now {
        println!("  now ({}): {}", time(now), judgement(j));
        if let Some(agent) =
            a.decision.as_ref().filter(|d| holding && d.reserved_capacity).and_then(|d| d.agent_id.as_ref())
        {
            println!("  (now, {agent}'s load counts the slot that this attempt holds)");
        }
    }
    if then.is_none() && a.now.is_none() {
        return;
    }
    let chosen = a.decision.as_ref().and_then(|d| d.agent_id.as_ref()).map(|id| id.as_str());
    let table = Table::new(then, chosen, a.now.as_ref());
    table.print();
}

/// Why the winner won, in words.
fn choice(choice: &Choice, recorded: &str) -> String {
    match choice {
        Choice::BestScore { score, runner_up: Some(r) } => {
            format!("best score {score:.3}, ahead of {} at {:.3}", r.agent_id, r.score)
        }
        Choice::BestScore { score, runner_up: None } => {
            format!("best score {score:.3}, the only eligible agent")
        }
        Choice::TieBrokenById { score, tied_with } => {
            let tied: Vec<&str> = tied_with.iter().map(|a| a.as_str()).collect();
            format!("best score {score:.3}, tied with {}: the lowest id wins", tied.join(", "))
        }
        Choice::DefaultAgent { rejected } => {
            format!("its default agent: no candidate was eligible ({rejected} rejected)")
        }
        Choice::NoAgent | Choice::AsRecorded => recorded.to_owned(),
    }
}

fn judgement(j: &Judgement) -> String {
    match &j.agent_id {
        Some(agent) => format!("would go to {agent}, {}", choice(&j.choice, &j.reason)),
        None => format!("would wait: {}", j.reason),
    }
}

fn time(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The candidates of one attempt: as recorded ("then"), as judged now, or both, one row each per
/// agent, side by side.
struct Table<'a> {
    rows: Vec<Row<'a>>,
    /// Whether the rows say "then" and "now".
    both: bool,
    /// The weights as applied then and now, if any candidate was scored.
    weights: (Option<Weights>, Option<Weights>),
    /// Whether a candidate scored then has its terms' values only.
    unweighted: bool,
}

struct Row<'a> {
    agent: &'a str,
    then: Option<(&'a Verdict, bool)>,
    now: Option<(&'a Verdict, bool)>,
}

impl<'a> Table<'a> {
    fn new(then: Option<&'a [Candidate]>, chosen: Option<&'a str>, now: Option<&'a Judgement>) -> Self {
        let winner_now = now.and_then(|j| j.agent_id.as_ref()).map(|id| id.as_str());
        let mut agents: Vec<&str> = then
            .into_iter()
            .flatten()
            .chain(now.into_iter().flat_map(|j| &j.candidates))
            .map(|c| c.agent_id.as_str())
            .collect();
        agents.sort_unstable();
        agents.dedup();
        let find = |list: Option<&'a [Candidate]>, agent: &str, winner: Option<&str>| {
            let c = list?.iter().find(|c| c.agent_id.as_str() == agent)?;
            Some((&c.verdict, winner == Some(agent)))
        };
        let rows = agents
            .into_iter()
            .map(|agent| Row {
                agent,
                then: find(then, agent, chosen),
                now: find(now.map(|j| j.candidates.as_slice()), agent, winner_now),
            })
            .collect();
        let weights_of = |list: Option<&[Candidate]>| {
            list.into_iter().flatten().find_map(|c| match c.verdict {
                Verdict::Scored { weights, .. } => weights,
                Verdict::Rejected { .. } => None,
            })
        };
        let unweighted =
            then.into_iter().flatten().any(|c| matches!(c.verdict, Verdict::Scored { weights: None, .. }));
        Table {
            rows,
            both: then.is_some() && now.is_some(),
            weights: (weights_of(then), weights_of(now.map(|j| j.candidates.as_slice()))),
            unweighted,
        }
    }

    fn print(&self) {
        if self.rows.is_empty() {
            println!("  no agent was a candidate");
            return;
        }
        const HOW: &str = "each term: value×weight=contribution";
        match self.weights {
            (Some(then), Some(now)) if then != now => {
                println!("  weights then: {}; now: {} ({HOW})", weights(then), weights(now));
            }
            (Some(w), _) | (None, Some(w)) => println!("  weights: {} ({HOW})", weights(w)),
            (None, None) => {}
        }
        if self.unweighted {
            println!(
                "  (this decision was recorded before the weights of the scores were kept: its terms show their values only)"
            );
        }
        let width = self.rows.iter().map(|r| r.agent.len()).max().unwrap_or(0).max("AGENT".len());
        let when = if self.both { "      " } else { "" };
        let scored =
            self.rows.iter().flat_map(|r| [r.then, r.now]).flatten().any(|(v, _)| v.score().is_some());
        if scored {
            println!(
                "    {:<width$} {when}{:<7} {:<17} {:<17} AFFINITY",
                "AGENT", "SCORE", "LOAD", "SUCCESS"
            );
        } else {
            println!("    {:<width$} {when}VERDICT", "AGENT");
        }
        for row in &self.rows {
            if self.both {
                println!("{}", line(row.agent, "then  ", row.then, width));
                println!("{}", line("", "now   ", row.now, width));
            } else {
                println!("{}", line(row.agent, "", row.then.or(row.now), width));
            }
        }
    }
}

/// One agent's verdict, `*` marking the winner.
fn line(agent: &str, when: &str, verdict: Option<(&Verdict, bool)>, width: usize) -> String {
    let (mark, text) = match verdict {
        None => (' ', "not a candidate".to_owned()),
        Some((verdict, won)) => (if won { '*' } else { ' ' }, describe(verdict)),
    };
    format!("  {mark} {agent:<width$} {when}{text}")
}

fn describe(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Rejected { reasons } => {
            let reasons: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            format!("rejected: {}", reasons.join("; "))
        }
        Verdict::Scored { score, load, success, affinity, .. } => match verdict.terms() {
            Some(terms) => {
                let [l, s, a] = terms.named().map(|(_, t)| term(t));
                format!("{score:.3} = {l:<15} + {s:<15} + {a}")
            }
            None => format!("{score:.3}   {load:<17.2} {success:<17.2} {affinity:.2}"),
        },
    }
}

fn term(t: Term) -> String {
    format!("{:.2}×{:.2}={:.3}", t.value, t.weight, t.contribution)
}

fn weights(w: Weights) -> String {
    format!("load {:.2}, success {:.2}, affinity {:.2}", w.load, w.success, w.affinity)
}
