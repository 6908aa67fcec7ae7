//! The Kandinsky 2.2 decoder UNet: diffusers `UNet2DConditionModel` with
//! `addition_embed_type "image"` (or `"image_hint"` for ControlNet-depth),
//! `encoder_hid_dim_type "image_proj"`, scale-shift resnets with resnet-based up/down-sampling
//! and added-KV attention.
//!
//! Source: <https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py>;
//! config: `kandinsky-community/kandinsky-2-2-decoder/unet/config.json`. The output has
//! `out_channels` (8) channels: ε in 0–3, the learned-variance value in 4–7.

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod resnet;

use crate::config::UNet2DConditionConfig;
use crate::error::{ModelError, Result};
use blocks::{AttnSpec, BlockCommon, DownBlock, MidBlock, UpBlock};
use candle_core::{DType, Module, Tensor};
use candle_nn::{conv2d, group_norm, Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use embeddings::{ImageProjection, ImageTimeEmbedding};
use std::path::Path;

/// The Kandinsky 2.2 decoder UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    add_embedding: ImageTimeEmbedding,
    encoder_hid_proj: ImageProjection,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    in_channels: usize,
    out_channels: usize,
    embed_dim: usize,
    downscale: usize,
    dtype: DType,
}

fn unsupported(field: &str, value: impl std::fmt::Debug, supported: &str) -> ModelError {
    ModelError::Unsupported {
        path: Path::new("unet/config.json").to_path_buf(),
        field: field.into(),
        value: format!("{value:?}"),
        supported: supported.into(),
    }
}

impl UNet2DConditionModel {
    /// Builds the UNet from its config and weights (diffusers key names). The weights' dtype is
    /// the `VarBuilder`'s (f32 default, f16 on request).
    pub fn new(cfg: &UNet2DConditionConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate(Path::new("unet/config.json"))?;
        let with_hint = match cfg.addition_embed_type.as_deref() {
            Some("image") => false,
            Some("image_hint") => true,
            other => {
                return Err(unsupported(
                    "addition_embed_type",
                    other,
                    "\"image\", \"image_hint\"",
                ))
            }
        };
        if cfg.encoder_hid_dim_type.as_deref() != Some("image_proj") {
            return Err(unsupported(
                "encoder_hid_dim_type",
                &cfg.encoder_hid_dim_type,
                "\"image_proj\"",
            ));
        }
        let embed_dim = cfg.encoder_hid_dim.unwrap_or_default();
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embed_dim();
        let common = BlockCommon {
            temb_channels: temb,
            groups: cfg.groups(),
            eps: cfg.norm_eps,
            output_scale_factor: cfg.resnet_out_scale_factor,
        };
        let k_in = cfg.conv_in_kernel;
        let conv_in = conv2d(
            cfg.in_channels,
            ch[0],
            k_in,
            Conv2dConfig {
                padding: (k_in - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_in"),
        )?;
        let time_proj = Timesteps::new(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift);
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], temb)?;
        let add_embedding =
            ImageTimeEmbedding::new(embed_dim, temb, with_hint, vb.pp("add_embedding"))?;
        let cross_last = cfg.cross_attention_dim.get(n - 1);
        let encoder_hid_proj = ImageProjection::new(
            embed_dim,
            cfg.cross_attention_dim.get(0),
            vb.pp("encoder_hid_proj"),
        )?;
        if (0..n).any(|i| cfg.cross_attention_dim.get(i) != cross_last) {
            return Err(unsupported(
                "cross_attention_dim",
                &cfg.cross_attention_dim,
                "one value for all blocks (image_proj makes one context)",
            ));
        }
        let attn_for = |ty: &str, i: usize| -> Result<Option<AttnSpec>> {
            Ok(match ty {
                "ResnetDownsampleBlock2D" | "ResnetUpsampleBlock2D" => None,
                "SimpleCrossAttnDownBlock2D" | "SimpleCrossAttnUpBlock2D" => Some(AttnSpec {
                    head_dim: cfg.attention_head_dim.get(i),
                    context_dim: cfg.cross_attention_dim.get(i),
                }),
                other => return Err(unsupported("block type", other, "Resnet*/SimpleCrossAttn*")),
            })
        };
        let vb_down = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(n);
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            down_blocks.push(DownBlock::new(
                cin,
                ch[i],
                cfg.layers_per_block.get(i),
                i + 1 != n,
                attn_for(ty, i)?,
                &common,
                vb_down.pp(i.to_string()),
            )?);
        }
        let mid_common = BlockCommon {
            output_scale_factor: cfg.mid_block_scale_factor,
            ..common
        };
        let mid_block = MidBlock::new(
            ch[n - 1],
            AttnSpec {
                head_dim: cfg.attention_head_dim.get(n - 1),
                context_dim: cross_last,
            },
            &mid_common,
            vb.pp("mid_block"),
        )?;
        let vb_up = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(n);
        let mut out_c = ch[n - 1];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let rev = n - 1 - i;
            let prev = out_c;
            out_c = ch[rev];
            let in_c = ch[rev.saturating_sub(1)];
            up_blocks.push(UpBlock::new(
                in_c,
                prev,
                out_c,
                cfg.layers_per_block.get(rev) + 1,
                i + 1 != n,
                attn_for(ty, rev)?,
                &common,
                vb_up.pp(i.to_string()),
            )?);
        }
        let conv_norm_out = group_norm(cfg.groups(), ch[0], cfg.norm_eps, vb.pp("conv_norm_out"))?;
        let k_out = cfg.conv_out_kernel;
        let conv_out = conv2d(
            ch[0],
            cfg.out_channels,
            k_out,
            Conv2dConfig {
                padding: (k_out - 1) / 2,
                ..Default::default()
            },
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            conv_in,
            time_proj,
            time_embedding,
            add_embedding,
            encoder_hid_proj,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            in_channels: cfg.in_channels,
            out_channels: cfg.out_channels,
            embed_dim,
            downscale: 1 << (n - 1),
            dtype: vb.dtype(),
        })
    }

    /// Channels of the `sample` argument (the config's `in_channels`, minus the 4 hint
    /// channels for a ControlNet UNet).
    pub fn sample_channels(&self) -> usize {
        if self.takes_hint() {
            self.in_channels.saturating_sub(4)
        } else {
            self.in_channels
        }
    }

    /// Output channels (8: ε and the learned-variance value).
    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// Width of the image embeddings (`encoder_hid_dim`).
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Whether `forward` needs a ControlNet hint.
    pub fn takes_hint(&self) -> bool {
        self.add_embedding.takes_hint()
    }

    /// Latent sides must be multiples of this (2^(number of down-samplers)).
    pub fn latent_multiple(&self) -> usize {
        self.downscale
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// ε/variance prediction (B, 8, H, W) for `sample` (B, C, H, W) at `timestep` (the same for
    /// the whole batch), `image_embeds` (B, embed_dim) and, for ControlNet, `hint`
    /// (B, 3, 8H, 8W). Inputs may be of any float dtype; the output has the weights' dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        image_embeds: &Tensor,
        hint: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_traced(sample, timestep, image_embeds, hint, &mut |_, _| {})
    }

    fn check_inputs(
        &self,
        sample: &Tensor,
        image_embeds: &Tensor,
        hint: Option<&Tensor>,
    ) -> Result<()> {
        let dims = sample.dims();
        let ok = dims.len() == 4
            && dims[1] == self.sample_channels()
            && dims[2].is_multiple_of(self.downscale)
            && dims[3].is_multiple_of(self.downscale)
            && dims[2] > 0
            && dims[3] > 0;
        if !ok {
            return Err(ModelError::invalid(
                "sample",
                format!(
                    "shape {dims:?}; expected (B, {}, H, W) with H and W positive multiples of {}",
                    self.sample_channels(),
                    self.downscale
                ),
            ));
        }
        let b = dims[0];
        if image_embeds.dims() != [b, self.embed_dim] {
            return Err(ModelError::invalid(
                "image_embeds",
                format!(
                    "shape {:?}; expected ({b}, {})",
                    image_embeds.dims(),
                    self.embed_dim
                ),
            ));
        }
        match (self.takes_hint(), hint) {
            (true, None) => Err(ModelError::invalid(
                "hint",
                "this ControlNet UNet requires a hint",
            )),
            (false, Some(_)) => Err(ModelError::invalid("hint", "this UNet takes no hint")),
            (true, Some(h)) if h.dims() != [b, 3, 8 * dims[2], 8 * dims[3]] => {
                Err(ModelError::invalid(
                    "hint",
                    format!(
                        "shape {:?}; expected ({b}, 3, {}, {})",
                        h.dims(),
                        8 * dims[2],
                        8 * dims[3]
                    ),
                ))
            }
            _ => Ok(()),
        }
    }

    /// [`Self::forward`], calling `trace(name, tensor)` with every diffusers submodule output
    /// (`time_embedding`, `add_embedding`, `encoder_hid_proj`, `down_blocks.i`, `mid_block`,
    /// `up_blocks.i`) for layer-by-layer debugging.
    pub fn forward_traced(
        &self,
        sample: &Tensor,
        timestep: f64,
        image_embeds: &Tensor,
        hint: Option<&Tensor>,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        self.check_inputs(sample, image_embeds, hint)?;
        let dt = self.dtype;
        let b = sample.dim(0)?;
        let dev = sample.device();
        let t = Tensor::full(timestep as f32, b, dev)?;
        let t_emb = self.time_proj.forward(&t)?.to_dtype(dt)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        trace("time_embedding", &emb);
        let image_embeds = image_embeds.to_dtype(dt)?;
        let aug = self.add_embedding.forward(&image_embeds)?;
        trace("add_embedding", &aug);
        let mut sample = sample.to_dtype(dt)?;
        if let Some(h) = hint {
            let h4 = self
                .add_embedding
                .encode_hint(&h.to_dtype(dt)?)
                .expect("checked: hint block present")?;
            trace("add_embedding.hint", &h4);
            sample = Tensor::cat(&[&sample, &h4], 1)?;
        }
        let emb = (emb + aug)?;
        let context = self.encoder_hid_proj.forward(&image_embeds)?;
        trace("encoder_hid_proj", &context);

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            h = block.forward(&h, &emb, &context, &mut skips)?;
            trace(&format!("down_blocks.{i}"), &h);
        }
        h = self.mid_block.forward(&h, &emb, &context)?;
        trace("mid_block", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward(&h, &emb, &context, &mut skips)?;
            trace(&format!("up_blocks.{i}"), &h);
        }
        let h = candle_nn::ops::silu(&self.conv_norm_out.forward(&h)?)?;
        Ok(self.conv_out.forward(&h)?)
    }
}
