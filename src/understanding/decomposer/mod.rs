//! Decomposers: what reads a request's text and breaks it into intents, behind one trait, chosen
//! by configuration (`[decomposer] kind`).
//!
//! - [`Rules`]: the catalog's rules ([`Catalog::decompose`]), deterministic and without I/O.
//! - [`Llm`]: a model behind any OpenAI-compatible chat-completions endpoint. It is told the task
//!   and the catalog's work types, asked for JSON that matches [`answer_schema`], and its answer
//!   is validated strictly by [`parse_answer`] (a pure function): shape, bounds, work types of the
//!   catalog, confidence in [0, 1], control characters stripped. An answer that does not validate
//!   is asked for again, with what was wrong, up to `max_attempts` calls in all; HTTP errors and
//!   short rate limits are retried by [`Client::chat_with_retries`]; a timeout is not.
//!
//! The decompose stage asks the configured decomposer in its `load` (the stage's only I/O) and,
//! when it fails, has the rules stand in and records why ([`Decomposition::fallback_reason`]).
//! The rules need no I/O, so with `kind = "rules"` the stage runs them in `decide` and asks no
//! decomposer at all.
//!
//! The API key is a [`Secret`] read from the environment variable the configuration names: the
//! configuration holds only the variable's name, and errors come from [`crate::llm`], which shows
//! the key nowhere.

use std::env::VarError;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::llm::{self, Client, Endpoint, RetryPolicy, Secret};
use crate::model::domain::Decomposition;
use crate::understanding::catalog::Catalog;
use crate::understanding::rules::DecomposeError;

mod llm_decomposer;

pub use self::llm_decomposer::{Llm, answer_schema, parse_answer, system_prompt};

/// The name the [`Llm`] decomposer puts in [`Decomposition::decomposer`].
pub const LLM: &str = "llm";

/// The most intents an answer may have: as many as any decomposition.
pub use crate::model::domain::MAX_INTENTS;
/// The longest intent text, in characters.
pub const MAX_TEXT_CHARS: usize = 2000;
/// The most entities, and the most targets, of one intent.
pub const MAX_ITEMS: usize = 20;
/// The longest entity or target, in characters.
pub const MAX_ITEM_CHARS: usize = 200;

/// Why a decomposer gave no decomposition. The message is the reason recorded when the rules
/// stand in; it never contains the API key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rules found nothing they know in the text.
    #[error(transparent)]
    Rules(#[from] DecomposeError),
    /// The model's answer does not parse as JSON.
    #[error("the model's answer is not valid JSON: {0}")]
    NotJson(String),
    /// The model's answer is JSON, but not a decomposition of this catalog within the bounds.
    #[error("the model's answer does not match the schema: {0}")]
    Schema(String),
    /// No answer: a timeout, an HTTP error, a rate limit, a connection that failed.
    #[error(transparent)]
    Model(#[from] llm::Error),
}

/// Reads a request's text into intents.
pub trait Decomposer: Send + Sync {
    /// Names it in [`Decomposition::decomposer`], fallback reasons and logs.
    fn name(&self) -> &'static str;

    /// The decomposition of `text`, or why there is none.
    fn decompose<'a>(&'a self, text: &'a str) -> BoxFuture<'a, Result<Decomposition, Error>>;
}

/// The catalog's rules ([`Catalog::decompose`]).
#[derive(Debug, Clone)]
pub struct Rules {
    pub catalog: Arc<Catalog>,
}

impl Decomposer for Rules {
    fn name(&self) -> &'static str {
        crate::understanding::rules::DECOMPOSER
    }

    fn decompose<'a>(&'a self, text: &'a str) -> BoxFuture<'a, Result<Decomposition, Error>> {
        Box::pin(std::future::ready(self.catalog.decompose(text).map_err(Error::from)))
    }
}

/// Which decomposer reads requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The catalog's rules.
    #[default]
    Rules,
    /// A model, with the rules standing in when it fails.
    Llm,
}

/// The `[decomposer]` section of the configuration. The API key is not part of it: only the name
/// of the environment variable that holds it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub kind: Kind,
    /// For `llm`: the base URL of an OpenAI-compatible API (`http://127.0.0.1:11434/v1`).
    pub endpoint: Option<String>,
    /// For `llm`: the model to ask.
    pub model: Option<String>,
    /// For `llm`: the environment variable holding the API key; none for a server without one.
    pub api_key_env: Option<String>,
    /// How long one call to the model may take.
    pub timeout_secs: u64,
    /// Calls in all when the answer does not validate, and tries of a call that failed (a 5xx, a
    /// connection, a 429 with a short Retry-After).
    pub max_attempts: usize,
    /// A 429 asking to wait longer than this falls back to the rules at once.
    pub max_retry_after_secs: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            kind: Kind::Rules,
            endpoint: None,
            model: None,
            api_key_env: None,
            timeout_secs: 20,
            max_attempts: 2,
            max_retry_after_secs: 5,
        }
    }
}

impl fmt::Debug for Settings {
    /// The endpoint is shown without credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("kind", &self.kind)
            .field("endpoint", &self.endpoint.as_deref().map(crate::redact::everything))
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .field("timeout_secs", &self.timeout_secs)
            .field("max_attempts", &self.max_attempts)
            .field("max_retry_after_secs", &self.max_retry_after_secs)
            .finish()
    }
}

/// Why the `[decomposer]` settings cannot work. The messages never contain the API key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("[decomposer] kind = \"llm\" needs an endpoint: the base URL of an OpenAI-compatible API")]
    NoEndpoint,
    #[error("[decomposer] kind = \"llm\" needs a model")]
    NoModel,
    #[error("[decomposer] max_attempts must be at least 1")]
    NoAttempts,
    #[error(
        "the decomposer's API key is read from the environment variable {variable} (api_key_env), which is not set or empty"
    )]
    KeyNotSet { variable: String },
    #[error("the environment variable {variable} (the decomposer's API key) is not valid UTF-8")]
    KeyNotUnicode { variable: String },
    #[error("[decomposer]: {0}")]
    Endpoint(llm::Error),
}

impl Settings {
    /// The decomposer these settings configure, for the work types of `catalog`: `None` for the
    /// rules (which the decompose stage runs itself), else the model's, its API key read through
    /// `env` (`std::env::var` in a worker).
    pub fn build(
        &self,
        catalog: Arc<Catalog>,
        env: impl Fn(&str) -> Result<String, VarError>,
    ) -> Result<Option<Llm>, ConfigError> {
        if self.kind == Kind::Rules {
            return Ok(None);
        }
        let endpoint =
            self.endpoint.clone().filter(|e| !e.trim().is_empty()).ok_or(ConfigError::NoEndpoint)?;
        let model = self.model.clone().filter(|m| !m.trim().is_empty()).ok_or(ConfigError::NoModel)?;
        if self.max_attempts == 0 {
            return Err(ConfigError::NoAttempts);
        }
        let api_key = match &self.api_key_env {
            None => None,
            Some(variable) => match env(variable) {
                Ok(key) if !key.is_empty() => Some(Secret::new(key)),
                Ok(_) | Err(VarError::NotPresent) => {
                    return Err(ConfigError::KeyNotSet { variable: variable.clone() });
                }
                Err(VarError::NotUnicode(_)) => {
                    return Err(ConfigError::KeyNotUnicode { variable: variable.clone() });
                }
            },
        };
        let client = Client::new(Endpoint {
            base_url: endpoint,
            model,
            api_key,
            timeout: Duration::from_secs(self.timeout_secs),
        })
        .map_err(ConfigError::Endpoint)?;
        let retry = RetryPolicy {
            max_attempts: self.max_attempts,
            max_retry_after: Duration::from_secs(self.max_retry_after_secs),
        };
        Ok(Some(Llm::new(client, catalog).with_retry(retry).with_max_attempts(self.max_attempts)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::default()
    }

    #[tokio::test]
    async fn the_rules_decomposer_is_the_catalog() {
        let rules = Rules { catalog: Arc::new(catalog()) };
        assert_eq!(rules.name(), "rules");
        let decomposition = rules.decompose("Deploy Gitea to the homelab").await.unwrap();
        assert_eq!(decomposition, catalog().decompose("Deploy Gitea to the homelab").unwrap());
        let err = rules.decompose("hello there").await.unwrap_err();
        assert!(err.to_string().starts_with("no work type in the catalog matches"), "{err}");
    }

    #[test]
    fn settings_build_the_configured_decomposer() {
        let catalog = Arc::new(catalog());
        let none = |_: &str| Err(VarError::NotPresent);
        assert!(Settings::default().build(catalog.clone(), none).unwrap().is_none(), "rules by default");
        let settings = Settings {
            kind: Kind::Llm,
            endpoint: Some("https://me:hunter2@models.example.com/v1".into()),
            model: Some("small-1".into()),
            api_key_env: Some("DECOMPOSER_KEY".into()),
            timeout_secs: 3,
            max_attempts: 4,
            max_retry_after_secs: 1,
        };
        let env = |name: &str| match name {
            "DECOMPOSER_KEY" => Ok("sk-from-env".to_owned()),
            _ => Err(VarError::NotPresent),
        };
        let llm = settings.build(catalog.clone(), env).unwrap().unwrap();
        assert_eq!(llm.client().endpoint().api_key.as_ref().map(Secret::expose), Some("sk-from-env"));
        assert_eq!(llm.client().endpoint().timeout, Duration::from_secs(3));
        assert_eq!((llm.max_attempts, llm.retry.max_attempts), (4, 4));
        assert_eq!(llm.retry.max_retry_after, Duration::from_secs(1));
        let shown = format!("{settings:?} {llm:?}");
        for secret in ["hunter2", "sk-from-env"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        let no_key = Settings { api_key_env: None, ..settings.clone() };
        assert!(no_key.build(catalog.clone(), none).unwrap().unwrap().client().endpoint().api_key.is_none());
    }

    #[test]
    fn settings_that_cannot_work_are_named() {
        let catalog = Arc::new(catalog());
        let settings = Settings {
            kind: Kind::Llm,
            endpoint: Some("http://127.0.0.1:11434/v1".into()),
            model: Some("llama3".into()),
            api_key_env: Some("UNSET_DECOMPOSER_KEY".into()),
            ..Settings::default()
        };
        let refused = |settings: &Settings, env: &dyn Fn(&str) -> Result<String, VarError>| {
            settings.build(catalog.clone(), env).unwrap_err().to_string()
        };
        let unset = |_: &str| Err(VarError::NotPresent);
        let empty = |_: &str| Ok(String::new());
        let error = refused(&settings, &unset);
        assert_eq!(
            error,
            "the decomposer's API key is read from the environment variable UNSET_DECOMPOSER_KEY \
             (api_key_env), which is not set or empty"
        );
        assert_eq!(refused(&settings, &empty), error);
        let keyed = |_: &str| Ok("sk-x".to_owned());
        let no_endpoint = Settings { endpoint: None, ..settings.clone() };
        assert!(refused(&no_endpoint, &keyed).contains("needs an endpoint"));
        let no_model = Settings { model: Some(" ".into()), ..settings.clone() };
        assert!(refused(&no_model, &keyed).contains("needs a model"));
        let no_attempts = Settings { max_attempts: 0, ..settings.clone() };
        assert!(refused(&no_attempts, &keyed).contains("max_attempts"));
        let zero_timeout = Settings { timeout_secs: 0, ..settings.clone() };
        assert!(refused(&zero_timeout, &keyed).contains("timeout"));
        let bad_url = Settings { endpoint: Some("ftp://u:pw@h/v1".into()), ..settings.clone() };
        let error = refused(&bad_url, &keyed);
        assert!(error.contains("scheme") && !error.contains("pw"), "{error}");
    }

    #[test]
    fn settings_read_from_toml() {
        let settings: Settings = toml::from_str(
            "kind = \"llm\"\nendpoint = \"http://127.0.0.1:11434/v1\"\nmodel = \"llama3\"\ntimeout_secs = 5\n",
        )
        .unwrap();
        assert_eq!(settings.kind, Kind::Llm);
        assert_eq!((settings.timeout_secs, settings.max_attempts, settings.max_retry_after_secs), (5, 2, 5));
        assert!(toml::from_str::<Settings>("kind = \"magic\"").is_err());
        assert!(toml::from_str::<Settings>("api_key = \"sk-inline\"").is_err(), "no key in the file");
    }
}
