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

mod clip;
mod image_processor;
mod prior;
mod scheduler;
mod tokenizer;
mod unet;
mod uvit;
mod vq;

pub use clip::{ClipTextConfig, ClipVisionConfig};
pub use image_processor::{ClipImageProcessorConfig, ImageSize};
pub use prior::PriorTransformerConfig;
pub use scheduler::{
    ConsistencySchedulerConfig, DdimSchedulerConfig, DdpmSchedulerConfig,
    DpmSolverMultistepSchedulerConfig, SchedulerConfig, UnClipSchedulerConfig,
};
pub use tokenizer::TokenizerConfig;
pub use unet::UNet2DConditionConfig;
pub use uvit::{UVit2DConfig, MICRO_CONDS};
pub use vq::VqModelConfig;

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

pub(crate) fn unsupported(
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

pub(crate) fn check_one_of(path: &Path, field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(unsupported(path, field, value, &allowed.join(", ")))
    }
}

pub(crate) fn check_opt_one_of(
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

pub(crate) fn check_positive(path: &Path, field: &str, value: usize) -> Result<()> {
    if value == 0 {
        return Err(ModelError::Config {
            path: path.to_path_buf(),
            message: format!("`{field}` must be > 0"),
        });
    }
    Ok(())
}

pub(crate) fn check_divisible(path: &Path, what: &str, value: usize, by: usize) -> Result<()> {
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
