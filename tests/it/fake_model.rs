//! A fake OpenAI-compatible model server on 127.0.0.1 (wiremock), for tests of whatever asks a
//! model: the `llm` client, the `llm` executor, a model-based decomposer.
//!
//! It serves `POST /v1/chat/completions`. Replies queued with [`FakeModel::once`] are served first,
//! each to one call, in the order they were queued; then the last [`FakeModel::always`] reply
//! answers every call. A call that nothing answers gets a 404. [`FakeModel::received`] lists the
//! calls it got, with their JSON bodies and `Authorization` headers.
//!
//! ```ignore
//! let fake = FakeModel::start().await;
//! fake.once(Reply::rate_limited(1)).await;          // the first call: 429, Retry-After 1
//! fake.answer_json(&decomposition, usage(10, 20)).await; // then: a JSON answer, every time
//! let client = Client::new(fake.endpoint(Some("sk-test")))?;
//! ```

#![allow(dead_code)]

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use switchyard::llm::{Endpoint, Secret};
use switchyard::model::wire::TokenUsage;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The model name the fake's [`FakeModel::endpoint`] asks for (the fake answers any).
pub const FAKE_MODEL: &str = "fake-model";

/// `TokenUsage` of `input` prompt tokens and `output` completion tokens.
pub fn usage(input: u64, output: u64) -> TokenUsage {
    TokenUsage { input_tokens: input, output_tokens: output }
}

/// The body of a chat completion whose first choice says `content`, with `usage`.
pub fn completion_body(content: &str, usage: TokenUsage) -> Value {
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": FAKE_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": usage.input_tokens,
            "completion_tokens": usage.output_tokens,
            "total_tokens": usage.input_tokens + usage.output_tokens,
        },
    })
}

/// One reply of the fake server.
#[derive(Debug, Clone)]
pub struct Reply {
    status: u16,
    body: String,
    headers: Vec<(String, String)>,
    delay: Duration,
}

impl Reply {
    /// 200, a chat completion saying `content` with `usage`.
    pub fn answer(content: &str, usage: TokenUsage) -> Self {
        Reply::raw(200, &completion_body(content, usage).to_string())
    }

    /// 200, a chat completion whose content is `value` as JSON text (a structured answer; it
    /// need not match any schema: that is the point of some tests).
    pub fn json(value: &Value, usage: TokenUsage) -> Self {
        Reply::answer(&value.to_string(), usage)
    }

    /// `status` with `body` as it is (malformed answers, errors).
    pub fn raw(status: u16, body: &str) -> Self {
        Reply { status, body: body.to_owned(), headers: Vec::new(), delay: Duration::ZERO }
    }

    /// 429 with `Retry-After: <retry_after_secs>`.
    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Reply::raw(429, r#"{"error":{"message":"Rate limit reached","type":"rate_limit_exceeded"}}"#)
            .header("retry-after", &retry_after_secs.to_string())
    }

    /// The same, with a header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The same, sent only after `delay` (to make a caller time out).
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn template(&self) -> ResponseTemplate {
        let mut template = ResponseTemplate::new(self.status)
            .set_body_raw(self.body.clone().into_bytes(), "application/json")
            .set_delay(self.delay);
        for (name, value) in &self.headers {
            template = template.insert_header(name.as_str(), value.as_str());
        }
        template
    }
}

/// A call the fake server received.
#[derive(Debug, Clone)]
pub struct ReceivedChat {
    /// The request's JSON body (`Value::Null` if it was not JSON).
    pub body: Value,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

impl ReceivedChat {
    /// The content of the message with `role` (`system`, `user`), if there is one.
    pub fn message(&self, role: &str) -> Option<&str> {
        self.body["messages"].as_array()?.iter().find(|m| m["role"] == role)?["content"].as_str()
    }

    /// The `response_format` asked for, if any.
    pub fn response_format(&self) -> Option<&Value> {
        self.body.get("response_format")
    }
}

/// The fake server; it stops when dropped.
pub struct FakeModel {
    server: MockServer,
    /// The priority of the next `always` reply: each one outranks the earlier ones, and the
    /// `once` replies (priority 1) outrank them all.
    next_always: AtomicU8,
}

impl FakeModel {
    /// A fake server on 127.0.0.1 that answers nothing yet (404).
    pub async fn start() -> Self {
        FakeModel { server: MockServer::start().await, next_always: AtomicU8::new(u8::MAX) }
    }

    /// Its base URL, as a provider's `endpoint`: `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.server.uri())
    }

    /// An endpoint of this server with `api_key` and a 5 s timeout.
    pub fn endpoint(&self, api_key: Option<&str>) -> Endpoint {
        Endpoint {
            base_url: self.base_url(),
            model: FAKE_MODEL.into(),
            api_key: api_key.map(|key| Secret::new(key.into())),
            timeout: Duration::from_secs(5),
        }
    }

    /// Every call from now on gets `reply` (once the queued `once` replies are used up).
    pub async fn always(&self, reply: Reply) {
        let priority = self.next_always.fetch_sub(1, Ordering::SeqCst).max(2);
        self.mock().respond_with(reply.template()).with_priority(priority).mount(&self.server).await;
    }

    /// The next call not answered by an earlier `once` gets `reply`.
    pub async fn once(&self, reply: Reply) {
        self.mock()
            .respond_with(reply.template())
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&self.server)
            .await;
    }

    /// Every call gets a completion saying `content`, with `usage`.
    pub async fn answer(&self, content: &str, usage: TokenUsage) {
        self.always(Reply::answer(content, usage)).await;
    }

    /// Every call gets a completion whose content is `value` as JSON text.
    pub async fn answer_json(&self, value: &Value, usage: TokenUsage) {
        self.always(Reply::json(value, usage)).await;
    }

    /// Every call gets `status` with `body` as it is.
    pub async fn answer_raw(&self, status: u16, body: &str) {
        self.always(Reply::raw(status, body)).await;
    }

    /// Every call gets a 429 with `Retry-After: <retry_after_secs>`.
    pub async fn rate_limited(&self, retry_after_secs: u64) {
        self.always(Reply::rate_limited(retry_after_secs)).await;
    }

    /// Every call gets a completion ("slow answer", no tokens), but only after `delay`.
    pub async fn slow(&self, delay: Duration) {
        self.always(Reply::answer("slow answer", TokenUsage::default()).delayed(delay)).await;
    }

    /// The calls received so far, in order.
    pub async fn received(&self) -> Vec<ReceivedChat> {
        let requests = self.server.received_requests().await.expect("the fake records requests");
        requests
            .into_iter()
            .map(|request| ReceivedChat {
                body: serde_json::from_slice(&request.body).unwrap_or(Value::Null),
                authorization: request
                    .headers
                    .get("authorization")
                    .map(|value| value.to_str().expect("an ASCII header").to_owned()),
            })
            .collect()
    }

    fn mock(&self) -> wiremock::MockBuilder {
        Mock::given(method("POST")).and(path("/v1/chat/completions"))
    }
}
