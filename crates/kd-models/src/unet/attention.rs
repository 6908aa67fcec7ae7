//! Attention with added key/value projections (diffusers `Attention` +
//! `AttnAddedKVProcessor`), used by the Simple-cross-attn blocks of the Kandinsky 2.2 UNet.
//!
//! Self-attention keys/values of the group-normed feature map are concatenated **after** the
//! keys/values projected from the image-token context; softmax runs in f32
//! (`upcast_softmax=True`); the residual is added inside the block.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{group_norm, linear, GroupNorm, Linear, VarBuilder};

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

    /// `x` (B, C, H, W), `context` (B, T, context_dim) → (B, C, H, W).
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
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
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(x.dtype())?;
        let a = probs.matmul(&v)?; // (B, heads, HW, d)
        let a = a.transpose(1, 2)?.reshape((b, h * w, c))?;
        let y = self.to_out.forward(&a)?;
        let y = y.transpose(1, 2)?.reshape((b, c, h, w))?;
        y + x
    }
}
