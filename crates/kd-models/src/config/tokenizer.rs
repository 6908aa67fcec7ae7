//! `tokenizer/tokenizer_config.json`: what the CLIP tokenizer needs.

use serde::Deserialize;

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
#[serde(default)]
pub struct TokenizerConfig {
    /// The padded/truncated prompt length; transformers' "unset" value (`1e30`) reads as 77.
    #[serde(deserialize_with = "model_max_length")]
    pub model_max_length: usize,
    pub do_lower_case: Option<bool>,
}

impl Default for TokenizerConfig {
    /// The upstream class defaults.
    fn default() -> Self {
        Self {
            model_max_length: CLIP_CONTEXT_LENGTH,
            do_lower_case: Default::default(),
        }
    }
}
