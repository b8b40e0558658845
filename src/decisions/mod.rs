//! The decisions Switchyard takes and explains, each a pure function of what it is given:
//! which agent takes a task (`routing`), whether a plan goes to an external model (`fallback`,
//! over the `providers` and their quota windows), whether it needs an approval (`approval`), how long an attempt may run (`leases`), and whether a request's trail is
//! complete (`audit`). Each returns its reason with the figures it was based on.

pub mod approval;
pub mod audit;
pub mod fallback;
#[cfg(test)]
mod fixtures;
pub mod leases;
pub mod providers;
pub mod routing;

/// The singular or the plural of a word, for the counts in reasons ("1 agent", "2 agents").
pub(crate) fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}
