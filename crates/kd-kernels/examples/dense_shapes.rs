//! Times the dense layer on the transformer towers' shapes (CLIP text batch 2, prior batch 2,
//! CLIP vision 1 image): f32 weights through the `gemm` crate against weights packed at load
//! (f32 and f16): `cargo run --release -p kd-kernels --example dense_shapes`, each layer alone
//! (warm, best of 8), or `TOWER=rows,width,layers` for a tower's layers in sequence, every weight
//! used once per pass as in a forward (cold in cache; e.g. `154,1280,16` for the CLIP text
//! tower, `162,2048,8` for the prior, `257,1664,6` for CLIP vision).
use candle_core::{DType, Device, Tensor};
use kd_kernels::{Activation, PackedMatrix};
use std::time::Instant;

fn best(reps: usize, f: impl Fn() -> Tensor) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        drop(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() {
    kd_kernels::retain_freed_memory();
    if let Ok(w) = std::env::var("TOWER") {
        let v: Vec<usize> = w.split(',').map(|s| s.parse().unwrap()).collect();
        tower(v[0], v[1], v[2]);
        return;
    }
    let dev = Device::Cpu;
    // (rows, in, out)
    let shapes = [
        (154, 1280, 1280),
        (154, 1280, 5120),
        (154, 5120, 1280),
        (162, 2048, 2048),
        (162, 2048, 8192),
        (162, 8192, 2048),
        (257, 1664, 1664),
        (257, 1664, 8192),
        (257, 8192, 1664),
    ];
    for &(m, k, n) in &shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let wt = w32.t().unwrap().contiguous().unwrap();
        let b = Tensor::zeros(n, DType::F32, &dev).unwrap();
        let p16 = PackedMatrix::pack(&w).unwrap();
        let p32 = PackedMatrix::pack(&w32).unwrap();
        let id = Activation::Identity;
        let t0 = best(8, || kd_kernels::linear(&x, &wt, &b, id).unwrap());
        let t32 = best(8, || p32.linear(&x, &b, id).unwrap());
        let t16 = best(8, || p16.linear(&x, &b, id).unwrap());
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        println!(
            "{m}x{k}x{n}: gemm {:.0}, packed f32 {:.0}, packed f16 {:.0} GFLOP/s",
            gflop / t0,
            gflop / t32,
            gflop / t16
        );
    }
}

/// A tower's dense layers in sequence, every weight used once per pass (cold in cache, as in a
/// forward): `layers` × (4 of in×in, in→4in, 4in→in) on `rows` rows.
pub fn tower(rows: usize, width: usize, layers: usize) {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (rows, width), &dev).unwrap();
    let shapes = [
        (width, width),
        (width, width),
        (width, width),
        (width, width),
        (4 * width, width),
        (width, 4 * width),
    ];
    let mut plain = vec![];
    let mut p16 = vec![];
    let mut p32 = vec![];
    for _ in 0..layers {
        for &(n, k) in &shapes {
            let w = Tensor::randn(0f32, 0.02, (n, k), &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap();
            let w32 = w.to_dtype(DType::F32).unwrap();
            p16.push(PackedMatrix::pack(&w).unwrap());
            p32.push(PackedMatrix::pack(&w32).unwrap());
            plain.push((
                w32.t().unwrap().contiguous().unwrap(),
                Tensor::zeros(n, DType::F32, &dev).unwrap(),
            ));
        }
    }
    let xs: Vec<Tensor> = shapes
        .iter()
        .map(|&(_, k)| Tensor::randn(0f32, 1.0, (rows, k), &dev).unwrap())
        .collect();
    drop(x);
    let id = Activation::Identity;
    let mut t = [f64::MAX; 3];
    for rep in 0..12 {
        let v = rep % 3;
        let t0 = Instant::now();
        for (i, (wt, b)) in plain.iter().enumerate() {
            let x = &xs[i % shapes.len()];
            let y = match v {
                0 => kd_kernels::linear(x, wt, b, id).unwrap(),
                1 => p32[i].linear(x, b, id).unwrap(),
                _ => p16[i].linear(x, b, id).unwrap(),
            };
            drop(y);
        }
        let e = t0.elapsed().as_secs_f64();
        if rep >= 3 {
            t[v] = t[v].min(e);
        }
    }
    println!(
        "tower {rows} rows × {width} × {layers} layers: gemm {:.3} s, packed f32 {:.3} s, packed f16 {:.3} s",
        t[0], t[1], t[2]
    );
}
