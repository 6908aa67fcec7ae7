//! Logs and traces.
//!
//! * Logs: `tracing` with text or JSON output, level from `RUST_LOG` (default `info`).
//! * Traces: W3C `traceparent` is extracted from every incoming gRPC request (see
//!   [`server_span`]) and injected into every outgoing one ([`inject`]), so one request is one
//!   trace across the gateway and all stages; spans are exported over OTLP/gRPC when
//!   `--otlp-endpoint` is set.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub use crate::config::LogFormat;

/// Flushes and stops the trace exporter when dropped (end of `main`).
#[must_use = "dropping the guard stops trace export"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs logging only (tests, tools). Later calls are no-ops.
pub fn init(format: LogFormat) {
    let _ = try_init(format, None, "kandinsky-serve");
}

/// Installs logging and, with an endpoint, OTLP trace export for `service` (the OTel
/// `service.name`, unless `OTEL_SERVICE_NAME` overrides it).
pub fn init_tracing(common: &crate::config::CommonArgs, service: &'static str) -> TelemetryGuard {
    match try_init(common.log_format, common.otlp_endpoint.as_deref(), service) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("telemetry: {e}; continuing without trace export");
            init(common.log_format);
            TelemetryGuard { provider: None }
        }
    }
}

fn try_init(
    format: LogFormat,
    endpoint: Option<&str>,
    service: &'static str,
) -> Result<TelemetryGuard, String> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_target(false).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
    };
    let provider = match endpoint {
        Some(ep) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(ep)
                .build()
                .map_err(|e| format!("OTLP exporter for {ep}: {e}"))?;
            let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(service)));
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| e.to_string())?;
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(k, v);
        }
    }
}

/// gRPC services whose calls are not traced: probes, not requests (a kubelet's health check
/// every few seconds would otherwise make a one-span trace each time).
const UNTRACED: [&str; 3] = [
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1.ServerReflection/",
    "/grpc.reflection.v1alpha.ServerReflection/",
];

/// The span of one incoming gRPC request, child of the caller's `traceparent` if it sent one
/// (none for health checks and reflection). Installed on every server by the launcher.
pub fn server_span(req: &http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if UNTRACED.iter().any(|p| path.starts_with(p)) {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %path,
        rpc.method = %path,
        otel.kind = "server",
        trace_id = tracing::field::Empty
    );
    let parent = opentelemetry::global::get_text_map_propagator(|p| {
        p.extract(&HeaderExtractor(req.headers()))
    });
    let _ = span.set_parent(parent);
    // Every log line of the request carries its trace id (when tracing is on).
    let trace_id = span.context().span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
    span
}

/// Writes the current span's context as `traceparent` into an outgoing request.
pub fn inject<T>(req: &mut tonic::Request<T>) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut MetadataInjector(req.metadata_mut()))
    });
}
