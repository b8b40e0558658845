//! The `llm` executor: asks a model of an OpenAI-compatible provider to do the task, and reports
//! its answer as the output, with the tokens it used.
//!
//! The model gets a system prompt that says what it is (an agent of Switchyard doing one task of
//! a plan) and a user message with the task's key, work type and description. Its answer is the
//! result's output; an empty answer is a failure (with the tokens it cost). A failed call (after
//! [`Client::chat_with_retries`]) is a failure whose reason says what went wrong, never with the
//! API key.

use crate::llm::{ChatRequest, Client, RetryPolicy};
use crate::model::wire::TaskAssignment;

use super::executor::Execution;

/// What the model is told it is.
pub const SYSTEM_PROMPT: &str = "You are an agent of Switchyard, an orchestrator that splits a \
request into a plan of tasks and gives each task to an agent. You are doing one task of such a \
plan. Do the task described below, and answer with its result only: what you produced (text, \
code, findings, commands), without preamble or follow-up questions. If the task cannot be done, \
say why in one short paragraph.";

/// Runs each task as one chat with the provider's model.
#[derive(Debug, Clone)]
pub struct Llm {
    client: Client,
    retry: RetryPolicy,
    max_tokens: Option<u32>,
}

impl Llm {
    /// Asks `client`'s model, with the default [`RetryPolicy`] and no limit on the answer's tokens.
    pub fn new(client: Client) -> Self {
        Llm { client, retry: RetryPolicy::default(), max_tokens: None }
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Caps the tokens of each answer (`max_tokens`).
    pub fn with_max_tokens(mut self, max_tokens: u32) -> Self {
        self.max_tokens = Some(max_tokens);
        self
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// What the model is asked for `task`.
    pub fn request(&self, task: &TaskAssignment) -> ChatRequest {
        let task = &task.task;
        ChatRequest {
            system: SYSTEM_PROMPT.into(),
            user: format!("Task: {}\nWork type: {}\n\n{}", task.key, task.work_type, task.description),
            json_schema: None,
            max_tokens: self.max_tokens,
            temperature: None,
        }
    }

    pub async fn run(&self, task: &TaskAssignment) -> Execution {
        let model = &self.client.endpoint().model;
        match self.client.chat_with_retries(&self.request(task), &self.retry).await {
            Ok(completion) if completion.content.trim().is_empty() => {
                Execution::failed(format!("the model {model} answered nothing")).with_usage(completion.usage)
            }
            Ok(completion) => Execution::succeeded(completion.content).with_usage(completion.usage),
            Err(err) => Execution::failed(format!("the model {model} did not do the task: {err}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::llm::{Endpoint, Secret};

    fn llm() -> Llm {
        // Nothing listens on port 9 of 127.0.0.1 (discard): no test here gets that far anyway.
        let endpoint = Endpoint {
            base_url: "http://127.0.0.1:9/v1".into(),
            model: "llama3".into(),
            api_key: Some(Secret::new("sk-secret".into())),
            timeout: Duration::from_secs(1),
        };
        Llm::new(Client::new(endpoint).unwrap())
    }

    #[test]
    fn the_model_is_told_the_task() {
        let task = crate::agent::tests::assignment("1.deploy", "Deploy Uptime Kuma", 5);
        let request = llm().with_max_tokens(500).request(&task);
        assert_eq!(request.system, SYSTEM_PROMPT);
        assert_eq!(request.user, "Task: 1.deploy\nWork type: deployment\n\nDeploy Uptime Kuma");
        assert_eq!((request.max_tokens, request.json_schema), (Some(500), None));
    }

    #[test]
    fn its_debug_output_hides_the_key() {
        let shown = format!("{:?}", llm());
        assert!(!shown.contains("sk-secret"), "{shown}");
        assert!(shown.contains("llama3"), "{shown}");
    }
}
