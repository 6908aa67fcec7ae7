//! aMUSEd against Kandinsky 2.2 through the services, side by side in one run: an aMUSEd image
//! (its default 12 token steps, guidance 10) against a Kandinsky 2.2 image (prior 25 + decoder
//! 50 steps, guidance 4) at the same size, on the bundled fixtures: the tiny and the deep aMUSEd
//! folders, the tiny prior and the deep 2.2 decoder. The fixtures are small random-weight
//! models of different widths, so the ratio measures the serving path's step counts and
//! overheads, not the real models' cost (see the closing note for the real configurations'
//! parameters and FLOPs).
//!
//! `cargo bench -p kd-e2e --bench amused_latency` (or `make bench-amused`). Settings:
//! `E2E_SIZES` (pixels, default "256,512"), `E2E_RUNS` (default 3). The last line is
//! machine-readable.

use kd_e2e::{PriorLessStack, Stack};
use kd_proto::v1;
use kd_testkit::fixtures_dir;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(model: &str, size: u32, seed: u64) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model: model.into(),
        prompt: "a lighthouse at dusk, oil painting".into(),
        width: Some(size),
        height: Some(size),
        seeds: vec![seed],
        ..Default::default()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let runs = env("E2E_RUNS", 3);
    let sizes: Vec<u32> = std::env::var("E2E_SIZES")
        .unwrap_or_else(|_| "256,512".into())
        .split(',')
        .map(|s| s.trim().parse().expect("E2E_SIZES: pixel sides"))
        .collect();
    let kd22 = Stack::start(&[]).await;
    let tiny = PriorLessStack::start_dir(&fixtures_dir().join("tiny/amused-256"), &[]).await;
    let deep = PriorLessStack::start_dir(&fixtures_dir().join("deep/amused-512"), &[]).await;
    let mut clients = [
        kd22.client().await,
        tiny.client().await,
        deep.client().await,
    ];
    let labels = ["kandinsky-2-2 25+50", "amused tiny 12", "amused deep 12"];
    let mut line = String::from("amused_latency");
    for size in sizes {
        let mut times = vec![Vec::new(); clients.len()];
        for round in 0..=runs {
            // Interleaved, so every case sees the same machine load; round 0 warms up.
            for (k, c) in clients.iter_mut().enumerate() {
                let t = Instant::now();
                c.generate(request("", size, 100 + round as u64))
                    .await
                    .unwrap();
                if round > 0 {
                    times[k].push(t.elapsed().as_secs_f64());
                }
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        println!("{size}x{size}, {runs} runs, median seconds through the services:");
        for (label, m) in labels.iter().zip(&med) {
            println!(
                "  {label:<22} {m:8.3} s   kandinsky-2-2/this {:6.2}x",
                med[0] / m
            );
        }
        line.push_str(&format!(
            " ratio_tiny_{size}={:.3} ratio_deep_{size}={:.3} kd22_{size}_s={:.3} tiny_{size}_s={:.3} deep_{size}_s={:.3}",
            med[1] / med[0],
            med[2] / med[0],
            med[0],
            med[1],
            med[2]
        ));
    }
    println!("{line}");
}
