//! The catalog of work types: loading, validating and merging catalog files.
//!
//! The catalog is data, not code: each work type (deployment, monitoring, …) says how to
//! recognise it in a request (keywords), what an agent needs to take it (capabilities,
//! resources) and which steps it breaks into. The default catalog is
//! `catalog/work_types.toml`, embedded in the binary; a user file can add or replace work types
//! ([`Catalog::load`], [`Catalog::extend_from_file`]). Each file is checked on its own for what
//! is local to a work type (steps, complexity, …); references between work types (`runs_after`)
//! are checked against the merged catalog, so a user file may refer to the default work types.
//! Everything here is pure logic: the only I/O is reading catalog files. The catalog reads
//! requests in [`super::rules`] and makes plans in [`super::planner`].

mod file;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use self::file::RawCatalog;
use crate::model::domain::{Decomposition, Resources};
use crate::model::ids::{self, WorkType};

/// The default catalog, embedded so that the binary works without any file.
const DEFAULT_CATALOG: &str = include_str!("../../../catalog/work_types.toml");

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
    /// Generic words ("set up") that decide a clause only when no keyword of any work type is in
    /// it. Lowercase and single-spaced, none of them among `keywords`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub weak_keywords: Vec<String>,
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
}

/// Replaces each `{name}` (name of a-z and '_') in `template` by `value(name)`, or leaves it as
/// it is when that is `None`. A single pass, so a value containing `{text}` is not expanded.
pub(super) fn fill(template: &str, mut value: impl FnMut(&str) -> Option<String>) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ids::RequestId;
    use crate::understanding::fixtures::*;

    /// The work types of the default catalog, in order.
    const DEFAULT_WORK_TYPES: &[&str] = &[
        "deployment",
        "code_generation",
        "monitoring",
        "maintenance",
        "research",
        "transcription",
        "backup",
        "restore",
        "upgrade",
        "firewall",
        "dns",
        "diagnosis",
        "dashboard",
    ];

    /// A catalog with one work type, "thing", whose parts are given as TOML.
    fn one_work_type(head: &str, steps: &str) -> Result<Catalog, Error> {
        Catalog::from_toml_str(&format!(
            "[[work_type]]\nname = \"thing\"\nkeywords = [\"thing\"]\nbase_complexity = 0.5\n\
             {head}\n{steps}"
        ))
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
    fn default_catalog_has_the_required_work_types() {
        let catalog = Catalog::default();
        let names: Vec<&str> = catalog.work_types().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, DEFAULT_WORK_TYPES);
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
    fn weak_keywords_are_normalised_and_apart_from_keywords() {
        let step = "[[work_type.step]]\nkey = \"a\"\ndescription = \"x\"\nduration_secs = 1\n";
        let catalog = one_work_type("weak_keywords = [\"Set  Up\", \"thing\", \"set up\"]", step).unwrap();
        let spec = catalog.get(&wt("thing")).unwrap();
        assert_eq!(
            (spec.keywords.as_slice(), spec.weak_keywords.as_slice()),
            (["thing".to_owned()].as_slice(), ["set up".to_owned()].as_slice())
        );
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
        // Replaced in place, added at the end. The default `restore` keeps "restore": ties go to
        // catalog order, so the added work type is asked for with "recover".
        assert_eq!(names, [DEFAULT_WORK_TYPES, &["backup_restore"]].concat());
        assert_eq!(catalog.get(&wt("research")).unwrap().steps.len(), 1);
        assert!(catalog.decompose("Compare A and B").is_err(), "the old research keywords are gone");

        let d = catalog.decompose("Recover Vaultwarden onto the homelab and recover Paperless").unwrap();
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

    #[test]
    fn user_file_may_run_after_default_work_types() {
        let (dir, user) = temp_file("user.toml", &backup_restore(r#""deployment""#));
        let catalog = Catalog::load(Some(&user)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let names: Vec<&str> = catalog.work_types().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, [DEFAULT_WORK_TYPES, &["backup_restore"]].concat());
        assert_eq!(catalog.get(&wt("backup_restore")).unwrap().runs_after, [wt("deployment")]);

        let d = catalog.decompose("Deploy Vaultwarden to the homelab, then recover Vaultwarden").unwrap();
        assert_eq!(work_types(&d), ["deployment", "backup_restore"]);
        let plan = catalog.plan(RequestId::random(), &d).unwrap();
        assert_eq!(keys(&plan), ["1.prepare", "1.deploy", "1.verify", "2.fetch", "2.restore"]);
        assert_eq!(task(&plan, "2.fetch").depends_on, [task(&plan, "1.verify").id]);
        assert_eq!(task(&plan, "2.restore").depends_on, [task(&plan, "2.fetch").id]);
        // Only earlier intents count: a restore before the deployment waits for nothing.
        let d = catalog.decompose("Recover Vaultwarden, then deploy Gitea").unwrap();
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
                one_work_type("weak_keywords = [\"set up\", \"\"]", &step("a", "")),
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

    /// The README's table of built-in work types, as the catalog says it.
    fn readme_table(catalog: &Catalog) -> String {
        let mut table = String::from(
            "| work type | recognised by (some keywords) | every task needs | steps (and what a step needs besides) |\n\
             | --- | --- | --- | --- |\n",
        );
        for spec in catalog.work_types() {
            // A task needs its work type's name too (see `Catalog::plan`).
            let mut needs: BTreeSet<&str> = spec.capabilities.iter().map(String::as_str).collect();
            needs.insert(spec.name.as_str());
            let needs: Vec<&str> = needs.into_iter().collect();
            let r = spec.resources;
            let steps: Vec<String> = spec
                .steps
                .iter()
                .map(|step| {
                    let mut extra: Vec<String> = step.capabilities.iter().cloned().collect();
                    if step.resources != spec.resources {
                        let s = step.resources;
                        extra.push(format!("{} CPU, {} MiB, {} GPU", s.cpu, s.memory_mb, s.gpu));
                    }
                    if extra.is_empty() {
                        step.key.clone()
                    } else {
                        format!("{} ({})", step.key, extra.join(", "))
                    }
                })
                .collect();
            let keywords: Vec<String> = spec.keywords.iter().take(4).map(|k| format!("\"{k}\"")).collect();
            table.push_str(&format!(
                "| `{}` | {} | `{}`; {} CPU, {} MiB, {} GPU | {} |\n",
                spec.name,
                keywords.join(", "),
                needs.join("`, `"),
                r.cpu,
                r.memory_mb,
                r.gpu,
                steps.join(" → ")
            ));
        }
        table
    }

    #[test]
    fn the_readme_lists_the_built_in_work_types_as_they_are() {
        let readme = include_str!("../../../README.md");
        let table = readme_table(&Catalog::default());
        assert!(
            readme.contains(&table),
            "README.md should hold this table of the built-in work types:\n{table}"
        );
    }
}
