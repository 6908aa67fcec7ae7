//! The Kandinsky 2.1/2.2 decoder UNet: diffusers `UNet2DConditionModel` with scale-shift resnets,
//! resnet-based up/down-sampling and added-KV attention, conditioned either
//!
//! * (2.2) on image embeddings only: `addition_embed_type "image"` (or `"image_hint"` for
//!   ControlNet-depth) and `encoder_hid_dim_type "image_proj"` (32 context tokens), or
//! * (2.1) on image embeddings and M-CLIP text: `addition_embed_type "text_image"` and
//!   `encoder_hid_dim_type "text_image_proj"` (10 image tokens ⧺ the projected text hidden
//!   states, 87 tokens for 77 text tokens).
//!
//! Source: <https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py>;
//! configs: `kandinsky-community/kandinsky-2-{1,2-decoder}/unet/config.json`. The output has
//! `out_channels` (8) channels: ε in 0–3, the learned-variance value in 4–7.

pub mod attention;
pub mod blocks;
pub mod embeddings;
pub mod resnet;

use crate::config::UNet2DConditionConfig;
use crate::conv::{conv2d, Conv2d};
use crate::error::{ModelError, Result};
use crate::interrupt::{self, Stop};
use crate::norm::{group_norm, GroupNorm};
use blocks::{AttnSpec, BlockCommon, DownBlock, MidBlock, UpBlock};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use candle_transformers::models::stable_diffusion::embeddings::{TimestepEmbedding, Timesteps};
use embeddings::{
    ImageProjection, ImageTimeEmbedding, TextImageProjection, TextImageTimeEmbedding,
};
use std::path::Path;

/// The text conditioning of a Kandinsky 2.1 UNet (the M-CLIP text encoder's outputs).
#[derive(Debug, Clone, Copy)]
pub struct TextConditioning<'a> {
    /// Projected pooled text embedding (B, cross_attention_dim) (`added_cond_kwargs["text_embeds"]`).
    pub text_embeds: &'a Tensor,
    /// Text encoder last hidden states (B, L, encoder_hid_dim) (`encoder_hidden_states`).
    pub hidden_states: &'a Tensor,
}

/// The timestep of a UNet call: one for every row, or one per row.
#[derive(Debug, Clone, Copy)]
enum StepTimes<'a> {
    Shared(f64),
    PerRow(&'a [f64]),
}

/// Everything the UNet is conditioned on besides the sample and the timestep.
#[derive(Debug, Clone, Copy)]
pub struct UNetConditioning<'a> {
    /// Image embeddings (B, embed_dim) (prior output).
    pub image_embeds: &'a Tensor,
    /// Text conditioning: required by a 2.1 UNet, rejected by a 2.2 one.
    pub text: Option<TextConditioning<'a>>,
    /// ControlNet hint (B, 3, 8H, 8W): required by a ControlNet UNet, rejected otherwise.
    pub hint: Option<&'a Tensor>,
}

impl<'a> UNetConditioning<'a> {
    /// Image embeddings only (Kandinsky 2.2).
    pub fn image(image_embeds: &'a Tensor) -> Self {
        Self {
            image_embeds,
            text: None,
            hint: None,
        }
    }

    /// Adds Kandinsky 2.1 text conditioning.
    pub fn with_text(self, text_embeds: &'a Tensor, hidden_states: &'a Tensor) -> Self {
        Self {
            text: Some(TextConditioning {
                text_embeds,
                hidden_states,
            }),
            ..self
        }
    }

    /// Adds (or clears) a ControlNet hint.
    pub fn with_hint(self, hint: Option<&'a Tensor>) -> Self {
        Self { hint, ..self }
    }
}

/// The conditioning layers: `add_embedding` and `encoder_hid_proj` of one family.
#[derive(Debug)]
enum Conditioner {
    /// 2.2: `image`/`image_hint` + `image_proj`.
    Image {
        add_embedding: ImageTimeEmbedding,
        encoder_hid_proj: ImageProjection,
    },
    /// 2.1: `text_image` + `text_image_proj`; `hidden_dim` = `encoder_hid_dim`.
    TextImage {
        add_embedding: TextImageTimeEmbedding,
        encoder_hid_proj: TextImageProjection,
        hidden_dim: usize,
    },
}

/// The Kandinsky 2.1/2.2 decoder UNet.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    cond: Conditioner,
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
        let text_image = match cfg.addition_embed_type.as_deref() {
            Some("image") | Some("image_hint") => false,
            Some("text_image") => true,
            other => {
                return Err(unsupported(
                    "addition_embed_type",
                    other,
                    "\"image\", \"image_hint\", \"text_image\"",
                ))
            }
        };
        let (want_proj, desc) = if text_image {
            (
                "text_image_proj",
                "\"text_image_proj\" (with addition_embed_type \"text_image\")",
            )
        } else {
            (
                "image_proj",
                "\"image_proj\" (with addition_embed_type \"image\"/\"image_hint\")",
            )
        };
        if cfg.encoder_hid_dim_type.as_deref() != Some(want_proj) {
            return Err(unsupported(
                "encoder_hid_dim_type",
                &cfg.encoder_hid_dim_type,
                desc,
            ));
        }
        let hid_dim = cfg.encoder_hid_dim.unwrap_or_default();
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embed_dim();
        let cross = cfg.cross_attention_dim.get(0);
        // diffusers sizes the 2.1 image and pooled-text inputs by `cross_attention_dim`.
        let embed_dim = if text_image { cross } else { hid_dim };
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
        let cross_last = cfg.cross_attention_dim.get(n - 1);
        if (0..n).any(|i| cfg.cross_attention_dim.get(i) != cross_last) {
            return Err(unsupported(
                "cross_attention_dim",
                &cfg.cross_attention_dim,
                "one value for all blocks (encoder_hid_proj makes one context)",
            ));
        }
        let (vb_add, vb_hid) = (vb.pp("add_embedding"), vb.pp("encoder_hid_proj"));
        let cond = if text_image {
            Conditioner::TextImage {
                add_embedding: TextImageTimeEmbedding::new(cross, cross, temb, vb_add)?,
                encoder_hid_proj: TextImageProjection::new(hid_dim, cross, cross, vb_hid)?,
                hidden_dim: hid_dim,
            }
        } else {
            let with_hint = cfg.addition_embed_type.as_deref() == Some("image_hint");
            Conditioner::Image {
                add_embedding: ImageTimeEmbedding::new(embed_dim, temb, with_hint, vb_add)?,
                encoder_hid_proj: ImageProjection::new(embed_dim, cross, vb_hid)?,
            }
        };
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
            cond,
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

    /// Width of the image embeddings (2.2: `encoder_hid_dim`; 2.1: `cross_attention_dim`).
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Whether `forward` needs a ControlNet hint.
    pub fn takes_hint(&self) -> bool {
        match &self.cond {
            Conditioner::Image { add_embedding, .. } => add_embedding.takes_hint(),
            Conditioner::TextImage { .. } => false,
        }
    }

    /// Whether `forward` needs [`TextConditioning`] (a Kandinsky 2.1 UNet).
    pub fn takes_text(&self) -> bool {
        matches!(self.cond, Conditioner::TextImage { .. })
    }

    /// Width of the text hidden states (`encoder_hid_dim`) for a 2.1 UNet; `None` for 2.2.
    pub fn text_hidden_dim(&self) -> Option<usize> {
        match self.cond {
            Conditioner::TextImage { hidden_dim, .. } => Some(hidden_dim),
            Conditioner::Image { .. } => None,
        }
    }

    /// Width of the pooled text embeddings (`cross_attention_dim`) for a 2.1 UNet; `None` for 2.2.
    pub fn text_embed_dim(&self) -> Option<usize> {
        self.takes_text().then_some(self.embed_dim)
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
    /// the whole batch) under `cond` (image embeddings (B, embed_dim); for 2.1 the text
    /// conditioning; for ControlNet the hint (B, 3, 8H, 8W)). Inputs may be of any float dtype;
    /// the output has the weights' dtype.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
    ) -> Result<Tensor> {
        self.forward_traced(sample, timestep, cond, &mut |_, _| {})
    }

    /// [`Self::forward`] that asks `stop` between layers (every resnet, attention and
    /// re-sampler): [`crate::ModelError::Interrupted`] when it says stop.
    pub fn forward_interruptible(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        stop: Stop,
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            StepTimes::Shared(timestep),
            cond,
            &mut |_, _| {},
            stop,
        )
    }

    /// [`Self::forward_interruptible`] with one timestep per row of `sample` (`timesteps.len()`
    /// = B): rows of different requests at different steps of their schedules share one call,
    /// each row computing what it would alone (the time embedding is per row).
    pub fn forward_rows(
        &self,
        sample: &Tensor,
        timesteps: &[f64],
        cond: &UNetConditioning,
        stop: Stop,
    ) -> Result<Tensor> {
        let b = sample.dim(0)?;
        if timesteps.len() != b {
            return Err(crate::ModelError::invalid(
                "timesteps",
                format!(
                    "{} timesteps for {b} rows; give one per row",
                    timesteps.len()
                ),
            ));
        }
        self.forward_with(
            sample,
            StepTimes::PerRow(timesteps),
            cond,
            &mut |_, _| {},
            stop,
        )
    }

    fn check_inputs(&self, sample: &Tensor, cond: &UNetConditioning) -> Result<()> {
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
        let image_embeds = cond.image_embeds;
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
        self.check_text(b, cond.text)?;
        match (self.takes_hint(), cond.hint) {
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

    fn check_text(&self, b: usize, text: Option<TextConditioning>) -> Result<()> {
        let hidden_dim = match (self.text_hidden_dim(), text) {
            (None, None) => return Ok(()),
            (None, Some(_)) => {
                return Err(ModelError::invalid(
                    "text",
                    "this Kandinsky 2.2 UNet is conditioned on image embeddings only; expected no text conditioning",
                ))
            }
            (Some(h), None) => {
                return Err(ModelError::invalid(
                    "text",
                    format!(
                        "missing; this Kandinsky 2.1 UNet requires text_embeds ({b}, {}) and hidden_states ({b}, L, {h})",
                        self.embed_dim
                    ),
                ))
            }
            (Some(h), Some(_)) => h,
        };
        let t = text.expect("matched Some above");
        if t.text_embeds.dims() != [b, self.embed_dim] {
            return Err(ModelError::invalid(
                "text_embeds",
                format!(
                    "shape {:?}; expected ({b}, {})",
                    t.text_embeds.dims(),
                    self.embed_dim
                ),
            ));
        }
        let hd = t.hidden_states.dims();
        if hd.len() != 3 || hd[0] != b || hd[1] == 0 || hd[2] != hidden_dim {
            return Err(ModelError::invalid(
                "text_hidden_states",
                format!("shape {hd:?}; expected ({b}, L, {hidden_dim}) with L ≥ 1"),
            ));
        }
        Ok(())
    }

    /// [`Self::forward`], calling `trace(name, tensor)` with every diffusers submodule output
    /// (`time_embedding`, `add_embedding`, `encoder_hid_proj`, `down_blocks.i`, `mid_block`,
    /// `up_blocks.i`) for layer-by-layer debugging.
    pub fn forward_traced(
        &self,
        sample: &Tensor,
        timestep: f64,
        cond: &UNetConditioning,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        self.forward_with(
            sample,
            StepTimes::Shared(timestep),
            cond,
            trace,
            &interrupt::never,
        )
    }

    fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: StepTimes,
        cond: &UNetConditioning,
        trace: &mut dyn FnMut(&str, &Tensor),
        stop: Stop,
    ) -> Result<Tensor> {
        self.check_inputs(sample, cond)?;
        let dt = self.dtype;
        let b = sample.dim(0)?;
        let dev = sample.device();
        let t = match timesteps {
            StepTimes::Shared(t) => Tensor::full(t as f32, b, dev)?,
            StepTimes::PerRow(ts) => {
                Tensor::from_vec(ts.iter().map(|&t| t as f32).collect(), b, dev)?
            }
        };
        let t_emb = self.time_proj.forward(&t)?.to_dtype(dt)?;
        let emb = self.time_embedding.forward(&t_emb)?;
        trace("time_embedding", &emb);
        let image_embeds = cond.image_embeds.to_dtype(dt)?;
        let mut sample = sample.to_dtype(dt)?;
        let (aug, context) = match &self.cond {
            Conditioner::Image {
                add_embedding,
                encoder_hid_proj,
            } => {
                let aug = add_embedding.forward(&image_embeds)?;
                trace("add_embedding", &aug);
                if let Some(h) = cond.hint {
                    let h4 = add_embedding
                        .encode_hint(&h.to_dtype(dt)?)
                        .expect("checked: hint block present")?;
                    trace("add_embedding.hint", &h4);
                    sample = Tensor::cat(&[&sample, &h4], 1)?;
                }
                (aug, encoder_hid_proj.forward(&image_embeds)?)
            }
            Conditioner::TextImage {
                add_embedding,
                encoder_hid_proj,
                ..
            } => {
                let text = cond.text.expect("checked: text present");
                let text_embeds = text.text_embeds.to_dtype(dt)?;
                let hidden = text.hidden_states.to_dtype(dt)?;
                let aug = add_embedding.forward(&text_embeds, &image_embeds)?;
                trace("add_embedding", &aug);
                (aug, encoder_hid_proj.forward(&hidden, &image_embeds)?)
            }
        };
        let emb = (emb + aug)?;
        trace("encoder_hid_proj", &context);

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            h = block.forward(&h, &emb, &context, &mut skips, stop)?;
            trace(&format!("down_blocks.{i}"), &h);
        }
        h = self.mid_block.forward(&h, &emb, &context, stop)?;
        trace("mid_block", &h);
        for (i, block) in self.up_blocks.iter().enumerate() {
            h = block.forward(&h, &emb, &context, &mut skips, stop)?;
            trace(&format!("up_blocks.{i}"), &h);
        }
        let h = self.conv_norm_out.forward_silu(&h)?;
        Ok(self.conv_out.forward(&h)?)
    }
}
