//! The mT5 tokenizer of Kandinsky 2.0's `text_encoder2/`, built from `spiece.model` alone (the
//! official folder ships no `tokenizer.json`): what `AutoTokenizer.from_pretrained(folder)`
//! makes of it — transformers' `T5Tokenizer` converted from the SentencePiece model — called as
//! `Kandinsky2.encode_text` calls it (`max_length=77, padding="max_length", truncation=True,
//! add_special_tokens=True`).
//!
//! The conversion (transformers 5 `T5Tokenizer` / `T5Converter`, checked against the
//! `sentencepiece` library on every fixture prompt):
//!
//! * model: `Unigram` over the pieces in id order with their scores, then `extra_ids` sentinels
//!   `<extra_id_{n-1}>` … `<extra_id_0>` (score 0); unknown id = `trainer_spec.unk_id` (2 in
//!   mT5); no byte fallback (T5's tokenizer never enables it);
//! * normalizer: `Precompiled(normalizer_spec.precompiled_charsmap)` (none when empty);
//! * pre-tokenizer: `WhitespaceSplit`, then `Metaspace("▁", prepend_scheme=always, split)`;
//! * post-processor: `$A </s>`;
//! * special tokens, matched in the raw text before normalisation: the model's control pieces
//!   (`<pad>`, `</s>`), the `eos`/`unk`/`pad` tokens, the sentinels and
//!   `additional_special_tokens`; user-defined pieces are plain added tokens.
//!
//! Rows are `ids… </s>` truncated so that `</s>` stays last, padded with `<pad>` (id 0) to 77; the
//! mask is 1 up to `</s>`. An empty prompt is `</s>` alone.

use super::spm::{PieceType, SpmModel, SpmModelType};
use crate::clip::TokenizedBatch;
use crate::error::{ModelError, Result};
use crate::mclip::{XlmrBatch, XlmrTokenizer, MAX_LENGTH};
use candle_core::Device;
use serde_json::Value;
use std::path::Path;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// transformers' `T5Tokenizer` default sentinel count (mT5's folders set 0).
const DEFAULT_EXTRA_IDS: usize = 100;

/// The special tokens of a T5 tokenizer folder (`tokenizer_config.json`, else
/// `special_tokens_map.json`, else transformers' defaults).
#[derive(Debug, Clone, PartialEq)]
pub struct T5SpecialTokens {
    /// End of sequence, appended to every row (`</s>`).
    pub eos: String,
    /// Unknown token (`<unk>`).
    pub unk: String,
    /// Padding token (`<pad>`).
    pub pad: String,
    /// Sentinel count (`extra_ids`; 100 when unset, 0 in mT5's folders).
    pub extra_ids: usize,
    /// `additional_special_tokens`.
    pub additional: Vec<String>,
}

fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    crate::config::read_json(path).map(Some)
}

impl T5SpecialTokens {
    /// Reads `dir/tokenizer_config.json` and `dir/special_tokens_map.json` (both optional).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_optional_json(&cfg_path)?;
        let map = read_optional_json(&dir.join("special_tokens_map.json"))?;
        let get = |key: &str, default: &str| -> String {
            cfg.as_ref()
                .and_then(|c| c.get(key))
                .and_then(token_text)
                .or_else(|| map.as_ref().and_then(|m| m.get(key)).and_then(token_text))
                .unwrap_or_else(|| default.to_string())
        };
        let extra_ids = match cfg.as_ref().and_then(|c| c.get("extra_ids")) {
            None | Some(Value::Null) => DEFAULT_EXTRA_IDS,
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n <= 100_000)
                .ok_or_else(|| ModelError::Config {
                    path: cfg_path.clone(),
                    message: format!("`extra_ids` must be a count, got {v}"),
                })?,
        };
        let additional = cfg
            .as_ref()
            .and_then(|c| c.get("additional_special_tokens"))
            .or_else(|| {
                map.as_ref()
                    .and_then(|m| m.get("additional_special_tokens"))
            })
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(token_text).collect())
            .unwrap_or_default();
        Ok(Self {
            eos: get("eos_token", "</s>"),
            unk: get("unk_token", "<unk>"),
            pad: get("pad_token", "<pad>"),
            extra_ids,
            additional,
        })
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot build the mT5 tokenizer: {e}"),
    }
}

/// Checks a `precompiled_charsmap` before the `tokenizers` crate uses it: its parser reserves
/// what the header claims, and its double-array lookups index without bounds checks. The layout
/// is a little-endian u32 byte length of the trie, the trie's u32 units, then the normalised
/// strings (NUL-separated UTF-8). Accepted when the trie fits the bytes and every lookup the
/// trie can make stays inside it: from any unit `p` that is not a value unit, the children
/// `p ^ offset(p) ^ c` for every byte `c`, and every leaf's string offset is a character
/// boundary of the strings. Real
/// SentencePiece tries (darts-clone, allocated in blocks of 256 units) satisfy this.
fn check_charsmap(charsmap: &[u8]) -> std::result::Result<(), String> {
    let field = "normalizer_spec.precompiled_charsmap";
    let claimed = charsmap
        .get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(format!("{field}: shorter than its 4-byte header"))?;
    if !claimed.is_multiple_of(4) || claimed > charsmap.len() - 4 {
        return Err(format!(
            "{field}: its trie claims {claimed} bytes of {} (a multiple of 4 within the charsmap \
             is allowed)",
            charsmap.len() - 4
        ));
    }
    let units: Vec<usize> = charsmap[4..4 + claimed]
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let strings = std::str::from_utf8(&charsmap[4 + claimed..])
        .map_err(|_| format!("{field}: its normalised strings are not UTF-8"))?;
    if units.is_empty() {
        return Err(format!("{field}: an empty trie"));
    }
    // The unit encoding of darts-clone (as `spm_precompiled` reads it).
    let offset = |u: usize| (u >> 10) << ((u & (1 << 9)) >> 6);
    let has_leaf = |u: usize| (u >> 8) & 1 == 1;
    let value = |u: usize| u & ((1 << 31) - 1);
    // Value units (bit 31) hold a leaf's string offset; no lookup continues from them (their
    // label never matches a byte) — except the root, which every lookup starts from.
    let is_value = |u: usize| u & (1 << 31) != 0;
    for (p, &u) in units
        .iter()
        .enumerate()
        .filter(|&(p, &u)| p == 0 || !is_value(u))
    {
        let base = p ^ offset(u);
        if base | 0xFF >= units.len() {
            return Err(format!(
                "{field}: trie unit {p} points outside the trie ({} units)",
                units.len()
            ));
        }
        if has_leaf(u) {
            let v = value(units[base]);
            if v > strings.len() || !strings.is_char_boundary(v) {
                return Err(format!(
                    "{field}: trie unit {p} names string offset {v}, outside the strings"
                ));
            }
        }
    }
    Ok(())
}

/// Builds the `tokenizers` pipeline transformers makes of a T5 SentencePiece model (unpadded,
/// untruncated). `path` names the model file in errors.
pub fn t5_tokenizer_from_spm(
    model: &SpmModel,
    special: &T5SpecialTokens,
    path: &Path,
) -> Result<Tokenizer> {
    if model.trainer_spec.model_type != SpmModelType::Unigram {
        return Err(ModelError::Unsupported {
            path: path.to_path_buf(),
            field: "trainer_spec.model_type".into(),
            value: format!("{:?}", model.trainer_spec.model_type),
            supported: "Unigram (T5 / mT5)".into(),
        });
    }
    let unk_id = usize::try_from(model.trainer_spec.unk_id)
        .ok()
        .filter(|&i| i < model.pieces.len())
        .ok_or_else(|| {
            tok_err(
                path,
                format!(
                    "unk_id {} is not a piece id (0..{})",
                    model.trainer_spec.unk_id,
                    model.pieces.len()
                ),
            )
        })?;
    let mut vocab: Vec<(String, f64)> = model
        .pieces
        .iter()
        .map(|p| (p.piece.clone(), f64::from(p.score)))
        .collect();
    let sentinels: Vec<String> = (0..special.extra_ids)
        .rev()
        .map(|i| format!("<extra_id_{i}>"))
        .collect();
    vocab.extend(sentinels.iter().map(|s| (s.clone(), 0.0)));
    let unigram = Unigram::from(vocab, Some(unk_id), false).map_err(|e| tok_err(path, e))?;
    let mut tok = Tokenizer::new(unigram);
    let charsmap = &model.normalizer_spec.precompiled_charsmap;
    if !charsmap.is_empty() {
        check_charsmap(charsmap).map_err(|e| tok_err(path, e))?;
        let pre = Precompiled::from(charsmap)
            .map_err(|e| tok_err(path, format!("normalizer_spec.precompiled_charsmap: {e}")))?;
        tok.with_normalizer(Some(pre))
            .map_err(|e| tok_err(path, e))?;
    }
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        WhitespaceSplit.into(),
        Metaspace::new('▁', PrependScheme::Always, true).into(),
    ])));

    // Special tokens: control pieces in id order, then the named tokens, sentinels and
    // additional ones (each added once; all matched verbatim, before normalisation).
    let mut specials: Vec<String> = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::Control)
        .map(|p| p.piece.clone())
        .collect();
    for t in [&special.eos, &special.unk, &special.pad]
        .into_iter()
        .chain(&sentinels)
        .chain(&special.additional)
    {
        if !specials.contains(t) {
            specials.push(t.clone());
        }
    }
    let user_defined: Vec<AddedToken> = model
        .pieces
        .iter()
        .filter(|p| p.kind == PieceType::UserDefined)
        .map(|p| AddedToken::from(p.piece.clone(), false).normalized(false))
        .collect();
    if !user_defined.is_empty() {
        tok.add_tokens(user_defined).map_err(|e| tok_err(path, e))?;
    }
    let specials: Vec<AddedToken> = specials
        .into_iter()
        .map(|t| AddedToken::from(t, true).normalized(false))
        .collect();
    tok.add_special_tokens(specials)
        .map_err(|e| tok_err(path, e))?;

    let eos_id = tok.token_to_id(&special.eos).ok_or_else(|| {
        tok_err(
            path,
            format!("the eos token `{}` is not in the vocabulary", special.eos),
        )
    })?;
    let template = TemplateProcessing::builder()
        .try_single("$A </s>")
        .and_then(|b| b.try_pair("$A </s> $B </s>"))
        .map_err(|e| tok_err(path, e))?
        .special_tokens(vec![("</s>".to_string(), eos_id)])
        .build()
        .map_err(|e| tok_err(path, e))?;
    tok.with_post_processor(Some(template));
    Ok(tok)
}

/// The mT5 tokenizer padded/truncated to 77. Immutable; `encode` takes `&self`.
#[derive(Debug, Clone)]
pub struct Mt5Tokenizer {
    inner: XlmrTokenizer,
    vocab_size: usize,
}

impl Mt5Tokenizer {
    /// Loads `dir/spiece.model` (required) with the special tokens of
    /// `dir/tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("spiece.model");
        if !path.is_file() {
            return Err(ModelError::Checkpoint {
                path,
                message: "missing: the mT5 tokenizer needs the SentencePiece model `spiece.model`"
                    .into(),
            });
        }
        let model = SpmModel::from_file(&path)?;
        let special = T5SpecialTokens::from_dir(dir)?;
        Self::new(&model, &special, &path)
    }

    /// From a parsed model; `path` names it in errors.
    pub fn new(model: &SpmModel, special: &T5SpecialTokens, path: &Path) -> Result<Self> {
        let tok = t5_tokenizer_from_spm(model, special, path)?;
        let vocab_size = tok.get_vocab_size(true);
        let inner = XlmrTokenizer::new(tok, &special.pad, MAX_LENGTH, path)?;
        Ok(Self { inner, vocab_size })
    }

    /// The padding token id (0 in mT5).
    pub fn pad_id(&self) -> u32 {
        self.inner.pad_id()
    }

    /// The fixed sequence length (77).
    pub fn max_length(&self) -> usize {
        self.inner.max_length()
    }

    /// Pieces plus sentinels (ids run below this).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Tokenises prompts one by one into (B, 77) u32 rows of ids and attention mask.
    pub fn encode_rows<S: AsRef<str>>(&self, prompts: &[S]) -> Result<TokenizedBatch> {
        self.inner.encode_rows(prompts)
    }

    /// Tokenises prompts (B ≥ 1) into (B, 77) i64 `input_ids` and `attention_mask` on `device`.
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S], device: &Device) -> Result<XlmrBatch> {
        self.inner.encode(prompts, device)
    }
}
