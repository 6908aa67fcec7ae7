//! The Kandinsky 2.1 decoder prompt encoder: the XLM-R tokenizer plus diffusers'
//! `MultilingualCLIP` (XLM-RoBERTa + mask-mean + `LinearTransformation`), as
//! `KandinskyPipeline._encode_prompt` runs them (without the CFG batching, which belongs to the
//! sampler).
//!
//! Its output, [`MultilingualConditioning`], is what the 2.1 UNet is conditioned on:
//! `text_embeds` for `added_cond_kwargs["text_embeds"]`, `hidden_states` as
//! `encoder_hidden_states`, and the attention mask.

pub mod config;
pub mod model;
pub mod tokenizer;

pub use config::MClipConfig;
pub use model::{MultilingualClip, MultilingualClipOutput};
pub use tokenizer::{XlmrBatch, XlmrTokenizer, MAX_LENGTH};

use crate::checkpoint::{CheckpointDir, ComponentDir, Variant};
use crate::clip::TextConditioning;
use crate::error::{ModelError, Result};
use candle_core::{DType, Device};

/// Text conditioning of the Kandinsky 2.1 decoder: the same shape of data as the prior's CLIP
/// conditioning — `text_embeds` (B, numDims) f32, the projected mask-mean of the hidden states;
/// `hidden_states` (B, 77, hidden) f32, the XLM-R last hidden state; `mask` (B, 77) u32 0/1, 1 for
/// `<s>..</s>` — so it shares [`TextConditioning`]'s row helpers.
pub type MultilingualConditioning = TextConditioning;

/// The loaded 2.1 prompt encoder: XLM-R tokenizer and `MultilingualCLIP`. Immutable after
/// loading; `encode` takes `&self` and may run from several threads.
#[derive(Debug)]
pub struct MultilingualTextEncoder {
    tokenizer: XlmrTokenizer,
    text_encoder: MultilingualClip,
    device: Device,
}

/// `model_index.json` classes accepted for `text_encoder/`.
const TEXT_ENCODER_CLASSES: &[&str] = &["MultilingualCLIP"];
/// `model_index.json` classes accepted for `tokenizer/`.
const TOKENIZER_CLASSES: &[&str] = &["XLMRobertaTokenizerFast", "XLMRobertaTokenizer"];

/// Errors unless `model_index.json` lists `comp` with one of `allowed` classes.
fn expect_class(dir: &CheckpointDir, comp: &ComponentDir, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&comp.class.as_str()) {
        return Ok(());
    }
    Err(ModelError::Unsupported {
        path: dir.root().join("model_index.json"),
        field: comp.name.clone(),
        value: format!("{:?}", comp.class),
        supported: allowed.join(", "),
    })
}

impl MultilingualTextEncoder {
    /// Loads `tokenizer/` and `text_encoder/` of a Kandinsky 2.1 decoder folder in `dtype` on
    /// `device`.
    pub fn load(dir: &CheckpointDir, dtype: DType, device: &Device) -> Result<Self> {
        // Not `ComponentDir::tokenizer_config`: diffusers ignores XLM-R's `model_max_length`
        // (512 or transformers' unset 1e30) and always pads to 77.
        let tok = dir.component("tokenizer")?;
        expect_class(dir, &tok, TOKENIZER_CLASSES)?;
        let tokenizer = XlmrTokenizer::from_dir(&tok.path)?;
        let te = dir.component("text_encoder")?;
        expect_class(dir, &te, TEXT_ENCODER_CLASSES)?;
        let cfg_path = te.path.join("config.json");
        let cfg = MClipConfig::from_file(&cfg_path)?;
        if tokenizer.pad_id() != cfg.pad_token_id {
            return Err(ModelError::Config {
                path: cfg_path,
                message: format!(
                    "`pad_token_id` {} differs from the tokenizer's pad token id {} \
                     (position ids depend on it)",
                    cfg.pad_token_id,
                    tokenizer.pad_id()
                ),
            });
        }
        let model = MultilingualClip::new(
            &cfg,
            te.weights(Variant::Default)?.var_builder(dtype, device),
        )?;
        Ok(Self::new(tokenizer, model, device))
    }

    /// From loaded parts.
    pub fn new(tokenizer: XlmrTokenizer, text_encoder: MultilingualClip, device: &Device) -> Self {
        Self {
            tokenizer,
            text_encoder,
            device: device.clone(),
        }
    }

    /// The XLM-R tokenizer.
    pub fn tokenizer(&self) -> &XlmrTokenizer {
        &self.tokenizer
    }

    /// The `MultilingualCLIP` model.
    pub fn text_model(&self) -> &MultilingualClip {
        &self.text_encoder
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenises prompts (B ≥ 1) to (B, 77) i64 ids and mask, as diffusers calls the tokenizer.
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<XlmrBatch> {
        self.tokenizer.encode(prompts, &self.device)
    }

    /// Encodes a tokenised batch; the outputs are f32 whatever the weight dtype.
    pub fn encode_tokens(&self, tokens: &XlmrBatch) -> Result<MultilingualConditioning> {
        let out = self
            .text_encoder
            .forward(&tokens.input_ids, &tokens.attention_mask)?;
        Ok(MultilingualConditioning {
            text_embeds: out.text_embeds.to_dtype(DType::F32)?,
            hidden_states: out.hidden_states.to_dtype(DType::F32)?,
            mask: tokens.attention_mask.to_dtype(DType::U32)?,
        })
    }

    /// Tokenises and encodes prompts (B ≥ 1).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<MultilingualConditioning> {
        self.encode_tokens(&self.tokenize(prompts)?)
    }
}
