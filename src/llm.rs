//! A client for OpenAI-compatible chat-completions endpoints (Ollama, llama.cpp, vLLM, OpenAI and
//! the many servers that copy its API), for the parts of Switchyard that ask a model: the `llm`
//! executor of agents and model-based decomposition.
//!
//! One call is one `POST {base_url}/chat/completions` with a system and a user message, optionally
//! constrained to a JSON Schema (`response_format: json_schema`, strict), and answers the first
//! choice's content and the tokens the server reports. [`Client::chat_with_retries`] retries what
//! waiting can mend (429 within a limit, 5xx, a connection that failed) with exponential backoff
//! and jitter; never a timeout, whose caller has a deadline of its own.
//!
//! The API key is a [`Secret`]: it is sent as a bearer token and nothing else ever shows it.
//! Errors, logs (debug level only) and `Debug` output carry neither the key nor the credentials of
//! the base URL, and an error that quotes the server's answer has the key cut out of it, in case
//! the server echoes it.

use std::fmt;
use std::time::Duration;

use backon::Retryable;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::debug;

use crate::model::wire::TokenUsage;

/// How much of a server's answer an error quotes, in characters.
pub const QUOTED_CHARS: usize = 200;

/// The largest answer read; a server that sends more is answering something else.
pub const MAX_ANSWER_BYTES: usize = 8 * 1024 * 1024;

/// A secret (an API key): `Debug` and `Display` print `[redacted]`; only [`Secret::expose`] gives
/// the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a model is served and how long to wait for it.
#[derive(Clone)]
pub struct Endpoint {
    /// The API's base URL, to which `/chat/completions` is appended: `http://127.0.0.1:11434/v1`.
    pub base_url: String,
    pub model: String,
    /// Sent as `Authorization: Bearer <key>`; `None` for a server without one.
    pub api_key: Option<Secret>,
    /// How long one call may take, from sending the request to the end of the answer.
    pub timeout: Duration,
}

impl fmt::Debug for Endpoint {
    /// The base URL is shown redacted, the key as `[redacted]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &redact_url(&self.base_url))
            .field("model", &self.model)
            .field("api_key", &self.api_key)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// How [`Client::chat_with_retries`] retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (at least 1; 0 counts as 1).
    pub max_attempts: usize,
    /// A 429 asking to wait longer than this is not retried: it is returned at once.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    /// 3 attempts; a Retry-After of up to 5 s is waited for.
    fn default() -> Self {
        RetryPolicy { max_attempts: 3, max_retry_after: Duration::from_secs(5) }
    }
}

/// What to ask the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// The system message; left out of the request when empty.
    pub system: String,
    pub user: String,
    /// A name and the JSON Schema the answer must match: sent as `response_format: {type:
    /// "json_schema", json_schema: {name, schema, strict: true}}`. The server is trusted to
    /// enforce it no more than it is trusted otherwise: the caller still validates the answer.
    pub json_schema: Option<(String, Value)>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// The model's answer: the first choice's content and the tokens the server reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub content: String,
    /// `prompt_tokens` and `completion_tokens` of the answer's `usage`. A server that reports no
    /// usage (some do not, or only when streaming) gives zeros, logged at debug level: the answer
    /// is still good, and a missing count is not worth failing a task over.
    pub usage: TokenUsage,
}

/// Why a call to the model failed. The messages never contain the API key, the `Authorization`
/// header or the credentials of the base URL.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No complete answer within the endpoint's timeout.
    #[error("no answer within {after:?}")]
    Timeout { after: Duration },
    /// 429 Too Many Requests, with the wait the server asked for (`Retry-After`), if any.
    #[error("rate limited by the model server{}", retry_after_text(*.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    /// Any other status than a success or 429; `message` is the start of the answer's body.
    #[error("the model server answered {}{}", status_text(*.status), quoted(.message))]
    Status { status: u16, message: String },
    /// The server could not be reached, or the connection broke.
    #[error("cannot talk to the model server: {0}")]
    Transport(String),
    /// A success whose body is not a chat completion: not JSON, no choices, no content.
    #[error("unusable answer from the model server: {0}")]
    Malformed(String),
    /// The endpoint cannot work (a bad URL, a zero timeout, an empty model name).
    #[error("invalid model endpoint: {0}")]
    InvalidEndpoint(String),
}

fn retry_after_text(retry_after: Option<Duration>) -> String {
    retry_after.map(|wait| format!(" (Retry-After {wait:?})")).unwrap_or_default()
}

fn status_text(status: u16) -> String {
    match reqwest::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

fn quoted(message: &str) -> String {
    if message.is_empty() { String::new() } else { format!(": {message}") }
}

impl Error {
    /// Whether the same request may succeed later: a timeout, a rate limit, a 5xx status, a
    /// failed connection. Not a 4xx other than 429, a malformed answer or a bad endpoint.
    ///
    /// [`Client::chat_with_retries`] retries only part of these in process: not a timeout (the
    /// caller has a deadline) and not a rate limit whose Retry-After exceeds its limit.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Timeout { .. } | Error::RateLimited { .. } | Error::Transport(_) => true,
            Error::Status { status, .. } => (500..=599).contains(status),
            Error::Malformed(_) | Error::InvalidEndpoint(_) => false,
        }
    }

    /// Whether `chat_with_retries` tries again after this error.
    fn is_retried(&self, max_retry_after: Duration) -> bool {
        match self {
            Error::RateLimited { retry_after } => retry_after.is_none_or(|wait| wait <= max_retry_after),
            Error::Status { .. } | Error::Transport(_) => self.is_transient(),
            Error::Timeout { .. } | Error::Malformed(_) | Error::InvalidEndpoint(_) => false,
        }
    }
}

/// A client of one endpoint. Cloning is cheap: clones share the connection pool.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    url: reqwest::Url,
    http: reqwest::Client,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `endpoint`, if its URL is an http(s) URL with a host, its model is named and
    /// its timeout is not zero. Redirects are not followed (the key stays with the endpoint it
    /// was meant for).
    pub fn new(endpoint: Endpoint) -> Result<Self, Error> {
        let shown = redact_url(&endpoint.base_url);
        let invalid = |problem: &str| Error::InvalidEndpoint(format!("{shown}: {problem}"));
        let url =
            reqwest::Url::parse(&format!("{}/chat/completions", endpoint.base_url.trim_end_matches('/')))
                .map_err(|e| invalid(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        if endpoint.model.trim().is_empty() {
            return Err(Error::InvalidEndpoint(format!("{shown}: no model named")));
        }
        if endpoint.timeout.is_zero() {
            return Err(invalid("the timeout must be positive"));
        }
        if endpoint.api_key.as_ref().is_some_and(|key| key.expose().is_empty()) {
            return Err(invalid("the API key is empty"));
        }
        let http = reqwest::Client::builder()
            .timeout(endpoint.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| Error::InvalidEndpoint(format!("{shown}: {}", chain(&e.without_url()))))?;
        Ok(Client { endpoint, url, http })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One `POST {base_url}/chat/completions`, with `Authorization: Bearer <key>` when there is a
    /// key, and the first choice's content with the reported usage.
    pub async fn chat(&self, request: &ChatRequest) -> Result<Completion, Error> {
        let body = request_body(&self.endpoint.model, request);
        let mut post = self.http.post(self.url.clone()).json(&body);
        if let Some(key) = &self.endpoint.api_key {
            // Marked sensitive by reqwest: not shown in its own debug output either.
            post = post.bearer_auth(key.expose());
        }
        debug!(
            url = %redact_url(self.url.as_str()),
            model = %self.endpoint.model,
            schema = request.json_schema.as_ref().map(|(name, _)| name.as_str()),
            "asking the model"
        );
        let response = post.send().await.map_err(|e| self.transport(e))?;
        let status = response.status();
        let retry_after = retry_after(response.headers(), Utc::now());
        let answer = read_answer(response).await.map_err(|e| self.transport(e))?;
        debug!(status = status.as_u16(), bytes = answer.as_ref().map_or(0, Vec::len), "the model answered");
        let Some(answer) = answer else {
            return Err(Error::Malformed(format!("the answer exceeds {MAX_ANSWER_BYTES} bytes")));
        };
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(Error::RateLimited { retry_after });
        }
        if !status.is_success() {
            return Err(Error::Status { status: status.as_u16(), message: self.quote(&answer) });
        }
        parse_completion(&answer).map_err(|problem| Error::Malformed(self.scrub(&problem)))
    }

    /// [`Client::chat`], retried with exponential backoff and jitter on a 429 (waiting its
    /// Retry-After, in seconds or as an HTTP date, when that is within `retry.max_retry_after`;
    /// a longer one is returned at once as [`Error::RateLimited`]), a 5xx and a transport error.
    /// Never on a timeout (the caller has a deadline), on another 4xx, or on a malformed answer.
    pub async fn chat_with_retries(
        &self,
        request: &ChatRequest,
        retry: &RetryPolicy,
    ) -> Result<Completion, Error> {
        let backoff = crate::backoff::exponential(
            Duration::from_millis(250),
            Duration::from_secs(10),
            retry.max_attempts,
        );
        (|| self.chat(request))
            .retry(backoff)
            .when(|err| err.is_retried(retry.max_retry_after))
            .adjust(|err, backoff| match err {
                // The server said how long; `backoff` is `None` once the attempts are used up.
                Error::RateLimited { retry_after: Some(wait) } => backoff.map(|_| *wait),
                _ => backoff,
            })
            .notify(|err, wait| debug!(error = %err, ?wait, "the model call failed; retrying"))
            .await
    }

    /// A reqwest error as ours: a timeout, else a transport error without the URL (reqwest's
    /// message would quote it, credentials included).
    fn transport(&self, err: reqwest::Error) -> Error {
        if err.is_timeout() {
            return Error::Timeout { after: self.endpoint.timeout };
        }
        let cause = self.scrub(&chain(&err.without_url()));
        Error::Transport(format!("{}: {cause}", redact_url(self.url.as_str())))
    }

    /// The start of an answer, to quote in an error.
    fn quote(&self, answer: &[u8]) -> String {
        self.scrub(&quote(answer))
    }

    /// `text` without the API key, should anything have echoed it.
    fn scrub(&self, text: &str) -> String {
        match &self.endpoint.api_key {
            Some(key) if !key.expose().is_empty() => text.replace(key.expose(), "[redacted]"),
            _ => text.to_owned(),
        }
    }
}

/// The error and its sources, joined by `": "`.
fn chain(err: &dyn std::error::Error) -> String {
    crate::error_chain(err)
}

/// The body, or `None` when it exceeds [`MAX_ANSWER_BYTES`].
async fn read_answer(mut response: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// The JSON body of a chat-completions request.
pub fn request_body(model: &str, request: &ChatRequest) -> Value {
    let mut messages = Vec::new();
    if !request.system.is_empty() {
        messages.push(json!({"role": "system", "content": request.system}));
    }
    messages.push(json!({"role": "user", "content": request.user}));
    let mut body = json!({"model": model, "messages": messages, "stream": false});
    if let Some(max_tokens) = request.max_tokens {
        body["max_tokens"] = json!(max_tokens);
    }
    if let Some(temperature) = request.temperature {
        body["temperature"] = json!(temperature);
    }
    if let Some((name, schema)) = &request.json_schema {
        body["response_format"] = json!({
            "type": "json_schema",
            "json_schema": {"name": name, "schema": schema, "strict": true},
        });
    }
    body
}

#[derive(Deserialize)]
struct ChatCompletion {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<Message>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<String>,
    /// What OpenAI sends instead of content when the model refuses a structured output.
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// The first choice's content and the usage of a chat-completions answer; the problem otherwise.
pub fn parse_completion(body: &[u8]) -> Result<Completion, String> {
    let completion: ChatCompletion =
        serde_json::from_slice(body).map_err(|e| format!("not a chat completion ({e}): {}", quote(body)))?;
    let choice = completion.choices.into_iter().next().ok_or("no choices in the answer")?;
    let message = choice.message.ok_or("the first choice has no message")?;
    let content = match (message.content, message.refusal) {
        (Some(content), _) => content,
        (None, Some(refusal)) => return Err(format!("the model refused: {}", quote(refusal.as_bytes()))),
        (None, None) => return Err("the first choice's message has no content".into()),
    };
    let usage = match completion.usage {
        Some(usage) => {
            TokenUsage { input_tokens: usage.prompt_tokens, output_tokens: usage.completion_tokens }
        }
        None => {
            debug!("the model server reported no usage; counting zero tokens");
            TokenUsage::default()
        }
    };
    Ok(Completion { content, usage })
}

/// The first [`QUOTED_CHARS`] characters of `body`, whitespace runs as one space, with `…` when
/// cut.
fn quote(body: &[u8]) -> String {
    // Enough bytes for the characters quoted, whatever whitespace they are among.
    let text = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]);
    let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match text.char_indices().nth(QUOTED_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// How long a 429 asks to wait: `retry-after-ms` (OpenAI's), else `Retry-After` in seconds or as an
/// HTTP date (from `now`; a date in the past is no wait).
fn retry_after(headers: &reqwest::header::HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    header("retry-after-ms")
        .and_then(|ms| ms.trim().parse::<u64>().ok())
        .map(Duration::from_millis)
        .or_else(|| header("retry-after").and_then(|value| parse_retry_after(value, now)))
}

/// A `Retry-After` value: seconds (`"30"`, or `"1.5"` as some servers send) or an HTTP date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`), as the wait from `now`. `None` when it is neither.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    let date = DateTime::parse_from_rfc2822(value).ok()?.with_timezone(&Utc);
    Some((date - now).to_std().unwrap_or(Duration::ZERO))
}

/// The URL with its user name, password and query values masked, for logs and errors; a URL that
/// does not parse as one with a host is not shown at all.
pub fn redact_url(url: &str) -> String {
    crate::redact::everything(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> ChatRequest {
        ChatRequest {
            system: "be brief".into(),
            user: "hello".into(),
            json_schema: None,
            max_tokens: None,
            temperature: None,
        }
    }

    fn endpoint(base_url: &str) -> Endpoint {
        Endpoint {
            base_url: base_url.into(),
            model: "llama3".into(),
            api_key: Some(Secret::new("sk-very-secret".into())),
            timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn a_completion_gives_its_first_choice_and_usage() {
        let body = br#"{"id":"x","object":"chat.completion","choices":[
            {"index":0,"message":{"role":"assistant","content":"done"},"finish_reason":"stop"},
            {"index":1,"message":{"role":"assistant","content":"other"}}],
            "usage":{"prompt_tokens":12,"completion_tokens":34,"total_tokens":46}}"#;
        let completion = parse_completion(body).unwrap();
        assert_eq!(completion.content, "done");
        assert_eq!(completion.usage, TokenUsage { input_tokens: 12, output_tokens: 34 });
    }

    #[test]
    fn a_completion_without_usage_counts_zero_tokens() {
        let body = br#"{"choices":[{"message":{"content":"ok"}}]}"#;
        assert_eq!(parse_completion(body).unwrap().usage, TokenUsage::default());
        let body = br#"{"choices":[{"message":{"content":"ok"}}],"usage":null}"#;
        assert_eq!(parse_completion(body).unwrap().usage, TokenUsage::default());
    }

    #[test]
    fn malformed_completions_say_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (b"<html>Bad gateway</html>", "not a chat completion"),
            (b"[1, 2]", "not a chat completion"),
            (br#"{"choices":[]}"#, "no choices"),
            (br#"{"choices":[{}]}"#, "has no message"),
            (br#"{"choices":[{"message":{"content":null}}]}"#, "has no content"),
            (br#"{"choices":[{"message":{"refusal":"I will not"}}]}"#, "the model refused: I will not"),
        ];
        for (body, problem) in cases {
            let error = parse_completion(body).unwrap_err();
            assert!(error.contains(problem), "{error}");
        }
        let error = parse_completion(b"<html>Bad gateway</html>").unwrap_err();
        assert!(error.ends_with(": <html>Bad gateway</html>"), "quotes the body: {error}");
    }

    #[test]
    fn the_request_body_is_openai_shaped() {
        let body = request_body("llama3", &request());
        assert_eq!(
            body,
            json!({"model": "llama3", "stream": false, "messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]})
        );
        let schema = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let constrained = ChatRequest {
            system: String::new(),
            json_schema: Some(("decomposition".into(), schema.clone())),
            max_tokens: Some(100),
            temperature: Some(0.0),
            ..request()
        };
        let body = request_body("m", &constrained);
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": "hello"}]),
            "no empty system message"
        );
        assert_eq!(body["max_tokens"], 100);
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(
            body["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "decomposition", "schema": schema, "strict": true}})
        );
    }

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:30Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_retry_after("30", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("1.5", now), Some(Duration::from_millis(1500)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), Some(Duration::ZERO), "past");
        for bad in ["", "-1", "soon", "NaN", "inf", "-0.5"] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn retry_after_ms_takes_precedence() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "20".parse().unwrap());
        assert_eq!(retry_after(&headers, Utc::now()), Some(Duration::from_secs(20)));
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&headers, Utc::now()), Some(Duration::from_millis(150)));
        assert_eq!(retry_after(&reqwest::header::HeaderMap::new(), Utc::now()), None);
    }

    #[test]
    fn secrets_do_not_show() {
        let key = Secret::new("sk-very-secret".into());
        assert_eq!(format!("{key}"), "[redacted]");
        assert_eq!(format!("{key:?}"), "[redacted]");
        assert_eq!(key.expose(), "sk-very-secret");
        let endpoint = endpoint("https://user:hunter2@api.example.com/v1?key=abc");
        let shown = format!("{endpoint:?}");
        for secret in ["sk-very-secret", "hunter2", "user", "abc"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let client = Client::new(endpoint).unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("sk-very-secret") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("http://127.0.0.1:11434/v1"), "http://127.0.0.1:11434/v1");
        assert_eq!(redact_url("https://me:pw@api.example.com/v1"), "https://***@api.example.com/v1");
        assert_eq!(redact_url("https://token@api.example.com/v1"), "https://***@api.example.com/v1");
        assert_eq!(
            redact_url("https://api.example.com/v1?key=abc&x=1"),
            "https://api.example.com/v1?key=***&x=***"
        );
        // Special schemes are normalised: the credentials still go.
        assert_eq!(redact_url("https:me:pw@host"), "https://***@host/");
        assert_eq!(redact_url("mailto:me:pw@host"), "<URL without a host>");
        assert_eq!(redact_url("https://tok/en@host/v1"), "<URL with an @ after its host>");
        assert_eq!(redact_url("not a url"), "<unparsable URL>");
    }

    #[test]
    fn bad_endpoints_are_refused_without_their_credentials() {
        let refused = |endpoint: Endpoint| Client::new(endpoint).unwrap_err().to_string();
        let error = refused(endpoint("ftp://me:hunter2@host/v1"));
        assert_eq!(error, "invalid model endpoint: ftp://***@host/v1: the scheme must be http or https");
        assert!(refused(endpoint("nonsense")).contains("<unparsable URL>"));
        assert!(refused(Endpoint { timeout: Duration::ZERO, ..endpoint("http://h/v1") }).contains("timeout"));
        assert!(refused(Endpoint { model: " ".into(), ..endpoint("http://h/v1") }).contains("no model"));
        let empty_key = Endpoint { api_key: Some(Secret::new(String::new())), ..endpoint("http://h/v1") };
        assert!(refused(empty_key).contains("API key is empty"));
        let client = Client::new(endpoint("http://h/v1/")).unwrap();
        assert_eq!(client.url.as_str(), "http://h/v1/chat/completions");
    }

    #[test]
    fn errors_read_clearly() {
        let status = Error::Status { status: 503, message: "overloaded".into() };
        assert_eq!(status.to_string(), "the model server answered 503 Service Unavailable: overloaded");
        let bare = Error::Status { status: 404, message: String::new() };
        assert_eq!(bare.to_string(), "the model server answered 404 Not Found");
        let odd = Error::Status { status: 599, message: "x".into() };
        assert_eq!(odd.to_string(), "the model server answered 599: x");
        assert_eq!(Error::Timeout { after: Duration::from_secs(2) }.to_string(), "no answer within 2s");
        let limited = Error::RateLimited { retry_after: Some(Duration::from_secs(30)) };
        assert_eq!(limited.to_string(), "rate limited by the model server (Retry-After 30s)");
        assert_eq!(Error::RateLimited { retry_after: None }.to_string(), "rate limited by the model server");
    }

    #[test]
    fn what_is_transient_and_what_is_retried() {
        let limit = Duration::from_secs(5);
        let cases = [
            (Error::Timeout { after: limit }, true, false),
            (Error::RateLimited { retry_after: None }, true, true),
            (Error::RateLimited { retry_after: Some(Duration::from_secs(5)) }, true, true),
            (Error::RateLimited { retry_after: Some(Duration::from_secs(6)) }, true, false),
            (Error::Status { status: 500, message: String::new() }, true, true),
            (Error::Status { status: 400, message: String::new() }, false, false),
            (Error::Status { status: 401, message: String::new() }, false, false),
            (Error::Transport("refused".into()), true, true),
            (Error::Malformed("x".into()), false, false),
            (Error::InvalidEndpoint("x".into()), false, false),
        ];
        for (error, transient, retried) in cases {
            assert_eq!(error.is_transient(), transient, "{error}");
            assert_eq!(error.is_retried(limit), retried, "{error}");
        }
    }

    #[test]
    fn quotes_are_short_and_scrubbed() {
        let long = "x ".repeat(300);
        let quoted = quote(long.as_bytes());
        assert_eq!(quoted.chars().count(), QUOTED_CHARS + 1);
        assert!(quoted.ends_with('…'));
        assert_eq!(quote(b"  a\n\n  b  "), "a b");
        assert_eq!(quote("é".repeat(250).as_bytes()).chars().count(), QUOTED_CHARS + 1);
        let client = Client::new(endpoint("http://h/v1")).unwrap();
        assert_eq!(
            client.quote(b"Incorrect API key provided: sk-very-secret"),
            "Incorrect API key provided: [redacted]"
        );
    }
}
