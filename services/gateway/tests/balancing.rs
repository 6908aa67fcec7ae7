//! Client-side balancing over two real replicas of a stage (two MoVQ servers on loopback): calls
//! are spread over both, and when one replica stops the calls keep succeeding on the other.

use kd_gateway::balance::Pool;
use kd_proto::v1::{self, movq_client::MovqClient};
use kd_runtime::Listeners;
use kd_runtime::Shutdown;
use kd_testkit::parity::fixtures_dir;
use std::net::SocketAddr;
use std::time::Duration;

async fn replica() -> (SocketAddr, SocketAddr, Shutdown) {
    let listeners = Listeners::loopback().await.unwrap();
    let (addr, metrics) = (
        listeners.grpc.local_addr().unwrap(),
        listeners.metrics.local_addr().unwrap(),
    );
    let dir = fixtures_dir().join("tiny/kandinsky-2-2-decoder");
    let config = <kd_movq::Config as clap::Parser>::parse_from([
        "kd-movq",
        "--model-dir",
        dir.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    let shutdown = Shutdown::new();
    tokio::spawn(kd_movq::run_with_listeners(
        config,
        listeners,
        shutdown.clone(),
    ));
    (addr, metrics, shutdown)
}

async fn decode_count(metrics: SocketAddr) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(metrics).await else {
        return 0;
    };
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix("kd_requests_total{method=\"Decode\",stage=\"movq\"} "))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

fn request() -> v1::DecodeRequest {
    let z = candle_core::Tensor::zeros(
        (1, 4, 4, 4),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    v1::DecodeRequest {
        latents: Some(kd_proto::to_wire(&z).unwrap()),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_spread_over_replicas_and_survive_one_going_away() {
    let (a, a_metrics, a_stop) = replica().await;
    let (b, b_metrics, _b_stop) = replica().await;
    let urls = vec![format!("http://{a}"), format!("http://{b}")];
    let pool = Pool::new(&urls, "movq", Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(pool.len(), 2);
    // One call as the gateway makes it (retried once on another replica when UNAVAILABLE).
    let call = |pool: Pool| async move {
        pool.call(|ch| async move { MovqClient::new(ch).decode(request()).await })
            .await
    };
    // Both replicas load their model; wait until each reports SERVING.
    for addr in [a, b] {
        let start = std::time::Instant::now();
        loop {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect_lazy();
            let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
            let req = tonic_health::pb::HealthCheckRequest {
                service: "kandinsky.v1.Movq".into(),
            };
            if let Ok(r) = h.check(req).await {
                if r.into_inner().status()
                    == tonic_health::pb::health_check_response::ServingStatus::Serving
                {
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "replica {addr} did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for _ in 0..20 {
        call(pool.clone()).await.unwrap();
    }
    let (na, nb) = (decode_count(a_metrics).await, decode_count(b_metrics).await);
    assert!(
        na >= 5 && nb >= 5,
        "calls went to both replicas: {na} and {nb}"
    );

    // Replica A stops: every call still succeeds (at worst after one retry on B).
    a_stop.trigger();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        call(pool.clone())
            .await
            .unwrap_or_else(|e| panic!("call {i} after one replica stopped: {e:?}"));
    }
    assert!(
        decode_count(b_metrics).await >= nb + 20,
        "the surviving replica served the calls"
    );
}
