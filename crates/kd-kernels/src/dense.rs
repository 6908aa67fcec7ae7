//! The transformer towers' two hot paths on the CPU: a dense layer with its bias and activation
//! fused ([`linear`]) and multi-head attention read straight from the projections' layout
//! ([`attention`]).
//!
//! candle's `Linear` runs the GEMM, then the bias add and the activation each as a pass of its
//! own on one thread; its attention copies q, k and v into `(B, heads, L, D)`, runs one
//! multi-threaded GEMM per head (tiny ones: 77×77×64 for the CLIP text tower), adds the mask and
//! normalises in further passes, and copies the output back. Here the GEMM starts from the bias
//! and the activation runs in parallel over the output; attention runs one task per (image,
//! head), each with single-threaded GEMMs on strided views of the projections, its scores in a
//! scratch row block, and writes its head's columns of the `(B, L, heads·D)` output directly.

use crate::{apply_contiguous, f32_operands, filled, matmul, Shared, Strided};
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The activation applied to a dense layer's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// None: `x·Wᵀ + b`.
    Identity,
    /// Exact (erf) GELU, `x·(1 + erf(x/√2))/2`, with erf as a rational function ([`erf`]).
    Gelu,
    /// `x · σ(1.702 x)`.
    QuickGelu,
}

impl Activation {
    /// Applies the activation to every element of `values` (one loop per activation, so the
    /// compiler vectorises the GELU's polynomials).
    #[inline(always)]
    pub(crate) fn apply(self, values: &mut [f32]) {
        match self {
            Self::Identity => {}
            Self::Gelu => {
                for v in values {
                    *v *= 0.5 * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
                }
            }
            Self::QuickGelu => {
                for v in values {
                    *v /= 1.0 + (-1.702 * *v).exp();
                }
            }
        }
    }
}

/// The error function as the ratio of an odd degree-13 and an even degree-8 polynomial in x on
/// [−4, 4] (±1 beyond, where f32 rounds erf to ±1): no branches and no `exp`, so a loop of it
/// vectorises. Largest absolute error against the exact erf 4.5e-7 in f32 arithmetic (tested
/// below 5e-7; the ratio itself is within 6.5e-8 in exact arithmetic); libm's scalar
/// `erff` took a tenth of the transformer towers' time.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -1.609_603_3e-2,
        -2.954_6e-3,
        -7.349_906_3e-4,
        -5.692_506_4e-5,
        -2.101_024e-6,
        2.770_681_4e-8,
        -2.726_142_3e-10,
    ];
    const BETA: [f32; 5] = [
        -1.426_473_9e-2,
        -7.373_329e-3,
        -1.682_827e-3,
        -2.133_740_6e-4,
        -1.456_607_2e-5,
    ];
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = ALPHA[6];
    for &a in ALPHA[..6].iter().rev() {
        p = p * x2 + a;
    }
    let mut q = BETA[4];
    for &b in BETA[..4].iter().rev() {
        q = q * x2 + b;
    }
    x * p / q
}

/// Whether [`linear`] computes `x` through `weight` here (f32 on the CPU).
pub fn linear_supported(x: &Tensor, weight: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && x.rank() >= 1
        && weight.rank() == 2
}

/// `act(x·Wᵀ + b)` from the transposed weight: x `(…, K)`, `weight_t` `(K, N)` (a PyTorch
/// `Linear`'s `(N, K)` weight transposed, the layout the GEMM reads fastest), bias `(N,)`; the
/// output is `(…, N)`. Non-contiguous operands are copied first.
pub fn linear(x: &Tensor, weight_t: &Tensor, bias: &Tensor, act: Activation) -> Result<Tensor> {
    apply_contiguous([x, weight_t, bias], &Linear { act })
}

struct Linear {
    act: Activation,
}

/// Output elements per task of the parallel activation pass.
const ACT_CHUNK: usize = 1 << 14;

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "kd-linear"
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
        let [x, w, bias] = f32_operands("kd-linear", [(s1, l1), (s2, l2), (s3, l3)])?;
        let dims = l1.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        let (wk, n) = l2.shape().dims2()?;
        if wk != k || l3.shape().dims() != [n] || k == 0 {
            candle_core::bail!(
                "kd-linear: weight {:?} / bias {:?} do not fit input {:?}",
                l2.shape(),
                l3.shape(),
                l1.shape()
            )
        }
        let m = x.len() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank ≥ 1") = n;
        // The output starts as the bias rows; the GEMM accumulates into it.
        // SAFETY: the m rows of n elements cover the whole output.
        let mut out = unsafe {
            filled(m * n, |o| {
                for row in o.chunks_mut(n.max(1)) {
                    for (d, &b) in row.iter_mut().zip(bias) {
                        *d = MaybeUninit::new(b);
                    }
                }
            })
        };
        if m > 0 && n > 0 {
            let threads = candle_core::utils::get_num_threads().max(1);
            // SAFETY: dst is m×n row-major, x m×k row-major and Wᵀ k×n row-major, all within
            // their slices.
            unsafe {
                matmul(
                    (m, n, k),
                    out.as_mut_ptr(),
                    n,
                    true,
                    Strided::rows(x.as_ptr(), k),
                    Strided::rows(w.as_ptr(), n),
                    1.0,
                    gemm::Parallelism::Rayon(threads),
                );
            }
        }
        if self.act != Activation::Identity {
            let act = self.act;
            out.par_chunks_mut(ACT_CHUNK).for_each(|c| act.apply(c));
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

/// Whether [`attention`] computes these operands here (f32 on the CPU).
pub fn attention_supported(q: &Tensor) -> bool {
    matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32 && q.rank() == 3
}

/// Multi-head scaled dot-product attention on the projections' own layout: q, k, v
/// `(B, L, C)` with C = heads·D; `bias` an additive mask `(B or 1, heads or 1, L, L)`. The output
/// `(B, L, C)` is `softmax(scale·q_h·k_hᵀ + bias)·v_h` for each head h (columns h·D .. (h+1)·D),
/// the softmax in f32 over the last axis.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, l, c) = q.dims3()?;
    if k.dims() != [b, l, c] || v.dims() != [b, l, c] {
        candle_core::bail!(
            "kd-attention: q {:?}, k {:?} and v {:?} differ",
            q.shape(),
            k.shape(),
            v.shape()
        )
    }
    if heads == 0 || c % heads != 0 {
        candle_core::bail!("kd-attention: {c} channels do not split into {heads} heads")
    }
    let mask = match bias {
        Some(m) => {
            let (mb, mh, ml, ml2) = m.dims4()?;
            if !(mb == 1 || mb == b) || !(mh == 1 || mh == heads) || (ml, ml2) != (l, l) {
                candle_core::bail!(
                    "kd-attention: mask {:?} does not broadcast to ({b}, {heads}, {l}, {l})",
                    m.shape()
                )
            }
            Some((m.to_dtype(DType::F32)?.contiguous()?, mb, mh))
        }
        None => None,
    };
    let scale = scale as f32;
    apply_contiguous([q, k, v], &Attention { heads, scale, mask })
}

struct Attention {
    heads: usize,
    scale: f32,
    /// The mask with its batch and head extents (each 1 or the full size).
    mask: Option<(Tensor, usize, usize)>,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "kd-attention"
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
        let [q, k, v] = f32_operands("kd-attention", [(s1, l1), (s2, l2), (s3, l3)])?;
        let (b, l, c) = l1.shape().dims3()?;
        let h = self.heads;
        let d = c / h;
        let guard = self.mask.as_ref().map(|(m, mb, mh)| {
            let (storage, layout) = m.storage_and_layout();
            (storage, layout.start_offset(), *mb, *mh)
        });
        let mask: Option<(&[f32], usize, usize)> = match &guard {
            Some((storage, start, mb, mh)) => match &**storage {
                candle_core::Storage::Cpu(CpuStorage::F32(m)) => {
                    let m = m.get(*start..*start + mb * mh * l * l).ok_or_else(|| {
                        candle_core::Error::Msg("kd-attention: mask outside its storage".into())
                    })?;
                    Some((m, *mb, *mh))
                }
                _ => candle_core::bail!("kd-attention: the mask is not f32 on the CPU"),
            },
            None => None,
        };
        let n = b * l * c;
        let mut out: Vec<f32> = Vec::with_capacity(n);
        let dst = Shared(out.as_mut_ptr());
        let task = |t: usize, scores: &mut Vec<f32>| {
            let (bi, hi) = (t / h, t % h);
            // Head hi's columns of image bi's rows (row stride C) in q, k, v and the output.
            let base = bi * l * c + hi * d;
            // Overwritten whole by the first GEMM (it does not read its output).
            scores.resize(l * l, 0.0);
            // SAFETY: the q and k views are l×d with row stride C inside their slices; scores
            // is l×l row-major.
            unsafe {
                matmul(
                    (l, l, d),
                    scores.as_mut_ptr(),
                    l,
                    false,
                    Strided::rows(q.as_ptr().add(base), c),
                    Strided {
                        ptr: k.as_ptr().add(base),
                        rs: 1,
                        cs: c,
                    },
                    self.scale,
                    gemm::Parallelism::None,
                );
            }
            let mask = mask.map(|(m, mb, mh)| {
                let mi = (bi % mb) * mh + hi % mh;
                &m[mi * l * l..(mi + 1) * l * l]
            });
            for (i, row) in scores.chunks_mut(l).enumerate() {
                if let Some(m) = mask {
                    for (s, &a) in row.iter_mut().zip(&m[i * l..(i + 1) * l]) {
                        *s += a;
                    }
                }
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for s in row.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                for s in row.iter_mut() {
                    *s /= sum;
                }
            }
            // SAFETY: this task writes columns hi·d .. (hi+1)·d of image bi's l rows of the
            // output, which no other task writes; v's view is l×d with row stride C.
            unsafe {
                matmul(
                    (l, d, l),
                    dst.ptr().add(base),
                    c,
                    false,
                    Strided::rows(scores.as_ptr(), l),
                    Strided::rows(v.as_ptr().add(base), c),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        };
        (0..b * h)
            .into_par_iter()
            .for_each_init(Vec::new, |scores, t| task(t, scores));
        // SAFETY: the b·h tasks wrote every (image, row, head column) element.
        unsafe { out.set_len(n) };
        Ok((CpuStorage::F32(out), Shape::from((b, l, c))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rel;
    use candle_core::{Device, Module, D};

    fn randn(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn linear_equals_candles_linear_then_activation() {
        for (dims, n, act) in [
            (vec![2usize, 7, 33], 65usize, Activation::Gelu),
            (vec![5, 16], 1, Activation::Identity),
            (vec![1, 3, 4, 9], 130, Activation::QuickGelu),
            (vec![0, 8], 4, Activation::Gelu),
        ] {
            let k = *dims.last().unwrap();
            let x = randn(&dims);
            let w = randn(&[n, k]);
            let b = randn(&[n]);
            let reference = candle_nn::Linear::new(w.clone(), Some(b.clone()))
                .forward(&x)
                .unwrap();
            let reference = match act {
                Activation::Identity => reference,
                Activation::Gelu => reference.gelu_erf().unwrap(),
                Activation::QuickGelu => (&reference
                    * candle_nn::ops::sigmoid(&(&reference * 1.702).unwrap()).unwrap())
                .unwrap(),
            };
            let ours = linear(&x, &w.t().unwrap(), &b, act).unwrap();
            assert_eq!(ours.dims(), reference.dims());
            if reference.elem_count() > 0 {
                let e = rel(&ours, &reference);
                assert!(e <= 1e-6, "{dims:?}×{n} {act:?}: rel L2 {e}");
            }
        }
    }

    /// The rational erf against the f64 erf of libm, over the whole range and past the clamp.
    #[test]
    fn erf_is_within_5e7_of_the_exact_function() {
        let mut worst = 0f64;
        for i in -600_000..=600_000 {
            let x = i as f32 * 1e-5;
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - exact).abs());
        }
        assert!(worst < 5e-7, "largest error {worst:e}");
        assert!((erf(f32::INFINITY) - 1.0).abs() < 5e-7);
        assert!((erf(-30.0) + 1.0).abs() < 5e-7);
    }

    #[test]
    fn linear_refuses_a_weight_that_does_not_fit() {
        let x = randn(&[2, 8]);
        let err = linear(&x, &randn(&[7, 4]), &randn(&[4]), Activation::Identity)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
        let err = linear(&x, &randn(&[8, 4]), &randn(&[5]), Activation::Identity)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
    }

    /// The graph the towers ran before: heads split and copied, scores, mask, softmax, values.
    fn candle_attention(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        heads: usize,
        scale: f64,
    ) -> Tensor {
        let (b, l, c) = q.dims3().unwrap();
        let split = |t: &Tensor| {
            t.reshape((b, l, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let mut s = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        if let Some(m) = mask {
            s = s.broadcast_add(m).unwrap();
        }
        let p = candle_nn::ops::softmax(&s, D::Minus1).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, l, c))
            .unwrap()
    }

    #[test]
    fn attention_equals_candles_graph() {
        let causal = |l: usize| {
            let data: Vec<f32> = (0..l * l)
                .map(|i| {
                    if i % l > i / l {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(data, (1, 1, l, l), &Device::Cpu).unwrap()
        };
        for (b, l, heads, d, mask) in [
            (2usize, 77usize, 4usize, 16usize, Some(causal(77))),
            (1, 5, 1, 3, None),
            (3, 9, 2, 5, Some(randn(&[3, 1, 9, 9]))),
            (2, 6, 3, 4, Some(randn(&[2, 3, 6, 6]))),
        ] {
            let c = heads * d;
            let (q, k, v) = (randn(&[b, l, c]), randn(&[b, l, c]), randn(&[b, l, c]));
            let scale = (d as f64).powf(-0.5);
            let reference = candle_attention(&q, &k, &v, mask.as_ref(), heads, scale);
            let ours = attention(&q, &k, &v, mask.as_ref(), heads, scale).unwrap();
            let e = rel(&ours, &reference);
            assert!(e <= 1e-6, "b{b} l{l} h{heads} d{d}: rel L2 {e}");
        }
    }

    #[test]
    fn attention_refuses_shapes_that_do_not_fit() {
        let q = randn(&[2, 4, 6]);
        let err = attention(&q, &q, &q, None, 4, 1.0).unwrap_err().to_string();
        assert!(err.contains("heads"), "{err}");
        let err = attention(&q, &randn(&[2, 5, 6]), &q, None, 2, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ"), "{err}");
        let err = attention(&q, &q, &q, Some(&randn(&[1, 1, 4, 5])), 2, 1.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("broadcast"), "{err}");
    }
}
