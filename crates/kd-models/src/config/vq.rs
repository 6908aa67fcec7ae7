//! `movq/config.json` / `vqvae/config.json`: diffusers `VQModel` (MoVQ, aMUSEd's VQ-GAN).

use super::{check_divisible, check_one_of, check_positive, unsupported};
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// `VQModel` config (MoVQ: `norm_type` "spatial"; aMUSEd's VQ-GAN: "group" with
/// `lookup_from_codebook`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VqModelConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub sample_size: usize,
    pub num_vq_embeddings: usize,
    pub norm_num_groups: usize,
    pub vq_embed_dim: Option<usize>,
    pub scaling_factor: f64,
    pub norm_type: String,
    pub mid_block_add_attention: bool,
    pub lookup_from_codebook: bool,
    pub force_upcast: bool,
}

impl Default for VqModelConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 3,
            sample_size: 32,
            num_vq_embeddings: 256,
            norm_num_groups: 32,
            vq_embed_dim: None,
            scaling_factor: 0.18215,
            norm_type: "group".into(),
            mid_block_add_attention: true,
            lookup_from_codebook: Default::default(),
            force_upcast: Default::default(),
        }
    }
}

impl VqModelConfig {
    /// `vq_embed_dim`, defaulting to `latent_channels`.
    pub fn embed_dim(&self) -> usize {
        self.vq_embed_dim.unwrap_or(self.latent_channels)
    }

    /// Spatial down-scaling between pixels and latents: 2^(levels − 1).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// Whether the decoder's norms are MoVQ's spatial norms (else group norms).
    pub fn spatial(&self) -> bool {
        self.norm_type == "spatial"
    }

    /// Rejects what the port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        check_positive(path, "block_out_channels (length)", n)?;
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!("down_block_types and up_block_types must have {n} entries (one per block_out_channels)"),
            });
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            check_one_of(
                path,
                &format!("down_block_types[{i}]"),
                t,
                &["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
            )?;
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            check_one_of(
                path,
                &format!("up_block_types[{i}]"),
                t,
                &["UpDecoderBlock2D", "AttnUpDecoderBlock2D"],
            )?;
        }
        check_one_of(path, "norm_type", &self.norm_type, &["spatial", "group"])?;
        check_one_of(path, "act_fn", &self.act_fn, &["silu"])?;
        check_positive(path, "layers_per_block", self.layers_per_block)?;
        check_positive(path, "num_vq_embeddings", self.num_vq_embeddings)?;
        if self.spatial() && self.embed_dim() != self.latent_channels {
            return Err(unsupported(
                path,
                "vq_embed_dim",
                self.embed_dim(),
                &format!(
                    "null or latent_channels ({}) for the spatial-norm decoder",
                    self.latent_channels
                ),
            ));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_divisible(
                path,
                &format!("block_out_channels[{i}] by norm_num_groups"),
                c,
                self.norm_num_groups,
            )?;
            if self.spatial() {
                // SpatialNorm always uses 32 groups.
                check_divisible(
                    path,
                    &format!("block_out_channels[{i}] by 32 (SpatialNorm groups)"),
                    c,
                    32,
                )?;
            }
        }
        Ok(())
    }
}
