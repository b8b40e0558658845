//! The planner: a decomposition turned into a DAG of tasks, one per step of each intent.
//!
//! Task ids are derived from the request id and the task's key, so that a redelivered request
//! yields the very same plan. Pure logic.

use std::collections::BTreeMap;

use crate::model::domain::{Decomposition, Intent, MAX_INTENTS, Plan, PlanError, Task};
use crate::model::ids::{RequestId, TaskId, WorkType};

use super::catalog::{Catalog, fill};

/// What a description placeholder becomes when the intent has nothing to fill it with.
const PLACEHOLDER_FALLBACK: &str = "the request";

/// Why a decomposition yields no plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanningError {
    #[error("work type {0} is not in the catalog")]
    UnknownWorkType(WorkType),
    #[error("the decomposition has {0} intents, more than the {MAX_INTENTS} a plan may be made of")]
    TooManyIntents(usize),
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl Catalog {
    /// Turns a decomposition into a plan of `request_id`.
    ///
    /// Intent number `i` (1-based) gets one task per step of its work type, keyed `"{i}.{step}"`
    /// and with the id `plan_id.task_id(key)`, so the same input always yields the same ids.
    /// A task needs the work type's capabilities, the step's and the work type's name; it
    /// depends on the tasks of its step's `depends_on` in the same intent. The root steps of an
    /// intent also depend on the leaf steps of every earlier intent whose work type is in this
    /// intent's `runs_after` ("deploy, then monitor"). An intent with a target prefers agents
    /// labelled `target=<first target, lowercased>`.
    pub fn plan(&self, request_id: RequestId, decomposition: &Decomposition) -> Result<Plan, PlanningError> {
        // Each intent's root steps may depend on every earlier intent's leaves: bounded here, not
        // by the size of whatever message carried the decomposition.
        if decomposition.intents.len() > MAX_INTENTS {
            return Err(PlanningError::TooManyIntents(decomposition.intents.len()));
        }
        let plan_id = request_id.plan_id();
        let specs = decomposition
            .intents
            .iter()
            .map(|intent| {
                self.get(&intent.work_type)
                    .ok_or_else(|| PlanningError::UnknownWorkType(intent.work_type.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let task_id = |number: usize, step: &str| plan_id.task_id(&format!("{number}.{step}"));
        let mut tasks = Vec::new();
        for (index, (intent, spec)) in decomposition.intents.iter().zip(&specs).enumerate() {
            let number = index + 1;
            let upstream: Vec<TaskId> = specs[..index]
                .iter()
                .enumerate()
                .filter(|(_, earlier)| spec.runs_after.contains(&earlier.name))
                .flat_map(|(i, earlier)| earlier.leaf_steps().map(move |s| task_id(i + 1, &s.key)))
                .collect();
            let affinity: BTreeMap<String, String> =
                intent.targets.first().map(|t| ("target".to_owned(), t.to_lowercase())).into_iter().collect();
            for step in &spec.steps {
                let key = format!("{number}.{}", step.key);
                let mut depends_on: Vec<TaskId> =
                    step.depends_on.iter().map(|d| task_id(number, d)).collect();
                if step.depends_on.is_empty() {
                    depends_on.extend(&upstream);
                }
                let mut capabilities = spec.capabilities.clone();
                capabilities.extend(step.capabilities.iter().cloned());
                capabilities.insert(spec.name.to_string());
                tasks.push(Task {
                    id: plan_id.task_id(&key),
                    key,
                    work_type: spec.name.clone(),
                    description: describe(&step.description, intent),
                    estimated_duration_secs: step.duration_secs,
                    resources: step.resources,
                    capabilities,
                    depends_on,
                    affinity: affinity.clone(),
                });
            }
        }
        Ok(Plan::new(plan_id, request_id, tasks)?)
    }
}

/// Fills a step's description template from an intent.
fn describe(template: &str, intent: &Intent) -> String {
    let join = |items: &[String]| {
        if items.is_empty() { PLACEHOLDER_FALLBACK.to_owned() } else { items.join(", ") }
    };
    fill(template, |name| match name {
        "entities" => Some(join(&intent.entities)),
        "targets" => Some(join(&intent.targets)),
        "text" if !intent.text.trim().is_empty() => Some(intent.text.clone()),
        "text" => Some(PLACEHOLDER_FALLBACK.to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::domain::Resources;
    use crate::understanding::fixtures::*;
    use crate::understanding::rules::DecomposeError;

    const UPTIME_KUMA: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";

    #[test]
    fn uptime_kuma_plan_monitors_after_deploying() {
        let catalog = Catalog::default();
        let d = catalog.decompose(UPTIME_KUMA).unwrap();
        let request = RequestId::random();
        let plan = catalog.plan(request, &d).unwrap();
        assert_eq!(plan.id, request.plan_id());
        assert_eq!(plan.request_id, request);
        assert_eq!(
            keys(&plan),
            ["1.prepare", "1.deploy", "1.verify", "2.configure_checks", "2.configure_alerts"]
        );
        let checks = task(&plan, "2.configure_checks");
        assert_eq!(checks.depends_on, [request.plan_id().task_id("1.verify")]);
        assert_eq!(task(&plan, "1.prepare").depends_on, []);
        assert_eq!(task(&plan, "1.deploy").depends_on, [task(&plan, "1.prepare").id]);
        for t in plan.tasks() {
            assert_eq!(t.id, request.plan_id().task_id(&t.key));
            assert!(t.capabilities.contains(t.work_type.as_str()), "{}", t.key);
            assert!(t.estimated_duration_secs > 0, "{}", t.key);
            assert!(!t.description.contains('{'), "{}", t.description);
        }
        let prepare = task(&plan, "1.prepare");
        let caps: Vec<&str> = prepare.capabilities.iter().map(String::as_str).collect();
        assert_eq!(caps, ["deployment", "shell"]);
        assert_eq!(prepare.description, "Prepare homelab for Uptime Kuma");
        assert_eq!(prepare.affinity["target"], "homelab");
        assert_eq!(prepare.resources, Resources { cpu: 1.0, memory_mb: 512, gpu: 0 });
        let alerts = task(&plan, "2.configure_alerts");
        // No entity in "send alerts to Discord": the template falls back.
        assert_eq!(alerts.description, "Send alerts about the request to Discord");
        assert_eq!(alerts.affinity["target"], "discord");
        assert_eq!(plan.waves()[&alerts.id], 4);
    }

    #[test]
    fn code_generation_request() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Write a Python script that renames my photos").unwrap();
        assert_eq!(work_types(&d), ["code_generation"]);
        assert_eq!(d.intents[0].entities, ["Python"]);
        assert!(d.intents[0].targets.is_empty());
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.design", "1.implement", "1.test"]);
        assert!(plan.tasks().iter().all(|t| t.affinity.is_empty()));
        assert_eq!(
            task(&plan, "1.implement").description,
            "Implement Python: Write a Python script that renames my photos"
        );
        // The earliest keyword wins: this is code to write, not monitoring to set up.
        let d = decompose("Write a script to monitor disk usage");
        assert_eq!(work_types(&d), ["code_generation"]);
        assert!(d.intents[0].targets.is_empty(), "a verb after 'to' is no target");
        assert_eq!(decompose("Deploy Gitea to production").intents[0].targets, ["production"]);
    }

    #[test]
    fn monitoring_only_request() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Monitor Nextcloud and Jellyfin on the homelab.").unwrap();
        // "Jellyfin on the homelab" matches nothing: it folds into the monitoring intent.
        assert_eq!(work_types(&d), ["monitoring"]);
        let intent = &d.intents[0];
        assert_eq!(intent.text, "Monitor Nextcloud and Jellyfin on the homelab");
        assert_eq!(intent.entities, ["Nextcloud", "Jellyfin"]);
        assert_eq!(intent.targets, ["homelab"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.configure_checks", "1.configure_alerts"]);
        // runs_after only ties to earlier intents: without a deployment, nothing to wait for.
        assert_eq!(task(&plan, "1.configure_checks").depends_on, []);
        assert_eq!(
            task(&plan, "1.configure_checks").description,
            "Configure health checks for Nextcloud, Jellyfin"
        );
    }

    #[test]
    fn maintenance_request() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Restart Jellyfin on the homelab").unwrap();
        assert_eq!(work_types(&d), ["maintenance"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.snapshot", "1.apply", "1.verify"]);
        let apply = task(&plan, "1.apply");
        assert!(apply.capabilities.contains("shell") && apply.capabilities.contains("maintenance"));
        assert!(apply.description.contains("Jellyfin"), "{}", apply.description);
    }

    #[test]
    fn a_backup_before_an_upgrade_finishes_before_the_upgrade_starts() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Back up PostgreSQL, then upgrade it on the NAS").unwrap();
        assert_eq!(work_types(&d), ["backup", "upgrade"]);
        assert_eq!(d.intents[0].entities, ["PostgreSQL"]);
        assert_eq!(d.intents[1].targets, ["NAS"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.configure", "1.run", "1.verify", "2.snapshot", "2.upgrade", "2.verify"]);
        assert_eq!(task(&plan, "2.snapshot").depends_on, [task(&plan, "1.verify").id]);
        let upgrade = task(&plan, "2.upgrade");
        assert!(upgrade.capabilities.contains("shell") && upgrade.capabilities.contains("upgrade"));
        // Two upgrades of two named things stay two intents.
        let d = catalog.decompose("Upgrade Nextcloud and upgrade Jellyfin").unwrap();
        assert_eq!(work_types(&d), ["upgrade", "upgrade"]);
        assert_eq!(d.intents[1].entities, ["Jellyfin"]);
    }

    #[test]
    fn research_request() {
        let d = decompose("Compare Traefik and Caddy as reverse proxies for the homelab");
        assert_eq!(work_types(&d), ["research"]);
        let intent = &d.intents[0];
        assert_eq!(intent.entities, ["Traefik", "Caddy"]);
        assert!(intent.targets.is_empty(), "'for' introduces no target: {:?}", intent.targets);
        let catalog = Catalog::default();
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.gather", "1.summarize"]);
        assert!(task(&plan, "1.gather").capabilities.contains("web"));
    }

    #[test]
    fn two_intents_of_the_same_type_stay_apart_and_independent() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Deploy Gitea to the homelab; deploy Grafana on the VPS").unwrap();
        assert_eq!(work_types(&d), ["deployment", "deployment"]);
        assert_eq!(
            (d.intents[0].targets.as_slice(), d.intents[1].targets.as_slice()),
            (["homelab".to_owned()].as_slice(), ["VPS".to_owned()].as_slice())
        );
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(plan.tasks().len(), 6);
        // Deployment does not run after deployment: both intents start at once.
        assert_eq!(task(&plan, "2.prepare").depends_on, []);
        assert_eq!(task(&plan, "2.prepare").affinity["target"], "vps");
    }

    #[test]
    fn chained_work_types_wait_for_earlier_intents_only() {
        let catalog = Catalog::default();
        let d = catalog
            .decompose("Monitor Gitea. Write a Discord bot, then deploy it to the homelab and alert me")
            .unwrap();
        assert_eq!(work_types(&d), ["monitoring", "code_generation", "deployment", "monitoring"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        let id = |key| task(&plan, key).id;
        // The first monitoring intent precedes the deployment, so it waits for nothing.
        assert_eq!(task(&plan, "1.configure_checks").depends_on, []);
        assert_eq!(task(&plan, "3.prepare").depends_on, [id("2.test")]);
        assert_eq!(task(&plan, "4.configure_checks").depends_on, [id("3.verify")]);
        assert!(d.intents[3].targets.is_empty(), "a pronoun is no target");
    }

    #[test]
    fn plans_are_deterministic() {
        let catalog = Catalog::default();
        let request = RequestId::random();
        let first = catalog.plan(request, &catalog.decompose(UPTIME_KUMA).unwrap()).unwrap();
        let second = catalog.plan(request, &catalog.decompose(UPTIME_KUMA).unwrap()).unwrap();
        assert_eq!(first, second);
        let other = catalog.plan(RequestId::random(), &catalog.decompose(UPTIME_KUMA).unwrap()).unwrap();
        assert_ne!(first.tasks()[0].id, other.tasks()[0].id);
    }

    #[test]
    fn planning_rejects_unknown_work_types_and_empty_decompositions() {
        let catalog = Catalog::default();
        let mut d = catalog.decompose(UPTIME_KUMA).unwrap();
        d.intents[1].work_type = wt("juggling");
        let err = catalog.plan(RequestId::random(), &d).unwrap_err();
        assert_eq!(err, PlanningError::UnknownWorkType(wt("juggling")));
        assert_eq!(err.to_string(), "work type juggling is not in the catalog");
        d.intents.clear();
        let err = catalog.plan(RequestId::random(), &d).unwrap_err();
        assert_eq!(err, PlanningError::Plan(PlanError::NoTasks));
        assert_eq!(err.to_string(), "the request yields no task");
    }

    #[test]
    fn a_request_that_asks_for_too_many_things_is_refused_before_it_is_planned() {
        let catalog = Catalog::default();
        let asking = |pairs: usize| -> String {
            let clauses: Vec<String> =
                (0..pairs).map(|i| format!("write script{i} and deploy app{i}")).collect();
            clauses.join(" and ")
        };
        let most = catalog.decompose(&asking(MAX_INTENTS / 2)).unwrap();
        assert_eq!(most.intents.len(), MAX_INTENTS);
        assert!(catalog.plan(RequestId::random(), &most).is_ok());
        // Each deployment waits for every script before it: the plan would grow with the square
        // of what the request asks for.
        let err = catalog.decompose(&asking(3000)).unwrap_err();
        assert_eq!(err, DecomposeError::TooManyIntents(6000));
        assert_eq!(
            err.to_string(),
            "the request asks for 6000 things, more than the 20 one request may ask for: split it into \
             smaller requests"
        );
        // The same bound holds for a decomposition that arrives in a message.
        let mut many = most.clone();
        many.intents.extend(most.intents.iter().cloned());
        let err = catalog.plan(RequestId::random(), &many).unwrap_err();
        assert_eq!(err, PlanningError::TooManyIntents(40));
        assert_eq!(
            err.to_string(),
            "the decomposition has 40 intents, more than the 20 a plan may be made of"
        );
    }

    #[test]
    fn templates_are_filled_in_one_pass() {
        let intent = Intent {
            work_type: wt("research"),
            text: "about {targets}".into(),
            entities: vec!["A".into(), "B".into()],
            targets: vec![],
        };
        assert_eq!(
            describe("{entities} on {targets}: {text} {other} {", &intent),
            "A, B on the request: about {targets} {other} {"
        );
    }
}
