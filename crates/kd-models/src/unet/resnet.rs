//! `ResnetBlock2D` with `time_embedding_norm = "scale_shift"` and optional resnet-based
//! up/down-sampling, as in diffusers `models/resnet.py` (Kandinsky 2.2 / ADM flavour).
//!
//! ```text
//! h = SiLU(GN1(x)); [up: x,h = nearest×2 | down: x,h = avgpool2×2]; h = conv1(h)
//! scale, shift = chunk(time_emb_proj(SiLU(temb)), 2); h = GN2(h)·(1+scale)+shift
//! out = shortcut(x) + conv2(SiLU(h))
//! ```

use crate::conv::{conv2d, Conv2d};
use crate::norm::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{linear, Conv2dConfig, Linear, VarBuilder};

/// Optional resampling inside a resnet block (the UNet's up/down-samplers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// No resampling.
    None,
    /// Nearest-neighbour ×2 (`Upsample2D(use_conv=False)`).
    Up,
    /// 2×2 average pooling (`Downsample2D(use_conv=False)`).
    Down,
}

/// Shape parameters of one resnet block.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding.
    pub temb_channels: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
    /// Output is divided by this factor.
    pub output_scale_factor: f64,
    /// Resampling applied after the first norm.
    pub resample: Resample,
}

/// A scale-shift `ResnetBlock2D`.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    out_channels: usize,
    output_scale_factor: f64,
    resample: Resample,
}

impl ResnetBlock2D {
    /// Loads the block from `vb` (keys `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
    /// `conv_shortcut`).
    pub fn new(cfg: ResnetConfig, vb: VarBuilder) -> Result<Self> {
        let c3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let norm1 = group_norm(cfg.groups, cfg.in_channels, cfg.eps, vb.pp("norm1"))?;
        let conv1 = conv2d(cfg.in_channels, cfg.out_channels, 3, c3, vb.pp("conv1"))?;
        let time_emb_proj = linear(
            cfg.temb_channels,
            2 * cfg.out_channels,
            vb.pp("time_emb_proj"),
        )?;
        let norm2 = group_norm(cfg.groups, cfg.out_channels, cfg.eps, vb.pp("norm2"))?;
        let conv2 = conv2d(cfg.out_channels, cfg.out_channels, 3, c3, vb.pp("conv2"))?;
        let conv_shortcut = if cfg.in_channels != cfg.out_channels {
            Some(conv2d(
                cfg.in_channels,
                cfg.out_channels,
                1,
                Conv2dConfig::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            out_channels: cfg.out_channels,
            output_scale_factor: cfg.output_scale_factor,
            resample: cfg.resample,
        })
    }

    fn resample(&self, x: &Tensor) -> Result<Tensor> {
        match self.resample {
            Resample::None => Ok(x.clone()),
            Resample::Up => {
                let (_, _, h, w) = x.dims4()?;
                x.upsample_nearest2d(2 * h, 2 * w)
            }
            Resample::Down => x.avg_pool2d(2),
        }
    }

    /// `x` (B, C_in, H, W), `temb` (B, T) → (B, C_out, H', W').
    pub fn forward(&self, x: &Tensor, temb: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x)?;
        let (x, h) = (self.resample(x)?, self.resample(&h)?);
        let h = self.conv1.forward(&h)?;
        let e = self
            .time_emb_proj
            .forward(&candle_nn::ops::silu(temb)?)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let scale = e.narrow(1, 0, self.out_channels)?;
        let shift = e.narrow(1, self.out_channels, self.out_channels)?;
        let h = self
            .norm2
            .forward(&h)?
            .broadcast_mul(&(scale + 1.0)?)?
            .broadcast_add(&shift)?;
        let h = self.conv2.forward(&candle_nn::ops::silu(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(&x)?,
            None => x,
        };
        let out = (x + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
