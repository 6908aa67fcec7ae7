//! Starting a model stage: serve at once (health NOT_SERVING), load and warm the model on the
//! blocking pool, install it, then flip health to SERVING; on shutdown, drain and exit.
//!
//! Every stage service's `run_with_listeners` is a thin call of [`Launch::run`], so the order of
//! these steps — and the load-time metric — is the same for all of them.

use crate::error::ServiceError;
use crate::server::{serve, Readiness};
use crate::shutdown::Shutdown;
use crate::stage::{blocking, Stage};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::transport::server::Router;

/// Longest wait, after shutdown (and its drain delay), for open calls to finish before the server
/// is stopped anyway.
pub const MAX_DRAIN: Duration = Duration::from_secs(30);

/// Why a service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The model could not be loaded or warmed up.
    #[error("model load failed: {0}")]
    Load(ServiceError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The metrics endpoint failed.
    #[error("metrics endpoint: {0}")]
    Metrics(std::io::Error),
    /// A server task panicked or was cancelled.
    #[error("server task: {0}")]
    Task(String),
}

/// Everything a stage needs to start serving.
pub struct Launch<M> {
    /// The stage the RPC handlers share (its model is installed once loaded).
    pub stage: Stage<M>,
    /// The gRPC router: health, reflection and the stage's API.
    pub router: Router,
    /// The health publisher of the router.
    pub readiness: Readiness,
    /// Where the gRPC server listens.
    pub grpc: TcpListener,
    /// Where `/metrics` is served.
    pub metrics: TcpListener,
    /// The process's shutdown signal.
    pub shutdown: Shutdown,
    /// Pause between NOT_SERVING and closing the listener on shutdown.
    pub drain_delay: Duration,
}

impl<M: Send + Sync + 'static> Launch<M> {
    /// Serves until `shutdown`. Model loading starts once `gate` resolves (tests use it to observe
    /// NOT_SERVING; pass `std::future::ready(())` otherwise) and runs `load` — which must load the
    /// weights and run one warm-up call — on the blocking pool; its duration is recorded as
    /// `kd_model_load_seconds`. A failed load stops the server and returns the error.
    pub async fn run<G, L>(self, gate: G, load: L) -> Result<(), LaunchError>
    where
        G: Future<Output = ()> + Send,
        L: FnOnce() -> Result<M, ServiceError> + Send + 'static,
    {
        let Self {
            stage,
            router,
            readiness,
            grpc,
            metrics,
            shutdown,
            drain_delay,
        } = self;
        tracing::info!(
            stage = stage.metrics.stage(),
            service = readiness.service(),
            grpc = %grpc.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            metrics = %metrics.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            "listening (NOT_SERVING until the model is loaded and warmed)"
        );
        let metrics_task = tokio::spawn(stage.metrics.clone().serve(metrics, shutdown.clone()));
        let server_task = tokio::spawn(serve(
            router,
            grpc,
            readiness.clone(),
            shutdown.clone(),
            drain_delay,
        ));
        let loading = async {
            gate.await;
            let start = Instant::now();
            let model = blocking(load).await?;
            stage.metrics.model_loaded(start.elapsed());
            Ok::<_, ServiceError>(model)
        };
        let stage_name = stage.metrics.stage();
        let load_result = tokio::select! {
            r = loading => Some(r),
            _ = shutdown.wait() => None,
        };
        match load_result {
            Some(Ok(model)) => {
                stage.set_model(Arc::new(model));
                if !shutdown.is_triggered() {
                    readiness.serving().await;
                    tracing::info!(stage = stage_name, "model loaded and warmed; serving");
                    // A shutdown that raced the flip must still end NOT_SERVING.
                    if shutdown.is_triggered() {
                        readiness.not_serving().await;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::error!(stage = stage_name, error = %e, "model load failed");
                shutdown.trigger();
                let _ = server_task.await;
                let _ = metrics_task.await;
                return Err(LaunchError::Load(e));
            }
            None => tracing::info!(stage = stage_name, "shutdown before the model was loaded"),
        }
        // Graceful shutdown waits for every open call, and a client's health Watch stream never
        // ends on its own: bound the drain so the process still exits.
        let mut server_task = server_task;
        let bounded_drain = async {
            shutdown.wait().await;
            tokio::time::sleep(drain_delay + MAX_DRAIN).await;
        };
        tokio::select! {
            r = &mut server_task => r.map_err(|e| LaunchError::Task(e.to_string()))??,
            _ = bounded_drain => {
                tracing::warn!(stage = stage_name, "calls still open {MAX_DRAIN:?} after shutdown; stopping the server");
                server_task.abort();
            }
        }
        metrics_task
            .await
            .map_err(|e| LaunchError::Task(e.to_string()))?
            .map_err(LaunchError::Metrics)?;
        Ok(())
    }
}
