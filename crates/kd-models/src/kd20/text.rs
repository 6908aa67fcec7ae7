//! Kandinsky 2.0's two text encoders, loaded from their original folders, and
//! `Kandinsky2.encode_text` for both.
//!
//! * `text_encoder1/`: the official `MultilingualCLIP` — transformers' `XLMRobertaModel` built
//!   from the folder's plain `XLMRobertaConfig` (`model_type: "xlm-roberta"`) plus
//!   `LinearTransformation` on the mask-weighted mean of the last hidden state — with the XLM-R
//!   tokenizer (`tokenizer.json`). Its weights are `pytorch_model.bin` (`torch.save`d state dict,
//!   `transformer.*` and `LinearTransformation.*`), read by the safe pickle reader. The
//!   projection's sizes are in no config file (the official class hard-codes `in_features=1024,
//!   out_features=640`): they are read from `LinearTransformation.weight`'s shape, and its input
//!   width must be the XLM-R `hidden_size`.
//! * `text_encoder2/`: `MT5EncoderModel` ([`Mt5Encoder`]) with the mT5 SentencePiece tokenizer
//!   ([`Mt5Tokenizer`], from `spiece.model`).
//!
//! `encode_text` tokenises with `max_length=77, padding="max_length", truncation=True` and runs
//! `TextEncoder(tokens, mask)`: for `multiclip` (full = last hidden state, pooled = projection),
//! for `MT5EncoderModel` (full = last hidden state, pooled = None). The CFG batching
//! (`[prompt] * B + [""] * B`) belongs to the sampler: encode the empty prompt like any other.

use super::mt5::{Mt5Config, Mt5Encoder};
use super::tokenizer::Mt5Tokenizer;
use crate::checkpoint::{Variant, Weights};
use crate::config::{read_json, unsupported};
use crate::error::{ModelError, Result};
use crate::mclip::config::RawXlmr;
use crate::mclip::{MClipConfig, MultilingualClip, XlmrBatch, XlmrTokenizer, MAX_LENGTH};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The `LinearTransformation` weight that fixes the projection's sizes.
const PROJECTION_KEY: &str = "LinearTransformation.weight";

/// `text_encoder1/config.json`: a plain transformers `XLMRobertaConfig` (what
/// `AutoConfig.from_pretrained` reads; `model_type` must be `xlm-roberta`), as the XLM-R part of
/// an [`MClipConfig`] whose projection sizes are still to be set
/// ([`MClipConfig::transformer_dimensions`] = `hidden_size`, [`MClipConfig::num_dims`] = 0).
pub fn xlmr_config_from_file(path: &Path) -> Result<MClipConfig> {
    let raw: RawXlmr = read_json(path)?;
    match raw.model_type.as_deref() {
        Some("xlm-roberta") => {}
        Some(other) => return Err(unsupported(path, "model_type", other, "\"xlm-roberta\"")),
        None => {
            return Err(ModelError::Config {
                path: path.to_path_buf(),
                message: "missing `model_type` (supported: \"xlm-roberta\")".into(),
            })
        }
    }
    raw.into_config(path, None, 0)
}

/// Loads `text_encoder1/` (config + weights): the official `MultilingualCLIP`, its projection
/// sized from the stored `LinearTransformation.weight`.
pub fn load_multilingual_clip(
    dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(MClipConfig, MultilingualClip)> {
    let cfg_path = dir.join("config.json");
    let mut cfg = xlmr_config_from_file(&cfg_path)?;
    let weights = Weights::open_dir(dir, Variant::Default)?;
    let files = || {
        weights
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some((shape, _)) = weights.info(PROJECTION_KEY) else {
        return Err(ModelError::MissingTensor {
            files: files(),
            key: PROJECTION_KEY.into(),
            expected: vec![0, cfg.hidden_size],
        });
    };
    let &[out_features, in_features] = shape.as_slice() else {
        return Err(ModelError::Checkpoint {
            path: weights
                .paths()
                .first()
                .map_or(dir.to_path_buf(), |p| p.to_path_buf()),
            message: format!("`{PROJECTION_KEY}` must be 2-D (out, in), got shape {shape:?}"),
        });
    };
    if in_features != cfg.hidden_size {
        return Err(ModelError::Checkpoint {
            path: weights
                .paths()
                .first()
                .map_or(dir.to_path_buf(), |p| p.to_path_buf()),
            message: format!(
                "`{PROJECTION_KEY}` takes {in_features} inputs but the XLM-R hidden_size in \
                 {} is {}",
                cfg_path.display(),
                cfg.hidden_size
            ),
        });
    }
    cfg.transformer_dimensions = in_features;
    cfg.num_dims = out_features;
    cfg.validate(&cfg_path)?;
    let model = MultilingualClip::new(&cfg, weights.var_builder(dtype, device))?;
    Ok((cfg, model))
}

/// Loads `text_encoder2/` (config + weights): `MT5EncoderModel`.
pub fn load_mt5_encoder(dir: &Path, dtype: DType, device: &Device) -> Result<Mt5Encoder> {
    let cfg = Mt5Config::from_file(&dir.join("config.json"))?;
    let weights = Weights::open_dir(dir, Variant::Default)?;
    Mt5Encoder::new(&cfg, weights.var_builder(dtype, device))
}

/// Both tokenisations of a prompt batch, (B, 77) i64 each.
#[derive(Debug, Clone)]
pub struct Kd20Tokens {
    /// XLM-R ids and mask (`<s> … </s>`, pad 1).
    pub tokens1: XlmrBatch,
    /// mT5 ids and mask (`… </s>`, pad 0).
    pub tokens2: XlmrBatch,
}

/// What Kandinsky 2.0's UNet is conditioned on (`model_kwargs` of `generate_img`), f32.
#[derive(Debug, Clone)]
pub struct Kd20TextConditioning {
    /// `pooled_emb1`: `LinearTransformation(mask-mean(full1))`, (B, D1) (640 in the real model).
    pub pooled1: Tensor,
    /// `full_emb1`: XLM-R last hidden state, (B, 77, H1) (1024).
    pub full1: Tensor,
    /// XLM-R attention mask, (B, 77) u32 0/1.
    pub mask1: Tensor,
    /// `full_emb2`: mT5 last hidden state, (B, 77, H2) (512). (`pooled_emb2` is None.)
    pub full2: Tensor,
    /// mT5 attention mask, (B, 77) u32 0/1.
    pub mask2: Tensor,
}

impl Kd20TextConditioning {
    /// Number of rows B.
    pub fn rows(&self) -> Result<usize> {
        Ok(self.pooled1.dim(0)?)
    }

    /// Row `i` as a one-row conditioning.
    pub fn row(&self, i: usize) -> Result<Self> {
        Ok(Self {
            pooled1: self.pooled1.narrow(0, i, 1)?,
            full1: self.full1.narrow(0, i, 1)?,
            mask1: self.mask1.narrow(0, i, 1)?,
            full2: self.full2.narrow(0, i, 1)?,
            mask2: self.mask2.narrow(0, i, 1)?,
        })
    }

    /// Rows of `a` followed by rows of `b` (e.g. prompts then empty prompts, as `encode_text`).
    pub fn cat(a: &Self, b: &Self) -> Result<Self> {
        let c = |x: &Tensor, y: &Tensor| Tensor::cat(&[x, y], 0);
        Ok(Self {
            pooled1: c(&a.pooled1, &b.pooled1)?,
            full1: c(&a.full1, &b.full1)?,
            mask1: c(&a.mask1, &b.mask1)?,
            full2: c(&a.full2, &b.full2)?,
            mask2: c(&a.mask2, &b.mask2)?,
        })
    }
}

/// The loaded Kandinsky 2.0 prompt encoders. Immutable after loading; `encode` takes `&self` and
/// may run from several threads.
#[derive(Debug)]
pub struct Kd20TextEncoders {
    tokenizer1: XlmrTokenizer,
    encoder1: MultilingualClip,
    config1: MClipConfig,
    tokenizer2: Mt5Tokenizer,
    encoder2: Mt5Encoder,
    device: Device,
}

impl Kd20TextEncoders {
    /// Loads `root/text_encoder1/` and `root/text_encoder2/` (the official checkpoint folder, as
    /// `get_kandinsky2_0` lays it out) in `dtype` on `device`.
    pub fn load(root: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<Self> {
        let root = root.as_ref();
        Self::load_dirs(
            &root.join("text_encoder1"),
            &root.join("text_encoder2"),
            dtype,
            device,
        )
    }

    /// Loads the two encoder folders (each holding its model and its tokenizer).
    pub fn load_dirs(te1: &Path, te2: &Path, dtype: DType, device: &Device) -> Result<Self> {
        for dir in [te1, te2] {
            if !dir.is_dir() {
                return Err(ModelError::Checkpoint {
                    path: dir.to_path_buf(),
                    message: "missing: a Kandinsky 2.0 text encoder folder".into(),
                });
            }
        }
        let tokenizer1 = XlmrTokenizer::from_dir(te1)?;
        let (config1, encoder1) = load_multilingual_clip(te1, dtype, device)?;
        if tokenizer1.pad_id() != config1.pad_token_id {
            return Err(ModelError::Config {
                path: te1.join("config.json"),
                message: format!(
                    "`pad_token_id` {} differs from the tokenizer's pad token id {} \
                     (position ids depend on it)",
                    config1.pad_token_id,
                    tokenizer1.pad_id()
                ),
            });
        }
        let tokenizer2 = Mt5Tokenizer::from_dir(te2)?;
        let encoder2 = load_mt5_encoder(te2, dtype, device)?;
        Ok(Self {
            tokenizer1,
            encoder1,
            config1,
            tokenizer2,
            encoder2,
            device: device.clone(),
        })
    }

    /// The XLM-R tokenizer.
    pub fn tokenizer1(&self) -> &XlmrTokenizer {
        &self.tokenizer1
    }

    /// The mT5 tokenizer.
    pub fn tokenizer2(&self) -> &Mt5Tokenizer {
        &self.tokenizer2
    }

    /// `MultilingualCLIP`'s config (projection sizes from the checkpoint).
    pub fn config1(&self) -> &MClipConfig {
        &self.config1
    }

    /// The mT5 encoder.
    pub fn encoder2(&self) -> &Mt5Encoder {
        &self.encoder2
    }

    /// The device the models run on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Sequence length of both tokenisations (77).
    pub fn max_length(&self) -> usize {
        MAX_LENGTH
    }

    /// Tokenises prompts (B ≥ 1) with both tokenizers.
    pub fn tokenize<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Kd20Tokens> {
        Ok(Kd20Tokens {
            tokens1: self.tokenizer1.encode(prompts, &self.device)?,
            tokens2: self.tokenizer2.encode(prompts, &self.device)?,
        })
    }

    /// Encodes tokenised prompts; the outputs are f32 whatever the weight dtype.
    pub fn encode_tokens(&self, tokens: &Kd20Tokens) -> Result<Kd20TextConditioning> {
        let (t1, t2) = (&tokens.tokens1, &tokens.tokens2);
        if t1.input_ids.dim(0)? != t2.input_ids.dim(0)? {
            return Err(ModelError::invalid(
                "tokens",
                format!(
                    "the two tokenisations have {} and {} rows",
                    t1.input_ids.dim(0)?,
                    t2.input_ids.dim(0)?
                ),
            ));
        }
        let out1 = self.encoder1.forward(&t1.input_ids, &t1.attention_mask)?;
        let out2 = self.encoder2.forward(&t2.input_ids, &t2.attention_mask)?;
        Ok(Kd20TextConditioning {
            pooled1: out1.text_embeds.to_dtype(DType::F32)?,
            full1: out1.hidden_states.to_dtype(DType::F32)?,
            mask1: t1.attention_mask.to_dtype(DType::U32)?,
            full2: out2.last_hidden_state.to_dtype(DType::F32)?,
            mask2: t2.attention_mask.to_dtype(DType::U32)?,
        })
    }

    /// Tokenises and encodes prompts (B ≥ 1).
    pub fn encode<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Kd20TextConditioning> {
        self.encode_tokens(&self.tokenize(prompts)?)
    }
}
