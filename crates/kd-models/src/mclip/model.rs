//! diffusers `MultilingualCLIP` (`pipelines/kandinsky/text_encoder.py`), the Kandinsky 2.1 decoder
//! text encoder: an XLM-RoBERTa encoder (transformers `XLMRobertaModel`, paper
//! <https://arxiv.org/abs/1911.02116>) whose last hidden state is mean-pooled over the attention
//! mask and projected by `LinearTransformation` (M-CLIP, <https://arxiv.org/abs/2111.06273>):
//!
//! ```text
//! embs  = XLMRobertaModel(input_ids, attention_mask)[0]            # (B, L, hidden)
//! embs2 = (embs * mask[..., None]).sum(1) / mask.sum(1)[:, None]
//! return LinearTransformation(embs2), embs                         # (B, numDims), (B, L, hidden)
//! ```
//!
//! Written here rather than taken from `candle_transformers::models::xlm_roberta`, which runs the
//! softmax in the weights' dtype (f16 softmax with an f32::MIN mask), is not `Debug`, and would
//! index the embedding tables with unchecked ids. Numerics follow transformers: post-LN layers,
//! exact (erf) GELU, position ids `cumsum(ids != pad) * (ids != pad) + pad` (padding positions
//! get `pad`), token type 0, padded keys masked out. Softmax and the mean-pool run in f32.

use super::config::MClipConfig;
use crate::clip::encoder::ln;
use crate::dense::{self, dense, Activation, Dense};
use crate::error::{ModelError, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::{embedding, linear, Embedding, LayerNorm, Linear, VarBuilder};

/// Outputs of [`MultilingualClip::forward`], in the weights' dtype.
#[derive(Debug, Clone)]
pub struct MultilingualClipOutput {
    /// `LinearTransformation(mask-mean(hidden_states))`, (B, numDims).
    pub text_embeds: Tensor,
    /// XLM-R last hidden state, (B, L, hidden).
    pub hidden_states: Tensor,
}

#[derive(Debug, Clone)]
struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl Embeddings {
    fn new(cfg: &MClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            word_embeddings: embedding(cfg.vocab_size, h, vb.pp("word_embeddings"))?,
            position_embeddings: embedding(
                cfg.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type_embeddings: embedding(
                cfg.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: ln(h, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    /// `ids`, `positions`: (B, L) u32.
    fn forward(&self, ids: &Tensor, positions: &Tensor) -> candle_core::Result<Tensor> {
        let words = self.word_embeddings.forward(ids)?;
        // Token type ids are all zero: row 0 of the table, broadcast.
        let token_type = self.token_type_embeddings.embeddings().narrow(0, 0, 1)?;
        let pos = self.position_embeddings.forward(positions)?;
        let x = (words.broadcast_add(&token_type)? + pos)?;
        self.layer_norm.forward(&x)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    query: Dense,
    key: Dense,
    value: Dense,
    attn_out: Dense,
    attn_norm: LayerNorm,
    intermediate: Dense,
    output: Dense,
    output_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
}

impl Layer {
    fn new(cfg: &MClipConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let att = vb.pp("attention");
        Ok(Self {
            query: dense(h, h, att.pp("self.query"))?,
            key: dense(h, h, att.pp("self.key"))?,
            value: dense(h, h, att.pp("self.value"))?,
            attn_out: dense(h, h, att.pp("output.dense"))?,
            attn_norm: ln(h, eps, att.pp("output.LayerNorm"))?,
            intermediate: dense(h, i, vb.pp("intermediate.dense"))?,
            output: dense(i, h, vb.pp("output.dense"))?,
            output_norm: ln(h, eps, vb.pp("output.LayerNorm"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: h / cfg.num_attention_heads,
        })
    }

    /// `bias`: additive f32 key mask (B, 1, 1, L).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let proj = |layer: &Dense| layer.forward_act(x, Activation::Identity);
        let (q, k, v) = (proj(&self.query)?, proj(&self.key)?, proj(&self.value)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let bias = bias.broadcast_as((b, 1, l, l))?;
        let ctx = dense::attention(&q, &k, &v, Some(&bias), self.num_heads, scale)?;
        let attn = self.attn_out.forward_act(&ctx, Activation::Identity)?;
        let x = self.attn_norm.forward(&(attn + x)?)?;
        let h = self.intermediate.forward_act(&x, Activation::Gelu)?;
        let out = self.output.forward_act(&h, Activation::Identity)?;
        self.output_norm.forward(&(out + x)?)
    }
}

/// `MultilingualCLIP`: `transformer` (XLM-R, pooler unused) + `LinearTransformation`.
#[derive(Debug, Clone)]
pub struct MultilingualClip {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    linear_transformation: Linear,
    pad_token_id: u32,
    vocab_size: usize,
    max_positions: usize,
    dtype: DType,
}

impl MultilingualClip {
    /// Loads `transformer.embeddings.*`, `transformer.encoder.layer.{i}.*` and
    /// `LinearTransformation.*`; the weights' dtype is the compute dtype.
    pub fn new(cfg: &MClipConfig, vb: VarBuilder) -> Result<Self> {
        let t = vb.pp("transformer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, t.pp(format!("encoder.layer.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: Embeddings::new(cfg, t.pp("embeddings"))?,
            layers,
            linear_transformation: linear(
                cfg.transformer_dimensions,
                cfg.num_dims,
                vb.pp("LinearTransformation"),
            )?,
            pad_token_id: cfg.pad_token_id,
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            dtype: vb.dtype(),
        })
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs the encoder on (B, L) integer `input_ids` and 0/1 `attention_mask` (any integer or
    /// float dtype). Every row needs at least one attended token.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<MultilingualClipOutput> {
        let (ids, mask) = ids_and_mask(input_ids, attention_mask)?;
        let (b, l) = (ids.len(), ids[0].len());
        let device = input_ids.device();
        let (ids_u32, positions) = self.ids_and_positions(&ids)?;
        let flat_mask: Vec<f32> = mask.into_iter().flatten().collect();
        let mask = Tensor::from_vec(flat_mask, (b, l), device)?;
        let ids_t = Tensor::from_vec(ids_u32, (b, l), device)?;
        let pos_t = Tensor::from_vec(positions, (b, l), device)?;

        // Extended attention mask: 0 for attended keys, f32::MIN for padding (transformers' eager
        // `(1 - mask) * finfo.min`), added to f32 scores.
        let bias = ((1.0 - &mask)? * f64::from(f32::MIN))?.reshape((b, 1, 1, l))?;
        let mut x = self.embeddings.forward(&ids_t, &pos_t)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias)?;
        }

        // Mean over attended tokens in f32, then the projection in the weights' dtype.
        let summed = x
            .to_dtype(DType::F32)?
            .broadcast_mul(&mask.unsqueeze(2)?)?
            .sum(1)?;
        let pooled = summed.broadcast_div(&mask.sum_keepdim(1)?)?;
        let text_embeds = self
            .linear_transformation
            .forward(&pooled.to_dtype(self.dtype)?)?;
        Ok(MultilingualClipOutput {
            text_embeds,
            hidden_states: x,
        })
    }

    /// Checks ids against the vocabulary and builds transformers' position ids (host side).
    fn ids_and_positions(&self, ids: &[Vec<i64>]) -> Result<(Vec<u32>, Vec<u32>)> {
        let pad = self.pad_token_id;
        let mut out_ids = Vec::with_capacity(ids.len() * ids.first().map_or(0, Vec::len));
        let mut positions = Vec::with_capacity(out_ids.capacity());
        for row in ids {
            let mut count = 0u32;
            for &id in row {
                if id < 0 || id as u64 >= self.vocab_size as u64 {
                    return Err(ModelError::invalid(
                        "input_ids",
                        format!(
                            "token id {id} is outside the vocabulary 0..{}",
                            self.vocab_size
                        ),
                    ));
                }
                let id = id as u32;
                if id == pad {
                    positions.push(pad);
                } else {
                    count += 1;
                    positions.push(pad + count);
                }
                out_ids.push(id);
            }
            if (pad + count) as usize >= self.max_positions {
                return Err(ModelError::invalid(
                    "input_ids",
                    format!(
                        "{count} non-padding tokens exceed max_position_embeddings {} (padding_idx {pad})",
                        self.max_positions
                    ),
                ));
            }
        }
        Ok((out_ids, positions))
    }
}

/// Token ids and the 0/1 attention mask, one row per prompt.
pub(crate) type IdRows = (Vec<Vec<i64>>, Vec<Vec<f32>>);

/// Checks (B ≥ 1, L ≥ 1) integer `input_ids` and a 0/1 `attention_mask` of the same shape (any
/// integer or float dtype) with at least one attended token per row; returns them as rows.
pub(crate) fn ids_and_mask(input_ids: &Tensor, attention_mask: &Tensor) -> Result<IdRows> {
    let (b, l) = input_ids.dims2().map_err(|_| {
        ModelError::invalid(
            "input_ids",
            format!("must be (B, L), got {:?}", input_ids.dims()),
        )
    })?;
    if attention_mask.dims() != [b, l] {
        return Err(ModelError::invalid(
            "attention_mask",
            format!(
                "must have the shape of input_ids {:?}, got {:?}",
                [b, l],
                attention_mask.dims()
            ),
        ));
    }
    if b == 0 || l == 0 {
        return Err(ModelError::invalid(
            "input_ids",
            "must hold at least one token per row",
        ));
    }
    let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
    let mask = attention_mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    for (r, row) in mask.iter().enumerate() {
        if row.iter().any(|&m| m != 0.0 && m != 1.0) {
            return Err(ModelError::invalid(
                "attention_mask",
                format!("row {r} holds values other than 0 and 1"),
            ));
        }
        if !row.contains(&1.0) {
            return Err(ModelError::invalid(
                "attention_mask",
                format!("row {r} attends to no token (needs at least one 1)"),
            ));
        }
    }
    Ok((ids, mask))
}
