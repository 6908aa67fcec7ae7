//! Typed views of the diffusers / transformers `config.json` files of every Kandinsky component.
//!
//! Field names and defaults follow the upstream classes (`UNet2DConditionModel`, `VQModel`,
//! `PriorTransformer`, `CLIPTextConfig`, `CLIPVisionConfig`, the schedulers and
//! `CLIPImageProcessor`), so official checkpoint folders load unchanged. Unknown fields are
//! ignored; values this implementation does not support are rejected by each `validate`, which
//! names the file, the field and the supported values.

use crate::error::{ModelError, Result};
use serde::Deserialize;
use std::path::Path;

/// A field that upstream accepts either as one value or as a per-block list.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> T {
        match self {
            Self::One(v) => v.clone(),
            Self::Many(v) => v[i.min(v.len().saturating_sub(1))].clone(),
        }
    }

    /// Checks that a list form has exactly `n` entries.
    pub fn check_len(&self, n: usize, path: &Path, field: &str) -> Result<()> {
        match self {
            Self::Many(v) if v.len() != n => Err(ModelError::Config {
                path: path.to_path_buf(),
                message: format!(
                    "`{field}` has {} entries, expected {n} (one per block)",
                    v.len()
                ),
            }),
            _ => Ok(()),
        }
    }
}

fn unsupported(
    path: &Path,
    field: &str,
    value: impl std::fmt::Debug,
    supported: &str,
) -> ModelError {
    ModelError::Unsupported {
        path: path.to_path_buf(),
        field: field.to_string(),
        value: format!("{value:?}"),
        supported: supported.to_string(),
    }
}

fn check_one_of(path: &Path, field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(unsupported(path, field, value, &allowed.join(", ")))
    }
}

fn check_opt_one_of(
    path: &Path,
    field: &str,
    value: &Option<String>,
    allowed: &[Option<&str>],
) -> Result<()> {
    if allowed.contains(&value.as_deref()) {
        Ok(())
    } else {
        let names: Vec<String> = allowed
            .iter()
            .map(|a| a.map_or("null".to_string(), |s| format!("\"{s}\"")))
            .collect();
        Err(unsupported(path, field, value, &names.join(", ")))
    }
}

fn check_positive(path: &Path, field: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!("`{field}` must be > 0"),
        });
    }
    Ok(())
}

fn check_divisible(path: &Path, what: &str, value: usize, by: usize) -> Result<()> {
    if by == 0 || !value.is_multiple_of(by) {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!("{what}: {value} is not divisible by {by}"),
        });
    }
    Ok(())
}

/// Reads and parses a JSON config file.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

// ---------------------------------------------------------------------------------------------
// UNet

fn d_unet_in() -> usize {
    4
}
fn d_unet_out() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_layers_per_block() -> OneOrMany<usize> {
    OneOrMany::One(2)
}
fn d_one_usize() -> usize {
    1
}
fn d_one_f64() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_groups() -> Option<usize> {
    Some(32)
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_cross_dim() -> OneOrMany<usize> {
    OneOrMany::One(1280)
}
fn d_head_dim() -> OneOrMany<usize> {
    OneOrMany::One(8)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_three() -> usize {
    3
}
fn d_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_unet_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_unet_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_unet_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_64() -> usize {
    64
}

/// `UNet2DConditionModel` config (the decoder UNet of Kandinsky 2.1 / 2.2).
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    pub sample_size: Option<usize>,
    #[serde(default = "d_unet_in")]
    pub in_channels: usize,
    #[serde(default = "d_unet_out")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_unet_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid_block")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_unet_up")]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: OneOrMany<bool>,
    #[serde(default = "d_unet_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers_per_block")]
    pub layers_per_block: OneOrMany<usize>,
    #[serde(default = "d_one_usize")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f64")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "d_eps5")]
    pub norm_eps: f64,
    #[serde(default = "d_cross_dim")]
    pub cross_attention_dim: OneOrMany<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: OneOrMany<usize>,
    pub num_attention_heads: Option<OneOrMany<usize>>,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    #[serde(default = "d_64")]
    pub addition_embed_type_num_heads: usize,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f64")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_three")]
    pub conv_out_kernel: usize,
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub dropout: f64,
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

// ---------------------------------------------------------------------------------------------
// MoVQ

fn d_three_ch() -> usize {
    3
}
fn d_vq_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_vq_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_vq_channels() -> Vec<usize> {
    vec![64]
}
fn d_256() -> usize {
    256
}
fn d_32() -> usize {
    32
}
fn d_scaling() -> f64 {
    0.18215
}
fn d_group() -> String {
    "group".into()
}

/// `VQModel` config (MoVQ).
#[derive(Debug, Clone, Deserialize)]
pub struct VqModelConfig {
    #[serde(default = "d_three_ch")]
    pub in_channels: usize,
    #[serde(default = "d_three_ch")]
    pub out_channels: usize,
    #[serde(default = "d_vq_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_vq_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_vq_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_one_usize")]
    pub layers_per_block: usize,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_three_ch")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub sample_size: usize,
    #[serde(default = "d_256")]
    pub num_vq_embeddings: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    pub vq_embed_dim: Option<usize>,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default = "d_group")]
    pub norm_type: String,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub lookup_from_codebook: bool,
    #[serde(default)]
    pub force_upcast: bool,
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

    /// Rejects what the MoVQ port does not implement.
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
        check_one_of(path, "norm_type", &self.norm_type, &["spatial"])?;
        check_one_of(path, "act_fn", &self.act_fn, &["silu"])?;
        if self.lookup_from_codebook {
            return Err(unsupported(path, "lookup_from_codebook", true, "false"));
        }
        check_positive(path, "layers_per_block", self.layers_per_block)?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            check_divisible(
                path,
                &format!("block_out_channels[{i}] by norm_num_groups"),
                c,
                self.norm_num_groups,
            )?;
            // SpatialNorm always uses 32 groups.
            check_divisible(
                path,
                &format!("block_out_channels[{i}] by 32 (SpatialNorm groups)"),
                c,
                32,
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Prior

fn d_prior_heads() -> usize {
    32
}
fn d_prior_head_dim() -> usize {
    64
}
fn d_prior_layers() -> usize {
    20
}
fn d_768() -> usize {
    768
}
fn d_77() -> usize {
    77
}
fn d_4() -> usize {
    4
}
fn d_linear() -> Option<String> {
    Some("linear".into())
}
fn d_prd() -> Option<String> {
    Some("prd".into())
}

/// `PriorTransformer` config.
#[derive(Debug, Clone, Deserialize)]
pub struct PriorTransformerConfig {
    #[serde(default = "d_prior_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_prior_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "d_prior_layers")]
    pub num_layers: usize,
    #[serde(default = "d_768")]
    pub embedding_dim: usize,
    #[serde(default = "d_77")]
    pub num_embeddings: usize,
    #[serde(default = "d_4")]
    pub additional_embeddings: usize,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub time_embed_act_fn: String,
    pub norm_in_type: Option<String>,
    pub embedding_proj_norm_type: Option<String>,
    #[serde(default = "d_linear")]
    pub encoder_hid_proj_type: Option<String>,
    #[serde(default = "d_prd")]
    pub added_emb_type: Option<String>,
    pub time_embed_dim: Option<usize>,
    pub embedding_proj_dim: Option<usize>,
    pub clip_embed_dim: Option<usize>,
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

// ---------------------------------------------------------------------------------------------
// CLIP

fn d_vocab() -> usize {
    49408
}
fn d_512() -> usize {
    512
}
fn d_2048() -> usize {
    2048
}
fn d_12() -> usize {
    12
}
fn d_8() -> usize {
    8
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}
fn d_pad() -> u32 {
    1
}
fn d_bos() -> u32 {
    49406
}
fn d_eos() -> u32 {
    49407
}
fn d_3072() -> usize {
    3072
}
fn d_224() -> usize {
    224
}

/// transformers `CLIPTextConfig` (the text tower of `CLIPTextModelWithProjection`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_512")]
    pub hidden_size: usize,
    #[serde(default = "d_2048")]
    pub intermediate_size: usize,
    #[serde(default = "d_512")]
    pub projection_dim: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_8")]
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
    #[serde(default = "d_pad")]
    pub pad_token_id: u32,
    #[serde(default = "d_bos")]
    pub bos_token_id: u32,
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
}

/// transformers `CLIPVisionConfig` (the vision tower of `CLIPVisionModelWithProjection`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "d_768")]
    pub hidden_size: usize,
    #[serde(default = "d_3072")]
    pub intermediate_size: usize,
    #[serde(default = "d_512")]
    pub projection_dim: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_three_ch")]
    pub num_channels: usize,
    #[serde(default = "d_224")]
    pub image_size: usize,
    #[serde(default = "d_32")]
    pub patch_size: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
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

/// `CLIPImageProcessor` `size` / `crop_size`: an int (old files) or a dict.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ImageSize {
    Int(usize),
    ShortestEdge { shortest_edge: usize },
    HeightWidth { height: usize, width: usize },
}

fn d_size() -> ImageSize {
    ImageSize::ShortestEdge { shortest_edge: 224 }
}
fn d_crop() -> ImageSize {
    ImageSize::HeightWidth {
        height: 224,
        width: 224,
    }
}
fn d_resample() -> u32 {
    3
}
fn d_rescale() -> f64 {
    1.0 / 255.0
}
fn d_clip_mean() -> [f64; 3] {
    [0.48145466, 0.4578275, 0.40821073]
}
fn d_clip_std() -> [f64; 3] {
    [0.26862954, 0.26130258, 0.27577711]
}

/// transformers `CLIPImageProcessor` (`preprocessor_config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipImageProcessorConfig {
    #[serde(default = "d_true")]
    pub do_resize: bool,
    #[serde(default = "d_size")]
    pub size: ImageSize,
    #[serde(default = "d_resample")]
    pub resample: u32,
    #[serde(default = "d_true")]
    pub do_center_crop: bool,
    #[serde(default = "d_crop")]
    pub crop_size: ImageSize,
    #[serde(default = "d_true")]
    pub do_rescale: bool,
    #[serde(default = "d_rescale")]
    pub rescale_factor: f64,
    #[serde(default = "d_true")]
    pub do_normalize: bool,
    #[serde(default = "d_clip_mean")]
    pub image_mean: [f64; 3],
    #[serde(default = "d_clip_std")]
    pub image_std: [f64; 3],
    #[serde(default = "d_true")]
    pub do_convert_rgb: bool,
}

impl ClipImageProcessorConfig {
    /// Rejects resampling filters other than bicubic (3) and bilinear (2).
    pub fn validate(&self, path: &Path) -> Result<()> {
        if ![2, 3].contains(&self.resample) {
            return Err(unsupported(
                path,
                "resample",
                self.resample,
                "2 (bilinear), 3 (bicubic)",
            ));
        }
        Ok(())
    }
}

fn d_max_len() -> usize {
    CLIP_CONTEXT_LENGTH
}

/// CLIP's context length: the `model_max_length` every Kandinsky CLIP tokenizer stores.
const CLIP_CONTEXT_LENGTH: usize = 77;
/// transformers writes `VERY_LARGE_INTEGER = int(1e30)` as `model_max_length` when the tokenizer
/// was saved without one; any value this large means "unset".
const UNSET_MODEL_MAX_LENGTH: f64 = 1e29;

/// `model_max_length` as an integer or a float (transformers' "unset" `1e30` does not fit a
/// `usize`); the "unset" value becomes CLIP's context length.
fn model_max_length<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<usize, D::Error> {
    let v = f64::deserialize(d)?;
    if v >= UNSET_MODEL_MAX_LENGTH {
        return Ok(CLIP_CONTEXT_LENGTH);
    }
    if v < 0.0 || v.fract() != 0.0 {
        return Err(serde::de::Error::custom(format!(
            "`model_max_length` must be a non-negative integer (or transformers' unset 1e30), \
             got {v}"
        )));
    }
    Ok(v as usize)
}

/// transformers `tokenizer_config.json` (only what the CLIP tokenizer needs).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizerConfig {
    /// The padded/truncated prompt length; transformers' "unset" value (`1e30`) reads as 77.
    #[serde(default = "d_max_len", deserialize_with = "model_max_length")]
    pub model_max_length: usize,
    #[serde(default)]
    pub do_lower_case: Option<bool>,
}

// ---------------------------------------------------------------------------------------------
// Schedulers

fn d_1000() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_beta_linear() -> String {
    "linear".into()
}
fn d_squaredcos() -> String {
    "squaredcos_cap_v2".into()
}
fn d_fixed_small() -> String {
    "fixed_small".into()
}
fn d_fixed_small_log() -> String {
    "fixed_small_log".into()
}
fn d_epsilon() -> String {
    "epsilon".into()
}
fn d_leading() -> String {
    "leading".into()
}
fn d_linspace() -> String {
    "linspace".into()
}
fn d_995() -> f64 {
    0.995
}
fn d_two() -> usize {
    2
}
fn d_dpmpp() -> String {
    "dpmsolver++".into()
}
fn d_midpoint() -> String {
    "midpoint".into()
}
fn d_zero() -> String {
    "zero".into()
}
fn d_neg_inf() -> f64 {
    f64::NEG_INFINITY
}

/// `UnCLIPScheduler` config (the prior's scheduler).
#[derive(Debug, Clone, Deserialize)]
pub struct UnClipSchedulerConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_fixed_small_log")]
    pub variance_type: String,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one_f64")]
    pub clip_sample_range: f64,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default = "d_squaredcos")]
    pub beta_schedule: String,
}

impl UnClipSchedulerConfig {
    /// Rejects what the UnCLIP port does not implement.
    pub fn validate(&self, path: &Path) -> Result<()> {
        check_one_of(
            path,
            "variance_type",
            &self.variance_type,
            &["fixed_small_log", "learned_range"],
        )?;
        check_one_of(
            path,
            "prediction_type",
            &self.prediction_type,
            &["sample", "epsilon"],
        )?;
        check_one_of(
            path,
            "beta_schedule",
            &self.beta_schedule,
            &["squaredcos_cap_v2"],
        )?;
        check_positive(path, "num_train_timesteps", self.num_train_timesteps)
    }
}

/// `DDPMScheduler` config.
#[derive(Debug, Clone, Deserialize)]
pub struct DdpmSchedulerConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_beta_linear")]
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_fixed_small")]
    pub variance_type: String,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "d_995")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(default = "d_one_f64")]
    pub clip_sample_range: f64,
    #[serde(default = "d_one_f64")]
    pub sample_max_value: f64,
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// `DDIMScheduler` config.
#[derive(Debug, Clone, Deserialize)]
pub struct DdimSchedulerConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_beta_linear")]
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "d_995")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(default = "d_one_f64")]
    pub clip_sample_range: f64,
    #[serde(default = "d_one_f64")]
    pub sample_max_value: f64,
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// A float that diffusers may have written as `"-inf"`, `"inf"` or `"nan"` (its `-Infinity`
/// token is not JSON, so saved copies spell it as a string).
fn f64_or_name<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum F {
        Num(f64),
        Name(String),
    }
    match F::deserialize(d)? {
        F::Num(v) => Ok(v),
        F::Name(s) => match s.to_ascii_lowercase().as_str() {
            "-inf" | "-infinity" => Ok(f64::NEG_INFINITY),
            "inf" | "infinity" => Ok(f64::INFINITY),
            "nan" => Ok(f64::NAN),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number, got {s:?}"
            ))),
        },
    }
}

/// `DPMSolverMultistepScheduler` config.
#[derive(Debug, Clone, Deserialize)]
pub struct DpmSolverMultistepSchedulerConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_beta_linear")]
    pub beta_schedule: String,
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_two")]
    pub solver_order: usize,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default = "d_995")]
    pub dynamic_thresholding_ratio: f64,
    #[serde(default = "d_one_f64")]
    pub sample_max_value: f64,
    #[serde(default = "d_dpmpp")]
    pub algorithm_type: String,
    #[serde(default = "d_midpoint")]
    pub solver_type: String,
    #[serde(default = "d_true")]
    pub lower_order_final: bool,
    #[serde(default)]
    pub euler_at_final: bool,
    #[serde(default)]
    pub use_karras_sigmas: bool,
    #[serde(default)]
    pub use_lu_lambdas: bool,
    #[serde(default = "d_zero")]
    pub final_sigmas_type: String,
    #[serde(default = "d_neg_inf", deserialize_with = "f64_or_name")]
    pub lambda_min_clipped: f64,
    pub variance_type: Option<String>,
    #[serde(default = "d_linspace")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

/// A scheduler config, dispatched on its `_class_name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "_class_name")]
pub enum SchedulerConfig {
    #[serde(rename = "UnCLIPScheduler")]
    UnClip(UnClipSchedulerConfig),
    #[serde(rename = "DDPMScheduler")]
    Ddpm(DdpmSchedulerConfig),
    #[serde(rename = "DDIMScheduler")]
    Ddim(DdimSchedulerConfig),
    #[serde(rename = "DPMSolverMultistepScheduler")]
    DpmSolverMultistep(DpmSolverMultistepSchedulerConfig),
}

impl SchedulerConfig {
    /// Checks the values the decoder schedulers rely on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let betas = |s: &str| {
            check_one_of(
                path,
                "beta_schedule",
                s,
                &["linear", "scaled_linear", "squaredcos_cap_v2"],
            )
        };
        let spacing = |s: &str| {
            check_one_of(
                path,
                "timestep_spacing",
                s,
                &["leading", "trailing", "linspace"],
            )
        };
        let prediction = |s: &str| {
            check_one_of(
                path,
                "prediction_type",
                s,
                &["epsilon", "sample", "v_prediction"],
            )
        };
        match self {
            Self::UnClip(c) => c.validate(path),
            Self::Ddpm(c) => {
                betas(&c.beta_schedule)?;
                spacing(&c.timestep_spacing)?;
                prediction(&c.prediction_type)?;
                check_one_of(
                    path,
                    "variance_type",
                    &c.variance_type,
                    &["fixed_small", "fixed_small_log", "learned_range", "learned"],
                )?;
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)
            }
            Self::Ddim(c) => {
                betas(&c.beta_schedule)?;
                spacing(&c.timestep_spacing)?;
                prediction(&c.prediction_type)?;
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)
            }
            Self::DpmSolverMultistep(c) => {
                betas(&c.beta_schedule)?;
                spacing(&c.timestep_spacing)?;
                prediction(&c.prediction_type)?;
                check_one_of(path, "algorithm_type", &c.algorithm_type, &["dpmsolver++"])?;
                check_one_of(path, "solver_type", &c.solver_type, &["midpoint", "heun"])?;
                if !(1..=3).contains(&c.solver_order) {
                    return Err(unsupported(path, "solver_order", c.solver_order, "1, 2, 3"));
                }
                check_positive(path, "num_train_timesteps", c.num_train_timesteps)
            }
        }
    }
}
