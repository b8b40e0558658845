//! Traces: the W3C trace context (`traceparent`, `tracestate`) carried in the AMQP headers of
//! every message, from `submit` (or a client's own `traceparent` on its request) through every
//! stage, into the agent's task and back with its result; and the spans' export over OTLP/HTTP
//! (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is
//! set. Without an endpoint, spans still get ids, so that the context passes on and log lines
//! can name their trace; nothing is sent anywhere.
//!
//! The rest of Switchyard speaks in `tracing` spans: [`adopt`] makes a span the child of the
//! context a message carries, [`inject`] writes a span's context into a message's headers. The
//! only module that names OpenTelemetry.

use std::collections::BTreeMap;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header that carries a message's trace and parent span (W3C Trace Context).
pub const TRACEPARENT: &str = "traceparent";
/// The header that carries vendors' trace state along (W3C Trace Context).
pub const TRACESTATE: &str = "tracestate";

/// How long one export to the collector may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes `span`'s context into `headers` (`traceparent`, and `tracestate` if it has any). A
/// span without a context (no tracing layer installed, or a disabled span) writes nothing.
pub fn inject(span: &tracing::Span, headers: &mut BTreeMap<String, String>) {
    let context = span.context();
    if context.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&context, &mut Headers(headers));
    }
}

/// Makes `span` the child of the context that `headers` carry, if they carry a valid one; an
/// absent or invalid `traceparent` leaves `span` a root, which is no error. Before `span` is
/// entered: a span that started keeps its parent.
pub fn adopt(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    if let Some(parent) = extract(headers) {
        let context = opentelemetry::Context::new().with_remote_span_context(parent);
        // Only fails if the span started already or no layer is installed: then it stays a root.
        let _ = span.set_parent(context);
    }
}

/// The context that `headers` carry, if valid.
pub fn extract(headers: &BTreeMap<String, String>) -> Option<SpanContext> {
    let context = TraceContextPropagator::new().extract(&ReadHeaders(headers));
    let parent = context.span().span_context().clone();
    parent.is_valid().then_some(parent)
}

/// The trace id of `span` (32 hex digits), if it has a context.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    span_context.is_valid().then(|| span_context.trace_id().to_string())
}

/// `span`'s context as a `traceparent` value, if it has one: what a request keeps so that work
/// done for it later, on another message's behalf, continues its trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut headers = BTreeMap::new();
    inject(span, &mut headers);
    headers.remove(TRACEPARENT)
}

/// Links `span` to `cause`: a span continuing a trace kept earlier (see [`traceparent`]) links
/// to the span it would otherwise have been the child of (the message that woke it), so that
/// either trace leads to the other.
pub fn link(span: &tracing::Span, cause: &tracing::Span) {
    let cause = cause.context().span().span_context().clone();
    span.add_link(cause);
}

struct Headers<'a>(&'a mut BTreeMap<String, String>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct ReadHeaders<'a>(&'a BTreeMap<String, String>);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Whether the environment names an OTLP endpoint for traces.
pub fn exporting() -> bool {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// The tracer provider of this process: with a batch exporter over OTLP/HTTP when the
/// environment names an endpoint (the standard `OTEL_*` variables configure it: endpoint,
/// headers, timeout, `OTEL_BSP_*` batching), with none otherwise. HTTP requests run on
/// `runtime`; the provider must be shut down ([`SdkTracerProvider::shutdown`]) while it runs,
/// so that the last spans are sent.
pub(super) fn provider(runtime: tokio::runtime::Handle) -> Result<SdkTracerProvider, String> {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("switchyard");
    }
    let mut builder = SdkTracerProvider::builder().with_resource(resource.build());
    if exporting() {
        let client = reqwest::Client::builder()
            .timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|err| format!("cannot build the HTTP client for traces: {err}"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_http_client(Http { client, runtime })
            .build()
            .map_err(|err| format!("cannot export traces: {}", without_credentials(&err.to_string())))?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(builder.build())
}

/// `text` with any endpoint named in the environment shown without its password.
fn without_credentials(text: &str) -> String {
    ["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
        .iter()
        .filter_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()))
        .fold(text.to_owned(), |text, url| text.replace(&url, &crate::redact::password(&url)))
}

/// The `tracing` layer that gives spans OpenTelemetry contexts from `provider`.
pub(super) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S> + use<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("switchyard"))
        .with_tracked_inactivity(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
}

/// The exporter's HTTP client: Switchyard's reqwest, on the process's runtime (the batch
/// exporter calls it from a thread of its own, outside the runtime).
#[derive(Debug)]
struct Http {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for Http {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            // Errors are logged: without the collector's URL, which may hold a password.
            let response = client.execute(request).await.map_err(reqwest::Error::without_url)?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = response.bytes().await.map_err(reqwest::Error::without_url)?;
            let mut answer = Response::new(body);
            *answer.status_mut() = status;
            *answer.headers_mut() = headers;
            Ok::<_, HttpError>(answer)
        });
        sent.await?
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_context_goes_into_headers_and_comes_back_the_same() {
        let context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x1")]).unwrap(),
        );
        let mut written = BTreeMap::new();
        let otel = opentelemetry::Context::new().with_remote_span_context(context.clone());
        TraceContextPropagator::new().inject_context(&otel, &mut Headers(&mut written));
        assert_eq!(written, headers(&[(TRACEPARENT, PARENT), (TRACESTATE, "vendor=x1")]));
        assert_eq!(extract(&written), Some(context));
    }

    #[test]
    fn an_invalid_traceparent_is_ignored() {
        for invalid in ["", "nonsense", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "zz-1-2-3"]
        {
            assert_eq!(extract(&headers(&[(TRACEPARENT, invalid)])), None, "{invalid:?}");
        }
        assert_eq!(extract(&BTreeMap::new()), None);
        // Without the layer, nothing is written and nothing fails.
        let span = tracing::info_span!("nothing");
        adopt(&span, &headers(&[(TRACEPARENT, "nonsense")]));
        let mut written = BTreeMap::new();
        inject(&span, &mut written);
        assert!(written.is_empty());
        assert_eq!(trace_id(&span), None);
    }

    #[test]
    fn a_span_continues_the_trace_of_its_message_and_passes_it_on() {
        let provider = SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry().with(layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("message");
            adopt(&span, &headers(&[(TRACEPARENT, PARENT), (TRACESTATE, "vendor=x1")]));
            assert_eq!(trace_id(&span).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
            let mut written = BTreeMap::new();
            inject(&span, &mut written);
            let passed = extract(&written).expect("a context passed on");
            assert_eq!(passed.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(passed.span_id().to_string(), "00f067aa0ba902b7", "its own span, a child");
            assert_eq!(written.get(TRACESTATE).map(String::as_str), Some("vendor=x1"));

            // An invalid parent: a root of a trace of its own, not an error.
            let root = tracing::info_span!("message");
            adopt(&root, &headers(&[(TRACEPARENT, "00-garbage")]));
            let id = trace_id(&root).expect("a root has a trace too");
            assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736");

            // A kept traceparent is continued.
            let kept = traceparent(&span).unwrap();
            let later = tracing::info_span!("placed");
            adopt(&later, &headers(&[(TRACEPARENT, &kept)]));
            link(&later, &root);
            assert_eq!(trace_id(&later).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        });
    }
}
