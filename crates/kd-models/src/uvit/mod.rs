//! `UVit2DModel` (diffusers `models/unets/uvit_2d.py`), the masked-token transformer of aMUSEd
//! (<https://arxiv.org/abs/2401.01808>): given a grid of VQ token ids, some of them the mask
//! token, it predicts logits over the codebook for every position.
//!
//! Data flow (channels-last inside, see [`blocks`]):
//!
//! 1. `encoder_proj` + RMS norm on the text encoder hidden states (B, L, encoder_hidden_size);
//! 2. the conditioning vector `cond_embed([pooled_text_emb, sinusoid(micro_conds)])`
//!    (`TimestepEmbedding`: linear, SiLU, linear), the sinusoid being diffusers'
//!    `get_timestep_embedding(·, micro_cond_encode_dim, flip_sin_to_cos=True, shift=0)` of each of
//!    the 5 micro-conditioning values;
//! 3. `embed` (token embedding, RMS norm, 1×1 conv), `down_block` (optional 2× downsample,
//!    ConvNeXt + cross-attention blocks);
//! 4. `project_to_hidden`, `num_hidden_layers` ada-norm transformer layers, `project_from_hidden`;
//! 5. `up_block` (ConvNeXt + cross-attention blocks, optional 2× upsample), `mlm_layer`.
//!
//! The whole pass runs in the weights' dtype (norm statistics and attention softmax in f32); the
//! logits come back in f32.

pub mod blocks;
pub mod layers;

use crate::checkpoint::{ComponentDir, Variant};
use crate::config::{UVit2DConfig, MICRO_CONDS};
use crate::error::{ModelError, Result};
use crate::interrupt::{check, Stop};
use crate::prior::transformer::timestep_features;
use blocks::{BlockDims, ConvEmbed, MlmLayer, TransformerLayer, UVitBlock};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{linear_b, Linear, VarBuilder};
use layers::RmsNorm;
use std::path::Path;

/// Names of the intermediates [`UVit2DModel::forward_traced`] reports, in order.
pub const TRACE_POINTS: [&str; 4] = ["cond", "embed", "down", "transformer"];

/// aMUSEd's `UVit2DModel`.
#[derive(Debug, Clone)]
pub struct UVit2DModel {
    encoder_proj: Linear,
    encoder_proj_layer_norm: RmsNorm,
    embed: ConvEmbed,
    cond_embed_1: Linear,
    cond_embed_2: Linear,
    down_block: UVitBlock,
    project_to_hidden_norm: RmsNorm,
    project_to_hidden: Linear,
    transformer_layers: Vec<TransformerLayer>,
    project_from_hidden_norm: RmsNorm,
    project_from_hidden: Linear,
    up_block: UVitBlock,
    mlm_layer: MlmLayer,
    cfg: UVit2DConfig,
    dtype: DType,
    device: Device,
}

impl UVit2DModel {
    /// Builds the model from its config (validated here too) and weights with diffusers' key
    /// names; runs in the `VarBuilder`'s dtype on its device.
    pub fn new(cfg: &UVit2DConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate(Path::new("transformer/config.json"))?;
        let d = BlockDims {
            channels: cfg.block_out_channels,
            hidden_size: cfg.hidden_size,
            bias: cfg.use_bias,
            eps: cfg.layer_norm_eps,
            affine: cfg.ln_elementwise_affine,
        };
        let hidden = cfg.hidden_size;
        let channels = cfg.block_out_channels;
        let (eps, affine, bias) = (d.eps, d.affine, d.bias);
        let cond_in = cfg.micro_cond_embed_dim + cfg.cond_embed_dim;
        let transformer_layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                TransformerLayer::new(
                    hidden,
                    cfg.num_attention_heads,
                    cfg.intermediate_size,
                    bias,
                    eps,
                    affine,
                    vb.pp(format!("transformer_layers.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let heads = cfg.block_num_heads;
        let res = cfg.num_res_blocks;
        Ok(Self {
            encoder_proj: linear_b(cfg.encoder_hidden_size, hidden, bias, vb.pp("encoder_proj"))?,
            encoder_proj_layer_norm: RmsNorm::new(
                hidden,
                eps,
                affine,
                vb.pp("encoder_proj_layer_norm"),
            )?,
            embed: ConvEmbed::new(cfg.vocab_size, cfg.in_channels, d, vb.pp("embed"))?,
            cond_embed_1: linear_b(cond_in, hidden, bias, vb.pp("cond_embed.linear_1"))?,
            cond_embed_2: linear_b(hidden, hidden, bias, vb.pp("cond_embed.linear_2"))?,
            down_block: UVitBlock::new(d, res, heads, cfg.downsample, false, vb.pp("down_block"))?,
            project_to_hidden_norm: RmsNorm::new(
                channels,
                eps,
                affine,
                vb.pp("project_to_hidden_norm"),
            )?,
            project_to_hidden: linear_b(channels, hidden, bias, vb.pp("project_to_hidden"))?,
            transformer_layers,
            project_from_hidden_norm: RmsNorm::new(
                hidden,
                eps,
                affine,
                vb.pp("project_from_hidden_norm"),
            )?,
            project_from_hidden: linear_b(hidden, channels, bias, vb.pp("project_from_hidden"))?,
            up_block: UVitBlock::new(d, res, heads, false, cfg.upsample, vb.pp("up_block"))?,
            mlm_layer: MlmLayer::new(cfg.in_channels, cfg.codebook_size, d, vb.pp("mlm_layer"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads the `transformer` component of an aMUSEd checkpoint folder in `dtype` on `device`.
    pub fn load(component: &ComponentDir, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = component.uvit_config()?;
        let vb = component
            .weights(Variant::Default)?
            .var_builder(dtype, device);
        Self::new(&cfg, vb)
    }

    /// The model's config.
    pub fn config(&self) -> &UVit2DConfig {
        &self.cfg
    }

    /// The weights' dtype (the dtype the pass runs in).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Predicts the codebook logits of every token position.
    ///
    /// * `input_ids` (B, h, w) token ids, u32 or i64, each below `vocab_size` (the mask token is
    ///   one of them); h and w even when the model down/upsamples;
    /// * `encoder_hidden_states` (B, L, encoder_hidden_size), any float dtype;
    /// * `pooled_text_emb` (B, cond_embed_dim);
    /// * `micro_conds` (B, 5): original width, height, crop top, crop left, aesthetic score.
    ///
    /// Returns f32 logits (B, codebook_size, h, w). `stop` is asked before every ConvNeXt block
    /// and every transformer layer.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_text_emb: &Tensor,
        micro_conds: &Tensor,
        stop: Stop,
    ) -> Result<Tensor> {
        self.forward_traced(
            input_ids,
            encoder_hidden_states,
            pooled_text_emb,
            micro_conds,
            stop,
            &mut |_, _| {},
        )
    }

    /// [`Self::forward`], also handing `trace` the intermediates named in [`TRACE_POINTS`]
    /// (in the weights' dtype): `cond` (B, hidden_size), the output of `cond_embed`; `embed`,
    /// `down` and `transformer` (the up block's input) as (B, block_out_channels, h', w').
    pub fn forward_traced(
        &self,
        input_ids: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_text_emb: &Tensor,
        micro_conds: &Tensor,
        stop: Stop,
        trace: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Tensor> {
        let b = self.check_inputs(
            input_ids,
            encoder_hidden_states,
            pooled_text_emb,
            micro_conds,
        )?;
        let dtype = self.dtype;
        let nchw = |t: &Tensor| t.permute((0, 3, 1, 2));

        let ehs = self
            .encoder_proj
            .forward(&encoder_hidden_states.to_dtype(dtype)?)?;
        let ehs = self.encoder_proj_layer_norm.forward(&ehs)?;

        let values = micro_conds
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(v) = values.iter().find(|v| !v.is_finite()) {
            return Err(ModelError::invalid(
                "micro_conds",
                format!("holds a non-finite value ({v})"),
            ));
        }
        let micro = timestep_features(&values, self.cfg.micro_cond_encode_dim, &self.device)?
            .reshape((b, ()))?;
        let pooled =
            Tensor::cat(&[&pooled_text_emb.to_dtype(DType::F32)?, &micro], 1)?.to_dtype(dtype)?;
        let cond = self.cond_embed_1.forward(&pooled)?;
        let cond = self.cond_embed_2.forward(&candle_nn::ops::silu(&cond)?)?;
        trace("cond", &cond);

        let x = self.embed.forward(input_ids)?;
        trace("embed", &nchw(&x)?);
        let x = self
            .down_block
            .forward(&x, &cond, &ehs, stop, "a UVit down block")?;
        trace("down", &nchw(&x)?);

        let (_, h, w, c) = x.dims4()?;
        let x = x.reshape((b, h * w, c))?;
        let mut x = self
            .project_to_hidden
            .forward(&self.project_to_hidden_norm.forward(&x)?)?;
        for layer in &self.transformer_layers {
            check(stop, "a UVit transformer layer")?;
            x = layer.forward(&x, &ehs, &cond)?;
        }
        let x = self
            .project_from_hidden
            .forward(&self.project_from_hidden_norm.forward(&x)?)?
            .reshape((b, h, w, c))?;
        trace("transformer", &nchw(&x)?);

        let x = self
            .up_block
            .forward(&x, &cond, &ehs, stop, "a UVit up block")?;
        check(stop, "the UVit output layer")?;
        let logits = self.mlm_layer.forward(&x)?.to_dtype(DType::F32)?;
        Ok(nchw(&logits)?.contiguous()?)
    }

    /// Checks shapes, dtypes, devices and token ids; returns the batch size.
    fn check_inputs(
        &self,
        input_ids: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_text_emb: &Tensor,
        micro_conds: &Tensor,
    ) -> Result<usize> {
        let cfg = &self.cfg;
        for (name, t) in [
            ("input_ids", input_ids),
            ("encoder_hidden_states", encoder_hidden_states),
            ("pooled_text_emb", pooled_text_emb),
            ("micro_conds", micro_conds),
        ] {
            if !t.device().same_device(&self.device) {
                return Err(ModelError::invalid(
                    name,
                    format!(
                        "is on {:?}, the model on {:?}",
                        t.device().location(),
                        self.device.location()
                    ),
                ));
            }
            if name != "input_ids" && !t.dtype().is_float() {
                return Err(ModelError::invalid(
                    name,
                    format!("has dtype {:?}, expected a float dtype", t.dtype()),
                ));
            }
        }

        let (b, h, w) = match *input_ids.dims() {
            [b, h, w] if b > 0 && h > 0 && w > 0 => (b, h, w),
            _ => {
                return Err(ModelError::invalid(
                    "input_ids",
                    format!(
                        "shape {:?}, expected (batch, height, width), all non-zero",
                        input_ids.dims()
                    ),
                ))
            }
        };
        if cfg.downsample && (h % 2 != 0 || w % 2 != 0) {
            return Err(ModelError::invalid(
                "input_ids",
                format!("grid {h}×{w}: height and width must be even (the model downsamples by 2)"),
            ));
        }
        let vocab = cfg.vocab_size;
        let flat = input_ids.flatten_all()?;
        let (min, max) = match input_ids.dtype() {
            DType::U32 => (0, i64::from(flat.max(0)?.to_scalar::<u32>()?)),
            DType::I64 => (
                flat.min(0)?.to_scalar::<i64>()?,
                flat.max(0)?.to_scalar::<i64>()?,
            ),
            other => {
                return Err(ModelError::invalid(
                    "input_ids",
                    format!("has dtype {other:?}, expected u32 or i64"),
                ))
            }
        };
        if min < 0 || max >= vocab as i64 {
            let bad = if min < 0 { min } else { max };
            return Err(ModelError::invalid(
                "input_ids",
                format!("holds token id {bad}, outside the vocabulary 0..{vocab}"),
            ));
        }

        let expect = |name: &'static str, t: &Tensor, want: &[usize], what: &str| {
            if t.dims() == want {
                Ok(())
            } else {
                Err(ModelError::invalid(
                    name,
                    format!("shape {:?}, expected {what} = {want:?}", t.dims()),
                ))
            }
        };
        let ehs_ok = matches!(
            *encoder_hidden_states.dims(),
            [eb, l, e] if eb == b && l > 0 && e == cfg.encoder_hidden_size
        );
        if !ehs_ok {
            let want = format!("({b}, L ≥ 1, {})", cfg.encoder_hidden_size);
            return Err(ModelError::invalid(
                "encoder_hidden_states",
                format!(
                    "shape {:?}, expected (batch, tokens, encoder_hidden_size) = {want}",
                    encoder_hidden_states.dims()
                ),
            ));
        }
        expect(
            "pooled_text_emb",
            pooled_text_emb,
            &[b, cfg.cond_embed_dim],
            "(batch, cond_embed_dim)",
        )?;
        expect("micro_conds", micro_conds, &[b, MICRO_CONDS], "(batch, 5)")?;
        Ok(b)
    }
}
