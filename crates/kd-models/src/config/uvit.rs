//! `transformer/config.json`: diffusers `UVit2DModel` (aMUSEd's masked-token transformer).

use super::{check_divisible, check_positive};
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// `UVit2DModel` config.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UVit2DConfig {
    pub hidden_size: usize,
    pub use_bias: bool,
    pub hidden_dropout: f64,
    pub cond_embed_dim: usize,
    pub micro_cond_encode_dim: usize,
    pub micro_cond_embed_dim: usize,
    pub encoder_hidden_size: usize,
    pub vocab_size: usize,
    pub codebook_size: usize,
    pub in_channels: usize,
    pub block_out_channels: usize,
    pub num_res_blocks: usize,
    pub downsample: bool,
    pub upsample: bool,
    pub block_num_heads: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub attention_dropout: f64,
    pub intermediate_size: usize,
    pub layer_norm_eps: f64,
    pub ln_elementwise_affine: bool,
    pub sample_size: usize,
}

impl Default for UVit2DConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            hidden_size: 1024,
            use_bias: false,
            hidden_dropout: 0.0,
            cond_embed_dim: 768,
            micro_cond_encode_dim: 256,
            micro_cond_embed_dim: 1280,
            encoder_hidden_size: 768,
            vocab_size: 8256,
            codebook_size: 8192,
            in_channels: 768,
            block_out_channels: 768,
            num_res_blocks: 3,
            downsample: false,
            upsample: false,
            block_num_heads: 12,
            num_hidden_layers: 22,
            num_attention_heads: 16,
            attention_dropout: 0.0,
            intermediate_size: 2816,
            layer_norm_eps: 1e-6,
            ln_elementwise_affine: true,
            sample_size: 64,
        }
    }
}

/// The number of micro-conditioning values (original width, height, crop top, crop left,
/// aesthetic score).
pub const MICRO_CONDS: usize = 5;

impl UVit2DConfig {
    /// Rejects configurations the port cannot run.
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("cond_embed_dim", self.cond_embed_dim),
            ("micro_cond_encode_dim", self.micro_cond_encode_dim),
            ("encoder_hidden_size", self.encoder_hidden_size),
            ("vocab_size", self.vocab_size),
            ("codebook_size", self.codebook_size),
            ("in_channels", self.in_channels),
            ("block_out_channels", self.block_out_channels),
            ("block_num_heads", self.block_num_heads),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
        ] {
            check_positive(path, field, v)?;
        }
        check_divisible(
            path,
            "hidden_size by num_attention_heads",
            self.hidden_size,
            self.num_attention_heads,
        )?;
        check_divisible(
            path,
            "block_out_channels by block_num_heads",
            self.block_out_channels,
            self.block_num_heads,
        )?;
        check_divisible(
            path,
            "micro_cond_encode_dim by 2 (sin and cos halves)",
            self.micro_cond_encode_dim,
            2,
        )?;
        if self.micro_cond_embed_dim != MICRO_CONDS * self.micro_cond_encode_dim {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`micro_cond_embed_dim` ({}) must be {MICRO_CONDS} × micro_cond_encode_dim ({})",
                    self.micro_cond_embed_dim, self.micro_cond_encode_dim
                ),
            });
        }
        if self.downsample != self.upsample {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`downsample` ({}) and `upsample` ({}) must agree: otherwise the logits grid \
                     is not the token grid",
                    self.downsample, self.upsample
                ),
            });
        }
        if self.codebook_size >= self.vocab_size {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`codebook_size` ({}) must be below `vocab_size` ({}): the mask token lies above the codebook",
                    self.codebook_size, self.vocab_size
                ),
            });
        }
        Ok(())
    }
}
