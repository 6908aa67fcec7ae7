//! CLIP vision tower with projection (transformers `CLIPVisionModelWithProjection`), the
//! Kandinsky 2.2 image encoder (OpenCLIP ViT-bigG/14 vision tower). Paper:
//! <https://arxiv.org/abs/2103.00020>; source: `transformers/models/clip/modeling_clip.py`.
//!
//! Patch conv (no bias) → `[CLS; patches]` + positions → `pre_layrnorm` (sic) → encoder (no mask)
//! → `post_layernorm` on CLS → `visual_projection` (no bias).

use super::encoder::{activation_from_name, ln, ClipEncoder, EncoderConfig};
use crate::config::ClipVisionConfig;
use crate::error::{ModelError, Result};
use candle_core::{IndexOp, Module, Tensor};
use candle_nn::{
    conv2d_no_bias, embedding, linear_no_bias, Conv2d, Conv2dConfig, Embedding, LayerNorm, Linear,
    VarBuilder,
};

/// Outputs of the vision tower.
#[derive(Debug, Clone)]
pub struct ClipVisionOutput {
    /// `visual_projection(post_layernorm(CLS))`, (B, projection_dim).
    pub image_embeds: Tensor,
    /// Encoder output before `post_layernorm`, (B, 1 + patches, hidden).
    pub last_hidden_state: Tensor,
}

/// `CLIPVisionModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipVisionModelWithProjection {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Embedding,
    pre_layrnorm: LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    num_channels: usize,
    image_size: usize,
    num_positions: usize,
}

impl ClipVisionModelWithProjection {
    /// Loads the weights (`vision_model.*`, `visual_projection.weight`).
    pub fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let enc = EncoderConfig {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_heads: cfg.num_attention_heads,
            num_layers: cfg.num_hidden_layers,
            layer_norm_eps: cfg.layer_norm_eps,
            activation: activation_from_name(&cfg.hidden_act)?,
        };
        let vm = vb.pp("vision_model");
        let h = cfg.hidden_size;
        let patches = (cfg.image_size / cfg.patch_size).pow(2);
        let emb = vm.pp("embeddings");
        Ok(Self {
            patch_embedding: conv2d_no_bias(
                cfg.num_channels,
                h,
                cfg.patch_size,
                Conv2dConfig {
                    stride: cfg.patch_size,
                    ..Default::default()
                },
                emb.pp("patch_embedding"),
            )?,
            class_embedding: emb.get(h, "class_embedding")?,
            position_embedding: embedding(patches + 1, h, emb.pp("position_embedding"))?,
            pre_layrnorm: ln(h, cfg.layer_norm_eps, vm.pp("pre_layrnorm"))?,
            encoder: ClipEncoder::new(&enc, vm.pp("encoder"))?,
            post_layernorm: ln(h, cfg.layer_norm_eps, vm.pp("post_layernorm"))?,
            visual_projection: linear_no_bias(h, cfg.projection_dim, vb.pp("visual_projection"))?,
            num_channels: cfg.num_channels,
            image_size: cfg.image_size,
            num_positions: patches + 1,
        })
    }

    /// The expected `pixel_values` shape without the batch: (C, size, size).
    pub fn input_shape(&self) -> (usize, usize, usize) {
        (self.num_channels, self.image_size, self.image_size)
    }

    /// Encodes preprocessed `pixel_values` (B, C, size, size) (any float dtype).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let (c, s, _) = self.input_shape();
        let dims = pixel_values.dims();
        if dims.len() != 4 || dims[1] != c || dims[2] != s || dims[3] != s || dims[0] == 0 {
            return Err(ModelError::invalid(
                "pixel_values",
                format!("shape {dims:?}, expected (B ≥ 1, {c}, {s}, {s})"),
            ));
        }
        let b = dims[0];
        let dtype = self.class_embedding.dtype();
        let x = pixel_values.to_dtype(dtype)?;
        let patches = self
            .patch_embedding
            .forward(&x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let h = self.class_embedding.dim(0)?;
        let cls = self.class_embedding.reshape((1, 1, h))?.repeat((b, 1, 1))?;
        let x = Tensor::cat(&[cls, patches], 1)?;
        let positions = Tensor::arange(0u32, self.num_positions as u32, x.device())?;
        let x = x.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let x = self.pre_layrnorm.forward(&x)?;
        let last_hidden_state = self.encoder.forward(&x, None)?;
        let cls = self
            .post_layernorm
            .forward(&last_hidden_state.i((.., 0))?)?;
        let image_embeds = self.visual_projection.forward(&cls)?;
        Ok(ClipVisionOutput {
            image_embeds,
            last_hidden_state,
        })
    }
}
