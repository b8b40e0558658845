//! The work-type catalog, the rule-based decomposer and the planner.
//!
//! The catalog is data, not code: each work type (deployment, monitoring, …) says how to
//! recognise it in a request (keywords), what an agent needs to take it (capabilities,
//! resources) and which steps it breaks into. The default catalog is
//! `catalog/work_types.toml`, embedded in the binary; a user file can add or replace work types
//! ([`Catalog::load`], [`Catalog::extend_from_file`]). Each file is checked on its own for what
//! is local to a work type (steps, complexity, …); references between work types (`runs_after`)
//! are checked against the merged catalog, so a user file may refer to the default work types.
//! Everything here is pure logic: the only I/O is reading catalog files.
//!
//! - [`Catalog::decompose`] turns a request's text into a [`Decomposition`] with simple,
//!   deterministic rules (see its documentation).
//! - [`Catalog::plan`] turns a decomposition into a [`Plan`]: one task per step of each intent,
//!   with deterministic task ids, so that a redelivered request yields the very same plan.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::domain::{Decomposition, Intent, MAX_INTENTS, Plan, PlanError, Resources, Task};
use crate::model::ids::{self, RequestId, TaskId, WorkType};

/// The default catalog, embedded so that the binary works without any file.
const DEFAULT_CATALOG: &str = include_str!("../../catalog/work_types.toml");

/// The name [`Catalog::decompose`] puts in [`Decomposition::decomposer`].
pub const DECOMPOSER: &str = "rules";

/// The placeholders a step's description may use.
const PLACEHOLDERS: [&str; 3] = ["entities", "targets", "text"];

/// What a description placeholder becomes when the intent has nothing to fill it with.
const PLACEHOLDER_FALLBACK: &str = "the request";

/// Why a catalog was not loaded. Messages name the work type and step at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the catalog file {}: {error}", path.display())]
    Read { path: PathBuf, error: std::io::Error },
    #[error("in the catalog file {}: {error}", path.display())]
    InFile { path: PathBuf, error: Box<Error> },
    #[error("the catalog is not valid: {0}")]
    Toml(toml::de::Error),
    #[error("in the catalog: {0}")]
    InvalidName(ids::Error),
    #[error("work type {0} is defined twice")]
    DuplicateWorkType(WorkType),
    #[error("work type {work_type} has an empty keyword")]
    EmptyKeyword { work_type: WorkType },
    #[error("work type {work_type} has an empty capability")]
    EmptyCapability { work_type: WorkType },
    #[error("work type {work_type}: base_complexity {value} is not in [0, 1]")]
    Complexity { work_type: WorkType, value: f64 },
    #[error(
        "work type {work_type}: the resources{} need a finite, non-negative cpu",
        .step.as_ref().map(|s| format!(" of step {s}")).unwrap_or_default()
    )]
    InvalidResources { work_type: WorkType, step: Option<String> },
    #[error("work type {work_type} has no step")]
    NoSteps { work_type: WorkType },
    #[error(
        "work type {work_type}: invalid step key {key:?}: use 1 to 64 characters of a-z, 0-9, '-' and '_', starting with a letter or digit"
    )]
    InvalidStepKey { work_type: WorkType, key: String },
    #[error("work type {work_type}: step {step} is defined twice")]
    DuplicateStep { work_type: WorkType, step: String },
    #[error("work type {work_type}: step {step} needs a positive duration_secs")]
    ZeroDuration { work_type: WorkType, step: String },
    #[error(
        "work type {work_type}: step {step} uses the unknown placeholder {{{placeholder}}}; use {{entities}}, {{targets}} or {{text}}"
    )]
    UnknownPlaceholder { work_type: WorkType, step: String, placeholder: String },
    #[error(
        "work type {work_type}: step {step} depends on {missing:?}, which is not a step of this work type"
    )]
    UnknownStepDependency { work_type: WorkType, step: String, missing: String },
    #[error("work type {work_type}: the steps' depends_on form a cycle through step {step}")]
    StepCycle { work_type: WorkType, step: String },
    #[error("work type {work_type} runs after {missing:?}, which is not a work type of the catalog")]
    UnknownRunsAfter { work_type: WorkType, missing: String },
}

/// Why a request's text yields no decomposition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecomposeError {
    #[error("the request text is empty")]
    Empty,
    #[error("no work type in the catalog matches the request; known work types: {known}")]
    NoMatch {
        /// The catalog's work types, comma-separated.
        known: String,
    },
    #[error(
        "the request asks for {0} things, more than the {MAX_INTENTS} one request may ask for: \
         split it into smaller requests"
    )]
    TooManyIntents(usize),
}

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

/// A kind of work, as described by the catalog. A spec obtained from a [`Catalog`] was
/// validated when the catalog was loaded: among others, it has steps and they form a DAG.
///
/// It serialises in the catalog file's format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkTypeSpec {
    pub name: WorkType,
    pub description: String,
    /// Lowercase and single-spaced; matched at word starts.
    pub keywords: Vec<String>,
    /// Required of an agent for every task of this type.
    pub capabilities: BTreeSet<String>,
    /// In [0, 1].
    pub base_complexity: f64,
    /// Things this work type has been written for ("Gitea"): an entity that no work type knows
    /// adds to a plan's complexity.
    pub known_entities: Vec<String>,
    /// Work types whose intents, earlier in the same request, must finish before this one starts.
    pub runs_after: Vec<WorkType>,
    /// The default per task.
    pub resources: Resources,
    /// In catalog order.
    #[serde(rename = "step")]
    pub steps: Vec<StepSpec>,
}

/// One step of a work type: one task per intent of that type.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepSpec {
    /// Unique within the work type.
    pub key: String,
    /// A template: `{entities}`, `{targets}` and `{text}` are filled from the intent.
    pub description: String,
    pub duration_secs: u32,
    /// Needed on top of the work type's capabilities.
    pub capabilities: BTreeSet<String>,
    /// Keys of other steps of the same work type.
    pub depends_on: Vec<String>,
    /// The step's override merged over the work type's default.
    pub resources: Resources,
}

impl WorkTypeSpec {
    /// Steps that depend on no other step: where an intent of this type starts.
    pub fn root_steps(&self) -> impl Iterator<Item = &StepSpec> {
        self.steps.iter().filter(|s| s.depends_on.is_empty())
    }

    /// Steps no other step depends on: when they are done, the intent is done.
    pub fn leaf_steps(&self) -> impl Iterator<Item = &StepSpec> {
        self.steps.iter().filter(|s| !self.steps.iter().any(|o| o.depends_on.contains(&s.key)))
    }
}

/// A validated set of work types, in catalog order (which breaks ties when matching keywords).
/// It serialises in the catalog file's format (`toml::to_string` gives a loadable file).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Catalog {
    #[serde(rename = "work_type")]
    work_types: Vec<WorkTypeSpec>,
}

impl Default for Catalog {
    /// The catalog embedded from `catalog/work_types.toml`.
    fn default() -> Self {
        Self::from_toml_str(DEFAULT_CATALOG).expect("the embedded catalog is valid (tested)")
    }
}

impl Catalog {
    /// Parses and validates a complete catalog in the TOML format of `catalog/work_types.toml`:
    /// every `runs_after` must name a work type of this text. For a file that adds to another
    /// catalog, see [`Catalog::extend_from_toml_str`].
    pub fn from_toml_str(text: &str) -> Result<Self, Error> {
        Self::empty().extend_from_toml_str(text)
    }

    /// Reads, parses and validates a complete catalog file (see [`Catalog::from_toml_str`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        Self::empty().extend_from_file(path)
    }

    /// The default catalog, extended with the file `extra` when there is one (see
    /// [`Catalog::extend_from_file`]).
    pub fn load(extra: Option<&Path>) -> Result<Self, Error> {
        let catalog = Self::default();
        match extra {
            Some(path) => catalog.extend_from_file(path),
            None => Ok(catalog),
        }
    }

    /// This catalog with the work types of `text` (same format as `catalog/work_types.toml`)
    /// added: one with the name of an existing work type replaces it in place, so catalog order
    /// (and keyword tie-breaking) stays put; the others are appended in their order.
    ///
    /// `text` is checked on its own for everything local to a work type (steps, keywords,
    /// complexity, resources, a name defined twice, …); its `runs_after` may name work types of
    /// this catalog as well as its own, and are checked against the merged catalog.
    pub fn extend_from_toml_str(self, text: &str) -> Result<Self, Error> {
        let raw: RawCatalog = toml::from_str(text).map_err(Error::Toml)?;
        self.merged(raw.validate()?)
    }

    /// Like [`Catalog::extend_from_toml_str`], with the text of the file `path`; errors name
    /// the file.
    pub fn extend_from_file(self, path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|error| Error::Read { path: path.to_owned(), error })?;
        self.extend_from_toml_str(&text)
            .map_err(|error| Error::InFile { path: path.to_owned(), error: Box::new(error) })
    }

    fn empty() -> Self {
        Self { work_types: Vec::new() }
    }

    /// Adds or replaces `specs` (each valid on its own, names unique), then checks the references
    /// between work types of the result.
    fn merged(mut self, specs: Vec<WorkTypeSpec>) -> Result<Self, Error> {
        for spec in specs {
            match self.work_types.iter_mut().find(|s| s.name == spec.name) {
                Some(slot) => *slot = spec,
                None => self.work_types.push(spec),
            }
        }
        for spec in &self.work_types {
            if let Some(missing) = spec.runs_after.iter().find(|r| self.get(r).is_none()) {
                return Err(Error::UnknownRunsAfter {
                    work_type: spec.name.clone(),
                    missing: missing.to_string(),
                });
            }
        }
        Ok(self)
    }

    pub fn get(&self, work_type: &WorkType) -> Option<&WorkTypeSpec> {
        self.work_types.iter().find(|s| &s.name == work_type)
    }

    /// The work types, in catalog order.
    pub fn work_types(&self) -> &[WorkTypeSpec] {
        &self.work_types
    }

    /// Breaks a request's text into intents, by rules:
    ///
    /// 1. **Clauses.** The text is split on sentence ends (`.`, `!`, `?`), `,` and `;` when
    ///    followed by whitespace or the end of the text, on line breaks, and on the words
    ///    "and", "then" and "also" (case-insensitive; the conjunction itself is dropped).
    /// 2. **Work type.** Each clause gets the work type with the earliest keyword match in it;
    ///    a keyword matches case-insensitively at the start of a word ("alert" matches
    ///    "alerts", not "xalert") and may span words ("set up"). Ties go to catalog order. Each
    ///    matching clause is an intent of its own, even if the previous one has the same type.
    /// 3. **Folding.** A clause that matches no keyword adds its text, entities and targets to
    ///    the previous intent ("Deploy Gitea and PostgreSQL"), or, before the first intent, to
    ///    the first intent.
    /// 4. **Targets.** When a clause ends in "to|on|in|into|onto [the|my|our|your] PHRASE",
    ///    PHRASE is a target if it is one to three capitalised words ("to Discord"), or one
    ///    lowercase word ("to the homelab", "to production"; without a determiner, not one that
    ///    starts with a keyword or is a common verb, as in "a script to monitor"), or two
    ///    lowercase words after a determiner ("on the staging server").
    /// 5. **Entities.** Runs of capitalised words outside the target ("Uptime Kuma"), leaving
    ///    out a clause's first word when it is a keyword or a common verb or function word
    ///    ("Deploy", "Please"), and anything that is also a target of the intent.
    /// 6. **Confidence.** The share of clauses that matched a keyword, where a clause folded into
    ///    an intent counts half ("Deploy Gitea and PostgreSQL": 0.75), rounded to three decimals.
    pub fn decompose(&self, text: &str) -> Result<Decomposition, DecomposeError> {
        if text.trim().is_empty() {
            return Err(DecomposeError::Empty);
        }
        let mut drafts: Vec<Draft> = Vec::new();
        let (mut clause_count, mut matched_count) = (0usize, 0usize);
        // Clauses before the first intent, waiting for it.
        let mut pending: Option<Draft> = None;
        for clause in clauses(text) {
            let lower = LowerClause::new(&clause);
            let matched = self.classify(&lower);
            let starts_with_keyword = self.keyword_at_start(&lower);
            let is_verb = |w: &Word| {
                NOT_NAMES.contains(&w.lower.as_str()) || self.keyword_at_start(&LowerClause(w.lower.clone()))
            };
            let (entities, targets) = entities_and_targets(&clause, starts_with_keyword, is_verb);
            clause_count += 1;
            if matched.is_some() {
                matched_count += 1;
            }
            let part = Draft {
                work_type: matched.unwrap_or(usize::MAX),
                start: clause[0].start,
                end: clause[clause.len() - 1].end,
                words: clause.len(),
                entities,
                targets,
            };
            match (matched, drafts.last_mut()) {
                // "Monitor the NAS and notify me on Telegram": a clause of the same work type
                // that names nothing new continues the intent before it. One that names an
                // entity of its own ("… and deploy Nextcloud") is an intent of its own.
                (Some(m), Some(previous)) if previous.work_type == m && part.entities.is_empty() => {
                    previous.absorb_later(part)
                }
                (Some(_), _) => {
                    let mut draft = part;
                    if let Some(before) = pending.take() {
                        draft.absorb_earlier(before);
                    }
                    drafts.push(draft);
                }
                (None, Some(previous)) => previous.absorb_later(part),
                (None, None) => match &mut pending {
                    Some(before) => before.absorb_later(part),
                    None => pending = Some(part),
                },
            }
        }
        if drafts.is_empty() {
            let known: Vec<&str> = self.work_types.iter().map(|s| s.name.as_str()).collect();
            let known = if known.is_empty() { "(none)".to_owned() } else { known.join(", ") };
            return Err(DecomposeError::NoMatch { known });
        }
        if drafts.len() > MAX_INTENTS {
            return Err(DecomposeError::TooManyIntents(drafts.len()));
        }
        let intents: Vec<Intent> = drafts.into_iter().map(|d| self.intent(text, d)).collect();
        let folded = clause_count - matched_count;
        let confidence = clamp_round((matched_count as f64 + 0.5 * folded as f64) / clause_count as f64);
        Ok(Decomposition { decomposer: DECOMPOSER.to_owned(), intents, confidence, fallback_reason: None })
    }

    /// The entities of `decomposition` that no work type of the catalog lists among its known
    /// entities (compared case-insensitively), each once, in order of appearance.
    pub fn unknown_entities(&self, decomposition: &Decomposition) -> Vec<String> {
        let known: HashSet<String> =
            self.work_types.iter().flat_map(|s| &s.known_entities).map(|e| e.to_lowercase()).collect();
        let mut unknown: Vec<String> = Vec::new();
        for entity in decomposition.intents.iter().flat_map(|i| &i.entities) {
            let lower = entity.to_lowercase();
            if !known.contains(&lower) && !unknown.iter().any(|u| u.to_lowercase() == lower) {
                unknown.push(entity.clone());
            }
        }
        unknown
    }

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

    /// The index of the work type whose keyword comes first in the clause; ties go to catalog
    /// order.
    fn classify(&self, clause: &LowerClause) -> Option<usize> {
        self.work_types
            .iter()
            .enumerate()
            .filter_map(|(i, spec)| {
                spec.keywords.iter().filter_map(|k| clause.find(k)).min().map(|pos| (pos, i))
            })
            .min()
            .map(|(_, i)| i)
    }

    fn keyword_at_start(&self, clause: &LowerClause) -> bool {
        self.work_types.iter().flat_map(|s| &s.keywords).any(|k| clause.find(k) == Some(0))
    }

    fn intent(&self, text: &str, draft: Draft) -> Intent {
        let spec = &self.work_types[draft.work_type];
        Intent {
            work_type: spec.name.clone(),
            text: text[draft.start..draft.end].to_owned(),
            entities: draft.entities,
            targets: draft.targets,
        }
    }
}

fn clamp_round(value: f64) -> f64 {
    // Rounded so that stored and displayed values read 0.45, not 0.45000000000000007.
    (value.clamp(0.0, 1.0) * 1000.0).round() / 1000.0
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

/// Replaces each `{name}` (name of a-z and '_') in `template` by `value(name)`, or leaves it as
/// it is when that is `None`. A single pass, so a value containing `{text}` is not expanded.
fn fill(template: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if is_placeholder_name(&after[..close]) => {
                match value(&after[..close]) {
                    Some(v) => out.push_str(&v),
                    None => out.push_str(&rest[open..open + close + 2]),
                }
                rest = &after[close + 1..];
            }
            _ => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn is_placeholder_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
}

/// The same alphabet as names, because a step key becomes part of a task key.
fn valid_step_key(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.len() <= 64
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

// --- Loading -------------------------------------------------------------------------------

/// The file as written; [`RawCatalog::validate`] turns it into work types. Unknown fields are
/// errors, so that a typo ("depend_on") does not silently drop a dependency.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
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
    fn validate(self) -> Result<Vec<WorkTypeSpec>, Error> {
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

        let mut keywords = Vec::with_capacity(self.keywords.len());
        for keyword in &self.keywords {
            let normalized = normalize(keyword);
            if normalized.is_empty() {
                return Err(Error::EmptyKeyword { work_type: work_type() });
            }
            if !keywords.contains(&normalized) {
                keywords.push(normalized);
            }
        }
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

/// Lowercase, with runs of whitespace made single spaces.
fn normalize(s: &str) -> String {
    s.split_whitespace().map(str::to_lowercase).collect::<Vec<_>>().join(" ")
}

// --- Decomposing ---------------------------------------------------------------------------

/// Words that split clauses.
const CONJUNCTIONS: [&str; 3] = ["and", "then", "also"];
/// Words that introduce a target at the end of a clause.
const PREPOSITIONS: [&str; 5] = ["to", "on", "in", "into", "onto"];
const DETERMINERS: [&str; 4] = ["the", "my", "our", "your"];
/// Lowercase words that are never a target ("send it to me").
const PRONOUNS: [&str; 7] = ["me", "us", "it", "them", "you", "him", "her"];
/// Capitalised only because they start a sentence: not the name of anything. Keywords are
/// left out too, but by matching the catalog.
const NOT_NAMES: &[&str] = &[
    "a",
    "add",
    "after",
    "also",
    "an",
    "and",
    "before",
    "can",
    "check",
    "configure",
    "could",
    "create",
    "enable",
    "ensure",
    "finally",
    "first",
    "for",
    "get",
    "help",
    "i",
    "it",
    "keep",
    "let",
    "let's",
    "lets",
    "make",
    "next",
    "now",
    "once",
    "our",
    "please",
    "put",
    "run",
    "send",
    "set",
    "the",
    "then",
    "this",
    "use",
    "we",
    "when",
    "will",
    "with",
    "would",
    "you",
];
/// Stripped from the ends of words: quotes, brackets and punctuation, but not the '+' of "C++"
/// or the leading '.' of ".NET".
const LEADING: &[char] = &['"', '\'', '(', '[', '{', '<', '`', '*'];
const TRAILING: &[char] = &['"', '\'', ')', ']', '}', '>', '`', '*', '.', ',', ';', ':', '!', '?'];

/// A word of the request, without surrounding punctuation.
#[derive(Debug)]
struct Word<'a> {
    text: &'a str,
    lower: String,
    /// Byte range in the request's text.
    start: usize,
    end: usize,
}

impl Word<'_> {
    fn is_capitalised(&self) -> bool {
        self.text.chars().next().is_some_and(char::is_uppercase)
    }

    /// A plain lowercase word ("homelab", "staging-2").
    fn is_lowercase(&self) -> bool {
        self.text.chars().any(|c| c.is_alphabetic())
            && self.text.chars().all(|c| c.is_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
    }
}

/// Splits a request into clauses of words (see [`Catalog::decompose`]); never yields an empty
/// clause.
fn clauses(text: &str) -> Vec<Vec<Word<'_>>> {
    let mut clauses = Vec::new();
    let mut current = Vec::new();
    let tokens = tokens(text);
    for (i, &(start, end)) in tokens.iter().enumerate() {
        let raw = &text[start..end];
        let next = tokens.get(i + 1).map_or(text.len(), |t| t.0);
        let ends_clause = raw.ends_with(['.', '!', '?', ',', ';']) || text[end..next].contains('\n');
        let trimmed_start = raw.trim_start_matches(LEADING);
        let word_start = start + (raw.len() - trimmed_start.len());
        let word = trimmed_start.trim_end_matches(TRAILING);
        if word.chars().any(char::is_alphanumeric) {
            let lower = word.to_lowercase();
            if CONJUNCTIONS.contains(&lower.as_str()) {
                clauses.push(std::mem::take(&mut current));
            } else {
                current.push(Word { text: word, lower, start: word_start, end: word_start + word.len() });
            }
        }
        if ends_clause {
            clauses.push(std::mem::take(&mut current));
        }
    }
    clauses.push(current);
    clauses.retain(|c| !c.is_empty());
    clauses
}

/// Byte ranges of the whitespace-separated tokens of `text`.
fn tokens(text: &str) -> Vec<(usize, usize)> {
    let mut tokens = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        match (c.is_whitespace(), start) {
            (true, Some(s)) => {
                tokens.push((s, i));
                start = None;
            }
            (false, None) => start = Some(i),
            _ => {}
        }
    }
    if let Some(s) = start {
        tokens.push((s, text.len()));
    }
    tokens
}

/// A clause lowercased and single-spaced, for keyword matching.
struct LowerClause(String);

impl LowerClause {
    fn new(words: &[Word]) -> Self {
        Self(words.iter().map(|w| w.lower.as_str()).collect::<Vec<_>>().join(" "))
    }

    /// The byte position of the first match of `keyword` (normalised) at a word start.
    fn find(&self, keyword: &str) -> Option<usize> {
        self.0
            .match_indices(keyword)
            .map(|(i, _)| i)
            .find(|&i| self.0[..i].chars().next_back().is_none_or(|c| !c.is_alphanumeric()))
    }
}

/// The entities and targets of one clause.
///
/// `is_verb` tells whether a lowercase word after a bare preposition is rather a verb ("a script
/// to monitor") than a place ("to production").
fn entities_and_targets(
    words: &[Word],
    starts_with_keyword: bool,
    is_verb: impl Fn(&Word) -> bool,
) -> (Vec<String>, Vec<String>) {
    // A condition ("… on Telegram when it is down") ends the phrase that may hold the target.
    let cut = words
        .iter()
        .skip(1)
        .position(|w| SUBORDINATORS.contains(&w.lower.as_str()))
        .map_or(words.len(), |p| p + 1);
    let (head, tail) = words.split_at(cut);
    let (target, before) = match target(head, is_verb) {
        Some((target, preposition)) => (Some(target), &head[..preposition]),
        None => (None, head),
    };
    let mut entities = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    // `None` marks the gap between the part before the target and the condition.
    let scanned = before.iter().map(Some).chain(std::iter::once(None)).chain(tail.iter().map(Some));
    for (i, word) in scanned.enumerate() {
        let Some(word) = word else {
            if !run.is_empty() {
                entities.push(run.join(" "));
                run.clear();
            }
            continue;
        };
        let not_a_name =
            (i == 0 && (starts_with_keyword || NOT_NAMES.contains(&word.lower.as_str()))) || word.text == "I";
        if word.is_capitalised() && !not_a_name {
            run.push(word.text);
        } else if !run.is_empty() {
            entities.push(run.join(" "));
            run.clear();
        }
    }
    if !run.is_empty() {
        entities.push(run.join(" "));
    }
    (entities, target.into_iter().collect())
}

/// Words that open a condition or a schedule rather than name a place.
const SUBORDINATORS: &[&str] = &["when", "whenever", "if", "unless", "once", "every", "until", "while"];

/// The target at the end of a clause and the index of the preposition introducing it.
fn target(words: &[Word], is_verb: impl Fn(&Word) -> bool) -> Option<(String, usize)> {
    if words.len() < 2 {
        return None;
    }
    let preposition =
        words[..words.len() - 1].iter().rposition(|w| PREPOSITIONS.contains(&w.lower.as_str()))?;
    let mut phrase = &words[preposition + 1..];
    let determiner = phrase.len() > 1 && DETERMINERS.contains(&phrase[0].lower.as_str());
    if determiner {
        phrase = &phrase[1..];
    }
    let join = |phrase: &[Word]| phrase.iter().map(|w| w.text).collect::<Vec<_>>().join(" ");
    if phrase.len() <= 3 && phrase.iter().all(Word::is_capitalised) {
        return Some((join(phrase), preposition));
    }
    let lowercase = phrase.iter().all(Word::is_lowercase) && !PRONOUNS.contains(&phrase[0].lower.as_str());
    let fits = match phrase.len() {
        1 => determiner || !is_verb(&phrase[0]),
        2 => determiner,
        _ => false,
    };
    (lowercase && fits).then(|| (join(phrase), preposition))
}

/// An intent being assembled from clauses.
struct Draft {
    /// Index into the catalog; meaningless for clauses waiting for an intent.
    work_type: usize,
    /// Byte range of the intent's text in the request.
    start: usize,
    end: usize,
    words: usize,
    entities: Vec<String>,
    targets: Vec<String>,
}

impl Draft {
    /// Adds the clauses that follow this one.
    fn absorb_later(&mut self, later: Draft) {
        self.end = later.end;
        self.words += later.words;
        push_new(&mut self.entities, later.entities);
        push_new(&mut self.targets, later.targets);
        self.drop_targets_from_entities();
    }

    /// Adds the clauses that precede this one.
    fn absorb_earlier(&mut self, mut earlier: Draft) {
        self.start = earlier.start;
        self.words += earlier.words;
        push_new(&mut earlier.entities, std::mem::take(&mut self.entities));
        push_new(&mut earlier.targets, std::mem::take(&mut self.targets));
        self.entities = earlier.entities;
        self.targets = earlier.targets;
        self.drop_targets_from_entities();
    }

    /// A thing named as a target in one clause is not also an entity in another.
    fn drop_targets_from_entities(&mut self) {
        let targets = &self.targets;
        self.entities.retain(|e| !targets.iter().any(|t| t.eq_ignore_ascii_case(e)));
    }
}

/// Appends the items of `new` that are not in `items` yet.
fn push_new(items: &mut Vec<String>, new: Vec<String>) {
    for item in new {
        if !items.contains(&item) {
            items.push(item);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPTIME_KUMA: &str = "Deploy Uptime Kuma to the homelab and send alerts to Discord";

    fn wt(name: &str) -> WorkType {
        WorkType::parse(name).unwrap()
    }

    fn decompose(text: &str) -> Decomposition {
        Catalog::default().decompose(text).unwrap()
    }

    fn work_types(d: &Decomposition) -> Vec<&str> {
        d.intents.iter().map(|i| i.work_type.as_str()).collect()
    }

    fn keys(plan: &Plan) -> Vec<&str> {
        plan.tasks().iter().map(|t| t.key.as_str()).collect()
    }

    fn task<'a>(plan: &'a Plan, key: &str) -> &'a Task {
        plan.tasks().iter().find(|t| t.key == key).unwrap_or_else(|| panic!("no task {key}"))
    }

    /// A catalog with one work type, "thing", whose parts are given as TOML.
    fn one_work_type(head: &str, steps: &str) -> Result<Catalog, Error> {
        Catalog::from_toml_str(&format!(
            "[[work_type]]\nname = \"thing\"\nkeywords = [\"thing\"]\nbase_complexity = 0.5\n\
             {head}\n{steps}"
        ))
    }

    #[test]
    fn default_catalog_has_the_required_work_types() {
        let catalog = Catalog::default();
        let names: Vec<&str> = catalog.work_types().iter().map(|s| s.name.as_str()).collect();
        for name in ["deployment", "code_generation", "monitoring", "maintenance", "research"] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        for spec in catalog.work_types() {
            assert!((1..=4).contains(&spec.steps.len()), "{} has {} steps", spec.name, spec.steps.len());
            assert!(!spec.keywords.is_empty(), "{} has no keyword", spec.name);
            assert!(spec.root_steps().count() >= 1 && spec.leaf_steps().count() >= 1);
        }
        let monitoring = catalog.get(&wt("monitoring")).unwrap();
        assert_eq!(monitoring.runs_after, [wt("deployment")]);
        let deployment = catalog.get(&wt("deployment")).unwrap();
        let steps: Vec<&str> = deployment.steps.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(steps, ["prepare", "deploy", "verify"]);
        // A step's partial override keeps the work type's other defaults.
        let verify = &deployment.steps[2].resources;
        assert_eq!((verify.cpu, verify.memory_mb, verify.gpu), (0.5, 256, 0));
        assert!(catalog.get(&wt("nope")).is_none());
        let written = toml::to_string(&catalog).unwrap();
        assert_eq!(Catalog::from_toml_str(&written).unwrap(), catalog, "{written}");
    }

    #[test]
    fn uptime_kuma_request_yields_deployment_then_monitoring() {
        let d = decompose(UPTIME_KUMA);
        assert_eq!(d.decomposer, "rules");
        assert_eq!(work_types(&d), ["deployment", "monitoring"]);
        let (deploy, monitor) = (&d.intents[0], &d.intents[1]);
        assert_eq!(deploy.text, "Deploy Uptime Kuma to the homelab");
        assert_eq!(deploy.entities, ["Uptime Kuma"]);
        assert_eq!(deploy.targets, ["homelab"]);
        assert_eq!(monitor.text, "send alerts to Discord");
        assert!(monitor.entities.is_empty(), "{:?}", monitor.entities);
        assert_eq!(monitor.targets, ["Discord"]);
        assert_eq!(d.confidence, 1.0, "every clause matched a keyword");
        assert_eq!(d.fallback_reason, None);
    }

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
    fn a_condition_does_not_hide_the_target_and_a_follow_up_clause_joins_its_intent() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Monitor the NAS and notify me on Telegram when it is down").unwrap();
        assert_eq!(work_types(&d), ["monitoring"]);
        assert_eq!(d.intents[0].entities, ["NAS"]);
        assert_eq!(d.intents[0].targets, ["Telegram"]);
    }

    #[test]
    fn maintenance_request() {
        let catalog = Catalog::default();
        // "upgrade it" names nothing new: one maintenance intent, whose steps (snapshot, apply,
        // verify) already put the backup before the upgrade.
        let d = catalog.decompose("Back up PostgreSQL, then upgrade it on the NAS").unwrap();
        assert_eq!(work_types(&d), ["maintenance"]);
        assert_eq!(d.intents[0].entities, ["PostgreSQL"]);
        assert_eq!(d.intents[0].targets, ["NAS"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.snapshot", "1.apply", "1.verify"]);
        let apply = task(&plan, "1.apply");
        assert!(apply.capabilities.contains("shell") && apply.capabilities.contains("maintenance"));
        assert!(apply.description.contains("PostgreSQL"), "{}", apply.description);
        // Two upgrades of two named things stay two intents.
        let d = catalog.decompose("Upgrade Nextcloud and upgrade Jellyfin").unwrap();
        assert_eq!(work_types(&d), ["maintenance", "maintenance"]);
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
    fn clauses_without_a_keyword_fold_into_an_intent() {
        let d = decompose("For the homelab, please set up Uptime Kuma, Grafana and Prometheus.");
        assert_eq!(work_types(&d), ["deployment"]);
        let intent = &d.intents[0];
        assert_eq!(intent.text, "For the homelab, please set up Uptime Kuma, Grafana and Prometheus");
        assert_eq!(intent.entities, ["Uptime Kuma", "Grafana", "Prometheus"]);
        assert!(intent.targets.is_empty(), "'for' is no target preposition");
        let d = decompose("On my NAS, install Immich");
        assert_eq!(d.intents[0].targets, ["NAS"]);
        assert_eq!(d.intents[0].entities, ["Immich"]);
    }

    #[test]
    fn keywords_match_at_word_starts_case_insensitively() {
        assert_eq!(work_types(&decompose("SEND ALERTS")), ["monitoring"]);
        assert_eq!(work_types(&decompose("Please Set  Up Gitea")), ["deployment"]);
        assert_eq!(work_types(&decompose("a self-hosted wiki")), ["deployment"]);
        let err = Catalog::default().decompose("Stopwatch").unwrap_err();
        assert!(matches!(err, DecomposeError::NoMatch { .. }), "'watch' inside a word matched");
    }

    #[test]
    fn empty_and_unrecognised_text_are_errors() {
        let catalog = Catalog::default();
        for empty in ["", "   \n\t "] {
            let err = catalog.decompose(empty).unwrap_err();
            assert_eq!(err, DecomposeError::Empty);
            assert_eq!(err.to_string(), "the request text is empty");
        }
        let err = catalog.decompose("hello there").unwrap_err();
        assert!(matches!(err, DecomposeError::NoMatch { .. }));
        assert_eq!(
            err.to_string(),
            "no work type in the catalog matches the request; known work types: \
             deployment, code_generation, monitoring, maintenance, research, transcription"
        );
        assert!(catalog.decompose(" , and ; then .").is_err());
    }

    #[test]
    fn confidence_is_the_share_of_clauses_that_matched() {
        // "PostgreSQL" matches nothing and is folded into the deployment: it counts half.
        let d = decompose("Deploy Gitea and PostgreSQL");
        assert_eq!(d.confidence, 0.75);
        let d = decompose("Please, for the team. Deploy Gitea to the homelab");
        assert_eq!(d.confidence, 0.667, "{d:?}");
        assert_eq!(decompose(UPTIME_KUMA).confidence, 1.0);
    }

    #[test]
    fn entities_no_work_type_knows_are_unknown() {
        let catalog = Catalog::default();
        let d = catalog.decompose("Deploy Gitea and Frobnicator to the homelab").unwrap();
        assert_eq!(catalog.unknown_entities(&d), ["Frobnicator"]);
        let d = catalog.decompose("Deploy uptime kuma. Deploy GITEA").unwrap();
        assert!(catalog.unknown_entities(&d).is_empty(), "case does not matter: {d:?}");
        let d = catalog.decompose("Deploy Zorg. Monitor Zorg").unwrap();
        assert_eq!(catalog.unknown_entities(&d), ["Zorg"], "each once");
    }

    #[test]
    fn user_catalog_adds_and_replaces_work_types() {
        let catalog = Catalog::default().extend_from_toml_str(
            r#"
            [[work_type]]
            name = "backup_restore"
            keywords = ["restore", "recover"]
            capabilities = ["backup"]
            base_complexity = 0.6
            runs_after = ["backup_restore"]
            resources = { cpu = 1.0, memory_mb = 1024 }

            [[work_type.step]]
            key = "fetch"
            description = "Fetch the latest backup of {entities}"
            duration_secs = 240

            [[work_type.step]]
            key = "restore"
            description = "Restore {entities} onto {targets}"
            duration_secs = 600
            depends_on = ["fetch"]
            resources = { gpu = 1 }

            [[work_type]]
            name = "research"
            keywords = ["ponder"]
            base_complexity = 0.1
            [[work_type.step]]
            key = "think"
            description = "Think about {text}"
            duration_secs = 60
            "#,
        );
        let catalog = catalog.unwrap();
        let names: Vec<&str> = catalog.work_types().iter().map(|s| s.name.as_str()).collect();
        // Replaced in place, added at the end.
        assert_eq!(
            names,
            [
                "deployment",
                "code_generation",
                "monitoring",
                "maintenance",
                "research",
                "transcription",
                "backup_restore"
            ]
        );
        assert_eq!(catalog.get(&wt("research")).unwrap().steps.len(), 1);
        assert!(catalog.decompose("Compare A and B").is_err(), "the old research keywords are gone");

        let d = catalog.decompose("Restore Vaultwarden onto the homelab and recover Paperless").unwrap();
        assert_eq!(work_types(&d), ["backup_restore", "backup_restore"]);
        assert_eq!(d.intents[0].targets, ["homelab"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.fetch", "1.restore", "2.fetch", "2.restore"]);
        let restore = task(&plan, "1.restore");
        assert_eq!(restore.resources, Resources { cpu: 1.0, memory_mb: 1024, gpu: 1 });
        assert_eq!(restore.description, "Restore Vaultwarden onto homelab");
        let caps: Vec<&str> = restore.capabilities.iter().map(String::as_str).collect();
        assert_eq!(caps, ["backup", "backup_restore"]);
        // runs_after may name the work type itself: the second restore waits for the first.
        assert_eq!(task(&plan, "2.fetch").depends_on, [restore.id]);
    }

    /// A user catalog file adding `backup_restore`, which runs after `runs_after` (TOML items).
    fn backup_restore(runs_after: &str) -> String {
        format!(
            r#"
            [[work_type]]
            name = "backup_restore"
            keywords = ["restore", "recover"]
            capabilities = ["backup"]
            base_complexity = 0.6
            runs_after = [{runs_after}]

            [[work_type.step]]
            key = "fetch"
            description = "Fetch the latest backup of {{entities}}"
            duration_secs = 240

            [[work_type.step]]
            key = "restore"
            description = "Restore {{entities}} onto {{targets}}"
            duration_secs = 600
            depends_on = ["fetch"]
            "#
        )
    }

    /// Writes `text` to a file `name` of a new temporary directory; returns the directory (to
    /// remove) and the file.
    fn temp_file(name: &str, text: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("switchyard-catalog-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(name);
        std::fs::write(&file, text).unwrap();
        (dir, file)
    }

    #[test]
    fn user_file_may_run_after_default_work_types() {
        let (dir, user) = temp_file("user.toml", &backup_restore(r#""deployment""#));
        let catalog = Catalog::load(Some(&user)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<&str> = catalog.work_types().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "deployment",
                "code_generation",
                "monitoring",
                "maintenance",
                "research",
                "transcription",
                "backup_restore"
            ]
        );
        assert_eq!(catalog.get(&wt("backup_restore")).unwrap().runs_after, [wt("deployment")]);

        let d = catalog.decompose("Deploy Vaultwarden to the homelab, then restore Vaultwarden").unwrap();
        assert_eq!(work_types(&d), ["deployment", "backup_restore"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.prepare", "1.deploy", "1.verify", "2.fetch", "2.restore"]);
        assert_eq!(task(&plan, "2.fetch").depends_on, [task(&plan, "1.verify").id]);
        assert_eq!(task(&plan, "2.restore").depends_on, [task(&plan, "2.fetch").id]);
        // Only earlier intents count: a restore before the deployment waits for nothing.
        let d = catalog.decompose("Restore Vaultwarden, then deploy Gitea").unwrap();
        assert_eq!(work_types(&d), ["backup_restore", "deployment"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(task(&plan, "1.fetch").depends_on, []);
        assert_eq!(task(&plan, "2.prepare").depends_on, []);

        // The same from text; without an extra file, the default catalog.
        let text = backup_restore(r#""deployment""#);
        assert_eq!(Catalog::default().extend_from_toml_str(&text).unwrap(), catalog);
        assert_eq!(Catalog::load(None).unwrap(), Catalog::default());
        // On its own, the file is no complete catalog.
        let err = Catalog::from_toml_str(&text).unwrap_err().to_string();
        assert!(err.contains("backup_restore runs after \"deployment\""), "{err}");
        // The merged catalog is complete: written out, it loads on its own.
        let written = toml::to_string(&catalog).unwrap();
        assert_eq!(Catalog::from_toml_str(&written).unwrap(), catalog, "{written}");
    }

    #[test]
    fn user_file_running_after_an_unknown_work_type_is_rejected() {
        let (dir, user) = temp_file("user.toml", &backup_restore(r#""deployment", "nonexistent""#));
        let err = Catalog::load(Some(&user)).unwrap_err();
        let Error::InFile { path, error } = &err else { panic!("{err:?}") };
        assert_eq!(path, &user);
        assert!(
            matches!(
                &**error,
                Error::UnknownRunsAfter { work_type, missing }
                    if work_type == &wt("backup_restore") && missing == "nonexistent"
            ),
            "{error:?}"
        );
        let message = err.to_string();
        assert!(message.contains("user.toml"), "{message}");
        assert!(
            message.ends_with(
                "work type backup_restore runs after \"nonexistent\", which is not a work type of \
                 the catalog"
            ),
            "{message}"
        );
        std::fs::remove_dir_all(&dir).unwrap();

        // Not even a valid name.
        let err = Catalog::default().extend_from_toml_str(&backup_restore(r#""Not Valid""#)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "work type backup_restore runs after \"Not Valid\", which is not a work type of the catalog"
        );
        // What is local to a work type is still checked file by file.
        let text = backup_restore(r#""deployment""#).replace("duration_secs = 240", "duration_secs = 0");
        let err = Catalog::default().extend_from_toml_str(&text).unwrap_err();
        assert_eq!(err.to_string(), "work type backup_restore: step fetch needs a positive duration_secs");
        let twice = format!("{0}\n{0}", backup_restore(""));
        let err = Catalog::default().extend_from_toml_str(&twice).unwrap_err();
        assert_eq!(err.to_string(), "work type backup_restore is defined twice");
    }

    #[test]
    fn invalid_catalogs_are_rejected_with_clear_errors() {
        let step = |key: &str, deps: &str| {
            format!(
                "[[work_type.step]]\nkey = \"{key}\"\ndescription = \"x\"\nduration_secs = 1\n\
                 depends_on = [{deps}]\n"
            )
        };
        let cases: Vec<(Result<Catalog, Error>, &str)> = vec![
            (
                one_work_type("", &(step("a", "\"c\"") + &step("b", "\"a\"") + &step("c", "\"b\""))),
                "work type thing: the steps' depends_on form a cycle through step a",
            ),
            (
                one_work_type("", &step("a", "\"a\"")),
                "work type thing: the steps' depends_on form a cycle through step a",
            ),
            (
                one_work_type("", &(step("a", "") + &step("b", "\"nope\""))),
                "work type thing: step b depends on \"nope\", which is not a step of this work type",
            ),
            (
                Catalog::from_toml_str(
                    "[[work_type]]\nname = \"thing\"\nkeywords = [\"t\"]\nbase_complexity = 1.5\n\
                     [[work_type.step]]\nkey = \"a\"\ndescription = \"x\"\nduration_secs = 1\n",
                ),
                "work type thing: base_complexity 1.5 is not in [0, 1]",
            ),
            (
                one_work_type("runs_after = [\"deployment\"]", &step("a", "")),
                "work type thing runs after \"deployment\", which is not a work type of the catalog",
            ),
            (one_work_type("", ""), "work type thing has no step"),
            (
                one_work_type("", &(step("a", "") + &step("a", ""))),
                "work type thing: step a is defined twice",
            ),
            (one_work_type("", &step("A b", "")), "work type thing: invalid step key \"A b\""),
            (
                Catalog::from_toml_str(
                    "[[work_type]]\nname = \"thing\"\nkeywords = [\"ok\", \"  \"]\n\
                     base_complexity = 0.5\n",
                ),
                "work type thing has an empty keyword",
            ),
            (
                Catalog::from_toml_str(
                    "[[work_type]]\nname = \"Bad Name\"\nkeywords = []\nbase_complexity = 0.5\n",
                ),
                "invalid work type \"Bad Name\"",
            ),
            (
                one_work_type(
                    "",
                    "[[work_type.step]]\nkey = \"a\"\ndescription = \"For {who}\"\nduration_secs = 1\n",
                ),
                "work type thing: step a uses the unknown placeholder {who}",
            ),
            (
                one_work_type(
                    "",
                    "[[work_type.step]]\nkey = \"a\"\ndescription = \"x\"\nduration_secs = 0\n",
                ),
                "work type thing: step a needs a positive duration_secs",
            ),
            (
                one_work_type(
                    "",
                    "[[work_type.step]]\nkey = \"a\"\ndescription = \"x\"\nduration_secs = 1\n\
                     resources = { cpu = -1.0 }\n",
                ),
                "work type thing: the resources of step a need a finite, non-negative cpu",
            ),
            (one_work_type("", &(step("a", "") + "depend_on = [\"b\"]\n")), "unknown field `depend_on`"),
            (
                one_work_type("", &step("a", "")).and_then(|_| {
                    let twice = format!(
                        "{0}\n{0}",
                        "[[work_type]]\nname = \"x\"\nkeywords = []\n\
                        base_complexity = 0.5\n[[work_type.step]]\nkey = \"a\"\n\
                        description = \"x\"\nduration_secs = 1\n"
                    );
                    Catalog::from_toml_str(&twice)
                }),
                "work type x is defined twice",
            ),
        ];
        for (result, expected) in cases {
            let err = result.expect_err(expected).to_string();
            assert!(err.contains(expected), "{err:?} does not contain {expected:?}");
        }
    }

    #[test]
    fn catalog_files_are_read_and_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("switchyard-catalog-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.toml");
        std::fs::write(&good, DEFAULT_CATALOG).unwrap();
        assert_eq!(Catalog::from_file(&good).unwrap(), Catalog::default());
        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[[work_type]]\nname = \"x\"\nkeywords = []\nbase_complexity = 2.0\n").unwrap();
        let err = Catalog::from_file(&bad).unwrap_err().to_string();
        assert!(err.contains("bad.toml") && err.contains("base_complexity 2"), "{err}");
        let err = Catalog::from_file(dir.join("missing.toml")).unwrap_err();
        assert!(matches!(err, Error::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
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
