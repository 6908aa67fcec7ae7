//! Attention with added key/value projections (diffusers `Attention` +
//! `AttnAddedKVProcessor`), used by the Simple-cross-attn blocks of the Kandinsky 2.2 UNet.
//!
//! Self-attention keys/values of the group-normed feature map are concatenated **after** the
//! keys/values projected from the image-token context; softmax runs in f32
//! (`upcast_softmax=True`); the residual is added inside the block.

use crate::interrupt::{in_pieces, Stop};
use candle_core::{DType, Module, Result, Tensor};

/// Queries per attention chunk: the score matrix of one chunk is (B, heads, 1024, keys), so
/// memory grows linearly with the image area, and a stop check runs between chunks. Sizes up
/// to 32×32 latents per attention level are one chunk (the arithmetic of one whole softmax).
pub const QUERY_CHUNK: usize = 1024;
use crate::norm::{group_norm, GroupNorm};
use candle_nn::{linear, Linear, VarBuilder};

/// Shape parameters of one added-KV attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttnAddedKvConfig {
    /// Feature-map channels (query dim).
    pub channels: usize,
    /// Number of heads (`channels / attention_head_dim`).
    pub heads: usize,
    /// Width of the context tokens (`cross_attention_dim`).
    pub context_dim: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
}

/// `Attention(added_kv_proj_dim=…, norm_num_groups=…)` with the added-KV processor.
#[derive(Debug, Clone)]
pub struct AttnAddedKv {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    add_k_proj: Linear,
    add_v_proj: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl AttnAddedKv {
    /// Loads the block (keys `group_norm`, `to_{q,k,v}`, `add_{k,v}_proj`, `to_out.0`).
    pub fn new(cfg: AttnAddedKvConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.channels;
        let head_dim = c / cfg.heads;
        Ok(Self {
            group_norm: group_norm(cfg.groups, c, cfg.eps, vb.pp("group_norm"))?,
            to_q: linear(c, c, vb.pp("to_q"))?,
            to_k: linear(c, c, vb.pp("to_k"))?,
            to_v: linear(c, c, vb.pp("to_v"))?,
            add_k_proj: linear(cfg.context_dim, c, vb.pp("add_k_proj"))?,
            add_v_proj: linear(cfg.context_dim, c, vb.pp("add_v_proj"))?,
            to_out: linear(c, c, vb.pp("to_out").pp("0"))?,
            heads: cfg.heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    /// (B, L, C) → (B, heads, L, C/heads).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, c) = x.dims3()?;
        x.reshape((b, l, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `x` (B, C, H, W), `context` (B, T, context_dim) → (B, C, H, W); queries in chunks of
    /// [`QUERY_CHUNK`], asking `stop` between chunks.
    pub fn forward(&self, x: &Tensor, context: &Tensor, stop: Stop) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xn = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.split_heads(&self.to_q.forward(&xn)?)?;
        let k = Tensor::cat(
            &[self.add_k_proj.forward(context)?, self.to_k.forward(&xn)?],
            1,
        )?;
        let v = Tensor::cat(
            &[self.add_v_proj.forward(context)?, self.to_v.forward(&xn)?],
            1,
        )?;
        let (k, v) = (self.split_heads(&k)?, self.split_heads(&v)?);
        let kt = k.t()?;
        // Scaling the queries costs HW·C multiplies, scaling the scores HW·(HW + 77)·heads; with
        // the usual head widths (a power of 4) the scale is a power of two and both are exact.
        let q = (q * self.scale)?;
        let n = h * w;
        // (B, heads, HW, d)
        let a = in_pieces(
            n,
            QUERY_CHUNK,
            2,
            stop,
            "a UNet attention chunk",
            |start, len| {
                let q = if len == n {
                    q.clone()
                } else {
                    q.narrow(2, start, len)?.contiguous()?
                };
                let scores = q.matmul(&kt)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                    .to_dtype(x.dtype())?;
                probs.matmul(&v)
            },
        )?;
        let a = a.transpose(1, 2)?.reshape((b, h * w, c))?;
        let y = self.to_out.forward(&a)?;
        let y = y.transpose(1, 2)?.reshape((b, c, h, w))?;
        y + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt;
    use candle_core::Device;
    use candle_nn::{VarBuilder, VarMap};

    /// The whole softmax at once (what diffusers computes), from the block's own weights.
    fn unchunked(a: &AttnAddedKv, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let xn = a
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = a.split_heads(&a.to_q.forward(&xn)?)?;
        let k = Tensor::cat(&[a.add_k_proj.forward(context)?, a.to_k.forward(&xn)?], 1)?;
        let v = Tensor::cat(&[a.add_v_proj.forward(context)?, a.to_v.forward(&xn)?], 1)?;
        let (k, v) = (a.split_heads(&k)?, a.split_heads(&v)?);
        let probs = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * a.scale)?)?;
        let y = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, h * w, c))?;
        let y = a
            .to_out
            .forward(&y)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        y + x
    }

    #[test]
    fn chunked_queries_compute_the_whole_softmax() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let cfg = AttnAddedKvConfig {
            channels: 16,
            heads: 2,
            context_dim: 8,
            groups: 4,
            eps: 1e-5,
        };
        let a = AttnAddedKv::new(cfg, VarBuilder::from_varmap(&vars, DType::F32, &dev))?;
        let context = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        // 48×48 = 2304 queries: three chunks, the last one partial.
        let x = Tensor::randn(0f32, 1.0, (2, 16, 48, 48), &dev)?;
        let got = a.forward(&x, &context, &interrupt::never)?;
        let want = unchunked(&a, &x, &context)?;
        let err = ((&got - &want)?.sqr()?.sum_all()?.to_scalar::<f32>()?
            / want.sqr()?.sum_all()?.to_scalar::<f32>()?)
        .sqrt();
        assert!(err < 1e-6, "rel L2 {err:e}");
        let asked = std::cell::Cell::new(0);
        a.forward(&x, &context, &|| {
            asked.set(asked.get() + 1);
            false
        })?;
        assert_eq!(asked.get(), 2, "one check between each pair of chunks");
        Ok(())
    }
}
