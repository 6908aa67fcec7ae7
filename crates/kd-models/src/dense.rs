//! The transformer towers' dense layers and multi-head self-attention: f32 on the CPU runs
//! `kd_kernels`' fused kernels ([`kd_kernels::linear`]: GEMM from the bias, activation in
//! parallel; [`kd_kernels::attention`]: heads read in place, one task per image and head), other
//! devices and dtypes candle's ops (softmax in f32). Same weights, same results within rounding.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
pub use kd_kernels::Activation;

/// A dense layer (PyTorch `Linear` weights, with bias) holding its weight transposed,
/// `(in, out)`: the layout the CPU GEMM reads fastest. Checkpoints are read that way in one pass
/// (the `@T` keys of [`crate::checkpoint::Weights`]); other variable stores are transposed once.
#[derive(Debug, Clone)]
pub struct Dense {
    weight_t: Tensor,
    bias: Tensor,
}

/// The dense layer `weight (out, in)`, `bias (out,)` under `vb`.
pub fn dense(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Dense> {
    let key = format!("weight{}", crate::checkpoint::TRANSPOSED);
    let weight_t = if vb.contains_tensor(&key) {
        vb.get((in_dim, out_dim), &key)?
    } else {
        vb.get((out_dim, in_dim), "weight")?.t()?.contiguous()?
    };
    Ok(Dense {
        weight_t,
        bias: vb.get(out_dim, "bias")?,
    })
}

impl Dense {
    /// `act(x·Wᵀ + b)` for x `(…, in)`.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if kd_kernels::linear_supported(x, &self.weight_t) {
            return kd_kernels::linear(x, &self.weight_t, &self.bias, act);
        }
        let dims = x.dims();
        let (k, n) = self.weight_t.dims2()?;
        let m = x.elem_count() / k.max(1);
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = n;
        }
        let y = x
            .contiguous()?
            .reshape((m, k))?
            .matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?
            .reshape(out_dims)?;
        match act {
            Activation::Identity => Ok(y),
            Activation::Gelu => y.gelu_erf(),
            Activation::QuickGelu => &y * candle_nn::ops::sigmoid(&(&y * 1.702)?)?,
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
