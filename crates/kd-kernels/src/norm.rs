//! [`group_norm`]: GroupNorm (optionally followed by SiLU) of a contiguous f32 CPU tensor in two
//! reads and one write per element. candle's `GroupNorm` runs about eight whole-tensor passes
//! (sum, subtract, square, sum, divide, multiply, add, each into a fresh tensor) and its
//! reductions run on one thread; here each (image, group) is one parallel task: the mean, then
//! the variance of the deviations (both accumulated in f64, the same two-pass definition as
//! PyTorch's), then `y = (x − mean)·a_c + β_c` with `a_c = γ_c / √(var + ε)`, and SiLU in the
//! same write when asked.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// True when [`group_norm`] computes this input: CPU, f32, rank ≥ 3.
pub fn group_norm_supported(x: &Tensor, weight: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.rank() >= 3
}

/// `GroupNorm(groups, eps)(x)·γ + β`, then SiLU when `silu`: x `(B, C, …)`, γ and β `(C,)`.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.contiguous()?;
    x.apply_op3_no_bwd(&weight, &bias, &GroupNormOp { groups, eps, silu })
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "kd-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(bt)) = (s1, s2, s3) else {
            candle_core::bail!("kd-group-norm: f32 input, weight and bias only")
        };
        if !(l1.is_contiguous() && l2.is_contiguous() && l3.is_contiguous()) {
            candle_core::bail!("kd-group-norm: contiguous operands only")
        }
        let dims = l1.shape().dims();
        if dims.len() < 3 {
            candle_core::bail!("kd-group-norm: input rank {} (want ≥ 3)", dims.len())
        }
        let (b, c) = (dims[0], dims[1]);
        let groups = self.groups;
        if groups == 0 || c % groups != 0 || l2.shape().dims() != [c] || l3.shape().dims() != [c] {
            candle_core::bail!(
                "kd-group-norm: {c} channels, {groups} groups, weight {:?}, bias {:?}",
                l2.shape(),
                l3.shape()
            )
        }
        let spatial: usize = dims[2..].iter().product();
        let x = &x[l1.start_offset()..l1.start_offset() + b * c * spatial];
        let g = &g[l2.start_offset()..l2.start_offset() + c];
        let bt = &bt[l3.start_offset()..l3.start_offset() + c];
        let per_group = c / groups;
        let len = per_group * spatial;
        let mut out = vec![0f32; b * c * spatial];
        if len == 0 {
            return Ok((CpuStorage::F32(out), l1.shape().clone()));
        }
        out.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(task, (o, xs))| {
                let c0 = (task % groups) * per_group;
                let n = len as f64;
                let mean = sum(xs.iter().map(|&v| v as f64)) / n;
                let var = sum(xs.iter().map(|&v| {
                    let d = v as f64 - mean;
                    d * d
                })) / n;
                let rstd = 1.0 / (var + self.eps).sqrt();
                let m = mean as f32;
                for (k, (oc, xc)) in o.chunks_mut(spatial).zip(xs.chunks(spatial)).enumerate() {
                    let a = (g[c0 + k] as f64 * rstd) as f32;
                    let s = bt[c0 + k];
                    if self.silu {
                        for (y, &v) in oc.iter_mut().zip(xc) {
                            let t = (v - m) * a + s;
                            *y = t / (1.0 + (-t).exp());
                        }
                    } else {
                        for (y, &v) in oc.iter_mut().zip(xc) {
                            *y = (v - m) * a + s;
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A sum in eight interleaved f64 lanes (vectorises; the lanes also keep the rounding error of a
/// long sum small).
fn sum(it: impl Iterator<Item = f64>) -> f64 {
    let mut acc = [0f64; 8];
    for (i, v) in it.enumerate() {
        acc[i % 8] += v;
    }
    acc.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = b.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() / n.to_scalar::<f32>().unwrap()).sqrt()
    }

    /// Against candle's GroupNorm (and SiLU) on odd shapes: one group, one channel per group,
    /// rank 3 and 4, batch > 1, an offset mean (the two-pass variance matters there), a
    /// non-contiguous input.
    #[test]
    fn equals_candles_group_norm() {
        let dev = Device::Cpu;
        let cases: [(&[usize], usize); 5] = [
            (&[1, 4, 5, 3], 1),
            (&[2, 6, 7, 9], 3),
            (&[3, 8, 11], 8),
            (&[2, 64, 16, 16], 32),
            (&[1, 32, 1, 1], 32),
        ];
        for (shape, groups) in cases {
            let c = shape[1];
            let x = (Tensor::randn(0f32, 2.0, shape, &dev).unwrap() + 5.0).unwrap();
            let gamma = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let beta = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            let reference =
                candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-5).unwrap();
            let want = candle_core::Module::forward(&reference, &x).unwrap();
            let got = group_norm(&x, &gamma, &beta, groups, 1e-5, false).unwrap();
            let e = rel(&got, &want);
            assert!(e <= 1e-5, "{shape:?} / {groups}: rel L2 {e:e}");
            let want = candle_nn::ops::silu(&want).unwrap();
            let got = group_norm(&x, &gamma, &beta, groups, 1e-5, true).unwrap();
            let e = rel(&got, &want);
            assert!(e <= 1e-5, "{shape:?} / {groups} + SiLU: rel L2 {e:e}");
        }
        let x = Tensor::randn(0f32, 1.0, (2, 8, 6, 5), &dev).unwrap();
        let xt = x.transpose(2, 3).unwrap();
        let (gamma, beta) = (
            Tensor::ones(8, DType::F32, &dev).unwrap(),
            Tensor::zeros(8, DType::F32, &dev).unwrap(),
        );
        let reference = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), 8, 4, 1e-6).unwrap();
        let want = candle_core::Module::forward(&reference, &xt.contiguous().unwrap()).unwrap();
        let got = group_norm(&xt, &gamma, &beta, 4, 1e-6, false).unwrap();
        assert!(rel(&got, &want) <= 1e-5);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 6, 2, 2), DType::F32, &dev).unwrap();
        let g = Tensor::ones(6, DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &g, &g, 4, 1e-5, false).is_err());
        assert!(group_norm(&x, &g, &g, 0, 1e-5, false).is_err());
        let g5 = Tensor::ones(5, DType::F32, &dev).unwrap();
        assert!(group_norm(&x, &g5, &g5, 1, 1e-5, false).is_err());
        assert!(group_norm_supported(&x, &g));
        assert!(!group_norm_supported(&x.to_dtype(DType::F16).unwrap(), &g));
    }
}
