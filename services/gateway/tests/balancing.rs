//! Client-side balancing over two real replicas of a stage (two MoVQ servers on loopback): calls
//! are spread over both, and when one replica stops the calls keep succeeding on the other.

use kd_gateway::balance::Pool;
use kd_proto::v1::{self, movq_client::MovqClient};
use kd_testkit::{fixtures_dir, metric_at, stage_args, wait_serving, TestServer};
use std::time::Duration;

/// One MoVQ replica on the tiny fixture.
async fn replica() -> TestServer {
    let dir = fixtures_dir().join("tiny/kandinsky-2-2-decoder");
    let config = <kd_movq::Config as clap::Parser>::parse_from(stage_args("kd-movq", &dir, &[]));
    TestServer::spawn(|l, s| kd_movq::run_with_listeners(config, l, s)).await
}

/// Decode calls a replica has counted.
async fn decode_count(replica: &TestServer) -> u64 {
    let labels = [("method", "DecodeLatents"), ("stage", "movq")];
    metric_at(replica.metrics, "kd_requests_total", &labels).await as u64
}

fn request() -> v1::DecodeLatentsRequest {
    let z = candle_core::Tensor::zeros(
        (1, 4, 4, 4),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    v1::DecodeLatentsRequest {
        latents: Some(kd_proto::to_wire(&z).unwrap()),
        ..Default::default()
    }
}

#[tokio::test]
async fn calls_spread_over_replicas_and_survive_one_going_away() {
    let (a, b) = (replica().await, replica().await);
    let urls = vec![a.url(), b.url()];
    let pool = Pool::new(&urls, "movq", Duration::from_millis(200), None)
        .await
        .unwrap();
    assert_eq!(pool.len(), 2);
    // One call as the gateway makes it (retried once on another replica when UNAVAILABLE).
    let call = |pool: Pool| async move {
        pool.call(|ch| async move { MovqClient::new(ch).decode_latents(request()).await })
            .await
    };
    // Both replicas load their model; wait until each reports SERVING.
    for r in [&a, &b] {
        wait_serving(r, "kandinsky.v1.Movq", Duration::from_secs(60)).await;
    }
    for _ in 0..20 {
        call(pool.clone()).await.unwrap();
    }
    let (na, nb) = (decode_count(&a).await, decode_count(&b).await);
    assert!(
        na >= 5 && nb >= 5,
        "calls went to both replicas: {na} and {nb}"
    );

    // Replica A stops: every call still succeeds (at worst after one retry on B).
    a.trigger_shutdown();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        call(pool.clone())
            .await
            .unwrap_or_else(|e| panic!("call {i} after one replica stopped: {e:?}"));
    }
    assert!(
        decode_count(&b).await >= nb + 20,
        "the surviving replica served the calls"
    );
}
