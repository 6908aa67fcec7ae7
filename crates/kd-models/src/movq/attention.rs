//! Single-head MoVQ attention (diffusers `Attention` with `_from_deprecated_attn_block=True`,
//! `models/attention_processor.py`), computed in chunks of queries so that peak memory stays
//! bounded for large latents.
//!
//! `x + to_out(softmax(q·kᵀ / √C) · v)` with `q, k, v = to_q/to_k/to_v(norm(x))` over the H·W
//! tokens; the norm is a GroupNorm (encoder) or a SpatialNorm (decoder). Scores and softmax are
//! computed in f32 whatever the weight dtype.

use super::layers::Norm;
use crate::interrupt::{in_pieces, Stop};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear, Linear, VarBuilder};

/// One MoVQ attention block (heads = 1, head dim = channels).
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    norm: Norm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
    chunk: usize,
}

impl AttentionBlock {
    /// Loads the block. Accepts both `to_q/to_k/to_v/to_out.0` and the legacy
    /// `query/key/value/proj_attn` names. `zq_channels` selects the SpatialNorm (`spatial_norm`)
    /// instead of the GroupNorm (`group_norm`); `chunk` is the number of queries per chunk
    /// (0 = all at once).
    pub fn new(
        channels: usize,
        groups: usize,
        zq_channels: Option<usize>,
        chunk: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let norm_name = if zq_channels.is_some() {
            "spatial_norm"
        } else {
            "group_norm"
        };
        let norm = Norm::new(channels, groups, zq_channels, vb.pp(norm_name))?;
        let legacy = !vb.contains_tensor("to_q.weight") && vb.contains_tensor("query.weight");
        let (q, k, v, o) = if legacy {
            ("query", "key", "value", "proj_attn")
        } else {
            ("to_q", "to_k", "to_v", "to_out.0")
        };
        Ok(Self {
            norm,
            to_q: linear(channels, channels, vb.pp(q))?,
            to_k: linear(channels, channels, vb.pp(k))?,
            to_v: linear(channels, channels, vb.pp(v))?,
            to_out: linear(channels, channels, vb.pp(o))?,
            scale: 1.0 / (channels as f64).sqrt(),
            chunk,
        })
    }

    /// Changes the number of queries per chunk (0 = unchunked).
    pub fn set_chunk(&mut self, chunk: usize) {
        self.chunk = chunk;
    }

    /// Applies attention with the residual connection; `zq` conditions a SpatialNorm. Asks
    /// `stop` between query chunks.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>, stop: Stop) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = h * w;
        let dtype = x.dtype();
        let hs = self.norm.forward(x, zq)?;
        let hs = hs.reshape((b, c, n))?.transpose(1, 2)?.contiguous()?;
        let q = (self.to_q.forward(&hs)?.to_dtype(DType::F32)? * self.scale)?;
        let kt = self
            .to_k
            .forward(&hs)?
            .to_dtype(DType::F32)?
            .transpose(1, 2)?
            .contiguous()?;
        let v = self.to_v.forward(&hs)?.to_dtype(DType::F32)?.contiguous()?;
        drop(hs);
        let chunk = if self.chunk == 0 {
            n
        } else {
            self.chunk.min(n)
        };
        let attn = in_pieces(n, chunk, 1, stop, "a MoVQ attention chunk", |start, len| {
            let qc = q.narrow(1, start, len)?;
            let probs = candle_nn::ops::softmax_last_dim(&qc.matmul(&kt)?)?;
            probs.matmul(&v)
        })?;
        let out = self.to_out.forward(&attn.to_dtype(dtype)?)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}
