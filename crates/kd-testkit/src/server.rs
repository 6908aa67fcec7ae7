//! A service running in the test process on loopback ports, stopped on drop.

use crate::health::connect;
use kd_runtime::Listeners;
use kd_runtime::Shutdown;
use std::fmt::Display;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Longest wait in [`TestServer::shutdown`] for the server task to end.
pub const SHUTDOWN_BOUND: Duration = Duration::from_secs(30);

/// A server task spawned on its own [`Listeners`] with its own [`Shutdown`]; dropping it
/// triggers the shutdown.
pub struct TestServer {
    /// Where the gRPC server listens.
    pub grpc: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics: SocketAddr,
    shutdown: Shutdown,
    task: Option<JoinHandle<Result<(), String>>>,
    gate: Option<oneshot::Sender<()>>,
}

impl TestServer {
    /// Binds [`Listeners::loopback`] and spawns `run(listeners, shutdown)`, e.g.
    /// `TestServer::spawn(|l, s| kd_movq::run_with_listeners(config, l, s))`.
    pub async fn spawn<F, Fut, E>(run: F) -> Self
    where
        F: FnOnce(Listeners, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        Self::spawn_on(loopback().await, run)
    }

    /// As [`TestServer::spawn`], but model loading waits for [`TestServer::release`] (through
    /// [`Listeners::with_load_gate`]), so a test can observe NOT_SERVING first.
    pub async fn spawn_gated<F, Fut, E>(run: F) -> Self
    where
        F: FnOnce(Listeners, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<()>();
        let listeners = loopback().await.with_load_gate(async move {
            let _ = rx.await;
        });
        let mut server = Self::spawn_on(listeners, run);
        server.gate = Some(tx);
        server
    }

    /// Spawns `run` on the given listeners (e.g. bound to an address a test chose).
    pub fn spawn_on<F, Fut, E>(listeners: Listeners, run: F) -> Self
    where
        F: FnOnce(Listeners, Shutdown) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let addr = |l: &tokio::net::TcpListener| l.local_addr().expect("a bound listener");
        let (grpc, metrics) = (addr(&listeners.grpc), addr(&listeners.metrics));
        let shutdown = Shutdown::new();
        let fut = run(listeners, shutdown.clone());
        let task = tokio::spawn(async move { fut.await.map_err(|e| e.to_string()) });
        Self {
            grpc,
            metrics,
            shutdown,
            task: Some(task),
            gate: None,
        }
    }

    /// `http://<grpc address>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// A connected channel to the gRPC address (retried briefly while the server starts).
    pub async fn channel(&self) -> Channel {
        connect(self.grpc).await
    }

    /// Lets a [`TestServer::spawn_gated`] server load its model (no-op otherwise).
    pub fn release(&mut self) {
        if let Some(tx) = self.gate.take() {
            let _ = tx.send(());
        }
    }

    /// Triggers the shutdown without waiting (health flips to NOT_SERVING, calls drain).
    pub fn trigger_shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Triggers the shutdown and waits (at most [`SHUTDOWN_BOUND`]) for the server to end: the
    /// server's own result, or why it did not end (a timeout, a panic).
    pub async fn shutdown(mut self) -> Result<(), String> {
        self.shutdown.trigger();
        self.join().await
    }

    /// Waits (at most [`SHUTDOWN_BOUND`]) for the server to end by itself, e.g. after a failed
    /// model load: its result, or why it did not end.
    pub async fn join(&mut self) -> Result<(), String> {
        let Some(task) = self.task.take() else {
            return Err("the server task was already awaited".into());
        };
        match tokio::time::timeout(SHUTDOWN_BOUND, task).await {
            Err(_) => Err(format!(
                "server at {} did not stop within {SHUTDOWN_BOUND:?}",
                self.grpc
            )),
            Ok(Err(e)) => Err(format!("server task at {} failed: {e}", self.grpc)),
            Ok(Ok(result)) => result,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn loopback() -> Listeners {
    Listeners::loopback()
        .await
        .expect("cannot bind 127.0.0.1:0 for a test server")
}

/// `kandinsky.v1.StageInfo/Info` of the stage at `target` (a channel or a server).
pub async fn stage_info(
    channel: tonic::transport::Channel,
) -> Result<kd_proto::v1::ModelInfo, tonic::Status> {
    kd_proto::v1::stage_info_client::StageInfoClient::new(channel)
        .info(kd_proto::v1::InfoRequest {})
        .await
        .map(tonic::Response::into_inner)
        .map(|r| r.model.unwrap_or_default())
}
