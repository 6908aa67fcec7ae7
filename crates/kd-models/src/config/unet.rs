//! `unet/config.json`: diffusers `UNet2DConditionModel`.

use super::{
    check_divisible, check_one_of, check_opt_one_of, check_positive, unsupported, OneOrMany,
};
use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// `UNet2DConditionModel` config (the decoder UNet of Kandinsky 2.1 / 2.2).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: OneOrMany<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: OneOrMany<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: OneOrMany<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_embed_type_num_heads: usize,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub cross_attention_norm: Option<String>,
    pub dropout: f64,
}

impl Default for UNet2DConditionConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: Default::default(),
            flip_sin_to_cos: true,
            freq_shift: Default::default(),
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: Default::default(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: OneOrMany::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: OneOrMany::One(1280),
            encoder_hid_dim: None,
            encoder_hid_dim_type: None,
            attention_head_dim: OneOrMany::One(8),
            num_attention_heads: None,
            class_embed_type: None,
            addition_embed_type: None,
            addition_embed_type_num_heads: 64,
            upcast_attention: Default::default(),
            resnet_time_scale_shift: "default".into(),
            resnet_skip_time_act: Default::default(),
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".into(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            cross_attention_norm: None,
            dropout: Default::default(),
        }
    }
}

impl Default for OneOrMany<bool> {
    fn default() -> Self {
        Self::One(false)
    }
}

impl UNet2DConditionConfig {
    /// Time embedding width: `time_embedding_dim` or 4 × the first block's channels.
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Group-norm group count (32 when unset).
    pub fn groups(&self) -> usize {
        self.norm_num_groups.unwrap_or(32)
    }

    /// Rejects what the Kandinsky UNet port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let n = self.block_out_channels.len();
        check_positive(path, "block_out_channels (length)", n)?;
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "down_block_types ({}) and up_block_types ({}) must both have one entry per block_out_channels ({n})",
                    self.down_block_types.len(),
                    self.up_block_types.len()
                ),
            });
        }
        for (i, t) in self.down_block_types.iter().enumerate() {
            check_one_of(
                path,
                &format!("down_block_types[{i}]"),
                t,
                &["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
            )?;
        }
        for (i, t) in self.up_block_types.iter().enumerate() {
            check_one_of(
                path,
                &format!("up_block_types[{i}]"),
                t,
                &["ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"],
            )?;
        }
        check_opt_one_of(
            path,
            "mid_block_type",
            &self.mid_block_type,
            &[Some("UNetMidBlock2DSimpleCrossAttn")],
        )?;
        check_opt_one_of(
            path,
            "addition_embed_type",
            &self.addition_embed_type,
            &[Some("image"), Some("image_hint"), Some("text_image")],
        )?;
        check_opt_one_of(
            path,
            "encoder_hid_dim_type",
            &self.encoder_hid_dim_type,
            &[Some("image_proj"), Some("text_image_proj")],
        )?;
        check_opt_one_of(path, "class_embed_type", &self.class_embed_type, &[None])?;
        check_opt_one_of(
            path,
            "cross_attention_norm",
            &self.cross_attention_norm,
            &[None],
        )?;
        check_opt_one_of(
            path,
            "time_embedding_act_fn",
            &self.time_embedding_act_fn,
            &[None],
        )?;
        check_opt_one_of(path, "timestep_post_act", &self.timestep_post_act, &[None])?;
        check_one_of(
            path,
            "resnet_time_scale_shift",
            &self.resnet_time_scale_shift,
            &["scale_shift"],
        )?;
        check_one_of(path, "act_fn", &self.act_fn, &["silu"])?;
        check_one_of(
            path,
            "time_embedding_type",
            &self.time_embedding_type,
            &["positional"],
        )?;
        if self.only_cross_attention != OneOrMany::One(false) {
            return Err(unsupported(
                path,
                "only_cross_attention",
                &self.only_cross_attention,
                "false",
            ));
        }
        if self.center_input_sample {
            return Err(unsupported(path, "center_input_sample", true, "false"));
        }
        if self.resnet_skip_time_act {
            return Err(unsupported(path, "resnet_skip_time_act", true, "false"));
        }
        if self.time_cond_proj_dim.is_some() {
            return Err(unsupported(
                path,
                "time_cond_proj_dim",
                self.time_cond_proj_dim,
                "null",
            ));
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                return Err(unsupported(path, field, k, "odd kernel sizes"));
            }
        }
        if self.encoder_hid_dim_type.is_some() && self.encoder_hid_dim.is_none() {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: "`encoder_hid_dim_type` is set but `encoder_hid_dim` is null".into(),
            });
        }
        self.layers_per_block
            .check_len(n, path, "layers_per_block")?;
        self.attention_head_dim
            .check_len(n, path, "attention_head_dim")?;
        self.cross_attention_dim
            .check_len(n, path, "cross_attention_dim")?;
        let groups = self.groups();
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_divisible(
                path,
                &format!("block_out_channels[{i}] by norm_num_groups"),
                c,
                groups,
            )?;
            check_divisible(
                path,
                &format!("block_out_channels[{i}] by attention_head_dim"),
                c,
                self.attention_head_dim.get(i),
            )?;
        }
        Ok(())
    }
}
