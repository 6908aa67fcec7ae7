//! The VQ decoder: diffusers `Decoder` (`models/autoencoders/vae.py`). With `norm_type="spatial"`
//! (MoVQ) every norm is a [`SpatialNorm`] conditioned on the (pre-`post_quant_conv`) latents and
//! the resnets are `ResnetBlockCondNorm2D`; with `norm_type="group"` (aMUSEd's VQ-GAN) every norm
//! is a GroupNorm. Blocks are `UNetMidBlock2D`, `AttnUpDecoderBlock2D` and `UpDecoderBlock2D`.

use super::attention::AttentionBlock;
use super::encoder::MidBlock;
use super::layers::{conv3x3, Conv3x3, Norm, ResnetBlock, Upsample};
use super::MovqOptions;
use crate::config::VqModelConfig;
use crate::interrupt::{self, check, Stop};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

/// An up block: `layers_per_block + 1` resnets (each followed by an attention for
/// `AttnUpDecoderBlock2D`) and an optional upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<AttentionBlock>,
    upsampler: Option<Upsample>,
}

impl UpBlock {
    fn forward(&self, mut x: Tensor, zq: Option<&Tensor>, stop: Stop) -> Result<Tensor> {
        for (i, r) in self.resnets.iter().enumerate() {
            x = r.forward_stop(&x, zq, stop)?;
            check(stop, "a MoVQ decoder resnet")?;
            if let Some(a) = self.attentions.get(i) {
                x = a.forward(&x, zq, stop)?;
                check(stop, "a MoVQ decoder attention")?;
            }
        }
        match &self.upsampler {
            Some(u) => u.forward_stop(&x, stop),
            None => Ok(x),
        }
    }
}

/// The MoVQ decoder: latents (B, latent_channels, h, w) → image (B, out, h·sf, w·sf).
#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv3x3,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: Norm,
    conv_out: Conv3x3,
}

impl Decoder {
    /// Builds the decoder from the `VQModel` config (weights under `decoder.`).
    pub fn new(cfg: &VqModelConfig, opts: &MovqOptions, vb: VarBuilder) -> Result<Self> {
        let (chunk, band) = (opts.attention_chunk, opts.conv_band_pixels);
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        // Spatial norms are conditioned on the latents; group norms on nothing.
        let zc = (cfg.norm_type == "spatial").then_some(cfg.latent_channels);
        let last = ch[ch.len() - 1];
        let conv_in = conv3x3(cfg.latent_channels, last, band, vb.pp("conv_in"))?;
        let mid_block = MidBlock::new(
            last,
            groups,
            zc,
            cfg.mid_block_add_attention,
            chunk,
            band,
            vb.pp("mid_block"),
        )?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(ch.len());
        let mut cout = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let cin = cout;
            cout = rev[i];
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let with_attn = kind == "AttnUpDecoderBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock::new(
                    rin,
                    cout,
                    groups,
                    zc,
                    band,
                    vbb.pp(format!("resnets.{j}")),
                )?);
                if with_attn {
                    attentions.push(AttentionBlock::new(
                        cout,
                        groups,
                        zc,
                        chunk,
                        vbb.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let upsampler = if i + 1 < ch.len() {
                Some(Upsample::new(cout, band, vbb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }
        Ok(Self {
            conv_in,
            mid_block,
            up_blocks,
            conv_norm_out: Norm::new(ch[0], groups, zc, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(ch[0], cfg.out_channels, band, vb.pp("conv_out"))?,
        })
    }

    /// Every attention block, to change its chunk size.
    pub(crate) fn attentions_mut(&mut self) -> Vec<&mut AttentionBlock> {
        let mut v: Vec<&mut AttentionBlock> = self.mid_block.attentions_mut().collect();
        for b in &mut self.up_blocks {
            v.extend(b.attentions.iter_mut());
        }
        v
    }

    /// Output after `conv_in`, the mid block and the first `up_blocks` up blocks (debugging).
    pub fn forward_partial(
        &self,
        x: &Tensor,
        zq: Option<&Tensor>,
        up_blocks: usize,
    ) -> Result<Tensor> {
        self.partial(x, zq, up_blocks, &interrupt::never)
    }

    fn partial(
        &self,
        x: &Tensor,
        zq: Option<&Tensor>,
        up_blocks: usize,
        stop: Stop,
    ) -> Result<Tensor> {
        let x = self.conv_in.forward_stop(x, stop)?;
        let mut x = self.mid_block.forward(&x, zq, stop)?;
        for b in self.up_blocks.iter().take(up_blocks) {
            check(stop, "a MoVQ decoder up-sampler")?;
            x = b.forward(x, zq, stop)?;
        }
        check(stop, "the last MoVQ decoder up block")?;
        Ok(x)
    }

    /// Decodes `x` (the `post_quant_conv` output) conditioned on the raw latents `zq` (spatial
    /// norms; `None` for group norms), asking `stop` between layers.
    pub fn forward(&self, x: &Tensor, zq: Option<&Tensor>, stop: Stop) -> Result<Tensor> {
        let x = self.partial(x, zq, self.up_blocks.len(), stop)?;
        let x = self.conv_norm_out.forward_silu(&x, zq)?;
        check(stop, "the MoVQ decoder's output norm")?;
        self.conv_out.forward_stop(&x, stop)
    }
}
