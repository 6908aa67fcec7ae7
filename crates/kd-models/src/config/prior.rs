//! `prior/config.json`: diffusers `PriorTransformer`.

use super::{check_one_of, check_opt_one_of, check_positive};
use crate::error::Result;
use serde::Deserialize;
use std::path::Path;

/// `PriorTransformer` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PriorTransformerConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    pub num_layers: usize,
    pub embedding_dim: usize,
    pub num_embeddings: usize,
    pub additional_embeddings: usize,
    pub dropout: f64,
    pub time_embed_act_fn: String,
    pub norm_in_type: Option<String>,
    pub embedding_proj_norm_type: Option<String>,
    pub encoder_hid_proj_type: Option<String>,
    pub added_emb_type: Option<String>,
    pub time_embed_dim: Option<usize>,
    pub embedding_proj_dim: Option<usize>,
    pub clip_embed_dim: Option<usize>,
}

impl Default for PriorTransformerConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            num_attention_heads: 32,
            attention_head_dim: 64,
            num_layers: 20,
            embedding_dim: 768,
            num_embeddings: 77,
            additional_embeddings: 4,
            dropout: Default::default(),
            time_embed_act_fn: "silu".into(),
            norm_in_type: None,
            embedding_proj_norm_type: None,
            encoder_hid_proj_type: Some("linear".into()),
            added_emb_type: Some("prd".into()),
            time_embed_dim: None,
            embedding_proj_dim: None,
            clip_embed_dim: None,
        }
    }
}

impl PriorTransformerConfig {
    /// Transformer width: heads × head dim.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Sequence length: text tokens + additional tokens.
    pub fn seq_len(&self) -> usize {
        self.num_embeddings + self.additional_embeddings
    }

    /// Rejects what the prior port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_positive(path, "num_attention_heads", self.num_attention_heads)?;
        check_positive(path, "attention_head_dim", self.attention_head_dim)?;
        check_one_of(
            path,
            "time_embed_act_fn",
            &self.time_embed_act_fn,
            &["silu", "gelu"],
        )?;
        check_opt_one_of(
            path,
            "norm_in_type",
            &self.norm_in_type,
            &[None, Some("layer")],
        )?;
        check_opt_one_of(
            path,
            "embedding_proj_norm_type",
            &self.embedding_proj_norm_type,
            &[None, Some("layer")],
        )?;
        check_opt_one_of(
            path,
            "encoder_hid_proj_type",
            &self.encoder_hid_proj_type,
            &[Some("linear"), None],
        )?;
        check_opt_one_of(
            path,
            "added_emb_type",
            &self.added_emb_type,
            &[Some("prd"), None],
        )?;
        Ok(())
    }
}
