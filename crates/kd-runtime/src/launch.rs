//! Starting a service, the same way for all five: bind → serve at once with health
//! NOT_SERVING → load (stages: weights + one warm-up call on the blocking pool) → install →
//! SERVING → on shutdown, NOT_SERVING, drain delay, and a bounded drain of open calls.
//!
//! A service's `run_with_listeners` builds a [`Launch`] (its stage, its gRPC services) and calls
//! [`Launch::run`]; its `main` is [`main`].

use crate::config::CommonArgs;
use crate::error::ServiceError;
use crate::server::{self, Readiness};
use crate::shutdown::Shutdown;
use crate::stage::{Stage, StageInfoService, StageModel};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Longest wait, after shutdown (and its drain delay), for open calls to finish before the server
/// is stopped anyway.
pub const MAX_DRAIN: Duration = Duration::from_secs(30);

/// Default message-size limit of the model stages (batches of hidden states, latents and
/// pixel-size masks): 512 MiB, twice the wire-tensor cap.
pub const STAGE_MESSAGE_LIMIT: usize = 512 << 20;

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
    /// A flag or configuration file is unusable.
    #[error("configuration: {0}")]
    Config(String),
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

impl From<ServiceError> for LaunchError {
    fn from(e: ServiceError) -> Self {
        Self::Load(e)
    }
}

type Gate = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The two sockets a service listens on (and, for tests, a gate before model loading).
pub struct Listeners {
    /// gRPC (service API, StageInfo, health, reflection).
    pub grpc: TcpListener,
    /// HTTP `/metrics`.
    pub metrics: TcpListener,
    gate: Option<Gate>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listeners")
            .field("grpc", &self.grpc.local_addr().ok())
            .field("metrics", &self.metrics.local_addr().ok())
            .field("gated", &self.gate.is_some())
            .finish()
    }
}

impl Listeners {
    /// Both sockets as given.
    pub fn new(grpc: TcpListener, metrics: TcpListener) -> Self {
        Self {
            grpc,
            metrics,
            gate: None,
        }
    }

    /// Binds the addresses of `--listen` and `--metrics-listen`; a failure names the address.
    pub async fn bind(common: &CommonArgs) -> Result<Self, LaunchError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| LaunchError::Bind { addr, source })
        };
        Ok(Self::new(
            bind(common.listen).await?,
            bind(common.metrics_listen).await?,
        ))
    }

    /// Both on 127.0.0.1 with OS-chosen ports (tests).
    pub async fn loopback() -> std::io::Result<Self> {
        Ok(Self::new(
            TcpListener::bind("127.0.0.1:0").await?,
            TcpListener::bind("127.0.0.1:0").await?,
        ))
    }

    /// Loading starts only once `gate` resolves (tests use it to watch NOT_SERVING).
    pub fn with_load_gate(mut self, gate: impl Future<Output = ()> + Send + 'static) -> Self {
        self.gate = Some(Box::pin(gate));
        self
    }
}

/// A generated gRPC server whose message-size limits can be set (every `kandinsky.v1` server).
pub trait MessageLimit {
    /// The server accepting and sending messages of at most `bytes`.
    fn message_limit(self, bytes: usize) -> Self;
}

macro_rules! message_limit {
    ($($module:ident :: $server:ident),* $(,)?) => {$(
        impl<T> MessageLimit for kd_proto::v1::$module::$server<T> {
            fn message_limit(self, bytes: usize) -> Self {
                self.max_decoding_message_size(bytes)
                    .max_encoding_message_size(bytes)
            }
        }
    )*};
}

message_limit!(
    text_encoder_server::TextEncoderServer,
    prior_server::PriorServer,
    denoiser_server::DenoiserServer,
    movq_server::MovqServer,
    gateway_server::GatewayServer,
);

/// A service being started: its stage, its gRPC services and its limits.
pub struct Launch<M> {
    stage: Stage<M>,
    routes: Routes,
    services: Vec<&'static str>,
    message_limit: usize,
    drain_delay: Duration,
    tls: crate::tls::TlsArgs,
}

impl<M: Send + Sync + 'static> Launch<M> {
    /// A launch of `stage` with the flags every service takes; `default_message_limit` applies
    /// unless `--max-message-bytes` is given.
    pub fn new(stage: Stage<M>, common: &CommonArgs, default_message_limit: usize) -> Self {
        Self {
            stage,
            routes: Routes::default(),
            services: Vec::new(),
            message_limit: common.message_limit(default_message_limit),
            drain_delay: common.drain_delay(),
            tls: common.tls.clone(),
        }
    }

    /// Mounts a generated server with the message-size limit applied. The first one mounted
    /// (StageInfo aside) names the service in health.
    pub fn serve<S>(self, server: S) -> Self
    where
        S: MessageLimit
            + tonic::codegen::Service<
                http::Request<tonic::body::Body>,
                Error = Infallible,
                Response = http::Response<tonic::body::Body>,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let limit = self.message_limit;
        self.mount(server.message_limit(limit))
    }

    /// Mounts a service as it is (already limited, e.g. wrapped in an interceptor).
    pub fn mount<S>(mut self, service: S) -> Self
    where
        S: tonic::codegen::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.services.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// The message-size limit in force.
    pub fn limit(&self) -> usize {
        self.message_limit
    }

    /// Serves until `shutdown`. `load` (for a stage: load the weights and run one warm-up call,
    /// on the blocking pool) starts once the listeners' gate opens; its duration is
    /// `kd_model_load_seconds`. A failed load stops the server and returns the error.
    pub async fn run<L>(
        self,
        listeners: Listeners,
        shutdown: Shutdown,
        load: L,
    ) -> Result<(), LaunchError>
    where
        L: Future<Output = Result<M, ServiceError>> + Send,
    {
        let Self {
            stage,
            routes,
            services,
            message_limit,
            drain_delay,
            tls,
        } = self;
        let tls = crate::tls::server_config(&tls).map_err(LaunchError::Config)?;
        let Listeners {
            grpc,
            metrics,
            gate,
        } = listeners;
        // Health names the service's own API (StageInfo is mounted beside every stage's).
        let service = services
            .iter()
            .copied()
            .find(|s| *s != kd_proto::v1::stage_info_server::SERVICE_NAME)
            .or(services.first().copied())
            .unwrap_or("");
        let (readiness, health) = Readiness::new(service).await;
        let mut names = services.clone();
        names.push(tonic_health::pb::health_server::SERVICE_NAME);
        let routes = server::add_reflection(routes.add_service(health), &names);
        let name = stage.metrics.stage();
        tracing::info!(
            stage = name,
            service,
            grpc = %grpc.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            metrics = %metrics.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
            "listening (NOT_SERVING until loaded)"
        );
        let metrics_task = tokio::spawn(stage.metrics.clone().serve(
            metrics,
            shutdown.clone(),
            readiness.flag(),
        ));
        let mut server_task = tokio::spawn(server::serve(
            routes,
            message_limit,
            grpc,
            tls,
            readiness.clone(),
            shutdown.clone(),
            drain_delay,
        ));
        let loading = async {
            if let Some(gate) = gate {
                gate.await;
            }
            let start = Instant::now();
            let model = load.await?;
            stage.metrics.model_loaded(start.elapsed());
            Ok::<_, ServiceError>(model)
        };
        let loaded = tokio::select! {
            r = loading => Some(r),
            _ = shutdown.wait() => None,
        };
        match loaded {
            Some(Ok(model)) => {
                stage.set_model(Arc::new(model));
                if !shutdown.is_triggered() {
                    readiness.serving().await;
                    tracing::info!(stage = name, "loaded and warmed; serving");
                    // A shutdown that raced the flip must still end NOT_SERVING.
                    if shutdown.is_triggered() {
                        readiness.not_serving().await;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::error!(stage = name, error = %e, "load failed");
                shutdown.trigger();
                let _ = server_task.await;
                let _ = metrics_task.await;
                return Err(LaunchError::Load(e));
            }
            None => tracing::info!(stage = name, "shutdown before loading finished"),
        }
        // Graceful shutdown waits for every open call, and a client's health Watch stream never
        // ends on its own: bound the drain so the process still exits.
        let bounded_drain = async {
            shutdown.wait().await;
            tokio::time::sleep(drain_delay + MAX_DRAIN).await;
        };
        tokio::select! {
            r = &mut server_task => r.map_err(|e| LaunchError::Task(e.to_string()))??,
            _ = bounded_drain => {
                tracing::warn!(stage = name, "calls still open {MAX_DRAIN:?} after shutdown; stopping the server");
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

impl<M: StageModel> Launch<M> {
    /// A launch of a model stage: `kandinsky.v1.StageInfo` is served beside its API, outside
    /// admission; the message limit defaults to [`STAGE_MESSAGE_LIMIT`].
    pub fn stage(stage: Stage<M>, common: &CommonArgs) -> Self {
        let info = StageInfoService::new(stage.clone());
        let mut launch = Self::new(stage, common, STAGE_MESSAGE_LIMIT);
        launch
            .services
            .push(kd_proto::v1::stage_info_server::SERVICE_NAME);
        launch.routes = launch.routes.add_service(info);
        launch
    }
}

/// The whole `main` of a service binary: parse the flags, set the heap policy for CPU tensors
/// (`kd_models::retain_freed_memory`, model stages), install logging and tracing, trigger
/// shutdown on SIGTERM/Ctrl-C, bind, and `run` until shutdown.
pub fn main<C, F, Fut>(binary: &'static str, common: impl Fn(&C) -> &CommonArgs, run: F)
where
    C: clap::Parser,
    F: FnOnce(C, Listeners, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), LaunchError>>,
{
    let config = C::parse();
    #[cfg(feature = "models")]
    kd_models::retain_freed_memory();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{binary}: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        let _telemetry = crate::telemetry::init_tracing(common(&config), binary);
        let shutdown = Shutdown::new();
        tokio::spawn(shutdown.clone().trigger_on_signals());
        let listeners = Listeners::bind(common(&config)).await?;
        run(config, listeners, shutdown).await
    });
    if let Err(e) = result {
        eprintln!("{binary}: {e}");
        std::process::exit(1);
    }
}

/// The `main` of a service binary whose library crate `$krate` has a `Config` (with a `common`
/// field) and `run_with_listeners`: `kd_runtime::service_main!("kd-prior", kd_prior);`.
#[macro_export]
macro_rules! service_main {
    ($binary:literal, $krate:ident) => {
        fn main() {
            $crate::launch::main(
                $binary,
                |c: &$krate::Config| &c.common,
                $krate::run_with_listeners,
            )
        }
    };
}
