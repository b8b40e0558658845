//! What an agent does with a task: the [`TaskHandler`] trait that every executor implements, the
//! [`Execution`] it returns, and [`Executor`], the executors that ship with Switchyard.

use std::future::Future;
use std::sync::Arc;

use super::exec::Exec;
use super::llm::Llm;
use super::simulate::Simulate;
use crate::model::wire::{TaskAssignment, TokenUsage};

/// How one attempt of a task ended, as the handler reports it. The runtime turns it into a
/// [`crate::model::wire::TaskResult`], truncating `output` and `error` to
/// [`crate::model::wire::MAX_RESULT_OUTPUT_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Execution {
    pub success: bool,
    /// What the task printed or produced.
    pub output: String,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// The tokens an external model used, for executors that call one.
    pub usage: Option<TokenUsage>,
    /// Nothing really ran (the `simulate` executor): the result says so, and Switchyard learns
    /// no durations from it.
    pub simulated: bool,
}

impl Execution {
    /// A success with its output.
    pub fn succeeded(output: impl Into<String>) -> Self {
        Execution { success: true, output: output.into(), error: None, usage: None, simulated: false }
    }

    /// A failure with its reason.
    pub fn failed(error: impl Into<String>) -> Self {
        Execution {
            success: false,
            output: String::new(),
            error: Some(error.into()),
            usage: None,
            simulated: false,
        }
    }

    /// The same, marked as simulated: nothing really ran.
    pub fn simulated(mut self) -> Self {
        self.simulated = true;
        self
    }

    /// The same, with the tokens a model used.
    pub fn with_usage(mut self, usage: TokenUsage) -> Self {
        self.usage = Some(usage);
        self
    }

    /// The same, with `output`.
    pub fn with_output(mut self, output: impl Into<String>) -> Self {
        self.output = output.into();
        self
    }
}

/// Runs tasks for an agent. Write one to make an agent in Rust; the runtime
/// ([`super::Agent`]) does the messaging: it calls `run` once per delivered assignment, up to the
/// agent's capacity at a time, and reports what it returns.
///
/// A handler reports a failure as an [`Execution`] with `success: false`; a panic is caught and
/// reported as a failure too, but should not be relied upon. A redelivered assignment (the
/// agent stopped before its result was confirmed) is run again: handlers should be idempotent, or
/// key their side effects by `task.task.id` and `task.attempt`.
pub trait TaskHandler: Send + Sync + 'static {
    fn run(&self, task: &TaskAssignment) -> impl Future<Output = Execution> + Send;
}

impl<H: TaskHandler> TaskHandler for Arc<H> {
    fn run(&self, task: &TaskAssignment) -> impl Future<Output = Execution> + Send {
        (**self).run(task)
    }
}

/// The executors that ship with Switchyard, chosen at run time (`switchyard agent --executor`).
#[derive(Debug, Clone)]
pub enum Executor {
    Simulate(Simulate),
    Exec(Exec),
    Llm(Llm),
}

impl TaskHandler for Executor {
    async fn run(&self, task: &TaskAssignment) -> Execution {
        match self {
            Executor::Simulate(simulate) => simulate.run(task).await,
            Executor::Exec(exec) => exec.run(task).await,
            Executor::Llm(llm) => llm.run(task).await,
        }
    }
}

impl TaskHandler for Simulate {
    fn run(&self, task: &TaskAssignment) -> impl Future<Output = Execution> + Send {
        Simulate::run(self, task)
    }
}

impl TaskHandler for Exec {
    fn run(&self, task: &TaskAssignment) -> impl Future<Output = Execution> + Send {
        Exec::run(self, task)
    }
}

impl TaskHandler for Llm {
    fn run(&self, task: &TaskAssignment) -> impl Future<Output = Execution> + Send {
        Llm::run(self, task)
    }
}

impl From<Simulate> for Executor {
    fn from(simulate: Simulate) -> Self {
        Executor::Simulate(simulate)
    }
}

impl From<Exec> for Executor {
    fn from(exec: Exec) -> Self {
        Executor::Exec(exec)
    }
}

impl From<Llm> for Executor {
    fn from(llm: Llm) -> Self {
        Executor::Llm(llm)
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
pub fn truncate_utf8(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate_utf8("hello".into(), 10), "hello");
        assert_eq!(truncate_utf8("hello".into(), 3), "hel");
        // "é" is two bytes: cutting through it drops it whole.
        assert_eq!(truncate_utf8("aé".into(), 2), "a");
        assert_eq!(truncate_utf8("🦀🦀".into(), 7), "🦀");
        assert_eq!(truncate_utf8("🦀".into(), 0), "");
    }
}
