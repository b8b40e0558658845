//! Why a routing decision chose its agent, read back from its candidates' verdicts: the best
//! score alone, a tie broken by id, the default agent, or no agent at all.

use serde::Serialize;

use super::{Candidate, best_candidates};
use crate::model::ids::AgentId;

/// How a decision came to its agent.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum Choice {
    /// The best score, alone; `runner_up` is the next best eligible agent, if there was one.
    BestScore { score: f64, runner_up: Option<RunnerUp> },
    /// The best score, shared (within rounding) with `tied_with`: the lowest id won.
    TieBrokenById { score: f64, tied_with: Vec<AgentId> },
    /// No candidate was eligible (`rejected` were listed): the task went to its default agent.
    DefaultAgent { rejected: usize },
    /// No agent was chosen: the task waited, or gave up waiting.
    NoAgent,
    /// The agent chosen is not the best eligible one of the candidates recorded: the decision's
    /// own reason is all there is to say.
    AsRecorded,
}

/// The eligible agent that came second.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunnerUp {
    pub agent_id: AgentId,
    pub score: f64,
}

/// Why `chosen` (`None`: no agent) was chosen among `candidates`, listed in id order as a
/// decision records them.
pub fn choice(chosen: Option<&AgentId>, candidates: &[Candidate]) -> Choice {
    let Some(chosen) = chosen else { return Choice::NoAgent };
    let best = best_candidates(candidates);
    let Some(&first) = best.first() else {
        return Choice::DefaultAgent { rejected: candidates.len() };
    };
    let winner = &candidates[first];
    let Some(score) = winner.verdict.score().filter(|_| winner.agent_id == *chosen) else {
        return Choice::AsRecorded;
    };
    if best.len() > 1 {
        let tied_with = best[1..].iter().map(|&i| candidates[i].agent_id.clone()).collect();
        return Choice::TieBrokenById { score, tied_with };
    }
    // The first of the others with the best score: ties among them go to the lowest id too.
    let runner_up = (candidates.iter().enumerate())
        .filter(|&(i, _)| i != first)
        .filter_map(|(_, c)| c.verdict.score().map(|score| (c, score)))
        .fold(None::<(&Candidate, f64)>, |best, (c, score)| match best {
            Some((_, top)) if top >= score => best,
            _ => Some((c, score)),
        })
        .map(|(c, score)| RunnerUp { agent_id: c.agent_id.clone(), score });
    Choice::BestScore { score, runner_up }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::*;

    fn judged(agents: &[Agent], policy: &RoutingPolicy) -> (Placement, Vec<Candidate>) {
        let t = task("t");
        let ask = Ask { default_agent: policy.default_agents.get(&t.work_type), ..Ask::ANY };
        let router = Router::new(agents, now(), policy);
        let candidates = router.judge(&t, ask);
        (Router::new(agents, now(), policy).place(&t, ask), candidates)
    }

    #[test]
    fn the_best_score_alone_names_the_runner_up() {
        let mut busy = agent("a-busy");
        busy.in_flight = 2;
        let mut busier = agent("b-busier");
        busier.in_flight = 3;
        let (placement, candidates) = judged(&[busy, agent("c-idle"), busier], &RoutingPolicy::default());
        let route = routed(placement);
        assert_eq!(
            choice(Some(&route.agent_id), &candidates),
            Choice::BestScore {
                score: route.score.unwrap(),
                runner_up: Some(RunnerUp {
                    agent_id: id("a-busy"),
                    score: verdict_of(&route, "a-busy").score().unwrap()
                })
            }
        );
        // Alone, there is no runner-up.
        let (placement, candidates) = judged(&[agent("solo")], &RoutingPolicy::default());
        let route = routed(placement);
        assert_eq!(
            choice(Some(&route.agent_id), &candidates),
            Choice::BestScore { score: route.score.unwrap(), runner_up: None }
        );
    }

    #[test]
    fn a_tie_is_broken_by_id_and_names_the_others() {
        let (placement, candidates) =
            judged(&[agent("charlie"), agent("alpha"), agent("bravo")], &RoutingPolicy::default());
        let route = routed(placement);
        assert_eq!(route.agent_id, id("alpha"));
        assert_eq!(
            choice(Some(&route.agent_id), &candidates),
            Choice::TieBrokenById {
                score: route.score.unwrap(),
                tied_with: vec![id("bravo"), id("charlie")]
            }
        );
    }

    #[test]
    fn no_eligible_candidate_means_the_default_agent_or_no_agent() {
        let mut full = agent("full");
        full.in_flight = full.capacity;
        let (placement, candidates) = judged(&[full.clone()], &with_default("deployment", "fallback"));
        let route = routed(placement);
        assert_eq!(choice(Some(&route.agent_id), &candidates), Choice::DefaultAgent { rejected: 1 });
        let (placement, candidates) = judged(&[full], &RoutingPolicy::default());
        assert!(matches!(placement, Placement::Waits(_)));
        assert_eq!(choice(None, &candidates), Choice::NoAgent);
    }

    #[test]
    fn an_agent_that_is_not_the_best_is_explained_by_its_record_only() {
        let mut busy = agent("a-busy");
        busy.in_flight = 3;
        let (_, candidates) = judged(&[busy, agent("b-idle")], &RoutingPolicy::default());
        assert_eq!(choice(Some(&id("a-busy")), &candidates), Choice::AsRecorded);
        assert_eq!(choice(Some(&id("stranger")), &candidates), Choice::AsRecorded);
    }
}
