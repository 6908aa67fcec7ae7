//! CLIP text tower with projection (transformers `CLIPTextModelWithProjection`), the Kandinsky 2.2
//! prompt encoder (OpenCLIP ViT-bigG/14 text tower). Paper: <https://arxiv.org/abs/2103.00020>;
//! source: `transformers/models/clip/modeling_clip.py`.
//!
//! Causal self-attention only (Kandinsky passes no attention mask). Pooling follows transformers:
//! with the legacy `eos_token_id == 2` (the real checkpoint) the pooled row is `argmax(input_ids)`,
//! i.e. the **first** `<|endoftext|>`; otherwise the first position holding `eos_token_id`.

use super::encoder::{activation_from_name, causal_mask, ln, ClipEncoder, EncoderConfig};
use crate::config::ClipTextConfig;
use crate::error::{ModelError, Result};
use candle_core::{DType, IndexOp, Module, Tensor};
use candle_nn::{embedding, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder};

/// Outputs of the text tower.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// `text_projection(pooled)`, (B, projection_dim).
    pub text_embeds: Tensor,
    /// After `final_layer_norm`, (B, L, hidden).
    pub last_hidden_state: Tensor,
    /// The input of the last encoder layer, no final norm (transformers'
    /// `hidden_states[-2]`), (B, L, hidden): what aMUSEd conditions on.
    pub penultimate_hidden_state: Tensor,
}

/// `CLIPTextModelWithProjection`.
#[derive(Debug, Clone)]
pub struct ClipTextModelWithProjection {
    token_embedding: Embedding,
    position_embedding: Embedding,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
    text_projection: Linear,
    max_positions: usize,
    vocab_size: usize,
    eos_token_id: u32,
}

impl ClipTextModelWithProjection {
    /// Loads the weights (`text_model.*`, `text_projection.weight`).
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let enc = EncoderConfig {
            hidden_size: cfg.hidden_size,
            intermediate_size: cfg.intermediate_size,
            num_heads: cfg.num_attention_heads,
            num_layers: cfg.num_hidden_layers,
            layer_norm_eps: cfg.layer_norm_eps,
            activation: activation_from_name(&cfg.hidden_act)?,
        };
        let tm = vb.pp("text_model");
        let h = cfg.hidden_size;
        Ok(Self {
            token_embedding: embedding(cfg.vocab_size, h, tm.pp("embeddings.token_embedding"))?,
            position_embedding: embedding(
                cfg.max_position_embeddings,
                h,
                tm.pp("embeddings.position_embedding"),
            )?,
            encoder: ClipEncoder::new(&enc, tm.pp("encoder"))?,
            final_layer_norm: ln(h, cfg.layer_norm_eps, tm.pp("final_layer_norm"))?,
            text_projection: linear_no_bias(h, cfg.projection_dim, vb.pp("text_projection"))?,
            max_positions: cfg.max_position_embeddings,
            vocab_size: cfg.vocab_size,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Row index pooled for each prompt (computed on the host; see the module docs).
    pub fn pooled_indices(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.eos_token_id == 2 {
                    // torch.argmax returns the first maximum.
                    let mut best = 0;
                    for (i, &v) in row.iter().enumerate() {
                        if v > row[best] {
                            best = i;
                        }
                    }
                    best
                } else {
                    row.iter()
                        .position(|&v| v == self.eos_token_id)
                        .unwrap_or(row.len().saturating_sub(1))
                }
            })
            .collect()
    }

    /// Encodes token ids (B, L) (any integer dtype) without an attention mask.
    pub fn forward(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let (b, l) = input_ids.dims2()?;
        if l == 0 || l > self.max_positions {
            return Err(ModelError::invalid(
                "input_ids",
                format!("sequence length {l}, allowed 1..={}", self.max_positions),
            ));
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let rows: Vec<Vec<u32>> = ids.to_device(&candle_core::Device::Cpu)?.to_vec2()?;
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&v| v as usize >= self.vocab_size)
        {
            return Err(ModelError::invalid(
                "input_ids",
                format!(
                    "token id {bad} is outside the vocabulary 0..{}",
                    self.vocab_size
                ),
            ));
        }
        let device = ids.device();
        let positions = Tensor::arange(0u32, l as u32, device)?;
        let x = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(l, device)?;
        let (x, penultimate_hidden_state) = self.encoder.forward_states(&x, Some(&mask))?;
        let last_hidden_state = self.final_layer_norm.forward(&x)?;
        let pooled = self
            .pooled_indices(&rows)
            .into_iter()
            .enumerate()
            .map(|(i, p)| last_hidden_state.i((i, p..p + 1)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&pooled, 0)?;
        debug_assert_eq!(pooled.dim(0)?, b);
        let text_embeds = self.text_projection.forward(&pooled)?;
        Ok(ClipTextOutput {
            text_embeds,
            last_hidden_state,
            penultimate_hidden_state,
        })
    }
}
