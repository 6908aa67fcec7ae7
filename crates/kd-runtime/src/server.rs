//! The gRPC server pieces every service runs: health (`grpc.health.v1`), server reflection
//! (v1 and v1alpha, listing only the services this server serves), one status mapping for
//! requests the transport refuses, and serving with graceful shutdown.

use crate::shutdown::Shutdown;
use axum::http::{HeaderMap, HeaderValue};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// Publishes one service's readiness on `grpc.health.v1` (under its name and under "").
#[derive(Clone, Debug)]
pub struct Readiness {
    reporter: HealthReporter,
    service: &'static str,
    up: Arc<AtomicBool>,
}

impl Readiness {
    /// A reporter for `service` (NOT_SERVING until [`Readiness::serving`]) and the health
    /// service to mount.
    pub async fn new(
        service: &'static str,
    ) -> (
        Self,
        tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, health) = tonic_health::server::health_reporter();
        let readiness = Self {
            reporter,
            service,
            up: Arc::new(AtomicBool::new(false)),
        };
        readiness.not_serving().await;
        (readiness, health)
    }

    /// The fully qualified gRPC service name (e.g. `kandinsky.v1.Prior`).
    pub fn service(&self) -> &'static str {
        self.service
    }

    /// Marks the service SERVING (after weights are loaded and warmed).
    pub async fn serving(&self) {
        self.set(ServingStatus::Serving).await;
    }

    /// Marks the service NOT_SERVING.
    pub async fn not_serving(&self) {
        self.set(ServingStatus::NotServing).await;
    }

    /// SERVING as a flag (what `/healthz` on the metrics port answers).
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.up.clone()
    }

    async fn set(&self, status: ServingStatus) {
        self.up
            .store(status == ServingStatus::Serving, Ordering::Relaxed);
        self.reporter.set_service_status(self.service, status).await;
        self.reporter.set_service_status("", status).await;
    }
}

/// Server reflection in both protocol versions (grpcurl speaks v1, Python's grpcio-reflection
/// v1alpha), advertising exactly `services` (and reflection itself).
pub fn add_reflection(routes: Routes, services: &[&'static str]) -> Routes {
    let builder = || {
        let mut b = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(kd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let reflection = [
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ];
        for s in services.iter().chain(&reflection) {
            b = b.with_service_name(*s);
        }
        b
    };
    routes
        .add_service(builder().build_v1().expect("descriptor sets are valid"))
        .add_service(
            builder()
                .build_v1alpha()
                .expect("descriptor sets are valid"),
        )
}

/// The largest request a service accepts, for the refusal message.
#[derive(Clone, Copy, Debug)]
struct Limit(usize);

/// One status for what the transport refuses before a handler runs: a message over the size
/// limit is RESOURCE_EXHAUSTED naming the limit (tonic says OUT_OF_RANGE), and bytes that are
/// not a valid message (garbage, invalid UTF-8 in a string) are INVALID_ARGUMENT (tonic says
/// INTERNAL, which would read as a server bug).
fn rewrite_refusal(headers: &mut HeaderMap, limit: Limit) {
    let code = headers.get("grpc-status").and_then(|v| v.to_str().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    let (code, text) = match code {
        Some("11") if message.contains("message length too large") => (
            "8",
            format!(
                "request too large: {message}; this service accepts messages up to {} bytes (--max-message-bytes)",
                limit.0
            ),
        ),
        Some("13") if message.starts_with("failed to decode Protobuf message") => (
            "3",
            format!("invalid `request`: the bytes are not a valid message ({message})"),
        ),
        _ => return,
    };
    headers.insert("grpc-status", HeaderValue::from_static(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(&text)) {
        headers.insert("grpc-message", v);
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| char::from(c).to_digit(16);
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.extend(u8::try_from(h * 16 + l).ok());
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Serves `routes` on `listener` until `shutdown`; then flips health to NOT_SERVING, waits
/// `drain_delay` (so load balancers stop routing here), stops accepting and drains in-flight
/// calls. Every call runs in a span whose parent is the caller's `traceparent`.
pub async fn serve(
    routes: Routes,
    message_limit: usize,
    listener: TcpListener,
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    readiness: Readiness,
    shutdown: Shutdown,
    drain_delay: Duration,
) -> Result<(), tonic::transport::Error> {
    let limit = Limit(message_limit);
    let router = routes
        .into_axum_router()
        .layer(axum::middleware::map_response(
            move |mut r: axum::response::Response| async move {
                rewrite_refusal(r.headers_mut(), limit);
                r
            },
        ));
    let server = Server::builder()
        .trace_fn(crate::telemetry::server_span)
        .add_routes(Routes::from(router));
    let stop = async move {
        shutdown.wait().await;
        readiness.not_serving().await;
        tracing::info!(service = readiness.service(), "draining");
        tokio::time::sleep(drain_delay).await;
    };
    match tls {
        Some(config) => {
            let incoming = crate::tls::incoming(listener, config);
            server.serve_with_incoming_shutdown(incoming, stop).await
        }
        None => {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            server.serve_with_incoming_shutdown(incoming, stop).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_get_one_status_each() {
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("11"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static(
                "Error,%20decoded%20message%20length%20too%20large:%20found%2010%20bytes,%20the%20limit%20is:%204%20bytes",
            ),
        );
        rewrite_refusal(&mut h, Limit(4));
        assert_eq!(h["grpc-status"], "8");
        let m = percent_decode(h["grpc-message"].to_str().unwrap());
        assert!(m.contains("up to 4 bytes (--max-message-bytes)"), "{m}");

        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("13"));
        h.insert(
            "grpc-message",
            HeaderValue::from_static("failed%20to%20decode%20Protobuf%20message"),
        );
        rewrite_refusal(&mut h, Limit(4));
        assert_eq!(h["grpc-status"], "3");

        // Anything else is left alone.
        let mut h = HeaderMap::new();
        h.insert("grpc-status", HeaderValue::from_static("13"));
        h.insert("grpc-message", HeaderValue::from_static("a%20bug"));
        rewrite_refusal(&mut h, Limit(4));
        assert_eq!(h["grpc-status"], "13");
        assert_eq!(percent_decode("a%20b%zz"), "a b%zz");
        assert_eq!(percent_encode("a b%é"), "a b%25%C3%A9");
    }
}
