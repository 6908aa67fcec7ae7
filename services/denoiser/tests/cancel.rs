//! The loop stops within one step when the client goes away or the deadline passes, observed
//! on `/metrics` (kd_denoise_steps_total, kd_failures_total) scraped over HTTP.

mod common;

use common::*;
use kd_proto::v1;
use kd_testkit::{metric, metric_at, scrape};
use std::time::{Duration, Instant};

/// A long request on the tiny checkpoint (64×64 pixels, 32×32 latents): many steps.
fn slow_request(steps: u32) -> v1::DenoiseRequest {
    request(1, steps, vec![9])
}

async fn steps_now(server: &kd_testkit::TestServer) -> f64 {
    metric_at(server.metrics, "kd_denoise_steps_total", &[]).await
}

/// Waits until the step counter has not moved for `quiet` and returns it.
async fn settle(server: &kd_testkit::TestServer, quiet: Duration) -> f64 {
    let mut last = steps_now(server).await;
    loop {
        tokio::time::sleep(quiet).await;
        let now = steps_now(server).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test]
async fn client_that_drops_the_stream_stops_the_loop_within_one_step() {
    let server = start(&tiny()).await;
    let mut c = client(&server).await;
    let n = 300;
    let t0 = Instant::now();
    let mut stream = c.denoise(slow_request(n)).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let step_time = t0.elapsed();
    assert!(matches!(
        first.event,
        Some(v1::denoise_event::Event::Progress(v1::DenoiseProgress {
            step: 1,
            ..
        }))
    ));
    let at_drop = steps_now(&server).await;
    drop(stream);
    drop(c);
    // Quiet for 3 step times: the loop has stopped.
    let stopped = settle(&server, step_time * 3 + Duration::from_millis(100)).await;
    let text = scrape(server.metrics).await;
    let cancelled = metric(
        &text,
        "kd_failures_total",
        &[("method", "Denoise"), ("reason", "cancelled")],
    )
    .unwrap_or(0.0);
    eprintln!(
        "client drop: first step {step_time:?}, steps at drop {at_drop}, after stop {stopped} of {n}, cancelled failures {cancelled}"
    );
    assert!(stopped <= at_drop + 2.0, "loop ran on: {stopped} steps");
    assert!(stopped < n as f64 / 4.0);
    assert_eq!(cancelled, 1.0, "{text}");
    assert_eq!(
        metric(&text, "kd_in_flight", &[]).unwrap_or(0.0),
        0.0,
        "{text}"
    );
}

#[tokio::test]
async fn deadline_shorter_than_the_work_is_deadline_exceeded_and_stops_the_loop() {
    let server = start(&tiny()).await;
    let mut c = client(&server).await;
    // Time one step first.
    let t0 = Instant::now();
    collect(&mut c, slow_request(1)).await.unwrap();
    let step_time = t0.elapsed();
    let n = 300;
    let budget = step_time * 4;
    let t1 = Instant::now();
    let err = with_deadline(&mut c, slow_request(n), budget).await;
    let took = t1.elapsed();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    let at_status = steps_now(&server).await - 1.0;
    let stopped = settle(&server, step_time * 3 + Duration::from_millis(100)).await - 1.0;
    let text = scrape(server.metrics).await;
    let exceeded = metric(
        &text,
        "kd_failures_total",
        &[("method", "Denoise"), ("reason", "deadline_exceeded")],
    )
    .unwrap_or(0.0);
    eprintln!(
        "deadline {budget:?} (step {step_time:?}): status after {took:?} ({}), steps at status {at_status}, after stop {stopped} of {n}, deadline failures {exceeded}",
        err.message()
    );
    // No step starts after the status (at most the one in flight finishes), and the loop
    // stopped far from its 300 steps.
    assert!(
        stopped <= at_status + 1.0,
        "loop ran on: {at_status} → {stopped}"
    );
    assert!(stopped < n as f64 / 4.0, "{stopped} steps");
    assert_eq!(exceeded, 1.0, "{text}");
}
