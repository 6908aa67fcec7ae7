//! [`group_norm`]: GroupNorm (optionally followed by SiLU) of a contiguous f32 CPU tensor in one
//! read for the statistics and one read and write for the output. candle's `GroupNorm` runs
//! about eight whole-tensor passes (sum, subtract, square, sum, divide, multiply, add, each into
//! a fresh tensor) and its reductions run on one thread; here each (image, group) is one parallel
//! task: the mean and variance (f64 sums, see `stats`), then `y = (x − mean)·a_c + β_c` with
//! `a_c = γ_c / √(var + ε)`, and SiLU in the same write when asked. [`spatial_norm`] adds the
//! MoVQ's per-pixel scale and shift to the same write.

use crate::{apply_contiguous, f32_operands, filled, silu};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

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
    apply_contiguous([x, weight, bias], &GroupNormOp { groups, eps, silu })
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
        let [x, g, bt] = f32_operands("kd-group-norm", [(s1, l1), (s2, l2), (s3, l3)])?;
        let dims = l1.shape().dims();
        if dims.len() < 3 {
            candle_core::bail!("kd-group-norm: input rank {} (want ≥ 3)", dims.len())
        }
        let c = dims[1];
        let groups = self.groups;
        if groups == 0
            || !c.is_multiple_of(groups)
            || l2.shape().dims() != [c]
            || l3.shape().dims() != [c]
        {
            candle_core::bail!(
                "kd-group-norm: {c} channels, {groups} groups, weight {:?}, bias {:?}",
                l2.shape(),
                l3.shape()
            )
        }
        let spatial: usize = dims[2..].iter().product();
        let write =
            |_img, ch: usize, m: f32, rstd: f64, oc: &mut [MaybeUninit<f32>], xc: &[f32]| {
                let a = (g[ch] as f64 * rstd) as f32;
                let s = bt[ch];
                if self.silu {
                    for (y, &v) in oc.iter_mut().zip(xc) {
                        y.write(silu((v - m) * a + s));
                    }
                } else {
                    for (y, &v) in oc.iter_mut().zip(xc) {
                        y.write((v - m) * a + s);
                    }
                }
            };
        // SAFETY: `write` writes every element of the channel it is given.
        let out = unsafe { per_group(x, groups, c / groups, spatial, self.eps, write) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A GroupNorm-shaped kernel's output: `x` is `(B, groups·per_group, plane)`; each (image,
/// group) is one parallel task that computes the group's mean and 1/√(var + ε) ([`stats`]), then
/// calls `channel(image, channel, mean, rstd, out, x)` for each of its channels' `plane`
/// elements. Empty input, empty output.
///
/// # Safety
/// `channel` must initialise every element of the `out` it is given.
unsafe fn per_group(
    x: &[f32],
    groups: usize,
    per_group: usize,
    plane: usize,
    eps: f64,
    channel: impl Fn(usize, usize, f32, f64, &mut [MaybeUninit<f32>], &[f32]) + Sync,
) -> Vec<f32> {
    let len = per_group * plane;
    if len == 0 {
        return Vec::new();
    }
    let write = |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(len)
            .zip(x.par_chunks(len))
            .enumerate()
            .for_each(|(task, (o, xs))| {
                let (img, c0) = (task / groups, (task % groups) * per_group);
                let (m, rstd) = stats(xs, eps);
                for (k, (oc, xc)) in o.chunks_mut(plane).zip(xs.chunks(plane)).enumerate() {
                    channel(img, c0 + k, m, rstd, oc, xc);
                }
            });
    };
    // SAFETY: the chunks of `len` (which divides x.len()) cover the output and `channel`, by the
    // caller's contract, writes every element of each channel.
    unsafe { filled(x.len(), write) }
}

/// The mean (rounded to f32, as it is subtracted in f32) and 1/√(var + ε) of one group, in one
/// read: sums of `x − K` and `(x − K)²` in f64 with the shift K = the group's first value (the
/// shifted-data variance; with f64 sums of f32 data it agrees with the two-pass form to rounding).
fn stats(xs: &[f32], eps: f64) -> (f32, f64) {
    let k = xs.first().copied().unwrap_or(0.0) as f64;
    let (mut s1, mut s2) = ([0f64; 8], [0f64; 8]);
    let chunks = xs.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            let d = c[l] as f64 - k;
            s1[l] += d;
            s2[l] += d * d;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        let d = v as f64 - k;
        s1[l] += d;
        s2[l] += d * d;
    }
    let n = xs.len() as f64;
    let m1 = s1.iter().sum::<f64>() / n;
    let var = (s2.iter().sum::<f64>() / n - m1 * m1).max(0.0);
    ((k + m1) as f32, 1.0 / (var + eps).sqrt())
}

/// True when [`spatial_norm`] computes this input: CPU f32 `(B, C, H, W)` features and a
/// `(B, C, h, w)` scale `y` (the shift has its shape) with H and W whole multiples of h and w.
pub fn spatial_norm_supported(x: &Tensor, y: &Tensor) -> bool {
    let (Ok((b, c, h, w)), Ok((yb, yc, zh, zw))) = (x.dims4(), y.dims4()) else {
        return false;
    };
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && y.dtype() == DType::F32
        && yb == b
        && yc == c
        && zh > 0
        && zw > 0
        && h % zh == 0
        && w % zw == 0
}

/// MoVQ's SpatialNorm, then SiLU when `silu`: `GroupNorm(groups, eps)(x)·γ + β`, times `y` and
/// plus `b` nearest-upsampled from `(h, w)` to `(H, W)`, in one pass. `gamma_beta` is `(2, C)`
/// (γ then β), `y_b` is `(B, 2·C, h, w)` (`y` in the first C channels, `b` in the next C).
pub fn spatial_norm(
    x: &Tensor,
    gamma_beta: &Tensor,
    y_b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    apply_contiguous([x, gamma_beta, y_b], &SpatialNormOp { groups, eps, silu })
}

struct SpatialNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for SpatialNormOp {
    fn name(&self) -> &'static str {
        "kd-spatial-norm"
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
        let [x, gb, yb] = f32_operands("kd-spatial-norm", [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, c, h, w) = l1.shape().dims4()?;
        let (yb_b, yb_c, zh, zw) = l3.shape().dims4()?;
        let groups = self.groups;
        if groups == 0
            || c % groups != 0
            || l2.shape().dims() != [2, c]
            || (yb_b, yb_c) != (b, 2 * c)
            || zh == 0
            || zw == 0
            || h % zh != 0
            || w % zw != 0
        {
            candle_core::bail!(
                "kd-spatial-norm: x {:?}, {groups} groups, γβ {:?}, y/b {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            )
        }
        let (sh, sw) = (h / zh, w / zw);
        let zplane = zh * zw;
        let write = |img, ch, m: f32, rstd: f64, oc: &mut [MaybeUninit<f32>], xc: &[f32]| {
            let a = (gb[ch] as f64 * rstd) as f32;
            let beta = gb[c + ch];
            let yp = &yb[(img * 2 * c + ch) * zplane..][..zplane];
            let bp = &yb[(img * 2 * c + c + ch) * zplane..][..zplane];
            for (row, (orow, xrow)) in oc.chunks_mut(w).zip(xc.chunks(w)).enumerate() {
                let zr = row / sh;
                let (yr, br) = (&yp[zr * zw..][..zw], &bp[zr * zw..][..zw]);
                for (zx, (ob, xb)) in orow.chunks_mut(sw).zip(xrow.chunks(sw)).enumerate() {
                    let (yv, bv) = (yr[zx], br[zx]);
                    for (o, &v) in ob.iter_mut().zip(xb) {
                        let t = ((v - m) * a + beta) * yv + bv;
                        o.write(if self.silu { silu(t) } else { t });
                    }
                }
            }
        };
        // SAFETY: `write`'s row × column loops write every element of the channel it is given
        // (w = sw·zw columns per row).
        let out = unsafe { per_group(x, groups, c / groups, h * w, self.eps, write) };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel;

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

    /// Against GroupNorm · nearest-upsampled y + b (candle's ops), with and without SiLU, at
    /// ratios 1, 2 and 3×4 and batch 2.
    #[test]
    fn spatial_norm_equals_its_definition() {
        let dev = Device::Cpu;
        for (b, c, groups, (h, w), (zh, zw)) in [
            (1, 8, 4, (6, 6), (6, 6)),
            (2, 64, 32, (16, 16), (8, 8)),
            (1, 32, 32, (12, 20), (4, 5)),
        ] {
            let x = (Tensor::randn(0f32, 2.0, (b, c, h, w), &dev).unwrap() + 3.0).unwrap();
            let gamma = Tensor::randn(1f32, 0.5, c, &dev).unwrap();
            let beta = Tensor::randn(0f32, 0.5, c, &dev).unwrap();
            let y = Tensor::randn(1f32, 0.5, (b, c, zh, zw), &dev).unwrap();
            let bb = Tensor::randn(0f32, 0.5, (b, c, zh, zw), &dev).unwrap();
            let gn =
                candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, 1e-6).unwrap();
            let want = candle_core::Module::forward(&gn, &x)
                .unwrap()
                .mul(&y.upsample_nearest2d(h, w).unwrap())
                .unwrap()
                .add(&bb.upsample_nearest2d(h, w).unwrap())
                .unwrap();
            let gb = Tensor::stack(&[&gamma, &beta], 0).unwrap();
            let yb = Tensor::cat(&[&y, &bb], 1).unwrap();
            assert!(spatial_norm_supported(&x, &y));
            let got = spatial_norm(&x, &gb, &yb, groups, 1e-6, false).unwrap();
            let e = rel(&got, &want);
            assert!(e <= 1e-5, "{b} {c} {h}×{w} from {zh}×{zw}: rel L2 {e:e}");
            let got = spatial_norm(&x, &gb, &yb, groups, 1e-6, true).unwrap();
            let e = rel(&got, &candle_nn::ops::silu(&want).unwrap());
            assert!(
                e <= 1e-5,
                "{b} {c} {h}×{w} from {zh}×{zw} + SiLU: rel L2 {e:e}"
            );
        }
        // A ratio that is not whole is refused (the caller upsamples instead).
        let x = Tensor::zeros((1, 4, 5, 5), DType::F32, &dev).unwrap();
        let yb = Tensor::zeros((1, 8, 2, 2), DType::F32, &dev).unwrap();
        assert!(!spatial_norm_supported(&x, &yb.narrow(1, 0, 4).unwrap()));
        let gb = Tensor::ones((2, 4), DType::F32, &dev).unwrap();
        assert!(spatial_norm(&x, &gb, &yb, 2, 1e-6, false).is_err());
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
