//! `bench`: measures the pipeline against the broker's ceiling, with a progress bar on a
//! terminal, and prints the figures as text and as one JSON line.

use std::time::Duration;

use anyhow::{Context, Result};
use switchyard::config::Config;

use crate::{Exit, print};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Requests to submit.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..))]
    requests: u64,
    /// Tasks per request (independent: one wave).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    tasks: u64,
    /// Simulated agents (zero-duration tasks).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=100))]
    agents: u64,
    /// Tasks each agent runs at once (its prefetch). By default enough for every task of the
    /// run at once, so that no task waits for a slot and the run measures the pipeline.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65535))]
    capacity: Option<u32>,
    /// Milliseconds each task takes its agent (0: none). With a fleet smaller than the load
    /// (`--agents 2 --capacity 4 --task-ms 100`), tasks wait for slots, and the run reports how
    /// busy the slots were.
    #[arg(long, default_value_t = 0)]
    task_ms: u64,
    /// Submit at this many requests per second, to measure latency at a given load; by default
    /// as fast as the broker takes them.
    #[arg(long)]
    rate: Option<f64>,
    /// Run the stages and agents in this process instead of as `worker` and `agent` processes.
    #[arg(long)]
    in_process: bool,
    /// `worker --stage all` processes (without --in-process).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    workers: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// Keep the run's queues and database afterwards.
    #[arg(long)]
    keep: bool,
    /// Measure the broker's ceiling for at least this many seconds (or 50,000 messages), in
    /// rounds of the pipeline's deliveries; their spread is reported. 0: one round.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = ceiling_secs)]
    ceiling_secs: f64,
}

/// A ceiling's duration: 0 to an hour.
fn ceiling_secs(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.0..=3600.0).contains(&secs) => Ok(secs),
        _ => Err(format!("{text:?} is not a number of seconds from 0 to 3600")),
    }
}

pub async fn bench(config: Config, args: BenchArgs) -> Result<Exit> {
    let processes = if args.in_process {
        None
    } else {
        let exe = std::env::current_exe().context("finding the switchyard executable")?;
        Some(switchyard::bench::Processes { exe, workers: args.workers as usize })
    };
    let settings = switchyard::bench::Settings {
        requests: args.requests as usize,
        tasks: args.tasks as usize,
        agents: args.agents as usize,
        agent_capacity: args.capacity.unwrap_or_else(|| {
            switchyard::bench::Settings::unbounded_capacity(
                args.requests as usize,
                args.tasks as usize,
                args.agents as usize,
            )
        }),
        task_ms: args.task_ms,
        rate: args.rate,
        processes,
        timeout: Duration::from_secs(args.timeout),
        keep: args.keep,
        ceiling_duration: Duration::from_secs_f64(args.ceiling_secs),
    };
    let bar = progress_bar(settings.requests as u64);
    let report = switchyard::bench::run(&config, &settings, |completed, failed| {
        if let Some(bar) = &bar {
            bar.set_position(completed);
            if failed > 0 {
                bar.set_message(format!("({failed} failed)"));
            }
        }
    })
    .await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let report = report?;
    print::bench(&report);
    println!("{}", serde_json::to_string(&report).expect("the report serializes"));
    Ok(Exit::Success)
}

/// A bar of the requests completed, on a terminal only: a redirected stderr gets none.
fn progress_bar(requests: u64) -> Option<indicatif::ProgressBar> {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let bar = indicatif::ProgressBar::new(requests);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:40}] {pos}/{len} requests completed {msg}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    }
}
