//! The catalog file's format, as written, and its validation into work types.
//!
//! A file is checked on its own here, for everything local to a work type (steps, keywords,
//! complexity, placeholders, …); what refers to other work types is checked once the files are
//! merged, in [`Catalog::merged`](super::Catalog).

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::Deserialize;

use crate::model::domain::Resources;
use crate::model::ids::WorkType;

use super::{Error, StepSpec, WorkTypeSpec, fill};

/// The placeholders a step's description may use.
const PLACEHOLDERS: [&str; 3] = ["entities", "targets", "text"];

/// The same alphabet as names, because a step key becomes part of a task key.
fn valid_step_key(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// The file as written; [`RawCatalog::validate`] turns it into work types. Unknown fields are
/// errors, so that a typo ("depend_on") does not silently drop a dependency.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCatalog {
    #[serde(default)]
    work_type: Vec<RawWorkType>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkType {
    name: String,
    #[serde(default)]
    description: String,
    keywords: Vec<String>,
    #[serde(default)]
    weak_keywords: Vec<String>,
    #[serde(default)]
    capabilities: Vec<String>,
    base_complexity: f64,
    #[serde(default)]
    known_entities: Vec<String>,
    #[serde(default)]
    runs_after: Vec<String>,
    #[serde(default)]
    resources: RawResources,
    #[serde(default)]
    step: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    key: String,
    description: String,
    duration_secs: u32,
    #[serde(default)]
    capabilities: Vec<String>,
    #[serde(default)]
    depends_on: Vec<String>,
    resources: Option<RawResources>,
}

/// Resources with every field optional, so that a step can override just one of them.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawResources {
    cpu: Option<f64>,
    memory_mb: Option<u64>,
    gpu: Option<u32>,
}

impl RawResources {
    fn over(&self, base: Resources) -> Resources {
        Resources {
            cpu: self.cpu.unwrap_or(base.cpu),
            memory_mb: self.memory_mb.unwrap_or(base.memory_mb),
            gpu: self.gpu.unwrap_or(base.gpu),
        }
    }
}

impl RawCatalog {
    /// Validates each work type on its own and that no name is defined twice; `runs_after` is
    /// checked against the merged catalog ([`Catalog::merged`]).
    pub(super) fn validate(self) -> Result<Vec<WorkTypeSpec>, Error> {
        let mut seen = HashSet::new();
        let mut work_types = Vec::with_capacity(self.work_type.len());
        for raw in &self.work_type {
            let spec = raw.validate()?;
            if !seen.insert(spec.name.clone()) {
                return Err(Error::DuplicateWorkType(spec.name));
            }
            work_types.push(spec);
        }
        Ok(work_types)
    }
}

impl RawWorkType {
    /// Validates one work type on its own: whether its `runs_after` name work types of the
    /// catalog is for [`Catalog::merged`] to check.
    fn validate(&self) -> Result<WorkTypeSpec, Error> {
        let name = WorkType::parse(&self.name).map_err(Error::InvalidName)?;
        let work_type = || name.clone();

        let keywords = normalize_keywords(&self.keywords, &[])
            .ok_or_else(|| Error::EmptyKeyword { work_type: work_type() })?;
        // A word is weak or not: one that is both is a keyword.
        let weak_keywords = normalize_keywords(&self.weak_keywords, &keywords)
            .ok_or_else(|| Error::EmptyKeyword { work_type: work_type() })?;
        let capabilities = parse_capabilities(&self.capabilities, &name)?;
        if !(0.0..=1.0).contains(&self.base_complexity) {
            return Err(Error::Complexity { work_type: work_type(), value: self.base_complexity });
        }
        let resources = self.resources.over(Resources::default());
        if !valid_resources(&resources) {
            return Err(Error::InvalidResources { work_type: work_type(), step: None });
        }

        if self.step.is_empty() {
            return Err(Error::NoSteps { work_type: work_type() });
        }
        let mut steps: Vec<StepSpec> = Vec::with_capacity(self.step.len());
        for raw in &self.step {
            let step = || raw.key.clone();
            if !valid_step_key(&raw.key) {
                return Err(Error::InvalidStepKey { work_type: work_type(), key: step() });
            }
            if steps.iter().any(|s| s.key == raw.key) {
                return Err(Error::DuplicateStep { work_type: work_type(), step: step() });
            }
            if raw.duration_secs == 0 {
                return Err(Error::ZeroDuration { work_type: work_type(), step: step() });
            }
            let mut unknown = None;
            fill(&raw.description, |p| {
                if !PLACEHOLDERS.contains(&p) {
                    unknown.get_or_insert_with(|| p.to_owned());
                }
                None
            });
            if let Some(placeholder) = unknown {
                return Err(Error::UnknownPlaceholder { work_type: work_type(), step: step(), placeholder });
            }
            let step_resources = raw.resources.as_ref().map_or(resources, |r| r.over(resources));
            if !valid_resources(&step_resources) {
                return Err(Error::InvalidResources { work_type: work_type(), step: Some(step()) });
            }
            let mut depends_on: Vec<String> = Vec::with_capacity(raw.depends_on.len());
            for dep in &raw.depends_on {
                if !depends_on.contains(dep) {
                    depends_on.push(dep.clone());
                }
            }
            steps.push(StepSpec {
                key: raw.key.clone(),
                description: raw.description.clone(),
                duration_secs: raw.duration_secs,
                capabilities: parse_capabilities(&raw.capabilities, &name)?,
                depends_on,
                resources: step_resources,
            });
        }
        for step in &steps {
            if let Some(missing) = step.depends_on.iter().find(|d| !steps.iter().any(|s| &s.key == *d)) {
                return Err(Error::UnknownStepDependency {
                    work_type: work_type(),
                    step: step.key.clone(),
                    missing: missing.clone(),
                });
            }
        }
        if let Some(step) = step_in_cycle(&steps) {
            return Err(Error::StepCycle { work_type: work_type(), step });
        }

        let mut runs_after: Vec<WorkType> = Vec::with_capacity(self.runs_after.len());
        for other in &self.runs_after {
            // Not a valid name: no catalog can have such a work type.
            let other = WorkType::parse(other)
                .map_err(|_| Error::UnknownRunsAfter { work_type: work_type(), missing: other.clone() })?;
            if !runs_after.contains(&other) {
                runs_after.push(other);
            }
        }

        Ok(WorkTypeSpec {
            name: name.clone(),
            description: self.description.trim().to_owned(),
            keywords,
            weak_keywords,
            capabilities,
            base_complexity: self.base_complexity,
            known_entities: self
                .known_entities
                .iter()
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect(),
            runs_after,
            resources,
            steps,
        })
    }
}

fn parse_capabilities(raw: &[String], work_type: &WorkType) -> Result<BTreeSet<String>, Error> {
    raw.iter()
        .map(|c| match c.trim() {
            "" => Err(Error::EmptyCapability { work_type: work_type.clone() }),
            c => Ok(c.to_owned()),
        })
        .collect()
}

fn valid_resources(r: &Resources) -> bool {
    r.cpu.is_finite() && r.cpu >= 0.0
}

/// A step on a cycle of `depends_on`, if there is one (depth-first search: a step met again
/// while it is still being explored closes a cycle).
fn step_in_cycle(steps: &[StepSpec]) -> Option<String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit<'a>(
        key: &'a str,
        deps: &HashMap<&'a str, &'a [String]>,
        marks: &mut HashMap<&'a str, Mark>,
    ) -> Option<String> {
        match marks[key] {
            Mark::Open => return Some(key.to_owned()),
            Mark::Done => return None,
            Mark::New => {}
        }
        marks.insert(key, Mark::Open);
        for dep in deps[key] {
            if let Some(found) = visit(dep, deps, marks) {
                return Some(found);
            }
        }
        marks.insert(key, Mark::Done);
        None
    }
    let deps: HashMap<&str, &[String]> =
        steps.iter().map(|s| (s.key.as_str(), s.depends_on.as_slice())).collect();
    let mut marks: HashMap<&str, Mark> = steps.iter().map(|s| (s.key.as_str(), Mark::New)).collect();
    steps.iter().find_map(|s| visit(&s.key, &deps, &mut marks))
}

/// The keywords normalised, each once and none of `except`; `None` if one is empty.
fn normalize_keywords(raw: &[String], except: &[String]) -> Option<Vec<String>> {
    let mut keywords: Vec<String> = Vec::with_capacity(raw.len());
    for keyword in raw {
        let normalized = normalize(keyword);
        if normalized.is_empty() {
            return None;
        }
        if !keywords.contains(&normalized) && !except.contains(&normalized) {
            keywords.push(normalized);
        }
    }
    Some(keywords)
}

/// Lowercase, with runs of whitespace made single spaces.
fn normalize(s: &str) -> String {
    s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}
