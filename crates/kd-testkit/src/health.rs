//! `grpc.health.v1` from the client side: one Check, or polling until SERVING.

use crate::TestServer;
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// How long [`connect`] keeps retrying a refused connection.
const CONNECT_BOUND: Duration = Duration::from_secs(4);
/// Pause between polls.
const POLL: Duration = Duration::from_millis(20);

/// What a health call talks to: an address (connected per call) or an open channel.
#[derive(Clone, Debug)]
pub enum Target {
    /// A gRPC server's address.
    Addr(SocketAddr),
    /// An open channel.
    Channel(Channel),
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Self {
        Self::Addr(a)
    }
}

impl From<Channel> for Target {
    fn from(c: Channel) -> Self {
        Self::Channel(c)
    }
}

impl From<&Channel> for Target {
    fn from(c: &Channel) -> Self {
        Self::Channel(c.clone())
    }
}

impl From<&TestServer> for Target {
    fn from(s: &TestServer) -> Self {
        Self::Addr(s.grpc)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(a) => write!(f, "{a}"),
            Self::Channel(_) => f.write_str("the channel"),
        }
    }
}

impl Target {
    async fn check(&self, service: &str) -> Result<ServingStatus, String> {
        let channel = match self {
            Self::Addr(a) => endpoint(*a)
                .connect()
                .await
                .map_err(|e| format!("connect: {e}"))?,
            Self::Channel(c) => c.clone(),
        };
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map_err(|s| format!("Check: {s:?}"))?;
        ServingStatus::try_from(r.into_inner().status).map_err(|e| format!("status: {e}"))
    }
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).expect("a socket address is a valid URI")
}

/// A connected channel to `addr`, retried for a few seconds while the server starts.
pub async fn connect(addr: SocketAddr) -> Channel {
    let start = Instant::now();
    loop {
        match endpoint(addr).connect().await {
            Ok(c) => return c,
            Err(e) if start.elapsed() > CONNECT_BOUND => {
                panic!("no gRPC server at {addr} after {CONNECT_BOUND:?}: {e}")
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// One health Check of `service` ("" for the whole server); panics naming the target and the
/// error when the call fails.
pub async fn health_status(target: impl Into<Target>, service: &str) -> ServingStatus {
    let target = match target.into() {
        Target::Addr(a) => Target::Channel(connect(a).await),
        t => t,
    };
    target
        .check(service)
        .await
        .unwrap_or_else(|e| panic!("health Check of {service:?} at {target}: {e}"))
}

/// Polls health Check of `service` until SERVING; panics after `timeout` with the last answer
/// (connection errors while the server starts count as "not yet").
pub async fn wait_serving(target: impl Into<Target>, service: &str, timeout: Duration) {
    let target = target.into();
    let start = Instant::now();
    loop {
        let last = target.check(service).await;
        if last == Ok(ServingStatus::Serving) {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "{service} at {target} is not SERVING after {timeout:?}; last answer: {last:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// A `grpc.health.v1` Watch stream of one service.
pub struct HealthWatch {
    service: String,
    stream: tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
}

/// Opens a Watch of `service` on `channel`; panics naming the service when the call fails.
pub async fn watch_health(channel: &Channel, service: &str) -> HealthWatch {
    let stream = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("health Watch of {service:?}: {s:?}"))
        .into_inner();
    HealthWatch {
        service: service.into(),
        stream,
    }
}

impl HealthWatch {
    /// The next status the server sends; `None` when the stream ends or fails. Panics when
    /// nothing arrives within `timeout`.
    pub async fn next_status(&mut self, timeout: Duration) -> Option<ServingStatus> {
        let message = tokio::time::timeout(timeout, self.stream.message())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "health Watch of {:?}: nothing within {timeout:?}",
                    self.service
                )
            });
        let status = message.ok()??.status;
        Some(
            ServingStatus::try_from(status).unwrap_or_else(|e| {
                panic!("health Watch of {:?}: status {status}: {e}", self.service)
            }),
        )
    }
}

/// Checks the readiness life of `service` on a [`TestServer::spawn_gated`] server: NOT_SERVING
/// (Check by name and under "", and the first Watch message) while the model load waits — when
/// `while_loading` runs with a channel, e.g. to see the API answer UNAVAILABLE —, SERVING once
/// released, NOT_SERVING (or the stream's end) on shutdown; then the server stops cleanly.
/// `/healthz` on the metrics port follows: 503 while loading, 200 once SERVING.
pub async fn assert_health_lifecycle<F, Fut>(
    mut server: TestServer,
    service: &str,
    while_loading: F,
) where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let channel = server.channel().await;
    for name in [service, ""] {
        assert_eq!(
            health_status(&channel, name).await,
            ServingStatus::NotServing,
            "{name:?} while loading"
        );
    }
    let mut watch = watch_health(&channel, service).await;
    let first = watch.next_status(Duration::from_secs(10)).await;
    assert_eq!(
        first,
        Some(ServingStatus::NotServing),
        "first Watch message"
    );
    while_loading(channel.clone()).await;
    let healthz = crate::http_get(server.metrics, "/healthz").await;
    assert!(
        healthz.starts_with("HTTP/1.1 503"),
        "/healthz while loading: {healthz}"
    );

    server.release();
    let next = watch.next_status(Duration::from_secs(30)).await;
    assert_eq!(next, Some(ServingStatus::Serving), "Watch after the load");
    assert_eq!(health_status(&channel, "").await, ServingStatus::Serving);
    let healthz = crate::http_get(server.metrics, "/healthz").await;
    assert!(
        healthz.starts_with("HTTP/1.1 200"),
        "/healthz once loaded: {healthz}"
    );

    server.trigger_shutdown();
    if let Some(last) = watch.next_status(Duration::from_secs(10)).await {
        assert_eq!(last, ServingStatus::NotServing, "Watch on shutdown");
    }
    // An open Watch stream would hold the graceful drain open: close the client side.
    drop((watch, channel));
    server
        .shutdown()
        .await
        .expect("the server stops once its calls are closed");
}
