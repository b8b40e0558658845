//! From a request's text to a plan: the catalog of work types, the decomposers that read the
//! text into intents (rules, or a model), the planner that turns intents into a DAG of tasks,
//! what the fleet can do, and how complex the plan is. Pure, except the model decomposer, which
//! asks its model through `llm`.

pub mod catalog;
pub mod complexity;
pub mod decomposer;
#[cfg(test)]
mod fixtures;
pub mod fleet;
pub mod planner;
pub mod rules;
