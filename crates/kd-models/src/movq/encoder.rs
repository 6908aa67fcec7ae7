//! MoVQ encoder: the VQGAN/LDM `Encoder` of diffusers (`models/autoencoders/vae.py`,
//! `double_z=False`) with `DownEncoderBlock2D` / `AttnDownEncoderBlock2D` and a `UNetMidBlock2D`
//! (`models/unets/unet_2d_blocks.py`). Group norms use `norm_num_groups` and eps 1e-6.

use super::attention::AttentionBlock;
use super::layers::{conv3x3, Conv3x3, Downsample, ResnetBlock, MOVQ_EPS};
use super::MovqOptions;
use crate::config::VqModelConfig;
use crate::interrupt::{self, check, Stop};
use crate::norm::{group_norm, GroupNorm};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// A down block: resnets (each followed by an attention for `AttnDownEncoderBlock2D`) and an
/// optional downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<AttentionBlock>,
    downsampler: Option<Downsample>,
}

impl DownBlock {
    fn forward(&self, mut x: Tensor, stop: Stop) -> Result<Tensor> {
        for (i, r) in self.resnets.iter().enumerate() {
            x = r.forward_stop(&x, None, stop)?;
            check(stop, "a MoVQ encoder resnet")?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, None, stop)?;
                check(stop, "a MoVQ encoder attention")?;
            }
        }
        match &self.downsampler {
            Some(d) => d.forward_stop(&x, stop),
            None => Ok(x),
        }
    }
}

/// `UNetMidBlock2D`: resnet, (attention), resnet. Shared with the decoder (spatial norms there).
#[derive(Debug, Clone)]
pub(crate) struct MidBlock {
    resnets: Vec<ResnetBlock>,
    attention: Option<AttentionBlock>,
}

impl MidBlock {
    /// Loads `resnets.0`, `attentions.0` (if `add_attention`) and `resnets.1`.
    pub(crate) fn new(
        channels: usize,
        groups: usize,
        zq_channels: Option<usize>,
        add_attention: bool,
        chunk: usize,
        band: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| {
                ResnetBlock::new(
                    channels,
                    channels,
                    groups,
                    zq_channels,
                    band,
                    vb.pp(format!("resnets.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let attention = if add_attention {
            Some(AttentionBlock::new(
                channels,
                groups,
                zq_channels,
                chunk,
                vb.pp("attentions.0"),
            )?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    pub(crate) fn attentions_mut(&mut self) -> impl Iterator<Item = &mut AttentionBlock> {
        self.attention.iter_mut()
    }

    pub(crate) fn forward(&self, x: &Tensor, zq: Option<&Tensor>, stop: Stop) -> Result<Tensor> {
        let mut x = self.resnets[0].forward_stop(x, zq, stop)?;
        check(stop, "a MoVQ mid-block resnet")?;
        if let Some(a) = &self.attention {
            x = a.forward(&x, zq, stop)?;
            check(stop, "a MoVQ mid-block attention")?;
        }
        let x = self.resnets[1].forward_stop(&x, zq, stop)?;
        check(stop, "a MoVQ mid-block resnet")?;
        Ok(x)
    }
}

/// The MoVQ encoder: image (B, in, H, W) → (B, latent_channels, H/sf, W/sf), before `quant_conv`.
#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv3x3,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv3x3,
}

impl Encoder {
    /// Builds the encoder from the `VQModel` config (weights under `encoder.`).
    pub fn new(cfg: &VqModelConfig, opts: &MovqOptions, vb: VarBuilder) -> Result<Self> {
        let (chunk, band) = (opts.attention_chunk, opts.conv_band_pixels);
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let conv_in = conv3x3(cfg.in_channels, ch[0], band, vb.pp("conv_in"))?;
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cout = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cin = cout;
            cout = ch[i];
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let with_attn = kind == "AttnDownEncoderBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(
                    rin,
                    cout,
                    groups,
                    None,
                    band,
                    vbb.pp(format!("resnets.{j}")),
                )?);
                if with_attn {
                    attentions.push(AttentionBlock::new(
                        cout,
                        groups,
                        None,
                        chunk,
                        vbb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample::new(cout, band, vbb.pp("downsamplers.0"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }
        let last = ch[ch.len() - 1];
        let mid_block = MidBlock::new(
            last,
            groups,
            None,
            cfg.mid_block_add_attention,
            chunk,
            band,
            vb.pp("mid_block"),
        )?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid_block,
            conv_norm_out: group_norm(groups, last, MOVQ_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(last, cfg.latent_channels, band, vb.pp("conv_out"))?,
        })
    }

    /// Every attention block, to change its chunk size.
    pub(crate) fn attentions_mut(&mut self) -> Vec<&mut AttentionBlock> {
        let mut v: Vec<&mut AttentionBlock> = Vec::new();
        for b in &mut self.down_blocks {
            v.extend(b.attentions.iter_mut());
        }
        v.extend(self.mid_block.attentions_mut());
        v
    }

    /// Output of the down path (after the given number of down blocks), for debugging.
    pub fn forward_down(&self, x: &Tensor, blocks: usize) -> Result<Tensor> {
        self.down(x, blocks, &interrupt::never)
    }

    fn down(&self, x: &Tensor, blocks: usize, stop: Stop) -> Result<Tensor> {
        let mut x = self.conv_in.forward_stop(x, stop)?;
        for b in self.down_blocks.iter().take(blocks) {
            x = b.forward(x, stop)?;
            check(stop, "a MoVQ encoder down-sampler")?;
        }
        Ok(x)
    }

    /// Encodes an image in [-1, 1], asking `stop` between layers.
    pub fn forward(&self, x: &Tensor, stop: Stop) -> Result<Tensor> {
        let x = self.down(x, self.down_blocks.len(), stop)?;
        let x = self.mid_block.forward(&x, None, stop)?;
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward_stop(&x, stop)
    }
}
