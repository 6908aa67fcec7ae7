//! Kandinsky 2.0 against Kandinsky 2.2 through the services, side by side in one run: a 2.0
//! image at the gateway's BALANCED preset (50 DDIM steps, guidance 7) and at the official
//! default (QUALITY_BEST: 100 DDIM steps) against a 2.2 image (prior 25 + decoder 50 steps,
//! guidance 4) at the same size, each through its gateway and stages over loopback gRPC. The
//! fixtures: the tiny 2.0 folder (`tests/fixtures/kd20`: UNet, both text encoders, KL
//! autoencoder) and the 2.2 stack the other benches use (the tiny prior, the deep decoder).
//! They are small random-weight models of different widths, so the ratio measures the serving
//! path's step counts and overheads, not the real models' cost (`tools/reference/count_kd20.py`
//! gives the real configuration's parameters and FLOPs).
//!
//! `cargo bench -p kd-e2e --bench kd20_latency` (or `make bench-kd20`). Settings: `E2E_SIZES`
//! (pixels, default "256,512"), `E2E_RUNS` (default 3). The last line is machine-readable:
//! `kd20 ratio=<2.0 balanced / 2.2> ratio_best=<2.0 best / 2.2> …` at the first size.

use kd_e2e::{kd20_dir, PriorLessStack, Stack};
use kd_proto::v1;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn request(size: u32, seed: u64, quality: v1::Quality) -> v1::GenerateRequest {
    v1::GenerateRequest {
        prompt: "маяк в сумерках, масляная живопись".into(),
        width: Some(size),
        height: Some(size),
        seeds: vec![seed],
        quality: quality as i32,
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
    let kd20 = PriorLessStack::start_dir(&kd20_dir(), &[]).await;
    let mut c22 = kd22.client().await;
    let mut c20 = kd20.client().await;
    let labels = [
        "kandinsky-2-2 25+50",
        "kandinsky-2-0 50 (balanced)",
        "kandinsky-2-0 100 (best)",
    ];
    let mut line = String::from("kd20");
    for (i, size) in sizes.into_iter().enumerate() {
        let mut times = vec![Vec::new(); labels.len()];
        for round in 0..=runs {
            // Interleaved, so every case sees the same machine load; round 0 warms up.
            let seed = 100 + round as u64;
            for (k, times) in times.iter_mut().enumerate() {
                let t = Instant::now();
                match k {
                    0 => {
                        c22.generate(request(size, seed, v1::Quality::Balanced))
                            .await
                    }
                    1 => {
                        c20.generate(request(size, seed, v1::Quality::Balanced))
                            .await
                    }
                    _ => c20.generate(request(size, seed, v1::Quality::Best)).await,
                }
                .unwrap();
                if round > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
        }
        let med: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        println!("{size}x{size}, {runs} runs, median seconds through the services:");
        for (label, m) in labels.iter().zip(&med) {
            println!(
                "  {label:<28} {m:8.3} s   this/kandinsky-2-2 {:6.2}x",
                m / med[0]
            );
        }
        if i == 0 {
            line.push_str(&format!(
                " ratio={:.3} ratio_best={:.3}",
                med[1] / med[0],
                med[2] / med[0]
            ));
        }
        line.push_str(&format!(
            " kd22_{size}_s={:.3} kd20_{size}_s={:.3} kd20_best_{size}_s={:.3}",
            med[0], med[1], med[2]
        ));
    }
    println!("{line}");
}
