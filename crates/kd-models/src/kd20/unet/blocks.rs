//! guided-diffusion blocks as the official `kandinsky2/model/unet.py` has them (key names kept):
//! `ResBlock` (scale-shift norm, resblock up/down), `AttentionBlock` with `encoder_kv`,
//! `Downsample` / `Upsample` with convolutions, and `text_encoders.AttentionPooling`.

use crate::conv::{conv2d, Conv2d};
use crate::norm::{group_norm, GroupNorm};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv1d, linear, Conv1d, Conv1dConfig, Conv2dConfig, Linear, VarBuilder};

const GN_EPS: f64 = 1e-5;

fn conv3(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        stride,
        ..Default::default()
    };
    conv2d(cin, cout, 3, cfg, vb)
}

/// Up / down resampling without weights (inside a `ResBlock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updown {
    None,
    Up,
    Down,
}

fn resample(x: &Tensor, how: Updown) -> Result<Tensor> {
    match how {
        Updown::None => Ok(x.clone()),
        Updown::Up => {
            let (_, _, h, w) = x.dims4()?;
            x.upsample_nearest2d(2 * h, 2 * w)
        }
        Updown::Down => x.avg_pool2d(2),
    }
}

/// `ResBlock` (keys `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`).
#[derive(Debug, Clone)]
pub struct ResBlock {
    in_norm: GroupNorm,
    in_conv: Conv2d,
    emb: Linear,
    out_norm: GroupNorm,
    out_conv: Conv2d,
    skip: Option<Conv2d>,
    out_channels: usize,
    scale_shift: bool,
    updown: Updown,
}

impl ResBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        channels: usize,
        emb_channels: usize,
        out_channels: usize,
        groups: usize,
        scale_shift: bool,
        updown: Updown,
        vb: VarBuilder,
    ) -> Result<Self> {
        let emb_out = if scale_shift {
            2 * out_channels
        } else {
            out_channels
        };
        let skip = if out_channels == channels {
            None
        } else {
            Some(conv2d(
                channels,
                out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("skip_connection"),
            )?)
        };
        Ok(Self {
            in_norm: group_norm(groups, channels, GN_EPS, vb.pp("in_layers.0"))?,
            in_conv: conv3(channels, out_channels, 1, vb.pp("in_layers.2"))?,
            emb: linear(emb_channels, emb_out, vb.pp("emb_layers.1"))?,
            out_norm: group_norm(groups, out_channels, GN_EPS, vb.pp("out_layers.0"))?,
            out_conv: conv3(out_channels, out_channels, 1, vb.pp("out_layers.3"))?,
            skip,
            out_channels,
            scale_shift,
            updown,
        })
    }

    pub fn forward(&self, x: &Tensor, emb: &Tensor) -> Result<Tensor> {
        let h = self.in_norm.forward_silu(x)?;
        let (h, x) = (resample(&h, self.updown)?, resample(x, self.updown)?);
        let h = self.in_conv.forward(&h)?;
        let e = self
            .emb
            .forward(&candle_nn::ops::silu(emb)?)?
            .to_dtype(h.dtype())?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = if self.scale_shift {
            let scale = e.narrow(1, 0, self.out_channels)?;
            let shift = e.narrow(1, self.out_channels, self.out_channels)?;
            let h = self
                .out_norm
                .forward(&h)?
                .broadcast_mul(&(scale + 1.0)?)?
                .broadcast_add(&shift)?;
            candle_nn::ops::silu(&h)?
        } else {
            self.out_norm.forward_silu(&h.broadcast_add(&e)?)?
        };
        let h = self.out_conv.forward(&h)?;
        let x = match &self.skip {
            Some(c) => c.forward(&x)?,
            None => x,
        };
        x + h
    }
}

/// `AttentionBlock` with `encoder_kv`: keys `norm`, `qkv`, `encoder_kv`, `proj_out` (1-D convs).
///
/// `QKVAttention` splits heads first (`(B·heads, 3·ch, T)`: each head's q, k, v are adjacent
/// channel slices) and puts the text keys/values **before** the image ones; softmax in f32.
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    norm: GroupNorm,
    qkv: Conv1d,
    encoder_kv: Conv1d,
    proj_out: Conv1d,
    heads: usize,
}

impl AttentionBlock {
    pub fn new(
        channels: usize,
        heads: usize,
        encoder_channels: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let c1 = Conv1dConfig::default();
        Ok(Self {
            norm: group_norm(groups, channels, GN_EPS, vb.pp("norm"))?,
            qkv: conv1d(channels, 3 * channels, 1, c1, vb.pp("qkv"))?,
            encoder_kv: conv1d(encoder_channels, 2 * channels, 1, c1, vb.pp("encoder_kv"))?,
            proj_out: conv1d(channels, channels, 1, c1, vb.pp("proj_out"))?,
            heads,
        })
    }

    /// `x` (B, C, H, W), `encoder_out` (B, model_dim, S) → (B, C, H, W).
    pub fn forward(&self, x: &Tensor, encoder_out: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = h * w;
        let ch = c / self.heads;
        let bh = b * self.heads;
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x)?.reshape((b, c, t))?)?
            .reshape((bh, 3 * ch, t))?;
        let ekv = self
            .encoder_kv
            .forward(encoder_out)?
            .to_dtype(qkv.dtype())?;
        let s = ekv.dim(2)?;
        let ekv = ekv.reshape((bh, 2 * ch, s))?;
        let q = qkv.narrow(1, 0, ch)?;
        let k = Tensor::cat(&[ekv.narrow(1, 0, ch)?, qkv.narrow(1, ch, ch)?], 2)?;
        let v = Tensor::cat(&[ekv.narrow(1, ch, ch)?, qkv.narrow(1, 2 * ch, ch)?], 2)?;
        let scale = 1.0 / (ch as f64).sqrt();
        // (BH, T, S+T)
        let weight = (q.t()?.contiguous()?.matmul(&k.contiguous()?)? * scale)?;
        let weight =
            candle_nn::ops::softmax_last_dim(&weight.to_dtype(DType::F32)?)?.to_dtype(q.dtype())?;
        // (BH, ch, T)
        let a = v.contiguous()?.matmul(&weight.t()?.contiguous()?)?;
        let out = self.proj_out.forward(&a.reshape((b, c, t))?)?;
        x + out.reshape((b, c, h, w))?
    }
}

/// `Downsample(use_conv=True)` (key `op`) or `Upsample(use_conv=True)` (key `conv`), used when
/// `resblock_updown` is off.
#[derive(Debug, Clone)]
pub struct ConvResample {
    conv: Conv2d,
    up: bool,
}

impl ConvResample {
    pub fn down(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3(channels, channels, 2, vb.pp("op"))?,
            up: false,
        })
    }

    pub fn up(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3(channels, channels, 1, vb.pp("conv"))?,
            up: true,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.up {
            self.conv.forward(&resample(x, Updown::Up)?)
        } else {
            self.conv.forward(x)
        }
    }
}

/// `text_encoders.AttentionPooling(heads, in_dim, out_dim)`: multi-head self-attention over all
/// tokens (no mask), `out` projection, token 0 kept. Only query 0 is computed.
#[derive(Debug, Clone)]
pub struct AttentionPooling {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

impl AttentionPooling {
    pub fn new(heads: usize, in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            q: linear(in_dim, in_dim, vb.pp("q_linear"))?,
            k: linear(in_dim, in_dim, vb.pp("k_linear"))?,
            v: linear(in_dim, in_dim, vb.pp("v_linear"))?,
            out: linear(in_dim, out_dim, vb.pp("out"))?,
            heads,
        })
    }

    /// `x` (B, L, in_dim) → (B, out_dim).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let dk = d / self.heads;
        let split = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, n, self.heads, dk))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(&x.narrow(1, 0, 1)?)?, 1)?;
        let k = split(self.k.forward(x)?, l)?;
        let v = split(self.v.forward(x)?, l)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? / (dk as f64).sqrt())?;
        let scores = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let o = scores.matmul(&v)?; // (B, heads, 1, dk)
        let o = o.transpose(1, 2)?.reshape((b, d))?;
        self.out.forward(&o)
    }
}
