//! `CONFIG_2_0["model_config"]` of the official `kandinsky2/configs.py`: the arguments of
//! `model_creation.create_model` for the 2.0 `Text2ImUNet` / `InpaintText2ImUNet`. A JSON copy of
//! that dict parses as it is; [`Kd20UnetConfig::default`] carries the official values.
//!
//! Two keys are not upstream: `norm_num_groups` (default 32: upstream's `normalization`
//! hard-codes 32 groups, which a tiny test model cannot have) and `text_encoder2_dim` (default
//! 512: upstream hard-codes the mT5 width in `proj2` and `to_model_dim2`).

use crate::config::{check_divisible, check_one_of, check_positive, read_json, unsupported};
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// `CONFIG_2_0["model_config"]` (unknown keys ignored; `use_fp16`, `dropout`, `cache_text_emb`
/// have no effect on inference here).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Kd20UnetConfig {
    pub image_size: usize,
    pub num_channels: usize,
    pub num_res_blocks: usize,
    /// `""` (derived from `image_size` as `create_model` does) or `"1,2,3,4"`.
    pub channel_mult: String,
    pub num_heads: i64,
    pub num_head_channels: i64,
    pub num_heads_upsample: i64,
    /// Comma-separated resolutions; attention runs where `image_size / res` is the downsample rate.
    pub attention_resolutions: String,
    pub dropout: f64,
    /// Width of the text tokens the attention blocks attend to (`encoder_channels`).
    pub model_dim: usize,
    pub use_scale_shift_norm: bool,
    pub resblock_updown: bool,
    pub use_fp16: bool,
    pub cache_text_emb: bool,
    /// Width of `full_emb1` (M-CLIP's token states).
    pub text_encoder_in_dim1: usize,
    /// Width of `pooled_emb1` (with `pooling_type = "from_model"`).
    pub text_encoder_in_dim2: usize,
    pub pooling_type: String,
    /// Latent channels (the inpainting model has `2 * in_channels + 1` input channels).
    pub in_channels: usize,
    pub out_channels: usize,
    pub up: bool,
    pub inpainting: bool,
    /// Not upstream: GroupNorm groups (upstream: 32).
    pub norm_num_groups: usize,
    /// Not upstream: width of `full_emb2` (mT5's `d_model`; upstream hard-codes 512).
    pub text_encoder2_dim: usize,
}

impl Default for Kd20UnetConfig {
    fn default() -> Self {
        Self {
            image_size: 64,
            num_channels: 384,
            num_res_blocks: 3,
            channel_mult: String::new(),
            num_heads: 1,
            num_head_channels: 64,
            num_heads_upsample: -1,
            attention_resolutions: "32,16,8".into(),
            dropout: 0.0,
            model_dim: 768,
            use_scale_shift_norm: true,
            resblock_updown: true,
            use_fp16: false,
            cache_text_emb: true,
            text_encoder_in_dim1: 1024,
            text_encoder_in_dim2: 640,
            pooling_type: "from_model".into(),
            in_channels: 4,
            out_channels: 8,
            up: false,
            inpainting: false,
            norm_num_groups: 32,
            text_encoder2_dim: 512,
        }
    }
}

fn config_err(path: &Path, message: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message,
    }
}

impl Kd20UnetConfig {
    /// Reads and validates a JSON copy of `model_config`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The channel multipliers, as `create_model` derives them.
    pub fn channel_mult(&self, path: &Path) -> Result<Vec<usize>> {
        if self.channel_mult.is_empty() {
            return match self.image_size {
                256 => Ok(vec![1, 1, 2, 2, 4, 4]),
                128 => Ok(vec![1, 1, 2, 3, 4]),
                64 => Ok(vec![1, 2, 3, 4]),
                s => Err(unsupported(
                    path,
                    "image_size",
                    s,
                    "64, 128, 256 with an empty channel_mult",
                )),
            };
        }
        self.channel_mult
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .map_err(|e| config_err(path, format!("`channel_mult` {s:?}: {e}")))
            })
            .collect()
    }

    /// Downsample rates with attention (`image_size / res`).
    pub fn attention_ds(&self, path: &Path) -> Result<Vec<usize>> {
        self.attention_resolutions
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| match s.trim().parse::<usize>() {
                Ok(r) if r > 0 => Ok(self.image_size / r),
                _ => Err(config_err(
                    path,
                    format!("`attention_resolutions` {s:?} is not a positive integer"),
                )),
            })
            .collect()
    }

    /// Channels into the first convolution.
    pub fn model_in_channels(&self) -> usize {
        if self.inpainting {
            2 * self.in_channels + 1
        } else {
            self.in_channels
        }
    }

    /// Rejects what the port does not implement; `path` names the config in messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_one_of(path, "pooling_type", &self.pooling_type, &["from_model"])?;
        if self.up {
            return Err(unsupported(path, "up", self.up, "false"));
        }
        for (f, v) in [
            ("num_channels", self.num_channels),
            ("num_res_blocks", self.num_res_blocks),
            ("model_dim", self.model_dim),
            ("text_encoder_in_dim1", self.text_encoder_in_dim1),
            ("text_encoder_in_dim2", self.text_encoder_in_dim2),
            ("text_encoder2_dim", self.text_encoder2_dim),
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            check_positive(path, f, v)?;
        }
        check_divisible(
            path,
            "text_encoder2_dim (8 pooling heads)",
            self.text_encoder2_dim,
            8,
        )?;
        let mult = self.channel_mult(path)?;
        if mult.is_empty() || mult.contains(&0) {
            return Err(config_err(
                path,
                "`channel_mult` must be non-empty and positive".into(),
            ));
        }
        self.attention_ds(path)?;
        for m in &mult {
            let ch = m * self.num_channels;
            check_divisible(path, "a level width (GroupNorm)", ch, self.norm_num_groups)?;
            if self.num_head_channels > 0 {
                check_divisible(
                    path,
                    "a level width (num_head_channels)",
                    ch,
                    self.num_head_channels as usize,
                )?;
            } else if self.num_heads <= 0 {
                return Err(config_err(
                    path,
                    "`num_heads` must be > 0 when num_head_channels is -1".into(),
                ));
            }
        }
        Ok(())
    }
}
