//! MoVQ building blocks: [`SpatialNorm`], the group- or spatially-normalised resnet block and the
//! conv down/up-samplers.
//!
//! diffusers sources: `models/attention_processor.py` (`SpatialNorm`), `models/resnet.py`
//! (`ResnetBlock2D`, `ResnetBlockCondNorm2D`), `models/downsampling.py`, `models/upsampling.py`.
//! SpatialNorm is from MoVQ (<https://arxiv.org/abs/2209.09002>).

use crate::conv::{conv2d, Conv2d};
use crate::interrupt::{self, check, in_pieces, Stop};
use crate::norm::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

/// GroupNorm epsilon used everywhere inside the MoVQ.
pub const MOVQ_EPS: f64 = 1e-6;
/// SpatialNorm always uses 32 groups, whatever `norm_num_groups` says.
pub const SPATIAL_NORM_GROUPS: usize = 32;

/// A 3×3 convolution with padding 1, run in bands of output rows on large inputs so that the
/// im2col buffer of backends that materialise it whole (CUDA, Metal) stays bounded.
#[derive(Debug, Clone)]
pub struct Conv3x3 {
    conv: Conv2d,
    band_pixels: usize,
}

/// Loads a 3×3, padding-1 convolution; `band_pixels` is the largest output area computed in
/// one call (0 = no banding).
pub fn conv3x3(cin: usize, cout: usize, band_pixels: usize, vb: VarBuilder) -> Result<Conv3x3> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Conv3x3 {
        conv: conv2d(cin, cout, 3, cfg, vb)?,
        band_pixels,
    })
}

impl Module for Conv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_stop(x, &interrupt::never)
    }
}

impl Conv3x3 {
    /// [`Module::forward`] asking `stop` between bands.
    pub fn forward_stop(&self, x: &Tensor, stop: Stop) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if self.band_pixels == 0 || h * w <= self.band_pixels || h < 2 {
            return self.conv.forward(x);
        }
        let rows = self.band_pixels / w;
        in_pieces(h, rows, 2, stop, "a MoVQ convolution band", |r0, r| {
            // One halo row on each side; the conv's own zero padding is only kept at the image
            // border, the rows computed for the halo are dropped.
            let lo = r0.saturating_sub(1);
            let hi = (r0 + r + 1).min(h);
            let out = self.conv.forward(&x.narrow(2, lo, hi - lo)?)?;
            out.narrow(2, r0 - lo, r)
        })
    }
}

/// A 1×1 convolution.
pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(cin, cout, 1, Conv2dConfig::default(), vb)
}

/// `SpatialNorm`: `GroupNorm(f) · conv_y(zq') + conv_b(zq')`, with `zq'` the latents
/// nearest-resized to the feature map's size.
#[derive(Debug, Clone)]
pub struct SpatialNorm {
    norm_layer: GroupNorm,
    conv_y: Conv2d,
    conv_b: Conv2d,
}

impl SpatialNorm {
    /// Loads `norm_layer`, `conv_y` and `conv_b` for `f_channels` features and `zq_channels` latents.
    pub fn new(f_channels: usize, zq_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm_layer: group_norm(
                SPATIAL_NORM_GROUPS,
                f_channels,
                MOVQ_EPS,
                vb.pp("norm_layer"),
            )?,
            conv_y: conv1x1(zq_channels, f_channels, vb.pp("conv_y"))?,
            conv_b: conv1x1(zq_channels, f_channels, vb.pp("conv_b"))?,
        })
    }

    /// Normalises `f` conditioned on the latents `zq`.
    ///
    /// `conv_y`/`conv_b` are 1×1 convolutions, which commute with nearest upsampling, so they run
    /// at the latent resolution; when `f` is an integer multiple of the latent size the result
    /// is broadcast over each s×s block instead of materialising the upsampled maps.
    pub fn forward(&self, f: &Tensor, zq: &Tensor) -> Result<Tensor> {
        self.forward_act(f, zq, false)
    }

    /// [`Self::forward`], then SiLU when `silu`. On the CPU in f32 with a whole size ratio the
    /// norm, the scale and shift and the SiLU are one pass (`kd_kernels::spatial_norm`).
    fn forward_act(&self, f: &Tensor, zq: &Tensor, silu: bool) -> Result<Tensor> {
        let y = self.conv_y.forward(zq)?;
        let bias = self.conv_b.forward(zq)?;
        if let Some(out) = self.norm_layer.fused_spatial(f, &y, &bias, silu)? {
            return Ok(out);
        }
        let out = self.spatial(f, y, bias)?;
        if silu {
            candle_nn::ops::silu(&out)
        } else {
            Ok(out)
        }
    }

    /// The unfused SpatialNorm from the 1×1 convolutions' outputs (at the latents' size).
    fn spatial(&self, f: &Tensor, y: Tensor, bias: Tensor) -> Result<Tensor> {
        let (b, c, h, w) = f.dims4()?;
        let (_, _, zh, zw) = y.dims4()?;
        let norm_f = self.norm_layer.forward(f)?;
        if (zh, zw) == (h, w) {
            return norm_f.mul(&y)?.add(&bias);
        }
        if h % zh == 0 && w % zw == 0 {
            let (sh, sw) = (h / zh, w / zw);
            let blocks = norm_f.reshape((b, c, zh, sh, zw, sw))?;
            let y = y.reshape((b, c, zh, 1, zw, 1))?;
            let bias = bias.reshape((b, c, zh, 1, zw, 1))?;
            return blocks
                .broadcast_mul(&y)?
                .broadcast_add(&bias)?
                .reshape((b, c, h, w));
        }
        // F.interpolate(mode="nearest") for a non-integer ratio.
        norm_f
            .mul(&y.upsample_nearest2d(h, w)?)?
            .add(&bias.upsample_nearest2d(h, w)?)
    }
}

/// The normalisation of a resnet or attention: plain GroupNorm (encoder) or SpatialNorm (decoder).
#[derive(Debug, Clone)]
pub enum Norm {
    /// `nn.GroupNorm(norm_num_groups, eps 1e-6)`.
    Group(GroupNorm),
    /// [`SpatialNorm`] conditioned on the latents.
    Spatial(SpatialNorm),
}

impl Norm {
    /// A GroupNorm when `zq_channels` is `None`, else a SpatialNorm.
    pub fn new(
        channels: usize,
        groups: usize,
        zq_channels: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(match zq_channels {
            None => Self::Group(group_norm(groups, channels, MOVQ_EPS, vb)?),
            Some(zc) => Self::Spatial(SpatialNorm::new(channels, zc, vb)?),
        })
    }

    /// Applies the norm; `zq` is required for the spatial variant.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        self.apply(x, zq, false)
    }

    /// `silu(self.forward(x, zq))` (the norm and SiLU in one pass on the CPU).
    pub fn forward_silu(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        self.apply(x, zq, true)
    }

    /// The norm, then SiLU when `silu`.
    fn apply(&self, x: &Tensor, zq: Option<&Tensor>, silu: bool) -> Result<Tensor> {
        match self {
            Self::Group(n) if silu => n.forward_silu(x),
            Self::Group(n) => n.forward(x),
            Self::Spatial(n) => match zq {
                Some(zq) => n.forward_act(x, zq, silu),
                None => candle_core::bail!("SpatialNorm needs the latents (zq)"),
            },
        }
    }
}

/// `ResnetBlock2D` without time embedding (encoder) or `ResnetBlockCondNorm2D` with
/// `time_embedding_norm="spatial"` (decoder): `shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))))))`.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: Norm,
    conv1: Conv3x3,
    norm2: Norm,
    conv2: Conv3x3,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    /// Loads `norm1`, `conv1`, `norm2`, `conv2` and, when the channels change, `conv_shortcut`.
    pub fn new(
        cin: usize,
        cout: usize,
        groups: usize,
        zq_channels: Option<usize>,
        band_pixels: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv_shortcut = if cin != cout {
            Some(conv1x1(cin, cout, vb.pp("conv_shortcut"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: Norm::new(cin, groups, zq_channels, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, band_pixels, vb.pp("conv1"))?,
            norm2: Norm::new(cout, groups, zq_channels, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, band_pixels, vb.pp("conv2"))?,
            conv_shortcut,
        })
    }

    /// Runs the block; `zq` conditions the spatial norms (ignored by group norms).
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>) -> Result<Tensor> {
        self.forward_stop(x, zq, &interrupt::never)
    }

    /// [`Self::forward`] asking `stop` between its norms and convolution bands.
    pub fn forward_stop(&self, x: &Tensor, zq: Option<&Tensor>, stop: Stop) -> Result<Tensor> {
        let h = self.norm1.forward_silu(x, zq)?;
        check(stop, "a MoVQ resnet norm")?;
        let h = self.conv1.forward_stop(&h, stop)?;
        let h = self.norm2.forward_silu(&h, zq)?;
        check(stop, "a MoVQ resnet norm")?;
        let h = self.conv2.forward_stop(&h, stop)?;
        match &self.conv_shortcut {
            Some(c) => c.forward(x)? + h,
            None => x + h,
        }
    }
}

/// `Downsample2D(use_conv=True, padding=0)`: zero-pad right and bottom by 1, then a stride-2 3×3 conv.
#[derive(Debug, Clone)]
pub struct Downsample {
    conv: Conv2d,
    band_pixels: usize,
}

impl Downsample {
    /// Loads `conv` (at `downsamplers.0`); `band_pixels` as for [`conv3x3`].
    pub fn new(channels: usize, band_pixels: usize, vb: VarBuilder) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        Ok(Self {
            conv: conv2d(channels, channels, 3, cfg, vb.pp("conv"))?,
            band_pixels,
        })
    }

    /// Halves the spatial size (rounding as torch does for the padded stride-2 conv), in bands
    /// of output rows, asking `stop` between them.
    pub fn forward_stop(&self, x: &Tensor, stop: Stop) -> Result<Tensor> {
        let x = x.pad_with_zeros(D::Minus1, 0, 1)?;
        let x = x.pad_with_zeros(D::Minus2, 0, 1)?;
        let (_, _, h, w) = x.dims4()?;
        // Output rows: (h − 3) / 2 + 1; output row i reads input rows 2i..2i+2.
        let (oh, ow) = ((h.saturating_sub(3)) / 2 + 1, (w.saturating_sub(3)) / 2 + 1);
        if self.band_pixels == 0 || oh * ow <= self.band_pixels || h < 3 {
            return self.conv.forward(&x);
        }
        let rows = self.band_pixels / ow;
        in_pieces(oh, rows, 2, stop, "a MoVQ down-sampler band", |r0, r| {
            self.conv.forward(&x.narrow(2, 2 * r0, 2 * r + 1)?)
        })
    }
}

/// `Upsample2D(use_conv=True)`: nearest ×2, then a 3×3 conv.
#[derive(Debug, Clone)]
pub struct Upsample {
    conv: Conv3x3,
}

impl Upsample {
    /// Loads `conv` (at `upsamplers.0`).
    pub fn new(channels: usize, band_pixels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(channels, channels, band_pixels, vb.pp("conv"))?,
        })
    }

    /// Doubles the spatial size, asking `stop` between convolution bands.
    pub fn forward_stop(&self, x: &Tensor, stop: Stop) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        self.conv
            .forward_stop(&x.upsample_nearest2d(2 * h, 2 * w)?, stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn banded_convolutions_compute_the_whole_ones() -> Result<()> {
        let dev = Device::Cpu;
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, &dev);
        let x = Tensor::randn(0f32, 1.0, (1, 4, 37, 29), &dev)?;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            Ok((d / b.sqr()?.sum_all()?.to_scalar::<f32>()?).sqrt())
        };
        let down = Downsample::new(4, 0, vb.pp("down"))?;
        let whole = down.forward_stop(&x, &interrupt::never)?;
        for band in [15, 60, 100] {
            let banded = Downsample {
                band_pixels: band,
                ..down.clone()
            };
            let asked = std::cell::Cell::new(0);
            let got = banded.forward_stop(&x, &|| {
                asked.set(asked.get() + 1);
                false
            })?;
            assert_eq!(got.dims(), whole.dims());
            assert!(rel(&got, &whole)? < 1e-6, "band {band}");
            assert!(asked.get() > 0, "band {band}: no check between bands");
        }
        let conv = conv3x3(4, 4, 0, vb.pp("conv"))?;
        let whole = conv.forward(&x)?;
        let banded = Conv3x3 {
            band_pixels: 100,
            ..conv.clone()
        };
        assert!(rel(&banded.forward(&x)?, &whole)? < 1e-6);
        Ok(())
    }
}
