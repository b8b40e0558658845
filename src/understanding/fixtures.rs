//! What the tests of the understanding share: reading a request with the built-in catalog, and
//! reading a plan back.

use crate::model::domain::{Decomposition, Plan, Task};
use crate::model::ids::WorkType;
use crate::understanding::catalog::Catalog;

pub(crate) fn wt(name: &str) -> WorkType {
    WorkType::parse(name).unwrap()
}

/// `text` read by the rules of the built-in catalog.
pub(crate) fn decompose(text: &str) -> Decomposition {
    Catalog::default().decompose(text).unwrap()
}

pub(crate) fn work_types(d: &Decomposition) -> Vec<&str> {
    d.intents.iter().map(|i| i.work_type.as_str()).collect()
}

pub(crate) fn keys(plan: &Plan) -> Vec<&str> {
    plan.tasks().iter().map(|t| t.key.as_str()).collect()
}

pub(crate) fn task<'a>(plan: &'a Plan, key: &str) -> &'a Task {
    plan.tasks().iter().find(|t| t.key == key).unwrap_or_else(|| panic!("no task {key}"))
}
