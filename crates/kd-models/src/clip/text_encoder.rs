//! The prompt encoder of the Kandinsky 2.2 prior folder as one loadable model: the CLIP tokenizer
//! plus the CLIP text tower with projection (diffusers `KandinskyV22PriorPipeline._encode_prompt`,
//! without the CFG batching, which belongs to the sampler).
//!
//! Its output, [`TextConditioning`], is what the prior is conditioned on; the text-encoder service
//! returns it and the prior service takes it back.

use super::text::ClipTextModelWithProjection;
use super::tokenizer::{ClipTokenizer, TokenizedBatch};
use crate::checkpoint::{CheckpointDir, Variant};
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// Which hidden state of the text tower a family conditions on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TextHiddenLayer {
    /// `last_hidden_state` (after the final layer norm): the Kandinsky 2.2 prior.
    #[default]
    Last,
    /// `hidden_states[-2]` (the last layer's input, no final norm): aMUSEd.
    Penultimate,
}

/// Text conditioning of the prior (or of aMUSEd's transformer): CLIP `text_embeds`, the hidden
/// states the family conditions on and the token mask.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// (B, D) pooled, projected embedding.
    pub text_embeds: Tensor,
    /// (B, 77, D) hidden states of the text tower ([`TextHiddenLayer`]).
    pub hidden_states: Tensor,
    /// (B, 77) u32 0/1: 1 for BOS..EOS, 0 for padding.
    pub mask: Tensor,
}

impl TextConditioning {
    /// Number of rows B (read from `text_embeds`).
    pub fn rows(&self) -> Result<usize> {
        Ok(self.text_embeds.dim(0)?)
    }

    /// Every row repeated `n` times in place (`repeat_interleave(n, dim=0)`).
    pub fn repeat_interleave(&self, n: usize) -> Result<Self> {
        Ok(Self {
            text_embeds: repeat_interleave(&self.text_embeds, n)?,
            hidden_states: repeat_interleave(&self.hidden_states, n)?,
            mask: repeat_interleave(&self.mask, n)?,
        })
    }

    /// Rows of `a` followed by rows of `b`.
    pub fn cat(a: &Self, b: &Self) -> Result<Self> {
        Ok(Self {
            text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
            hidden_states: Tensor::cat(&[&a.hidden_states, &b.hidden_states], 0)?,
            mask: Tensor::cat(&[&a.mask, &b.mask], 0)?,
        })
    }

    /// Row `i` as a one-row conditioning.
    pub fn row(&self, i: usize) -> Result<Self> {
        Ok(Self {
            text_embeds: self.text_embeds.narrow(0, i, 1)?,
            hidden_states: self.hidden_states.narrow(0, i, 1)?,
            mask: self.mask.narrow(0, i, 1)?,
        })
    }
}

/// `x.repeat_interleave(n, dim=0)`.
pub(crate) fn repeat_interleave(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let mut dims = x.dims().to_vec();
    let b = dims[0];
    let mut expanded = vec![b, n];
    expanded.extend_from_slice(&dims[1..]);
    let y = x.unsqueeze(1)?.broadcast_as(expanded)?.contiguous()?;
    dims[0] = b * n;
    Ok(y.reshape(dims)?)
}

/// The loaded prompt encoder: CLIP tokenizer and text tower. Immutable after loading.
#[derive(Debug)]
pub struct ClipTextEncoder {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModelWithProjection,
    device: Device,
    hidden_layer: TextHiddenLayer,
}

impl ClipTextEncoder {
    /// Loads `tokenizer/` and `text_encoder/` of a prior folder in `dtype` on `device`.
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        let tok_dir = dir.component("tokenizer")?;
        let max_len = tok_dir.tokenizer_config()?.model_max_length;
        let tokenizer = ClipTokenizer::from_dir(&tok_dir.path, max_len)?;
        let te = dir.component("text_encoder")?;
        let text_encoder = ClipTextModelWithProjection::new(
            &te.clip_text_config()?,
            te.weights(Variant::Default)?.var_builder(dtype, device),
        )?;
        Ok(Self::new(tokenizer, text_encoder, device))
    }

    /// From loaded parts.
    pub fn new(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModelWithProjection,
        device: &Device,
    ) -> Self {
        Self {
            tokenizer,
            text_encoder,
            device: device.clone(),
            hidden_layer: TextHiddenLayer::Last,
        }
    }

    /// Returns `hidden_layer`'s states as [`TextConditioning::hidden_states`].
    pub fn with_hidden_layer(mut self, hidden_layer: TextHiddenLayer) -> Self {
        self.hidden_layer = hidden_layer;
        self
    }

    /// Which hidden states [`Self::encode`] returns.
    pub fn hidden_layer(&self) -> TextHiddenLayer {
        self.hidden_layer
    }

    /// The CLIP tokenizer.
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The CLIP text tower.
    pub fn text_model(&self) -> &ClipTextModelWithProjection {
        &self.text_encoder
    }

    /// The device the tower runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenises prompts (truncated to 77 tokens, padded, as diffusers calls the tokenizer).
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        if prompts.is_empty() {
            return Err(ModelError::invalid(
                "prompts",
                "must hold at least one prompt",
            ));
        }
        self.tokenizer.encode(prompts)
    }

    /// Encodes a tokenised batch (no attention mask for the text tower, as diffusers); the
    /// outputs are f32 whatever the weight dtype.
    pub fn encode_tokens(&self, tokens: &TokenizedBatch) -> Result<TextConditioning> {
        let out = self
            .text_encoder
            .forward(&tokens.ids_tensor(&self.device)?)?;
        let hidden = match self.hidden_layer {
            TextHiddenLayer::Last => out.last_hidden_state,
            TextHiddenLayer::Penultimate => out.penultimate_hidden_state,
        };
        Ok(TextConditioning {
            text_embeds: out.text_embeds.to_dtype(DType::F32)?,
            hidden_states: hidden.to_dtype(DType::F32)?,
            mask: tokens.mask_tensor(&self.device)?,
        })
    }

    /// Tokenises and encodes prompts (B ≥ 1).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TextConditioning> {
        self.encode_tokens(&self.tokenize(prompts)?)
    }
}
