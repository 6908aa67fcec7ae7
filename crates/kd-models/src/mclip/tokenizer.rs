//! The XLM-RoBERTa SentencePiece tokenizer as diffusers' `KandinskyPipeline._encode_prompt` calls
//! `XLMRobertaTokenizerFast`: `padding="max_length", max_length=77, truncation=True,
//! add_special_tokens=True` — `<s> … </s>`, truncated so that `</s>` stays last, padded with
//! `<pad>` (id 1 in XLM-R), attention mask 1 for `<s>..</s>` and 0 for padding.
//!
//! Loads `tokenizer.json` (the fast-tokenizer file: normalizer, Metaspace, Unigram and the
//! `<s> $A </s>` template). The pad token comes from `tokenizer_config.json` or
//! `special_tokens_map.json` (transformers' default `<pad>` when neither names one); the length
//! is diffusers' fixed 77, not `model_max_length` (which XLM-R sets to 512 or larger).

use crate::clip::TokenizedBatch;
use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// The sequence length diffusers pads and truncates M-CLIP prompts to.
pub const MAX_LENGTH: usize = 77;
/// transformers' `XLMRobertaTokenizer` default pad token.
const DEFAULT_PAD_TOKEN: &str = "<pad>";

/// A tokenised batch as (B, 77) i64 tensors, the dtypes transformers returns.
#[derive(Debug, Clone)]
pub struct XlmrBatch {
    /// Token ids, (B, 77) i64.
    pub input_ids: Tensor,
    /// 1 for `<s>..</s>`, 0 for padding, (B, 77) i64.
    pub attention_mask: Tensor,
}

/// XLM-R tokenizer padded/truncated to [`MAX_LENGTH`]. Immutable; `encode` takes `&self`.
#[derive(Clone)]
pub struct XlmrTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for XlmrTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XlmrTokenizer")
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot build the XLM-R tokenizer: {e}"),
    }
}

/// `pad_token` of a transformers tokenizer json: a string or an `AddedToken` object.
fn pad_token_in(path: &Path) -> Result<Option<String>> {
    if !path.is_file() {
        return Ok(None);
    }
    let v: serde_json::Value = crate::config::read_json(path)?;
    Ok(match v.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(obj @ serde_json::Value::Object(_)) => obj
            .get("content")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
        _ => None,
    })
}

impl XlmrTokenizer {
    /// Loads a `tokenizer/` folder: `tokenizer.json` (required) and the pad token from
    /// `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(ModelError::Checkpoint {
                path: json,
                message: "missing: the XLM-R tokenizer needs `tokenizer.json` (the fast-tokenizer \
                          file that transformers saves)"
                    .into(),
            });
        }
        let pad_token = match pad_token_in(&dir.join("tokenizer_config.json"))? {
            Some(p) => p,
            None => pad_token_in(&dir.join("special_tokens_map.json"))?
                .unwrap_or_else(|| DEFAULT_PAD_TOKEN.into()),
        };
        let inner = Tokenizer::from_file(&json).map_err(|e| tok_err(&json, e))?;
        Self::new(inner, &pad_token, MAX_LENGTH, &json)
    }

    /// Sets padding to `max_length` with `pad_token` and right truncation (special tokens kept).
    /// `path` names the source in errors.
    pub fn new(
        mut inner: Tokenizer,
        pad_token: &str,
        max_length: usize,
        path: &Path,
    ) -> Result<Self> {
        if max_length < 2 {
            return Err(tok_err(path, "max_length must be at least 2 (<s> + </s>)"));
        }
        let pad_id = inner.token_to_id(pad_token).ok_or_else(|| {
            tok_err(
                path,
                format!("the pad token `{pad_token}` is not in the vocabulary"),
            )
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| tok_err(path, e))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: pad_token.into(),
            ..Default::default()
        }));
        Ok(Self {
            inner,
            pad_id,
            max_length,
        })
    }

    /// The padding token id (1 for XLM-R).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The fixed sequence length (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenises prompts one by one (rows do not depend on the batch) into (B, 77) u32 rows of
    /// ids and attention mask.
    pub fn encode_rows<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        if prompts.is_empty() {
            return Err(ModelError::invalid(
                "prompts",
                "must hold at least one prompt",
            ));
        }
        let mut ids = Vec::with_capacity(prompts.len());
        let mut mask = Vec::with_capacity(prompts.len());
        for p in prompts {
            let enc = self
                .inner
                .encode(p.as_ref(), true)
                .map_err(|e| ModelError::invalid("prompts", format!("cannot tokenise: {e}")))?;
            ids.push(enc.get_ids().to_vec());
            mask.push(enc.get_attention_mask().to_vec());
        }
        Ok(TokenizedBatch {
            input_ids: ids,
            attention_mask: mask,
        })
    }

    /// Tokenises prompts (B ≥ 1) into (B, 77) i64 `input_ids` and `attention_mask` on `device`.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<XlmrBatch> {
        let rows = self.encode_rows(prompts)?;
        Ok(XlmrBatch {
            input_ids: rows_i64(&rows.input_ids, self.max_length, device)?,
            attention_mask: rows_i64(&rows.attention_mask, self.max_length, device)?,
        })
    }
}

fn rows_i64(rows: &[Vec<u32>], len: usize, device: &Device) -> Result<Tensor> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&v| i64::from(v)).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), len), device)?)
}
