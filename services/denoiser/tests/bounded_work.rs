//! Work is bounded by the deadline: a request whose single UNet step is long (a large image)
//! and whose deadline is short frees the denoiser within one UNet layer, not at the end of the
//! step; the process's CPU goes quiet and the next request runs at once.

mod common;

use common::*;
use kd_proto::v1;
use kd_testkit::cpu::until_cpu_quiet;
use kd_testkit::{fixtures_dir, metric_at};
use std::time::{Duration, Instant};

/// The deep decoder fixture (4 UNet levels, MoVQ scale factor 8, embed dim 32).
fn deep() -> std::path::PathBuf {
    fixtures_dir().join("deep/kandinsky-2-2-decoder")
}

fn large(side: u32) -> v1::DenoiseRequest {
    v1::DenoiseRequest {
        height: side,
        width: side,
        ..request(1, 1, vec![5])
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_large_step_frees_the_stage_within_one_layer() {
    // Admitted whatever the estimate (--admission-safety 0): one CFG step at 2048² takes tens of seconds
    // on 2 cores here, the deadline is 400 ms.
    let flags = ["--max-pixels", "4194304", "--admission-safety", "0"];
    let server = start_with(&deep(), &flags).await;
    kd_testkit::wait_serving(&server, SERVICE, Duration::from_secs(30)).await;
    let t = Instant::now();
    let budget = Duration::from_millis(400);
    let status = with_deadline(&mut client(&server).await, large(2048), budget).await;
    let at_status = t.elapsed();
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        status.message().contains("the request deadline passed"),
        "{}",
        status.message()
    );
    let quiet = until_cpu_quiet(Duration::from_secs(5)).await;
    let steps = metric_at(server.metrics, "kd_denoise_steps_total", &[]).await;
    eprintln!("2048², deadline {budget:?}: status after {at_status:?}, CPU quiet {quiet:?} later, steps done {steps}");
    assert_eq!(
        steps, 0.0,
        "the step ran to its end instead of stopping inside it"
    );
    // The stage is free and the next request runs normally.
    let mut c = client(&server).await;
    let mut small = large(64);
    small.num_inference_steps = 2;
    collect(&mut c, small).await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_request_over_max_pixels_is_refused_by_name_before_any_work() {
    // The CPU default is 1024².
    let server = start(&deep()).await;
    let err = collect(&mut client(&server).await, large(1536))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let m = err.message();
    assert!(
        m.contains("height") && m.contains("≤ 1048576") && m.contains("--max-pixels"),
        "{m}"
    );
    server.shutdown().await.unwrap();

    let server = start_with(&deep(), &["--max-pixels", "65536"]).await;
    kd_testkit::wait_serving(&server, SERVICE, Duration::from_secs(30)).await;
    let mut c = client(&server).await;
    collect(&mut c, large(256)).await.unwrap();
    let mut wide = large(256);
    wide.width = 320;
    let err = collect(&mut c, wide).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("256×320 pixels"),
        "{}",
        err.message()
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_that_cannot_finish_before_the_deadline_is_refused_at_once() {
    let server = start(&deep()).await;
    let mut c = client(&server).await;
    // 1024² with 1000 steps: most of an hour on this CPU (one step alone takes seconds). So
    // many steps are refused even when a loaded machine's calibration sees only the fixed cost
    // of a step (at 64² and 128² the fixture's steps are overhead-bound, and timing noise can
    // hide their per-pixel cost).
    let mut hopeless = large(1024);
    hopeless.num_inference_steps = 1000;
    let t = Instant::now();
    let err = with_deadline(&mut c, hopeless, Duration::from_secs(3)).await;
    let took = t.elapsed();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    let m = err.message();
    eprintln!("refused after {took:?}: {m}");
    assert!(
        m.starts_with("deadline exceeded: the request deadline would pass") && m.contains("s left"),
        "{m}"
    );
    assert!(took < Duration::from_secs(1), "refused only after {took:?}");
    assert_eq!(
        metric_at(server.metrics, "kd_denoise_steps_total", &[]).await,
        0.0,
        "no step of the refused request ran"
    );
    // Work that fits its deadline runs.
    let mut small = large(64);
    small.num_inference_steps = 3;
    let mut req = tonic::Request::new(small);
    req.set_timeout(Duration::from_secs(20));
    let mut stream = c.denoise(req).await.unwrap().into_inner();
    while stream.message().await.unwrap().is_some() {}
    server.shutdown().await.unwrap();
}
