//! The transformer towers' dense layers and multi-head self-attention: f32 on the CPU runs
//! `kd_kernels`' fused kernels ([`kd_kernels::linear`]: GEMM from the bias, activation in
//! parallel; [`kd_kernels::attention`]: heads read in place, one task per image and head), other
//! devices and dtypes candle's ops (softmax in f32). Same weights, same results within rounding.

use crate::checkpoint::{STORED, TRANSPOSED};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
pub use kd_kernels::Activation;
use kd_kernels::{PackedMatrix, PackedPrecision};
use std::sync::Arc;

/// A dense layer (PyTorch `Linear` weights, with bias).
///
/// f32 on a CPU with AVX-512 ([`kd_kernels::packed_dense_enabled`]) packs its weight at load
/// ([`kd_kernels::PackedMatrix`]) in the precision it is stored in: an fp16/bf16 checkpoint stays
/// 2 bytes per weight (the `@S` keys of [`crate::checkpoint::Weights`]; widening to f32 in the
/// GEMM is exact), which halves the towers' memory and load time, and the GEMM repacks nothing
/// per call. Otherwise the layer holds its weight transposed, `(in, out)`, the layout the `gemm`
/// crate reads fastest (the `@T` keys; other variable stores are transposed once).
#[derive(Debug, Clone)]
pub struct Dense {
    weight: Weight,
    bias: Tensor,
}

#[derive(Debug, Clone)]
enum Weight {
    Packed(Arc<PackedMatrix>),
    /// `(in, out)`.
    Transposed(Tensor),
}

/// The dense layer `weight (out, in)`, `bias (out,)` under `vb`.
pub fn dense(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Dense> {
    let bias = vb.get(out_dim, "bias")?;
    if vb.device().is_cpu() && vb.dtype() == DType::F32 && kd_kernels::packed_dense_enabled() {
        let stored = format!("weight{STORED}");
        let w = if vb.contains_tensor(&stored) {
            let w = vb.get((out_dim, in_dim), &stored)?;
            match w.dtype() {
                DType::F32 | DType::F16 | DType::BF16 => w,
                _ => w.to_dtype(DType::F32)?,
            }
        } else {
            vb.get((out_dim, in_dim), "weight")?
        };
        let weight = Weight::Packed(Arc::new(PackedMatrix::pack(&w)?));
        return Ok(Dense { weight, bias });
    }
    let key = format!("weight{TRANSPOSED}");
    let weight_t = if vb.contains_tensor(&key) {
        vb.get((in_dim, out_dim), &key)?
    } else {
        vb.get((out_dim, in_dim), "weight")?.t()?.contiguous()?
    };
    Ok(Dense {
        weight: Weight::Transposed(weight_t),
        bias,
    })
}

impl Dense {
    /// `act(x·Wᵀ + b)` for x `(…, in)`.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let weight_t = match &self.weight {
            Weight::Packed(w) => return w.linear(x, &self.bias, act),
            Weight::Transposed(w) => w,
        };
        if kd_kernels::linear_supported(x, weight_t) {
            return kd_kernels::linear(x, weight_t, &self.bias, act);
        }
        let dims = x.dims();
        let (k, n) = weight_t.dims2()?;
        let m = x.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let y = x
            .contiguous()?
            .reshape((m, k))?
            .matmul(weight_t)?
            .broadcast_add(&self.bias)?
            .reshape(out_dims)?;
        match act {
            Activation::Identity => Ok(y),
            Activation::Gelu => y.gelu_erf(),
            Activation::QuickGelu => &y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?,
        }
    }

    /// Whether the weight is packed for the CPU kernel, and in which precision.
    pub fn packed_precision(&self) -> Option<PackedPrecision> {
        match &self.weight {
            Weight::Packed(w) => Some(w.precision()),
            Weight::Transposed(_) => None,
        }
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }
}

/// Multi-head attention of projected q, k, v `(B, L, heads·D)`: per head
/// `softmax(scale·q·kᵀ + mask)·v` (the softmax in f32; `mask` additive, broadcastable to
/// `(B, heads, L, L)`), heads concatenated back to `(B, L, heads·D)`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    if kd_kernels::attention_supported(q) {
        return kd_kernels::attention(q, k, v, mask, heads, scale);
    }
    let (b, l, c) = q.dims3()?;
    let split = |t: &Tensor| {
        t.reshape((b, l, heads, c / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    // The queries are scaled first, so half-precision scores stay in range.
    let (q, k, v) = (split(&(q * scale)?)?, split(k)?, split(v)?);
    let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    if let Some(m) = mask {
        scores = scores.broadcast_add(m)?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, c))
}
