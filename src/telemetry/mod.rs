//! What an operator watches a running process by: Prometheus metrics and health checks served
//! over HTTP (`metrics`, `health`), traces that follow a request across its stages and its agent
//! (`trace`), and the format of the logs. Nothing here decides anything: the pipeline and the
//! agents report to it.

pub mod health;
pub mod logs;
pub mod metrics;
pub mod trace;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use serde::{Deserialize, Serialize};

/// Where to serve `/metrics`, `/healthz` and `/readyz`: `HOST:PORT`, or a bare port, which binds
/// to 127.0.0.1 (an operator opens it wider by saying so: `0.0.0.0:9464`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MetricsAddr(SocketAddr);

impl MetricsAddr {
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if let Ok(port) = text.parse::<u16>() {
            return Ok(MetricsAddr(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)));
        }
        text.parse::<SocketAddr>().map(MetricsAddr).map_err(|_| {
            format!("invalid metrics address {text:?}: expected HOST:PORT (127.0.0.1:9464) or a port")
        })
    }

    pub fn socket_addr(self) -> SocketAddr {
        self.0
    }
}

impl std::str::FromStr for MetricsAddr {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text)
    }
}

impl TryFrom<String> for MetricsAddr {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl From<MetricsAddr> for String {
    fn from(addr: MetricsAddr) -> String {
        addr.0.to_string()
    }
}

impl std::fmt::Display for MetricsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// How log lines are written.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, strum::EnumString, strum::Display,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum LogFormat {
    /// For people: one line per event, fields as `key=value`.
    #[default]
    Text,
    /// For machines: one JSON object per line, with the fields of every span it is in.
    Json,
}

/// The `[telemetry]` section of the configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Serve metrics and health here (`worker` and `agent` only); none when unset.
    pub metrics_addr: Option<MetricsAddr>,
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_port_binds_to_the_loopback_and_nonsense_is_named() {
        assert_eq!(MetricsAddr::parse("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(MetricsAddr::parse("0.0.0.0:9464").unwrap().to_string(), "0.0.0.0:9464");
        assert_eq!(MetricsAddr::parse("[::1]:9464").unwrap().to_string(), "[::1]:9464");
        let err = MetricsAddr::parse("localhost:x").unwrap_err();
        assert!(err.contains("localhost:x") && err.contains("HOST:PORT"), "{err}");
    }

    #[test]
    fn the_section_reads_from_toml() {
        let settings: Settings = toml::from_str("metrics_addr = \"9000\"\nlog_format = \"json\"\n").unwrap();
        assert_eq!(settings.metrics_addr.unwrap().to_string(), "127.0.0.1:9000");
        assert_eq!(settings.log_format, LogFormat::Json);
        assert!(toml::from_str::<Settings>("metrics_addr = \"nowhere\"\n").is_err());
    }
}
