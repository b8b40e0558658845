//! Configuration: an optional TOML file, then environment variables (`AMQP_URL`,
//! `DATABASE_URL`, `SWITCHYARD_NAMESPACE`, `SWITCHYARD_METRICS_ADDR`, `SWITCHYARD_LOG_FORMAT`) over
//! it. Every setting has a default that works with
//! the local services. URLs may hold passwords: `Debug` masks them, and nothing logs them whole.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::broker::redact;
use crate::decisions::approval::ApprovalPolicy;
use crate::decisions::fallback::FallbackPolicy;
use crate::decisions::leases::LeasePolicy;
use crate::decisions::routing::RoutingPolicy;
use crate::model::ids::Namespace;
use crate::pipeline::runner;
use crate::pipeline::stages::TrackingPolicy;
use crate::pipeline::topology::TopologySettings;
use crate::telemetry;
use crate::understanding::decomposer;
use crate::understanding::fleet::PlanningPolicy;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/switchyard";

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read configuration file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration file {path}: {source}")]
    Toml { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid {variable}: {source}")]
    Env { variable: &'static str, source: crate::model::ids::Error },
    #[error("invalid {variable}: {reason}")]
    Setting { variable: &'static str, reason: String },
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Prefix of every exchange and queue name.
    pub namespace: Namespace,
    pub amqp_url: String,
    pub database_url: String,
    /// Connections per process.
    pub database_pool_size: usize,
    /// A catalog file that extends (or overrides work types of) the built-in one.
    pub catalog: Option<PathBuf>,
    /// Which decomposer reads requests: the rules, or a model with the rules standing in.
    pub decomposer: decomposer::Settings,
    pub worker: runner::Settings,
    pub planning: PlanningPolicy,
    pub routing: RoutingPolicy,
    pub fallback: FallbackPolicy,
    pub approval: ApprovalPolicy,
    pub tracking: TrackingPolicy,
    pub leases: LeasePolicy,
    /// Metrics, health checks and logs.
    pub telemetry: telemetry::Settings,
    /// How the namespace's queues are stored: classic (the default) or quorum (a cluster).
    pub topology: TopologySettings,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            namespace: Namespace::parse("switchyard").expect("a valid namespace"),
            amqp_url: DEFAULT_AMQP_URL.into(),
            database_url: DEFAULT_DATABASE_URL.into(),
            database_pool_size: 16,
            catalog: None,
            decomposer: decomposer::Settings::default(),
            worker: runner::Settings::default(),
            planning: PlanningPolicy::default(),
            routing: RoutingPolicy::default(),
            fallback: FallbackPolicy::default(),
            approval: ApprovalPolicy::default(),
            tracking: TrackingPolicy::default(),
            leases: LeasePolicy::default(),
            telemetry: telemetry::Settings::default(),
            topology: TopologySettings::default(),
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("namespace", &self.namespace)
            .field("amqp_url", &redact(&self.amqp_url))
            .field("database_url", &redact(&self.database_url))
            .field("database_pool_size", &self.database_pool_size)
            .field("catalog", &self.catalog)
            .field("decomposer", &self.decomposer)
            .field("worker", &self.worker)
            .field("planning", &self.planning)
            .field("routing", &self.routing)
            .field("fallback", &self.fallback)
            .field("approval", &self.approval)
            .field("tracking", &self.tracking)
            .field("leases", &self.leases)
            .field("telemetry", &self.telemetry)
            .field("topology", &self.topology)
            .finish()
    }
}

impl Config {
    /// Reads `file` (if any) and applies the process environment over it.
    pub fn load(file: Option<&Path>) -> Result<Self, Error> {
        Self::load_with(file, |name| std::env::var(name).ok())
    }

    /// As [`Config::load`], with the environment given as a function (for tests).
    pub fn load_with(file: Option<&Path>, env: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| Error::Read { path: path.to_owned(), source })?;
                toml::from_str(&text)
                    .map_err(|source| Error::Toml { path: path.to_owned(), source: Box::new(source) })?
            }
            None => Config::default(),
        };
        if let Some(url) = env("AMQP_URL").filter(|v| !v.is_empty()) {
            config.amqp_url = url;
        }
        if let Some(url) = env("DATABASE_URL").filter(|v| !v.is_empty()) {
            config.database_url = url;
        }
        if let Some(ns) = env("SWITCHYARD_NAMESPACE").filter(|v| !v.is_empty()) {
            config.namespace = Namespace::parse(ns)
                .map_err(|source| Error::Env { variable: "SWITCHYARD_NAMESPACE", source })?;
        }
        if let Some(addr) = env("SWITCHYARD_METRICS_ADDR").filter(|v| !v.is_empty()) {
            let addr = telemetry::MetricsAddr::parse(&addr)
                .map_err(|reason| Error::Setting { variable: "SWITCHYARD_METRICS_ADDR", reason })?;
            config.telemetry.metrics_addr = Some(addr);
        }
        if let Some(format) = env("SWITCHYARD_LOG_FORMAT").filter(|v| !v.is_empty()) {
            config.telemetry.log_format = format.parse().map_err(|_| Error::Setting {
                variable: "SWITCHYARD_LOG_FORMAT",
                reason: format!("{format:?} is neither text nor json"),
            })?;
        }
        config
            .topology
            .validate()
            .map_err(|reason| Error::Setting { variable: "topology.delivery_limit", reason })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_point_at_the_local_services() {
        let config = Config::load_with(None, |_| None).unwrap();
        assert_eq!(config.namespace.as_str(), "switchyard");
        assert!(config.amqp_url.contains("127.0.0.1:5672"));
        assert!(config.database_url.contains("127.0.0.1:5432"));
        assert_eq!(config.worker.max_payload_bytes, 256 * 1024);
        assert_eq!(config.worker.dispatch_attempts, 3);
    }

    #[test]
    fn file_then_environment() {
        let dir = std::env::temp_dir().join(format!("switchyard-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("switchyard.toml");
        std::fs::write(
            &path,
            r#"
namespace = "staging"
[worker]
prefetch = 7
[approval]
auto_approve_below = 0.3
[topology]
queue_type = "quorum"
[routing.default_agents]
deployment = "deployer"
[[fallback.providers]]
name = "cloud"
endpoint = "https://proxyuser:proxypw@models.example.com/v1?key=querysecret"
model = "big-1"
api_key_env = "CLOUD_API_KEY"
price_per_1k_input_tokens_micros = 10000
price_per_1k_output_tokens_micros = 30000
input_tokens_per_task = 2000
output_tokens_per_task = 500
quota_micros = 1000000
work_types = ["code_generation"]
"#,
        )
        .unwrap();
        let env = |name: &str| match name {
            "DATABASE_URL" => Some("postgres://u:pw@db/x".to_owned()),
            _ => None,
        };
        let config = Config::load_with(Some(&path), env).unwrap();
        assert_eq!(config.namespace.as_str(), "staging");
        assert_eq!(config.worker.prefetch, 7);
        assert_eq!(config.worker.dispatch_attempts, 3, "unset fields keep their defaults");
        assert_eq!(config.approval.auto_approve_below, Some(0.3));
        assert_eq!(config.topology.queue_type, crate::pipeline::topology::QueueType::Quorum);
        assert_eq!(config.topology.delivery_limit, 20, "unset fields keep their defaults");
        assert_eq!(config.routing.default_agents.len(), 1);
        assert_eq!(config.fallback.providers[0].name, "cloud");
        assert_eq!(config.database_url, "postgres://u:pw@db/x");
        let debug = format!("{config:?}");
        assert!(!debug.contains("pw"), "password in {debug}");
        assert!(!debug.contains("querysecret") && !debug.contains("proxyuser"), "{debug}");
        assert!(debug.contains("models.example.com"), "{debug}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_decomposer_section_names_the_key_s_variable_and_hides_credentials() {
        let config: Config = toml::from_str(
            "[decomposer]\nkind = \"llm\"\nendpoint = \"https://u:pw@models.example.com/v1\"\n\
             model = \"small-1\"\napi_key_env = \"DECOMPOSER_API_KEY\"\n",
        )
        .unwrap();
        assert_eq!(config.decomposer.kind, decomposer::Kind::Llm);
        assert_eq!(config.decomposer.timeout_secs, 20, "unset fields keep their defaults");
        let debug = format!("{config:?}");
        assert!(!debug.contains("pw") && debug.contains("DECOMPOSER_API_KEY"), "{debug}");
        assert_eq!(Config::default().decomposer.kind, decomposer::Kind::Rules);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = std::env::temp_dir().join(format!("switchyard-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "namspace = \"x\"\n").unwrap();
        let err = Config::load_with(Some(&path), |_| None).unwrap_err();
        assert!(err.to_string().contains("namspace"), "{err}");
        let err =
            Config::load_with(None, |n| (n == "SWITCHYARD_NAMESPACE").then(|| "Bad NS".into())).unwrap_err();
        assert!(err.to_string().contains("SWITCHYARD_NAMESPACE"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
