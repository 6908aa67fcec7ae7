//! The kit against a real kd-runtime server on loopback: spawn, health, Watch, `/metrics`,
//! shutdown and the load gate.

use kd_proto::v1;
use kd_runtime::config::CommonArgs;
use kd_runtime::{Launch, LaunchError, Listeners, ServiceError, Shutdown, Stage, StageModel};
use kd_testkit::{
    assert_health_lifecycle, health_status, metric, metric_at, scrape, unwire, wait_serving, wire,
    TestServer,
};
use std::time::Duration;
use tonic_health::pb::health_check_response::ServingStatus;

/// A stage serving only `kandinsky.v1.StageInfo` (so its health name is that service's).
const SERVICE: &str = "kandinsky.v1.StageInfo";

struct Model(v1::ModelInfo);

impl StageModel for Model {
    fn info(&self) -> &v1::ModelInfo {
        &self.0
    }
}

#[derive(clap::Parser)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

/// A stage on the one launcher that turns SERVING once its load gate opens.
async fn run(listeners: Listeners, shutdown: Shutdown) -> Result<(), LaunchError> {
    let stage = Stage::new("test", 1, 0);
    stage
        .metrics
        .failure("Run", &ServiceError::Cancelled("gone".into()));
    stage
        .metrics
        .failure("Run", &ServiceError::Cancelled("gone".into()));
    stage.metrics.steps(3);
    let args = <Args as clap::Parser>::parse_from(["test"]);
    Launch::stage(stage, &args.common)
        .run(listeners, shutdown, async {
            Ok(Model(v1::ModelInfo::default()))
        })
        .await
}

#[tokio::test]
async fn a_spawned_server_serves_health_and_metrics_then_stops() {
    let server = TestServer::spawn(run).await;
    assert_eq!(server.url(), format!("http://{}", server.grpc));
    wait_serving(&server, SERVICE, Duration::from_secs(10)).await;
    assert_eq!(health_status(server.grpc, "").await, ServingStatus::Serving);

    let text = scrape(server.metrics).await;
    let cancelled = [("reason", "cancelled"), ("stage", "test")];
    assert_eq!(
        metric(&text, "kd_failures_total", &cancelled),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "kd_denoise_steps_total", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(metric(&text, "kd_failures_total", &[("reason", "x")]), None);
    assert_eq!(
        metric_at(server.metrics, "kd_no_such_metric", &[]).await,
        0.0
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_gated_server_goes_through_the_health_lifecycle() {
    let server = TestServer::spawn_gated(run).await;
    assert_health_lifecycle(server, SERVICE, |_| async {}).await;
}

#[tokio::test]
async fn a_failing_server_reports_its_error() {
    let mut server = TestServer::spawn(|_, _| async { Err::<(), _>("no model here") }).await;
    assert_eq!(server.join().await, Err("no model here".to_string()));
}

#[test]
fn wire_and_unwire_round_trip() {
    let t = candle_core::Tensor::arange(0f32, 6.0, &candle_core::Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let back = unwire(&wire(&t));
    assert_eq!(back.dims(), &[2, 3]);
    assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
}
