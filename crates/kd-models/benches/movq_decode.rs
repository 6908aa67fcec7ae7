//! MoVQ decode time and peak RSS on the deep (4-level, scale 8) fixture config for 64×64 and
//! 128×128 latents (512×512 and 1024×1024 images), chunked and unchunked attention.
//!
//! `cargo bench -p kd-models --bench movq_decode` (release), or faster to build:
//! `cargo test -p kd-models --bench movq_decode` (dev profile; candle/gemm are optimised there).
//! Each case runs in its own child process so that its peak RSS (VmHWM) is its own.
//! Extra arguments: `--cases 64:1024,128:1024,128:0` (latent side:attention chunk, 0 = unchunked)
//! and `--reps N`.

use candle_core::{DType, Device, Tensor};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::CheckpointDir;
use kd_testkit::parity::fixtures_dir;
use std::time::Instant;

fn status_kib(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// User + system CPU seconds of this process (less sensitive than wall time to a shared machine).
fn cpu_seconds() -> f64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = s
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

fn child(side: usize, chunk: usize, reps: usize) {
    let ckpt = CheckpointDir::open(fixtures_dir().join("deep/kandinsky-2-2-decoder")).unwrap();
    let movq = VqModel::load(
        &ckpt.component("movq").unwrap(),
        MovqOptions {
            attention_chunk: chunk,
            ..Default::default()
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    // Deterministic smooth latents (no RNG needed for timing).
    let n = 4 * side * side;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f32) * 0.013).sin() + 0.3 * ((i % side) as f32 * 0.2).cos())
        .collect();
    let z = Tensor::from_vec(v, (1, 4, side, side), &Device::Cpu).unwrap();
    let base = status_kib("VmRSS:");
    let mut times = Vec::new();
    let cpu0 = cpu_seconds();
    for _ in 0..reps {
        let t = Instant::now();
        let img = movq.decode(&z).unwrap();
        let _ = img.sum_all().unwrap().to_scalar::<f32>().unwrap();
        times.push(t.elapsed().as_secs_f64());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let cpu = (cpu_seconds() - cpu0) / reps as f64;
    let peak = status_kib("VmHWM:");
    println!(
        "RESULT latent={side}x{side} image={}x{} chunk={chunk} reps={reps} best_s={best:.3} mean_s={mean:.3} cpu_s_per_decode={cpu:.2} rss_before_decode_mib={:.0} peak_rss_mib={:.0}",
        side * 8,
        side * 8,
        base as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let reps: usize = get("--reps").and_then(|r| r.parse().ok()).unwrap_or(2);
    if let Some(c) = get("--child") {
        let (side, chunk) = c.split_once(':').unwrap();
        child(side.parse().unwrap(), chunk.parse().unwrap(), reps);
        return;
    }
    let cases = get("--cases").unwrap_or_else(|| "64:1024,128:1024,64:0,128:0".into());
    let exe = std::env::current_exe().unwrap();
    println!(
        "MoVQ decode, deep fixture config, f32, CPU, RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into())
    );
    for case in cases.split(',') {
        let out = std::process::Command::new(&exe)
            .args(["--child", case, "--reps", &reps.to_string()])
            .output()
            .expect("spawn child");
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find(|l| l.starts_with("RESULT")) {
            Some(l) => println!("{l}"),
            None => println!(
                "case {case} failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
}
