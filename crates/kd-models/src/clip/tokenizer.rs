//! The CLIP BPE tokenizer as `transformers.CLIPTokenizer` (fast) calls it for Kandinsky:
//! `padding="max_length", max_length=77, truncation=True` — BOS … EOS, padded with EOS (49407),
//! attention mask 1 for BOS..EOS and 0 for padding.
//!
//! Loads either a `tokenizer.json` or, for hub folders that only have the slow files, builds the
//! identical fast tokenizer from `vocab.json` + `merges.txt` (NFC → collapse whitespace →
//! lowercase → CLIP regex split → byte-level → BPE with `</w>`).

use crate::error::{ModelError, Result};
use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

/// The end-of-text token, also the padding token.
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// The start-of-text token.
pub const START_OF_TEXT: &str = "<|startoftext|>";
/// CLIP's pre-tokenisation regex (with the special tokens kept whole), as transformers writes it.
const CLIP_SPLIT_REGEX: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// A batch of tokenised prompts, each exactly `max_length` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedBatch {
    /// Token ids per prompt (BOS … EOS, EOS padding).
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for BOS..first EOS, 0 for padding.
    pub attention_mask: Vec<Vec<u32>>,
}

impl TokenizedBatch {
    /// Number of prompts.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True when the batch holds no prompt.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// `input_ids` as a (B, L) u32 tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        rows_tensor(&self.input_ids, device)
    }

    /// `attention_mask` as a (B, L) u32 tensor.
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        rows_tensor(&self.attention_mask, device)
    }
}

fn rows_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), l), device)?)
}

/// CLIP tokenizer padded/truncated to a fixed length (77 for Kandinsky).
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot build the CLIP tokenizer: {e}"),
    }
}

impl ClipTokenizer {
    /// Loads a tokenizer folder: `tokenizer.json` when present, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: impl AsRef<Path>, max_length: usize) -> Result<Self> {
        let dir = dir.as_ref();
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            Self::from_tokenizer_json(&json, max_length)
        } else {
            Self::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), max_length)
        }
    }

    /// Loads a fast-tokenizer `tokenizer.json` and sets CLIP's padding and truncation.
    pub fn from_tokenizer_json(path: &Path, max_length: usize) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        Self::configure(inner, max_length, path)
    }

    /// Builds the same fast tokenizer from the slow files `vocab.json` and `merges.txt`.
    pub fn from_vocab_merges(vocab: &Path, merges: &Path, max_length: usize) -> Result<Self> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| ModelError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let vocab_json: serde_json::Value =
            serde_json::from_str(&read(vocab)?).map_err(|e| tok_err(vocab, e))?;
        let merges_list: Vec<String> = read(merges)?
            .lines()
            .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
            .map(str::to_string)
            .collect();
        let id_of = |tok: &str| {
            vocab_json
                .get(tok)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| tok_err(vocab, format!("no `{tok}` in the vocabulary")))
        };
        let (bos, eos) = (id_of(START_OF_TEXT)?, id_of(END_OF_TEXT)?);
        let special = |id: u64, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        };
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(bos, START_OF_TEXT), special(eos, END_OF_TEXT)],
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT_REGEX}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
            "post_processor": {"type": "RobertaProcessing", "sep": [END_OF_TEXT, eos],
                "cls": [START_OF_TEXT, bos], "trim_offsets": false, "add_prefix_space": false},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": END_OF_TEXT,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>", "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_json, "merges": merges_list},
        });
        let inner: Tokenizer = spec.to_string().parse().map_err(|e| tok_err(vocab, e))?;
        Self::configure(inner, max_length, vocab)
    }

    fn configure(mut inner: Tokenizer, max_length: usize, path: &Path) -> Result<Self> {
        if max_length < 2 {
            return Err(tok_err(path, "max_length must be at least 2 (BOS + EOS)"));
        }
        let pad_id = inner
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| tok_err(path, format!("no `{END_OF_TEXT}` token")))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| tok_err(path, e))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            pad_id,
            pad_token: END_OF_TEXT.into(),
            ..Default::default()
        }));
        Ok(Self { inner, max_length })
    }

    /// The fixed sequence length (77).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Tokenises prompts one by one (the result does not depend on batch composition).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        let mut input_ids = Vec::with_capacity(prompts.len());
        let mut attention_mask = Vec::with_capacity(prompts.len());
        for p in prompts {
            let enc = self
                .inner
                .encode(p.as_ref(), true)
                .map_err(|e| ModelError::invalid("prompt", format!("cannot tokenise: {e}")))?;
            input_ids.push(enc.get_ids().to_vec());
            attention_mask.push(enc.get_attention_mask().to_vec());
        }
        Ok(TokenizedBatch {
            input_ids,
            attention_mask,
        })
    }
}
