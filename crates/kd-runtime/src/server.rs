//! The gRPC server every service runs: its own API plus `grpc.health.v1` and server reflection,
//! with graceful shutdown that flips health to NOT_SERVING before draining.

use crate::shutdown::Shutdown;
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::server::Router;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

/// The two sockets a service listens on.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC (service API, health, reflection).
    pub grpc: TcpListener,
    /// HTTP `/metrics`.
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds the addresses of `--listen` and `--metrics-listen`.
    pub async fn bind(common: &crate::config::CommonArgs) -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind(common.listen).await?,
            metrics: TcpListener::bind(common.metrics_listen).await?,
        })
    }

    /// Both on 127.0.0.1 with OS-chosen ports (tests).
    pub async fn loopback() -> std::io::Result<Self> {
        Ok(Self {
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            metrics: TcpListener::bind("127.0.0.1:0").await?,
        })
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
    let router = Server::builder()
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

/// Runs a model stage: serves `router` at once (health NOT_SERVING), loads the model with `load`
/// on the blocking pool (load + warm-up time in `kd_model_load_seconds`), installs it in `stage`
/// and flips health to SERVING. A model that fails to load triggers shutdown and is returned as
/// the error, so the process exits and the orchestrator sees it. Also serves `/metrics`.
pub async fn run_stage<M, F>(
    router: Router,
    listeners: Listeners,
    readiness: Readiness,
    stage: crate::Stage<M>,
    shutdown: Shutdown,
    drain_delay: Duration,
    load: F,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    M: Send + Sync + 'static,
    F: FnOnce() -> Result<M, crate::ServiceError> + Send + 'static,
{
    let Listeners { grpc, metrics } = listeners;
    let metrics_task = tokio::spawn(stage.metrics.clone().serve(metrics, shutdown.clone()));
    let loading = {
        let (stage, readiness, shutdown) = (stage.clone(), readiness.clone(), shutdown.clone());
        async move {
            let start = std::time::Instant::now();
            match crate::blocking(load).await {
                Ok(model) => {
                    stage.metrics.model_loaded(start.elapsed());
                    stage.set_model(std::sync::Arc::new(model));
                    readiness.serving().await;
                    tracing::info!(
                        stage = stage.metrics.stage(),
                        seconds = start.elapsed().as_secs_f64(),
                        "model loaded and warmed up"
                    );
                    Ok(())
                }
                Err(e) => {
                    tracing::error!(stage = stage.metrics.stage(), error = %e, "model failed to load");
                    shutdown.trigger();
                    Err(e)
                }
            }
        }
    };
    let (served, loaded) = tokio::join!(
        serve(router, grpc, readiness, shutdown.clone(), drain_delay),
        loading
    );
    shutdown.trigger();
    served?;
    loaded?;
    metrics_task.await??;
    Ok(())
}
