//! The gRPC server every service runs: its own API plus `grpc.health.v1` and server reflection,
//! with graceful shutdown that flips health to NOT_SERVING before draining.

use crate::shutdown::Shutdown;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// A future the model load waits for (see [`Listeners::with_load_gate`]).
pub type LoadGate = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The two sockets a service listens on.
pub struct Listeners {
    /// gRPC (service API, health, reflection).
    pub grpc: TcpListener,
    /// HTTP `/metrics`.
    pub metrics: TcpListener,
    /// When set, model loading starts only once this resolves.
    load_gate: Option<LoadGate>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("grpc", &self.grpc)
            .field("metrics", &self.metrics)
            .field("load_gate", &self.load_gate.is_some())
            .finish()
    }
}

impl Listeners {
    /// Binds the addresses of `--listen` and `--metrics-listen`; a failure names the address.
    pub async fn bind(
        common: &crate::config::CommonArgs,
    ) -> Result<Self, crate::launch::LaunchError> {
        let bind = |addr: std::net::SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| crate::launch::LaunchError::Bind { addr, source })
        };
        Ok(Self {
            grpc: bind(common.listen).await?,
            metrics: bind(common.metrics_listen).await?,
            load_gate: None,
        })
    }

    /// Both on 127.0.0.1 with OS-chosen ports (tests).
    pub async fn loopback() -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            metrics: TcpListener::bind("127.0.0.1:0").await?,
            load_gate: None,
        })
    }

    /// Model loading starts only once `gate` resolves, so a test can watch health report
    /// NOT_SERVING before the model is there.
    pub fn with_load_gate(mut self, gate: impl Future<Output = ()> + Send + 'static) -> Self {
        self.load_gate = Some(Box::pin(gate));
        self
    }

    /// Takes the load gate; a future that is ready at once when none was set.
    pub fn take_load_gate(&mut self) -> LoadGate {
        self.load_gate
            .take()
            .unwrap_or_else(|| Box::pin(std::future::ready(())))
    }
}

/// Publishes one service's readiness on `grpc.health.v1` (under its name and under "").
#[derive(Clone, Debug)]
pub struct Readiness {
    reporter: HealthReporter,
    service: &'static str,
}

impl Readiness {
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

    async fn set(&self, status: ServingStatus) {
        self.reporter.set_service_status(self.service, status).await;
        self.reporter.set_service_status("", status).await;
    }
}

/// A server builder with health (NOT_SERVING until [`Readiness::serving`]) and reflection.
pub async fn base_router(service: &'static str) -> (Router, Readiness) {
    let (reporter, health) = tonic_health::server::health_reporter();
    let readiness = Readiness { reporter, service };
    readiness.not_serving().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(kd_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("descriptor sets are valid");
    // Every request runs in a span whose parent is the caller's `traceparent`.
    let router = Server::builder()
        .trace_fn(crate::telemetry::server_span)
        .add_service(health)
        .add_service(reflection);
    (router, readiness)
}

/// Serves `router` on `listener` until `shutdown`; then flips health to NOT_SERVING, waits
/// `drain_delay` (so load balancers stop routing here), stops accepting and drains in-flight calls.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    readiness: Readiness,
    shutdown: Shutdown,
    drain_delay: Duration,
) -> Result<(), tonic::transport::Error> {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    router
        .serve_with_incoming_shutdown(incoming, async move {
            shutdown.wait().await;
            readiness.not_serving().await;
            tracing::info!(service = readiness.service(), "draining");
            tokio::time::sleep(drain_delay).await;
        })
        .await
}
