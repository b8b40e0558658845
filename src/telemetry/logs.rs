//! The logs and the spans of a process, set up once at its start: log lines on standard error,
//! as text (in colour on a terminal, unless `NO_COLOR` is set) or as JSON, one object a line
//! with the fields of the span it is in; and every span given an OpenTelemetry context (see
//! [`trace`](super::trace)), exported when an endpoint is configured.

use std::io::IsTerminal;

use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use super::{LogFormat, trace};

/// What [`init`] set up. [`Telemetry::shutdown`] sends the spans not sent yet: call it before
/// the process ends (and while its runtime still runs), so that even a short command's spans
/// reach the collector.
#[must_use = "shut it down at the end, or the last spans are lost"]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Sends what is left and stops exporting. Waits for the export, within its timeout.
    pub fn shutdown(self) {
        if trace::exporting()
            && let Err(err) = self.provider.shutdown()
        {
            eprintln!("warning: the last spans could not be exported: {err}");
        }
    }
}

/// Logs to stderr in `format`, at `default_level` unless `RUST_LOG` says otherwise, and gives
/// Switchyard's spans (at info and above, whatever the log level) their trace context. HTTP
/// requests of the exporter run on `runtime`. Fails when the exporter's settings are wrong, or
/// logging was set up already.
pub fn init(
    format: LogFormat,
    default_level: &str,
    runtime: tokio::runtime::Handle,
) -> Result<Telemetry, String> {
    let provider = trace::provider(runtime)?;
    let filter = EnvFilter::try_from_default_env()
        // lapin logs as errors of its own what Switchyard reports itself, once and with its
        // context: a refused login, a failed connection attempt, a closed channel, a returned
        // message (with its body). `RUST_LOG=lapin=debug` shows them.
        .unwrap_or_else(|_| EnvFilter::new(format!("{default_level},lapin=off")));
    let lines: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => {
            let colour =
                std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            tracing_subscriber::fmt::layer().with_ansi(colour).with_writer(std::io::stderr).boxed()
        }
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // Spans for traces whatever the log level: a command that logs warnings only still has its
    // spans. Switchyard's own only: libraries' spans would be noise in a request's trace.
    let spans = Targets::new().with_target("switchyard", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(trace::layer(&provider).with_filter(spans))
        .try_init()
        .map_err(|err| format!("cannot set up logging: {err}"))?;
    Ok(Telemetry { provider })
}
