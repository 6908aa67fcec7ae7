//! Times the 3×3 convolution on the Kandinsky 2.2 UNet's and MoVQ's shapes, Winograd against
//! im2col (`KD_CONV_NO_WINOGRAD`), to set the dispatch thresholds:
//! `cargo run --release -p kd-kernels --example conv_shapes`.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() {
    let dev = Device::Cpu;
    // (batch, cin, cout, side)
    let shapes = [
        (2, 384, 384, 64),
        (2, 768, 768, 32),
        (2, 1152, 1152, 16),
        (2, 1536, 1536, 8),
        (2, 1536, 1536, 4),
        (1, 128, 128, 512),
        (1, 256, 256, 256),
        (1, 512, 512, 128),
        (1, 512, 512, 64),
    ];
    let only: Option<usize> = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("a shape index"));
    let reps = if only.is_some() { 40 } else { 6 };
    for (i, &(b, cin, cout, s)) in shapes.iter().enumerate() {
        if only.is_some_and(|o| o != i) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (b, cin, s, s), &dev).unwrap();
        let k = Tensor::randn(0f32, 0.02, (cout, cin, 3, 3), &dev).unwrap();
        let bias = Tensor::zeros(cout, candle_core::DType::F32, &dev).unwrap();
        let mut best = [f64::MAX; 2];
        for rep in 0..reps {
            let path = if only.is_some() { 0 } else { rep % 2 };
            kd_kernels::force_path(Some(path == 0));
            let t = Instant::now();
            let y = kd_kernels::conv3x3(&x, &k, &bias, 1).unwrap();
            drop(y);
            best[path] = best[path].min(t.elapsed().as_secs_f64());
        }
        let gflop = 2.0 * 9.0 * (b * cin * cout * s * s) as f64 / 1e9;
        println!(
            "b{b} {cin}->{cout} {s}²: winograd {:.1} ms, im2col {:.1} ms ({:.2}×), im2col {:.0} GFLOP/s",
            best[0] * 1e3,
            best[1] * 1e3,
            best[1] / best[0],
            gflop / best[1]
        );
    }
}
