//! One decoder UNet step (CFG batch 2) on the deep fixture UNet at a 64×64 latent, f32 and f16.
//!
//! `cargo bench -p kd-models --bench unet_step [-- ITERS]`. Prints ms/step (median of ITERS after
//! one warm-up). Threads: candle's CPU backend honours `RAYON_NUM_THREADS`. Compare with
//! `tools/reference/bench_unet.py` (diffusers, same weights, 2 torch threads).

use candle_core::{DType, Device, Tensor};
use kd_models::unet::{UNet2DConditionModel, UNetConditioning};
use kd_models::{CheckpointDir, Variant};
use kd_testkit::parity::fixtures_dir;
use std::time::Instant;

fn bench(dtype: DType, iters: usize) -> candle_core::Result<f64> {
    let dev = Device::Cpu;
    let dir = CheckpointDir::open(fixtures_dir().join("deep/kandinsky-2-2-decoder")).unwrap();
    let comp = dir.component("unet").unwrap();
    let cfg = comp.unet_config().unwrap();
    let vb = comp
        .weights(Variant::Default)
        .unwrap()
        .var_builder(dtype, &dev);
    let unet = UNet2DConditionModel::new(&cfg, vb).unwrap();
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 64, 64), &dev)?;
    let embeds = Tensor::randn(0f32, 1.0, (2, unet.embed_dim()), &dev)?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..=iters {
        let start = Instant::now();
        let out = unet
            .forward(&sample, 981.0, &UNetConditioning::image(&embeds))
            .unwrap();
        out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    // Per-block breakdown of one more call (time since the previous traced output).
    let mut last = Instant::now();
    let mut parts = Vec::new();
    unet.forward_traced(
        &sample,
        981.0,
        &UNetConditioning::image(&embeds),
        &mut |name, _| {
            parts.push(format!("{name} {:.0}", last.elapsed().as_secs_f64() * 1e3));
            last = Instant::now();
        },
    )
    .unwrap();
    println!("  breakdown (ms): {}", parts.join(", "));
    Ok(times[times.len() / 2])
}

fn main() -> candle_core::Result<()> {
    let iters = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(10);
    println!(
        "deep UNet, batch 2 (CFG), latent 64x64, threads {}",
        candle_core::utils::get_num_threads()
    );
    for dtype in [DType::F32, DType::F16] {
        let ms = bench(dtype, iters)?;
        println!("{dtype:?}: {ms:.1} ms/step (median of {iters})");
    }
    Ok(())
}
