//! OpenTelemetry traces (`--otlp-endpoint`): a span per request, with child spans for the
//! admission wait, each selection, each attempt and each PD leg; W3C `traceparent` taken from
//! clients and sent on to workers.
//!
//! The spans are ordinary `tracing` spans under the [`TARGET`] target; the OpenTelemetry layer
//! (from [`layer`]) turns them into OTLP spans, batched and exported over HTTP by a background
//! task, never on a request's path. The child spans are at DEBUG level and only the OTel layer
//! asks for them, so with tracing off they are disabled at their call sites (one relaxed load)
//! and no context is injected into worker requests.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The target of every span exported as a trace.
pub const TARGET: &str = "switchyard::trace";

/// Whether an OTLP exporter is installed (worker requests then carry `traceparent`).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are being exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A trace exporter that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The endpoint is not an http(s) URL.
    #[error("--otlp-endpoint must be an http:// or https:// URL (OTLP over HTTP), got {0:?}")]
    Endpoint(String),
    /// The exporter refused its configuration.
    #[error("cannot set up the OTLP exporter: {0}")]
    Exporter(String),
}

/// The installed exporter: flush before exit, or spans still in the batch are lost.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports every span ended so far.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }

    /// Flushes and stops the exporter.
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "stopping the trace exporter failed");
        }
    }
}

/// The OTLP/HTTP traces URL for `endpoint`: as given when it has a path, else with
/// `/v1/traces` (the collector's default path) appended.
pub fn traces_url(endpoint: &str) -> Result<String, TelemetryError> {
    let uri: axum::http::Uri = endpoint.parse().map_err(|_| TelemetryError::Endpoint(endpoint.to_owned()))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(TelemetryError::Endpoint(endpoint.to_owned()));
    }
    Ok(match uri.path() {
        "" | "/" => format!("{}/v1/traces", endpoint.trim_end_matches('/')),
        _ => endpoint.to_owned(),
    })
}

/// The layer that exports [`TARGET`] spans to `endpoint` as service `service`, and its
/// exporter. Needs a Tokio runtime (the batch exporter is a task on it).
pub fn layer<S>(endpoint: &str, service: &str) -> Result<(impl Layer<S>, Exporter), TelemetryError>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let url = traces_url(endpoint)?;
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*crate::tls::default_client_config()).clone())
        .https_or_http()
        .enable_http1()
        .build();
    let client = opentelemetry_http::hyper::HyperClient::new(connector, Duration::from_secs(10), None);
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(url)
        .with_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
        exporter,
        opentelemetry_sdk::runtime::Tokio,
    )
    .build();
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
    let tracer = provider.tracer("switchyard");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(Targets::new().with_target(TARGET, tracing::Level::TRACE));
    ENABLED.store(true, Ordering::Relaxed);
    Ok((layer, Exporter { provider }))
}

/// Makes `span` a child of the trace a client's `traceparent` (and `tracestate`) names.
pub fn continue_client_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !enabled() || !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    // An invalid traceparent gives an empty context: the span then starts its own trace.
    let _ = span.set_parent(parent);
}

/// Puts the current span's context into a worker request's headers (`traceparent`).
pub fn inject_current(headers: &mut HeaderMap) {
    if !enabled() {
        return;
    }
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut opentelemetry_http::HeaderInjector(headers));
}

#[cfg(test)]
mod tests {
    #[test]
    fn endpoints_get_the_traces_path_only_when_they_have_none() {
        assert_eq!(super::traces_url("http://c:4318").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(super::traces_url("http://c:4318/").unwrap(), "http://c:4318/v1/traces");
        assert_eq!(super::traces_url("https://c/otlp/v1/traces").unwrap(), "https://c/otlp/v1/traces");
        assert!(super::traces_url("c:4317").is_err());
        assert!(super::traces_url("grpc://c:4317").is_err());
    }
}
