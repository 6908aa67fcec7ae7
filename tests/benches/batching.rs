//! Step-level batching in the denoiser, on against off, side by side in one run: N concurrent
//! clients each send R Denoise requests (one image, CFG, S DDPM steps) at SIZE² on the bundled
//! deep decoder, to a denoiser with `--max-batch-rows 16` and to one running each request's own
//! loop (`--max-batch-rows 0`, one loop at a time as deployed). Prints throughput (requests/s),
//! p50/p95 latency and the mean rows per UNet call of each; the last line is machine-readable.
//!
//! `cargo bench -p kd-e2e --bench batching` (or `make bench-batching`). Settings:
//! `BATCH_CLIENTS` (default "8,16"), `BATCH_REQUESTS` (per client, default 2), `BATCH_STEPS`
//! (default 10), `BATCH_SIZE` (pixels, default 256), `BATCH_ROWS` (UNet rows per call with
//! batching on, default 16), `BATCH_MODEL_DIR` (another decoder folder, e.g. the full-size
//! random-weight one `make bench-cpu` makes; the default is the bundled deep fixture).

use kd_e2e::decoder_dir;
use kd_proto::v1::{self, denoiser_client::DenoiserClient};
use kd_testkit::{connect, metric_at, stage_args, wait_serving, wire, TestServer};
use std::time::{Duration, Instant};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn embeds(seed: u64, dim: usize) -> v1::Tensor {
    let v: Vec<f32> = (0..dim)
        .map(|i| ((i as f32 + seed as f32 * 7.0) * 0.37).sin())
        .collect();
    wire(&candle_core::Tensor::from_vec(v, (1, dim), &candle_core::Device::Cpu).unwrap())
}

/// The decoder folder, and its UNet's image-embedding width.
fn model() -> (std::path::PathBuf, usize) {
    let dir = std::env::var_os("BATCH_MODEL_DIR").map_or_else(decoder_dir, Into::into);
    let config = std::fs::read_to_string(dir.join("unet/config.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let config: serde_json::Value = serde_json::from_str(&config).expect("unet/config.json");
    let dim = config["encoder_hid_dim"]
        .as_u64()
        .expect("unet/config.json: encoder_hid_dim") as usize;
    (dir, dim)
}

fn request(seed: u64, size: u32, steps: u32, dim: usize) -> v1::DenoiseRequest {
    let cond = |t| v1::DecoderConditioning {
        image_embeds: Some(t),
        ..Default::default()
    };
    v1::DenoiseRequest {
        conditioning: Some(cond(embeds(seed, dim))),
        negative_conditioning: Some(cond(embeds(1000 + seed, dim))),
        height: size,
        width: size,
        num_inference_steps: steps,
        guidance_scale: 4.0,
        scheduler: v1::Scheduler::Ddpm as i32,
        seeds: vec![seed],
        ..Default::default()
    }
}

async fn denoiser(dir: &std::path::Path, batch_rows: usize) -> TestServer {
    let rows = batch_rows.to_string();
    let extra = [
        "--max-batch-rows",
        &rows,
        "--batch-wait-ms",
        "5",
        "--admission-safety",
        "0",
    ];
    let config =
        <kd_denoiser::Config as clap::Parser>::parse_from(stage_args("kd-denoiser", dir, &extra));
    let server = TestServer::spawn(|l, s| kd_denoiser::run_with_listeners(config, l, s)).await;
    wait_serving(&server, "kandinsky.v1.Denoiser", Duration::from_secs(120)).await;
    server
}

struct Run {
    throughput: f64,
    p50: f64,
    p95: f64,
    rows_per_call: f64,
}

async fn run(
    server: &TestServer,
    clients: usize,
    per_client: usize,
    (size, steps, dim): (u32, u32, usize),
) -> Run {
    let (sum0, count0) = (
        metric_at(server.metrics, "kd_batch_size_sum", &[]).await,
        metric_at(server.metrics, "kd_batch_size_count", &[]).await,
    );
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let addr = server.grpc;
            tokio::spawn(async move {
                let mut client =
                    DenoiserClient::new(connect(addr).await).max_decoding_message_size(64 << 20);
                let mut latencies = Vec::new();
                for r in 0..per_client {
                    let t = Instant::now();
                    let req = request((c * 100 + r) as u64, size, steps, dim);
                    let mut stream = client.denoise(req).await.unwrap().into_inner();
                    while stream.message().await.unwrap().is_some() {}
                    latencies.push(t.elapsed().as_secs_f64());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let wall = t0.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let (sum, count) = (
        metric_at(server.metrics, "kd_batch_size_sum", &[]).await - sum0,
        metric_at(server.metrics, "kd_batch_size_count", &[]).await - count0,
    );
    Run {
        throughput: latencies.len() as f64 / wall,
        p50: q(0.5),
        p95: q(0.95),
        rows_per_call: if count > 0.0 { sum / count } else { 2.0 },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let clients: Vec<usize> = std::env::var("BATCH_CLIENTS")
        .unwrap_or_else(|_| "8,16".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let per_client = env("BATCH_REQUESTS", 2);
    let steps = env("BATCH_STEPS", 10) as u32;
    let size = env("BATCH_SIZE", 256) as u32;
    let rows = env("BATCH_ROWS", 16);
    let (dir, dim) = model();
    let on = denoiser(&dir, rows).await;
    let off = denoiser(&dir, 0).await;
    println!(
        "denoiser, {}, {size}², {steps} DDPM steps, CFG, {per_client} requests per client, \
         batching on = --max-batch-rows {rows}",
        dir.display()
    );
    println!("| clients | batching | requests/s | p50 s | p95 s | rows per UNet call |");
    println!("|---|---|---|---|---|---|");
    let mut last = Vec::new();
    for &n in &clients {
        // Off first, then on: each measured on a warm server.
        let b = run(&off, n, per_client, (size, steps, dim)).await;
        let a = run(&on, n, per_client, (size, steps, dim)).await;
        for (name, r) in [("off", &b), ("on", &a)] {
            println!(
                "| {n} | {name} | {:.2} | {:.2} | {:.2} | {:.1} |",
                r.throughput, r.p50, r.p95, r.rows_per_call
            );
        }
        last.push(format!(
            "batching{n} ratio={:.2} p95_ratio={:.2}",
            a.throughput / b.throughput,
            a.p95 / b.p95
        ));
    }
    println!("{}", last.join(" "));
}
