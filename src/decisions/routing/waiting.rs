//! Why a task waits, in a few words, read from its candidates' verdicts.

use std::collections::BTreeSet;

use super::{Candidate, Reason, Shortfall, Verdict};
use crate::decisions::plural;

/// Why a task waits, in a few words, from its candidates' verdicts: what no agent offers when no
/// agent could ever take it ("no agent has capability gpu-transcode"), else what keeps the capable
/// agents from it now ("2 capable agents busy (2/2, 2/2)"), or that it queues behind others
/// when an agent could take it.
pub fn waiting_reason(candidates: &[Candidate]) -> String {
    if candidates.is_empty() {
        return "no agent is registered".to_owned();
    }
    fn reasons(c: &Candidate) -> &[Reason] {
        match &c.verdict {
            Verdict::Rejected { reasons } => reasons,
            Verdict::Scored { .. } => &[],
        }
    }
    let eligible = candidates.iter().filter(|c| c.verdict.score().is_some()).count();
    if eligible > 0 {
        return format!(
            "in line behind tasks that waited first ({eligible} capable {} with room)",
            plural(eligible, "agent", "agents")
        );
    }
    let unfit = |r: &Reason| matches!(r, Reason::MissingCapabilities(_) | Reason::InsufficientResources(_));
    let capable: Vec<&Candidate> = candidates.iter().filter(|c| !reasons(c).iter().any(unfit)).collect();
    if capable.is_empty() {
        return no_agent_offers(candidates.iter().map(reasons));
    }
    let (mut failed, mut silent, mut busy) = (Vec::new(), Vec::new(), Vec::new());
    for candidate in capable {
        let reasons = reasons(candidate);
        if reasons.contains(&Reason::FailedBefore) {
            failed.push(candidate.agent_id.as_str());
        } else if let Some(Reason::StaleHeartbeat { age_millis, .. }) =
            reasons.iter().find(|r| matches!(r, Reason::StaleHeartbeat { .. }))
        {
            silent.push(format!("{} for {} s", candidate.agent_id, age_millis / 1000));
        } else if let Some(Reason::NoSpareCapacity { in_flight, capacity }) =
            reasons.iter().find(|r| matches!(r, Reason::NoSpareCapacity { .. }))
        {
            busy.push(format!("{in_flight}/{capacity}"));
        }
    }
    let mut parts = Vec::new();
    if !busy.is_empty() {
        let n = busy.len();
        parts.push(format!("{n} capable {} busy ({})", plural(n, "agent", "agents"), listed(&busy)));
    }
    if !silent.is_empty() {
        let n = silent.len();
        parts.push(format!("{n} capable {} silent ({})", plural(n, "agent", "agents"), listed(&silent)));
    }
    if !failed.is_empty() {
        let n = failed.len();
        parts.push(format!(
            "{n} capable {} failed it before ({})",
            plural(n, "agent", "agents"),
            listed(&failed)
        ));
    }
    parts.join("; ")
}

/// What no candidate offers: a capability that every one of them lacks, else a resource that
/// every one of them has too little of (with the most any has), else that none has it all at once.
fn no_agent_offers<'r>(rejections: impl Iterator<Item = &'r [Reason]>) -> String {
    let mut nowhere: Option<BTreeSet<&str>> = None;
    let (mut cpu, mut memory, mut gpu) = (Some((0.0, 0.0)), Some((0, 0)), Some((0, 0)));
    for reasons in rejections {
        let mut missing = BTreeSet::new();
        let mut short = Shortfall::default();
        for reason in reasons {
            match reason {
                Reason::MissingCapabilities(names) => missing.extend(names.iter().map(String::as_str)),
                Reason::InsufficientResources(s) => short = *s,
                _ => {}
            }
        }
        nowhere = Some(match nowhere {
            None => missing,
            Some(before) => before.intersection(&missing).copied().collect(),
        });
        // A resource stays "short everywhere" while every candidate lacks it: (needs, most had).
        cpu = cpu.zip(short.cpu).map(|((_, most), l)| (l.needs, f64::max(most, l.has)));
        memory = memory.zip(short.memory_mb).map(|((_, most), l)| (l.needs, most.max(l.has)));
        gpu = gpu.zip(short.gpu).map(|((_, most), l)| (l.needs, most.max(l.has)));
    }
    let nowhere: Vec<&str> = nowhere.unwrap_or_default().into_iter().collect();
    if !nowhere.is_empty() {
        return format!(
            "no agent has {} {}",
            plural(nowhere.len(), "capability", "capabilities"),
            nowhere.join(", ")
        );
    }
    let mut short = Vec::new();
    if let Some((needs, most)) = gpu {
        short.push(format!("{needs} {} (the most any has is {most})", plural(needs as usize, "GPU", "GPUs")));
    }
    if let Some((needs, most)) = memory {
        short.push(format!("{needs} MiB of memory (the most any has is {most} MiB)"));
    }
    if let Some((needs, most)) = cpu {
        short.push(format!("{needs} CPUs (the most any has is {most})"));
    }
    if short.is_empty() {
        "no agent has both the capabilities and the resources it needs".to_owned()
    } else {
        format!("no agent has {}", short.join(" and "))
    }
}

/// At most five items, then how many more.
fn listed<T: AsRef<str>>(items: &[T]) -> String {
    let shown: Vec<&str> = items.iter().take(5).map(AsRef::as_ref).collect();
    match items.len().saturating_sub(5) {
        0 => shown.join(", "),
        more => format!("{}, and {more} more", shown.join(", ")),
    }
}
#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::super::fixtures::*;
    use super::super::*;

    #[test]
    fn a_waiting_reason_names_what_keeps_the_capable_agents_from_the_task() {
        let mut t = task("t");
        t.capabilities = caps(&["docker", "gpu-transcode"]);
        let mut docker = agent("docker");
        docker.capabilities = caps(&["docker"]);
        let plain = agent("plain");
        let judge =
            |agents: &[Agent]| Router::new(agents, now(), &RoutingPolicy::default()).judge(&t, Ask::ANY);
        assert_eq!(waiting_reason(&judge(&[docker, plain])), "no agent has capability gpu-transcode");
        assert_eq!(waiting_reason(&[]), "no agent is registered");

        let mut full = agent("full");
        full.capabilities = caps(&["docker", "gpu-transcode"]);
        full.capacity = 2;
        full.in_flight = 2;
        let mut other = full.clone();
        other.id = id("other");
        assert_eq!(
            waiting_reason(&judge(&[full.clone(), other.clone()])),
            "2 capable agents busy (2/2, 2/2)"
        );
        other.last_heartbeat = now() - TimeDelta::seconds(45);
        assert_eq!(
            waiting_reason(&judge(&[full.clone(), other])),
            "1 capable agent busy (2/2); 1 capable agent silent (other for 45 s)"
        );
        // Able to take it now: it only queues behind others.
        full.in_flight = 1;
        assert_eq!(
            waiting_reason(&judge(&[full])),
            "in line behind tasks that waited first (1 capable agent with room)"
        );
        // Resources no agent has.
        let mut big = task("big");
        big.resources.gpu = 1;
        let judged = Router::new(&[agent("a")], now(), &RoutingPolicy::default()).judge(&big, Ask::ANY);
        assert_eq!(waiting_reason(&judged), "no agent has 1 GPU (the most any has is 0)");
    }
}
