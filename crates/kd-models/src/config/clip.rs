//! `text_encoder/config.json` and `image_encoder/config.json`: transformers
//! `CLIPTextConfig` / `CLIPVisionConfig`.

use super::{check_divisible, check_one_of, check_positive};
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

/// transformers `CLIPTextConfig` (the text tower of `CLIPTextModelWithProjection`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: 1,
            bos_token_id: 49406,
            eos_token_id: 49407,
        }
    }
}

/// transformers `CLIPVisionConfig` (the vision tower of `CLIPVisionModelWithProjection`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    /// Rejects what the CLIP text port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_one_of(
            path,
            "hidden_act",
            &self.hidden_act,
            &["gelu", "quick_gelu"],
        )?;
        check_divisible(
            path,
            "hidden_size by num_attention_heads",
            self.hidden_size,
            self.num_attention_heads,
        )?;
        check_positive(
            path,
            "max_position_embeddings",
            self.max_position_embeddings,
        )
    }
}

impl ClipVisionConfig {
    /// Rejects what the CLIP vision port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_one_of(
            path,
            "hidden_act",
            &self.hidden_act,
            &["gelu", "quick_gelu"],
        )?;
        check_divisible(
            path,
            "hidden_size by num_attention_heads",
            self.hidden_size,
            self.num_attention_heads,
        )?;
        check_divisible(
            path,
            "image_size by patch_size",
            self.image_size,
            self.patch_size,
        )
    }
}
