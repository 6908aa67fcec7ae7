//! The config of the Kandinsky 2.0 autoencoder: `CONFIG_2_0["image_enc_params"]` of the official
//! `kandinsky2/configs.py`, with the same nesting (`name`, `scale`, `params.embed_dim`,
//! `params.ddconfig`), so a JSON copy of that dict parses as it is (`ckpt_path` and other
//! unknown keys are ignored).
//!
//! The official checkpoint folder has no config for `vae.ckpt`: the code's `CONFIG_2_0` is the
//! config, and [`KlConfig::default`] carries its values. [`KlConfig::from_file`] reads a JSON
//! sidecar of that shape (the test fixture's `config.json`). One key is not upstream:
//! `ddconfig.norm_num_groups` (default 32), because upstream's `Normalize` hard-codes 32 groups,
//! which a tiny test model cannot have.

use crate::config::{check_one_of, check_positive, read_json, unsupported};
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// `CONFIG_2_0["image_enc_params"]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct KlConfig {
    /// The autoencoder class; only `"AutoencoderKL"` (the 2.0 one) is implemented.
    #[serde(default = "autoencoder_kl")]
    pub name: String,
    /// Latent scale: the pipeline decodes `decode(latents / scale)` and encodes
    /// `encode(image).sample() * scale` (0.0512 for 2.0).
    pub scale: f64,
    /// The constructor arguments.
    pub params: KlParams,
}

/// `AutoencoderKL(ddconfig, embed_dim)`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct KlParams {
    /// Latent channels after `quant_conv` (which outputs 2·embed_dim: mean and log-variance).
    pub embed_dim: usize,
    /// The encoder/decoder architecture.
    pub ddconfig: DdConfig,
}

/// The `ddconfig` of latent-diffusion's `Encoder`/`Decoder` (`vqgan/vqgan_blocks.py`); defaults
/// are those of the Python signatures.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DdConfig {
    /// The encoder outputs mean and log-variance (`2·z_channels`); `AutoencoderKL` asserts it.
    #[serde(default = "yes")]
    pub double_z: bool,
    /// Channels of the encoder output / decoder input.
    pub z_channels: usize,
    /// Nominal image size: only used to place `attn_resolutions`.
    pub resolution: usize,
    /// Image channels into the encoder.
    pub in_channels: usize,
    /// Image channels out of the decoder.
    pub out_ch: usize,
    /// Base width.
    pub ch: usize,
    /// Width multiplier of each level (the level count sets the scale factor 2^(levels − 1)).
    #[serde(default = "ldm_ch_mult")]
    pub ch_mult: Vec<usize>,
    /// Resnets per encoder level (the decoder has one more).
    pub num_res_blocks: usize,
    /// Resolutions (of `resolution` halved per level) whose levels get an attention after each
    /// resnet; empty for 2.0 (the mid blocks always have one).
    pub attn_resolutions: Vec<usize>,
    /// Training only.
    #[serde(default)]
    pub dropout: f64,
    /// Conv down/up-samplers (`false`, avg-pool / plain nearest, is not implemented).
    #[serde(default = "yes")]
    pub resamp_with_conv: bool,
    /// Decoder returns before its output norm (not implemented).
    #[serde(default)]
    pub give_pre_end: bool,
    /// `tanh` on the decoder output (not implemented).
    #[serde(default)]
    pub tanh_out: bool,
    /// Linear attention (not implemented).
    #[serde(default)]
    pub use_linear_attn: bool,
    /// Attention kind; only `"vanilla"` is implemented.
    #[serde(default = "vanilla")]
    pub attn_type: String,
    /// GroupNorm groups of every norm. **Not an upstream key**: upstream's `Normalize` always
    /// uses 32; the test fixture's tiny widths need fewer.
    #[serde(default = "groups32")]
    pub norm_num_groups: usize,
}

fn autoencoder_kl() -> String {
    "AutoencoderKL".into()
}
fn yes() -> bool {
    true
}
fn ldm_ch_mult() -> Vec<usize> {
    vec![1, 2, 4, 8]
}
fn vanilla() -> String {
    "vanilla".into()
}
fn groups32() -> usize {
    32
}

impl Default for KlConfig {
    /// `CONFIG_2_0["image_enc_params"]`: scale 0.0512, embed_dim 4, ch 128, ch_mult [1, 2, 4, 4],
    /// 2 resnets per level, no level attention, z_channels 4, 3 → 3 channels, 32 groups.
    fn default() -> Self {
        Self {
            name: autoencoder_kl(),
            scale: 0.0512,
            params: KlParams {
                embed_dim: 4,
                ddconfig: DdConfig {
                    double_z: true,
                    z_channels: 4,
                    resolution: 256,
                    in_channels: 3,
                    out_ch: 3,
                    ch: 128,
                    ch_mult: vec![1, 2, 4, 4],
                    num_res_blocks: 2,
                    attn_resolutions: vec![],
                    dropout: 0.0,
                    resamp_with_conv: true,
                    give_pre_end: false,
                    tanh_out: false,
                    use_linear_attn: false,
                    attn_type: vanilla(),
                    norm_num_groups: 32,
                },
            },
        }
    }
}

impl KlConfig {
    /// Kandinsky 2.0's config (the same as [`Default`]).
    pub fn kandinsky_2_0() -> Self {
        Self::default()
    }

    /// Reads and validates a JSON file shaped as `CONFIG_2_0["image_enc_params"]`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Rejects what the port does not implement; `path` names the config in messages.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let d = &self.params.ddconfig;
        check_one_of(path, "name", &self.name, &["AutoencoderKL"])?;
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!("`scale` must be finite and > 0, got {}", self.scale),
            });
        }
        if !d.double_z {
            return Err(unsupported(path, "ddconfig.double_z", false, "true"));
        }
        if !d.resamp_with_conv {
            return Err(unsupported(
                path,
                "ddconfig.resamp_with_conv",
                false,
                "true",
            ));
        }
        if d.give_pre_end {
            return Err(unsupported(path, "ddconfig.give_pre_end", true, "false"));
        }
        if d.tanh_out {
            return Err(unsupported(path, "ddconfig.tanh_out", true, "false"));
        }
        if d.use_linear_attn {
            return Err(unsupported(path, "ddconfig.use_linear_attn", true, "false"));
        }
        check_one_of(path, "ddconfig.attn_type", &d.attn_type, &["vanilla"])?;
        check_positive(path, "params.embed_dim", self.params.embed_dim)?;
        for (field, v) in [
            ("ddconfig.z_channels", d.z_channels),
            ("ddconfig.in_channels", d.in_channels),
            ("ddconfig.out_ch", d.out_ch),
            ("ddconfig.ch", d.ch),
            ("ddconfig.num_res_blocks", d.num_res_blocks),
            ("ddconfig.ch_mult (length)", d.ch_mult.len()),
            ("ddconfig.norm_num_groups", d.norm_num_groups),
        ] {
            check_positive(path, field, v)?;
        }
        for (i, &m) in d.ch_mult.iter().enumerate() {
            check_positive(path, &format!("ddconfig.ch_mult[{i}]"), m)?;
            let width = d.ch * m;
            if !width.is_multiple_of(d.norm_num_groups) {
                return Err(ModelError::Config {
                    path: path.to_path_buf(),
                    message: format!(
                        "level {i} width ch·ch_mult[{i}] = {width} is not divisible by the \
                         {} GroupNorm groups",
                        d.norm_num_groups
                    ),
                });
            }
        }
        Ok(())
    }

    /// Pixels per latent along each side: 2^(levels − 1) (8 for 2.0).
    pub fn scale_factor(&self) -> usize {
        1 << self.params.ddconfig.ch_mult.len().saturating_sub(1)
    }

    /// Width of each level: `ch · ch_mult[i]`.
    pub(crate) fn widths(&self) -> Vec<usize> {
        let d = &self.params.ddconfig;
        d.ch_mult.iter().map(|m| d.ch * m).collect()
    }

    /// Whether encoder level `i` has attentions: `curr_res in attn_resolutions`, with
    /// `curr_res = resolution // 2` applied `i` times (`Encoder.__init__`).
    pub(crate) fn encoder_level_attention(&self, i: usize) -> bool {
        let d = &self.params.ddconfig;
        let res = (0..i).fold(d.resolution, |r, _| r / 2);
        d.attn_resolutions.contains(&res)
    }

    /// Whether decoder level `i` (0 = full resolution) has attentions: `Decoder.__init__` starts
    /// from `resolution // 2^(levels − 1)` and doubles it per level, which differs from the
    /// encoder's halving when `resolution` is not a multiple of 2^(levels − 1).
    pub(crate) fn decoder_level_attention(&self, i: usize) -> bool {
        let d = &self.params.ddconfig;
        let top = d.ch_mult.len() - 1;
        let res = (d.resolution >> top) << (top - i);
        d.attn_resolutions.contains(&res)
    }
}
