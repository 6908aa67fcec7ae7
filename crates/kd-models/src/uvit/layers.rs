//! The small layers of the aMUSEd transformer, as diffusers defines them:
//!
//! * [`RmsNorm`] (`models/normalization.py` `RMSNorm`): `x · rsqrt(mean(x²) + eps) [· weight]`,
//!   the statistics in f32;
//! * [`LayerNorm`] (`torch.nn.LayerNorm` with optional weight and bias);
//! * [`AdaLayerNormContinuous`]: `norm(x) · (1 + scale) + shift`, `(scale, shift)` =
//!   `linear(silu(cond))` halves;
//! * [`Attention`] (`models/attention_processor.py`, `AttnProcessor2_0`): `to_q`, `to_k`, `to_v`,
//!   `to_out.0`, scale `1/√head_dim`, no mask;
//! * [`GegluFeedForward`] (`FeedForward(activation_fn="geglu")`): `net.2(h · gelu(gate))` with
//!   `(h, gate)` = `net.0.proj(x)` halves (exact GELU);
//! * [`pointwise_conv`]: a 1×1 `nn.Conv2d` loaded as a [`Linear`] over channels-last tensors.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear_b, Linear, VarBuilder};

/// diffusers `RMSNorm` over the last dimension (weight only with `elementwise_affine`; the
/// optional bias of the upstream class is never used by `UVit2DModel`).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` (dim) when `affine`.
    pub fn new(dim: usize, eps: f64, affine: bool, vb: VarBuilder) -> Result<Self> {
        let weight = affine.then(|| vb.get(dim, "weight")).transpose()?;
        Ok(Self { weight, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let y = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
        match &self.weight {
            Some(w) => y.broadcast_mul(w),
            None => Ok(y),
        }
    }
}

/// `nn.LayerNorm(dim, eps, elementwise_affine, bias)` over the last dimension, the statistics in
/// f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` when `affine`, and `bias` when `affine && bias`.
    pub fn new(dim: usize, eps: f64, affine: bool, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = affine.then(|| vb.get(dim, "weight")).transpose()?;
        let bias = (affine && bias).then(|| vb.get(dim, "bias")).transpose()?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
        let inv = (centred.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let mut y = centred.broadcast_mul(&inv)?.to_dtype(dtype)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(w)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }
}

/// The normalisation inside an [`AdaLayerNormContinuous`].
#[derive(Debug, Clone)]
pub enum AdaNorm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

/// diffusers `AdaLayerNormContinuous`: `norm(x) · (1 + scale)[:, None] + shift[:, None]` with
/// `(scale, shift) = chunk(linear(silu(cond)), 2)`.
#[derive(Debug, Clone)]
pub struct AdaLayerNormContinuous {
    linear: Linear,
    norm: AdaNorm,
}

impl AdaLayerNormContinuous {
    /// Loads `linear` (cond_dim → 2·dim, bias when `bias`) and `norm` (`rms`: an RMS norm,
    /// otherwise a layer norm whose bias also follows `bias`).
    pub fn new(
        dim: usize,
        cond_dim: usize,
        affine: bool,
        eps: f64,
        bias: bool,
        rms: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm = if rms {
            AdaNorm::Rms(RmsNorm::new(dim, eps, affine, vb.pp("norm"))?)
        } else {
            AdaNorm::Layer(LayerNorm::new(dim, eps, affine, bias, vb.pp("norm"))?)
        };
        Ok(Self {
            linear: linear_b(cond_dim, 2 * dim, bias, vb.pp("linear"))?,
            norm,
        })
    }

    /// `x` (B, L, dim), `cond` (B, cond_dim).
    pub fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let emb = self.linear.forward(&candle_nn::ops::silu(cond)?)?;
        let dim = emb.dim(1)? / 2;
        let scale = (emb.narrow(1, 0, dim)? + 1.0)?.unsqueeze(1)?;
        let shift = emb.narrow(1, dim, dim)?.unsqueeze(1)?;
        let normed = match &self.norm {
            AdaNorm::Rms(n) => n.forward(x)?,
            AdaNorm::Layer(n) => n.forward(x)?,
        };
        normed.broadcast_mul(&scale)?.broadcast_add(&shift)
    }
}

/// diffusers `Attention` with `AttnProcessor2_0`, without mask, norms or residual.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

/// Queries per attention chunk.
pub const QUERY_CHUNK: usize = 1024;

impl Attention {
    /// `query_dim` → heads·head_dim; keys and values from `kv_dim`-wide context; `bias` for
    /// q/k/v, `out_bias` for `to_out.0`.
    pub fn new(
        query_dim: usize,
        kv_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
        out_bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_b(query_dim, inner, bias, vb.pp("to_q"))?,
            to_k: linear_b(kv_dim, inner, bias, vb.pp("to_k"))?,
            to_v: linear_b(kv_dim, inner, bias, vb.pp("to_v"))?,
            to_out: linear_b(inner, query_dim, out_bias, vb.pp("to_out.0"))?,
            heads,
            head_dim,
        })
    }

    /// `x` (B, L, query_dim) attending to `context` (B, S, kv_dim), or to itself when `None`.
    /// Scores and softmax in f32, [`QUERY_CHUNK`] queries at a time: the score buffer is at most
    /// B·heads·chunk·S floats (a 1024² image of the real amused-256, 4096 tokens, holds 512 MiB
    /// instead of 2 GiB at once).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let ctx = context.unwrap_or(x);
        let split = |t: Tensor| -> Result<Tensor> {
            t.reshape((b, (), self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.to_q.forward(x)?)?;
        let k = split(self.to_k.forward(ctx)?)?;
        let v = split(self.to_v.forward(ctx)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = q.to_dtype(DType::F32)?;
        let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
        let attend = |q: &Tensor| -> Result<Tensor> {
            let scores = (q.matmul(&kt)? * scale)?;
            candle_nn::ops::softmax_last_dim(&scores)?
                .to_dtype(v.dtype())?
                .matmul(&v)
        };
        let out = if l <= QUERY_CHUNK {
            attend(&q)?
        } else {
            let pieces = (0..l)
                .step_by(QUERY_CHUNK)
                .map(|start| attend(&q.narrow(2, start, QUERY_CHUNK.min(l - start))?))
                .collect::<Result<Vec<_>>>()?;
            Tensor::cat(&pieces, 2)?
        };
        let out = out
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.head_dim))?;
        self.to_out.forward(&out)
    }
}

/// `FeedForward(dim, inner_dim, activation_fn="geglu", bias)`: `net.0.proj` (dim → 2·inner),
/// `h · gelu(gate)`, `net.2` (inner → dim).
#[derive(Debug, Clone)]
pub struct GegluFeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl GegluFeedForward {
    /// Loads `net.0.proj` and `net.2`.
    pub fn new(dim: usize, inner: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            proj: linear_b(dim, 2 * inner, bias, vb.pp("net.0.proj"))?,
            out: linear_b(inner, dim, bias, vb.pp("net.2"))?,
            inner,
        })
    }
}

impl Module for GegluFeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj.forward(x)?;
        let gate = h.narrow(D::Minus1, self.inner, self.inner)?.gelu_erf()?;
        let h = h.narrow(D::Minus1, 0, self.inner)?.mul(&gate)?;
        self.out.forward(&h)
    }
}

/// A 1×1 `nn.Conv2d` (`weight` (out, in, 1, 1), optional `bias`) as a [`Linear`] to apply to
/// channels-last tensors.
pub fn pointwise_conv(cin: usize, cout: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((cout, cin, 1, 1), "weight")?.reshape((cout, cin))?;
    let b = bias.then(|| vb.get(cout, "bias")).transpose()?;
    Ok(Linear::new(w, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// More queries than one chunk: the chunked attention equals the whole-matrix formula.
    #[test]
    fn chunked_self_attention_equals_the_whole_matrix() {
        let dev = Device::Cpu;
        let (dim, heads, head_dim, l) = (8, 2, 4, QUERY_CHUNK + 500);
        let mut t = HashMap::new();
        for (i, name) in ["to_q", "to_k", "to_v", "to_out.0"].iter().enumerate() {
            let w = Tensor::rand(-1f32, 1f32, (dim, dim), &dev).unwrap();
            let b = Tensor::rand(-1f32, 1f32, dim, &dev).unwrap();
            t.insert(
                format!("{name}.weight"),
                (w * (0.5 + i as f64 * 0.1)).unwrap(),
            );
            t.insert(format!("{name}.bias"), b);
        }
        let vb = VarBuilder::from_tensors(t.clone(), DType::F32, &dev);
        let attn = Attention::new(dim, dim, heads, head_dim, true, true, vb).unwrap();
        let x = Tensor::rand(-1f32, 1f32, (1, l, dim), &dev).unwrap();
        let got = attn.forward(&x, None).unwrap();
        // The formula over the whole (L, L) score matrix.
        let lin = |name: &str, x: &Tensor| {
            Linear::new(
                t[&format!("{name}.weight")].clone(),
                Some(t[&format!("{name}.bias")].clone()),
            )
            .forward(x)
            .unwrap()
        };
        let split = |y: Tensor| {
            y.reshape((1, l, heads, head_dim))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (
            split(lin("to_q", &x)),
            split(lin("to_k", &x)),
            split(lin("to_v", &x)),
        );
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * (head_dim as f64).powf(-0.5)).unwrap();
        let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
        let o = probs
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((1, l, dim))
            .unwrap();
        let want = lin("to_out.0", &o);
        let diff = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "max abs difference {diff}");
    }
}
