//! The UNet blocks of the Kandinsky 2.2 decoder (diffusers `models/unets/unet_2d_blocks.py`):
//! `ResnetDownsampleBlock2D` / `SimpleCrossAttnDownBlock2D` ([`DownBlock`]),
//! `ResnetUpsampleBlock2D` / `SimpleCrossAttnUpBlock2D` ([`UpBlock`]) and
//! `UNetMidBlock2DSimpleCrossAttn` ([`MidBlock`]). The samplers are resnets (see
//! [`super::resnet`]).

use super::attention::{AttnAddedKv, AttnAddedKvConfig};
use super::resnet::{Resample, ResnetBlock2D, ResnetConfig};
use crate::interrupt::{check, Stop};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// Parameters shared by every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    /// Time-embedding width.
    pub temb_channels: usize,
    /// Group-norm groups.
    pub groups: usize,
    /// Group-norm epsilon.
    pub eps: f64,
    /// Resnet output scale factor.
    pub output_scale_factor: f64,
}

impl BlockCommon {
    fn resnet(&self, cin: usize, cout: usize, resample: Resample) -> ResnetConfig {
        ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: self.temb_channels,
            groups: self.groups,
            eps: self.eps,
            output_scale_factor: self.output_scale_factor,
            resample,
        }
    }

    fn attn(&self, channels: usize, head_dim: usize, context_dim: usize) -> AttnAddedKvConfig {
        AttnAddedKvConfig {
            channels,
            heads: channels / head_dim,
            context_dim,
            groups: self.groups,
            eps: self.eps,
        }
    }
}

/// Attention settings of a Simple-cross-attn block (`None` for the plain resnet blocks).
#[derive(Debug, Clone, Copy)]
pub struct AttnSpec {
    /// `attention_head_dim` (heads = channels / head_dim).
    pub head_dim: usize,
    /// `cross_attention_dim` (width of the context tokens).
    pub context_dim: usize,
}

fn load_attns(
    n: usize,
    channels: usize,
    attn: Option<AttnSpec>,
    common: &BlockCommon,
    vb: &VarBuilder,
) -> Result<Vec<AttnAddedKv>> {
    match attn {
        None => Ok(Vec::new()),
        Some(a) => (0..n)
            .map(|i| {
                AttnAddedKv::new(
                    common.attn(channels, a.head_dim, a.context_dim),
                    vb.pp("attentions").pp(i.to_string()),
                )
            })
            .collect(),
    }
}

/// A down block: `layers` × (resnet [+ attention]), then an optional resnet down-sampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttnAddedKv>,
    downsampler: Option<ResnetBlock2D>,
}

impl DownBlock {
    /// Loads `resnets.*`, `attentions.*` (if `attn`) and `downsamplers.0` (if `add_downsample`).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        add_downsample: bool,
        attn: Option<AttnSpec>,
        common: &BlockCommon,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let cin = if i == 0 { in_channels } else { out_channels };
                ResnetBlock2D::new(
                    common.resnet(cin, out_channels, Resample::None),
                    vb.pp("resnets").pp(i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attns(layers, out_channels, attn, common, &vb)?;
        let downsampler = if add_downsample {
            Some(ResnetBlock2D::new(
                common.resnet(out_channels, out_channels, Resample::Down),
                vb.pp("downsamplers").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block output and pushes every skip state onto `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        stop: Stop,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb)?;
            check(stop, "a UNet down-block resnet")?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, stop)?;
                check(stop, "a UNet down-block attention")?;
            }
            skips.push(h.clone());
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(&h, temb)?;
            check(stop, "a UNet down-sampler")?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// An up block: `layers` × (concat skip, resnet [+ attention]), then an optional resnet
/// up-sampler.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttnAddedKv>,
    upsampler: Option<ResnetBlock2D>,
}

impl UpBlock {
    /// Loads the block; channel bookkeeping follows diffusers `get_up_block`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_channels: usize,
        prev_output_channels: usize,
        out_channels: usize,
        layers: usize,
        add_upsample: bool,
        attn: Option<AttnSpec>,
        common: &BlockCommon,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..layers)
            .map(|i| {
                let skip = if i == layers - 1 {
                    in_channels
                } else {
                    out_channels
                };
                let cin = if i == 0 {
                    prev_output_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    common.resnet(cin + skip, out_channels, Resample::None),
                    vb.pp("resnets").pp(i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attns(layers, out_channels, attn, common, &vb)?;
        let upsampler = if add_upsample {
            Some(ResnetBlock2D::new(
                common.resnet(out_channels, out_channels, Resample::Up),
                vb.pp("upsamplers").pp("0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Number of skip states this block consumes.
    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Pops one skip per resnet from the end of `skips`.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
        stop: Stop,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip stack underflow".into()))?;
            h = Tensor::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, temb)?;
            check(stop, "a UNet up-block resnet")?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context, stop)?;
                check(stop, "a UNet up-block attention")?;
            }
        }
        if let Some(u) = &self.upsampler {
            h = u.forward(&h, temb)?;
            check(stop, "a UNet up-sampler")?;
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DSimpleCrossAttn` (one layer): resnet, attention, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<AttnAddedKv>,
}

impl MidBlock {
    /// Loads `resnets.{0,1}` and `attentions.0`.
    pub fn new(
        channels: usize,
        attn: AttnSpec,
        common: &BlockCommon,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                ResnetBlock2D::new(
                    common.resnet(channels, channels, Resample::None),
                    vb.pp("resnets").pp(i.to_string()),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attns(1, channels, Some(attn), common, &vb)?;
        Ok(Self {
            resnets,
            attentions,
        })
    }

    /// (B, C, H, W) → (B, C, H, W).
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        stop: Stop,
    ) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, temb)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            check(stop, "the UNet mid-block resnet")?;
            h = attn.forward(&h, context, stop)?;
            check(stop, "the UNet mid-block attention")?;
            h = resnet.forward(&h, temb)?;
        }
        Ok(h)
    }
}
