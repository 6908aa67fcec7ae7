//! `text_encoder/config.json` of a Kandinsky 2.1 decoder folder: diffusers `MCLIPConfig`
//! (`model_type: "M-CLIP"`), i.e. transformers' `XLMRobertaConfig` plus the projection sizes
//! `transformerDimensions` (= XLM-R `hidden_size`) and `numDims` (width of `LinearTransformation`).
//!
//! `MCLIPConfig.__init__` takes `transformerDimSize` / `imageDimSize` (defaults 1024 / 768) and
//! stores them as `transformerDimensions` / `numDims`; a saved config holds the latter, which
//! win when both are present.

use super::tokenizer::MAX_LENGTH;
use crate::config::read_json;
use crate::config::unsupported;
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// Validated M-CLIP text-encoder config (transformers' `XLMRobertaConfig` defaults where absent).
#[derive(Debug, Clone, PartialEq)]
pub struct MClipConfig {
    /// Vocabulary size (250002 for XLM-R).
    pub vocab_size: usize,
    /// XLM-R width.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// MLP activation; only `"gelu"` (exact erf) is implemented.
    pub hidden_act: String,
    /// Rows of the position-embedding table (514 for XLM-R).
    pub max_position_embeddings: usize,
    /// Rows of the token-type table (token type 0 is always used).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Padding token id, also the position-id offset (`padding_idx`).
    pub pad_token_id: u32,
    /// Input width of `LinearTransformation` (must equal `hidden_size`).
    pub transformer_dimensions: usize,
    /// Output width of `LinearTransformation` (the `text_embeds` width).
    pub num_dims: usize,
}

/// The XLM-R keys of a config as stored (transformers' `XLMRobertaConfig`), before defaults.
#[derive(Debug, Deserialize)]
pub(crate) struct RawXlmr {
    pub(crate) model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    intermediate_size: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    type_vocab_size: Option<usize>,
    layer_norm_eps: Option<f64>,
    pad_token_id: Option<u32>,
    position_embedding_type: Option<String>,
    is_decoder: Option<bool>,
}

impl RawXlmr {
    /// An [`MClipConfig`] of these keys with `XLMRobertaConfig`'s defaults and the projection
    /// sizes given (`transformer_dimensions` `None` = `hidden_size`); refuses relative position
    /// embeddings and decoders, naming `path`. Not validated.
    pub(crate) fn into_config(
        self,
        path: &Path,
        transformer_dimensions: Option<usize>,
        num_dims: usize,
    ) -> Result<MClipConfig> {
        if let Some(pe) = &self.position_embedding_type {
            if pe != "absolute" {
                return Err(unsupported(
                    path,
                    "position_embedding_type",
                    pe,
                    "\"absolute\"",
                ));
            }
        }
        if self.is_decoder == Some(true) {
            return Err(unsupported(path, "is_decoder", true, "false"));
        }
        let hidden_size = self.hidden_size.unwrap_or(768);
        Ok(MClipConfig {
            vocab_size: self.vocab_size.unwrap_or(30522),
            hidden_size,
            num_hidden_layers: self.num_hidden_layers.unwrap_or(12),
            num_attention_heads: self.num_attention_heads.unwrap_or(12),
            intermediate_size: self.intermediate_size.unwrap_or(3072),
            hidden_act: self.hidden_act.unwrap_or_else(|| "gelu".into()),
            max_position_embeddings: self.max_position_embeddings.unwrap_or(512),
            type_vocab_size: self.type_vocab_size.unwrap_or(2),
            layer_norm_eps: self.layer_norm_eps.unwrap_or(1e-12),
            pad_token_id: self.pad_token_id.unwrap_or(1),
            transformer_dimensions: transformer_dimensions.unwrap_or(hidden_size),
            num_dims,
        })
    }
}

/// The JSON as stored, before defaults and validation.
#[derive(Debug, Deserialize)]
struct RawConfig {
    #[serde(flatten)]
    xlmr: RawXlmr,
    #[serde(rename = "transformerDimensions")]
    transformer_dimensions: Option<usize>,
    #[serde(rename = "transformerDimSize")]
    transformer_dim_size: Option<usize>,
    #[serde(rename = "numDims")]
    num_dims: Option<usize>,
    #[serde(rename = "imageDimSize")]
    image_dim_size: Option<usize>,
}

fn config_err(path: &Path, message: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message,
    }
}

impl MClipConfig {
    /// Reads and validates `path` (a `text_encoder/config.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = read_json(path)?;
        if let Some(mt) = &raw.xlmr.model_type {
            if mt != "M-CLIP" {
                return Err(unsupported(path, "model_type", mt, "\"M-CLIP\""));
            }
        }
        let transformer_dimensions = raw
            .transformer_dimensions
            .or(raw.transformer_dim_size)
            .unwrap_or(1024);
        let num_dims = raw.num_dims.or(raw.image_dim_size).unwrap_or(768);
        let cfg = raw
            .xlmr
            .into_config(path, Some(transformer_dimensions), num_dims)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Rejects what this port does not implement; errors name `path`, the field and the
    /// allowed values.
    pub fn validate(&self, path: &Path) -> Result<()> {
        if self.hidden_act != "gelu" {
            return Err(unsupported(
                path,
                "hidden_act",
                &self.hidden_act,
                "\"gelu\"",
            ));
        }
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("type_vocab_size", self.type_vocab_size),
            ("numDims", self.num_dims),
        ] {
            if v == 0 {
                return Err(config_err(path, format!("`{field}` must be > 0")));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(config_err(
                path,
                format!(
                    "`hidden_size` {} is not divisible by `num_attention_heads` {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if self.transformer_dimensions != self.hidden_size {
            return Err(unsupported(
                path,
                "transformerDimensions",
                self.transformer_dimensions,
                &format!("{} (= hidden_size)", self.hidden_size),
            ));
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(config_err(
                path,
                format!(
                    "`pad_token_id` {} is outside the vocabulary (vocab_size {})",
                    self.pad_token_id, self.vocab_size
                ),
            ));
        }
        // Position ids run up to pad_token_id + MAX_LENGTH (transformers' padding_idx offset).
        let needed = self.pad_token_id as usize + MAX_LENGTH + 1;
        if self.max_position_embeddings < needed {
            return Err(config_err(
                path,
                format!(
                    "`max_position_embeddings` {} is too small for {MAX_LENGTH} tokens after \
                     padding_idx {} (need ≥ {needed})",
                    self.max_position_embeddings, self.pad_token_id
                ),
            ));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(config_err(
                path,
                format!("`layer_norm_eps` {} must be > 0", self.layer_norm_eps),
            ));
        }
        Ok(())
    }
}
