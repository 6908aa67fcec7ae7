//! The mT5 encoder (transformers `MT5EncoderModel`, paper <https://arxiv.org/abs/2010.11934>),
//! Kandinsky 2.0's `text_encoder2`: `TextEncoder(model_name="MT5EncoderModel")` returns its
//! `last_hidden_state` for `(input_ids, attention_mask)`.
//!
//! ```text
//! x = shared[input_ids]
//! for block: x = x + SelfAttention(RMSNorm(x), bias = rel_bias(k - q) + mask)   # no 1/sqrt(d)
//!            x = x + wo(act(wi_0(RMSNorm(x))) * wi_1(RMSNorm(x)))               # gated FF
//! return final_layer_norm(x)
//! ```
//!
//! Written here rather than taken from `candle_transformers::models::t5`, whose encoder takes no
//! attention mask (padded keys would be attended to; Kandinsky passes the mask) and needs
//! `&mut self` (its KV cache). Numerics follow transformers: T5's scale-only RMS norm in f32, the
//! bidirectional relative-position buckets computed with f32 logs (the bucket boundaries at 16,
//! 32 and 64 fall on exact integers) and shared by every layer, padded keys masked with
//! `f32::MIN`, softmax in f32, `gated-gelu` = tanh-approximated GELU (`gelu_new`); in f16 the
//! hidden states are clamped after each sub-layer as transformers does.

use crate::config::{read_json, unsupported};
use crate::error::{ModelError, Result};
use candle_core::{DType, Module, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// Feed-forward activation (`dense_act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mt5Activation {
    /// `relu`.
    Relu,
    /// `gelu` (exact, erf).
    Gelu,
    /// `gelu_new` (tanh approximation), what `gated-gelu` selects.
    GeluNew,
    /// `silu`.
    Silu,
}

impl Mt5Activation {
    fn forward(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Relu => x.relu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluNew => x.gelu(),
            Self::Silu => x.silu(),
        }
    }
}

/// Validated `text_encoder2/config.json` (transformers `MT5Config`; defaults where absent).
#[derive(Debug, Clone, PartialEq)]
pub struct Mt5Config {
    /// Rows of `shared` (250112 in mT5; may exceed the tokenizer's 250100 pieces).
    pub vocab_size: usize,
    /// Model width (512 in mT5-small; Kandinsky 2.0's UNet expects 512).
    pub d_model: usize,
    /// Per-head width.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative-position buckets (32).
    pub relative_attention_num_buckets: usize,
    /// Distance beyond which positions share the last bucket (128).
    pub relative_attention_max_distance: usize,
    /// RMS-norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Whether the feed-forward is gated (`gated-*`).
    pub gated: bool,
    /// Feed-forward activation.
    pub activation: Mt5Activation,
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    d_model: Option<usize>,
    d_kv: Option<usize>,
    d_ff: Option<usize>,
    num_layers: Option<usize>,
    num_heads: Option<usize>,
    relative_attention_num_buckets: Option<usize>,
    relative_attention_max_distance: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    feed_forward_proj: Option<String>,
}

const MODEL_TYPES: &str = "\"mt5\", \"t5\"";
const FEED_FORWARD: &str = "\"relu\", \"gelu\", \"gelu_new\", \"silu\", with or without \"gated-\"";

fn config_err(path: &Path, message: String) -> ModelError {
    ModelError::Config {
        path: path.to_path_buf(),
        message,
    }
}

impl Mt5Config {
    /// Reads and validates `path` (a `text_encoder2/config.json`). `model_type` must be `mt5` (or
    /// `t5`): what `MT5EncoderModel.from_pretrained` reads.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: RawConfig = read_json(path)?;
        match raw.model_type.as_deref() {
            Some("mt5") | Some("t5") => {}
            Some(other) => return Err(unsupported(path, "model_type", other, MODEL_TYPES)),
            None => {
                return Err(config_err(
                    path,
                    format!("missing `model_type` (supported: {MODEL_TYPES})"),
                ))
            }
        }
        // MT5Config defaults (mt5-small).
        let proj = raw.feed_forward_proj.unwrap_or_else(|| "gated-gelu".into());
        let (gated, act) = match proj.strip_prefix("gated-") {
            Some(a) => (true, a),
            None => (false, proj.as_str()),
        };
        let activation = match (gated, act) {
            // T5Config: "gated-gelu" means gelu_new, for backwards compatibility.
            (true, "gelu") | (_, "gelu_new") => Mt5Activation::GeluNew,
            (false, "gelu") => Mt5Activation::Gelu,
            (_, "relu") => Mt5Activation::Relu,
            (_, "silu") => Mt5Activation::Silu,
            _ => return Err(unsupported(path, "feed_forward_proj", &proj, FEED_FORWARD)),
        };
        let d_model = raw.d_model.unwrap_or(512);
        let cfg = Self {
            vocab_size: raw.vocab_size.unwrap_or(250112),
            d_model,
            d_kv: raw.d_kv.unwrap_or(64),
            d_ff: raw.d_ff.unwrap_or(1024),
            num_layers: raw.num_layers.unwrap_or(8),
            num_heads: raw.num_heads.unwrap_or(6),
            relative_attention_num_buckets: raw.relative_attention_num_buckets.unwrap_or(32),
            relative_attention_max_distance: raw.relative_attention_max_distance.unwrap_or(128),
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-6),
            gated,
            activation,
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Rejects sizes this port cannot run; errors name `path` and the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            if v == 0 {
                return Err(config_err(path, format!("`{field}` must be > 0")));
            }
        }
        // Bidirectional buckets: half per direction, half of those exact.
        if self.relative_attention_num_buckets < 4 {
            return Err(config_err(
                path,
                format!(
                    "`relative_attention_num_buckets` {} must be ≥ 4",
                    self.relative_attention_num_buckets
                ),
            ));
        }
        let max_exact = self.relative_attention_num_buckets / 4;
        if self.relative_attention_max_distance <= max_exact {
            return Err(config_err(
                path,
                format!(
                    "`relative_attention_max_distance` {} must exceed num_buckets / 4 = {max_exact}",
                    self.relative_attention_max_distance
                ),
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(config_err(
                path,
                format!(
                    "`layer_norm_epsilon` {} must be > 0",
                    self.layer_norm_epsilon
                ),
            ));
        }
        Ok(())
    }
}

/// transformers' `_relative_position_bucket(relative_position, bidirectional=True, ...)` for one
/// `key - query` offset, with its f32 arithmetic.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.unsigned_abs();
    let max_exact = half / 2;
    if n < max_exact as u64 {
        bucket += n as usize;
    } else {
        // torch: log(n.float() / max_exact) / math.log(max_distance / max_exact)
        //        * (num_buckets - max_exact), then .to(long) (truncation), in float32.
        let ratio = n as f32 / max_exact as f32;
        let denom = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = (ratio.ln() / denom * (half - max_exact) as f32) as usize;
        bucket += (max_exact + large).min(half - 1);
    }
    bucket as u32
}

/// T5's scale-only RMS norm (no mean, no bias), in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        // transformers: `weight * hidden.to(weight.dtype)` for half weights, f32 otherwise.
        normed.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

fn no_bias(d_in: usize, d_out: usize, vb: VarBuilder) -> candle_core::Result<Tensor> {
    vb.get((d_out, d_in), "weight")
}

/// `x @ w.T` for (B, L, in) × (out, in).
fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, l, c) = x.dims3()?;
    x.reshape((b * l, c))?
        .matmul(&w.t()?)?
        .reshape((b, l, w.dim(0)?))
}

#[derive(Debug, Clone)]
struct Block {
    attn_norm: RmsNorm,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ff_norm: RmsNorm,
    wi_0: Tensor,
    wi_1: Option<Tensor>,
    wo: Tensor,
    num_heads: usize,
    d_kv: usize,
    activation: Mt5Activation,
}

impl Block {
    fn new(cfg: &Mt5Config, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, inner, eps) = (
            cfg.d_model,
            cfg.num_heads * cfg.d_kv,
            cfg.layer_norm_epsilon,
        );
        let sa = vb.pp("layer.0");
        let att = sa.pp("SelfAttention");
        let ff = vb.pp("layer.1");
        let dense = ff.pp("DenseReluDense");
        let (wi_0, wi_1) = if cfg.gated {
            (
                no_bias(d, cfg.d_ff, dense.pp("wi_0"))?,
                Some(no_bias(d, cfg.d_ff, dense.pp("wi_1"))?),
            )
        } else {
            (no_bias(d, cfg.d_ff, dense.pp("wi"))?, None)
        };
        Ok(Self {
            attn_norm: RmsNorm::new(d, eps, sa.pp("layer_norm"))?,
            q: no_bias(d, inner, att.pp("q"))?,
            k: no_bias(d, inner, att.pp("k"))?,
            v: no_bias(d, inner, att.pp("v"))?,
            o: no_bias(inner, d, att.pp("o"))?,
            ff_norm: RmsNorm::new(d, eps, ff.pp("layer_norm"))?,
            wi_0,
            wi_1,
            wo: no_bias(cfg.d_ff, d, dense.pp("wo"))?,
            num_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            activation: cfg.activation,
        })
    }

    /// `bias`: f32 (B, H, L, L) position bias plus key mask.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let h = self.attn_norm.forward(x)?;
        let heads = |w: &Tensor| {
            matmul_t(&h, w)?
                .reshape((b, l, self.num_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(&self.q)?, heads(&self.k)?, heads(&self.v)?);
        // T5 does not scale the scores.
        let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?.add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.num_heads * self.d_kv))?;
        let x = clamp_f16((x + matmul_t(&ctx, &self.o)?)?)?;

        let h = self.ff_norm.forward(&x)?;
        let mut a = self.activation.forward(&matmul_t(&h, &self.wi_0)?)?;
        if let Some(wi_1) = &self.wi_1 {
            a = (a * matmul_t(&h, wi_1)?)?;
        }
        clamp_f16((&x + matmul_t(&a, &self.wo)?)?)
    }
}

/// transformers' fp16 guard in `MT5Block`: clamp to ±(max - 1000) when anything overflowed, else
/// to ±max.
fn clamp_f16(x: Tensor) -> candle_core::Result<Tensor> {
    if x.dtype() != DType::F16 {
        return Ok(x);
    }
    let max = f64::from(half::f16::MAX.to_f32());
    let any_inf = x
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?
        .is_infinite();
    let c = if any_inf { max - 1000.0 } else { max };
    x.clamp(-c, c)
}

/// `MT5EncoderModel`: `shared` embedding, `encoder.block.{i}`, `encoder.final_layer_norm`.
#[derive(Debug, Clone)]
pub struct Mt5Encoder {
    embed: Embedding,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: RmsNorm,
    cfg: Mt5Config,
    dtype: DType,
}

/// Output of [`Mt5Encoder::forward`].
#[derive(Debug, Clone)]
pub struct Mt5Output {
    /// `last_hidden_state`, (B, L, d_model), in the weights' dtype.
    pub last_hidden_state: Tensor,
}

impl Mt5Encoder {
    /// Loads the weights under `vb` (the root of an `MT5EncoderModel` state dict). The token
    /// table is `shared.weight`, or `encoder.embed_tokens.weight` where only that is stored (the
    /// two are one tied tensor in transformers).
    pub fn new(cfg: &Mt5Config, vb: VarBuilder) -> Result<Self> {
        let shape = (cfg.vocab_size, cfg.d_model);
        let table = if vb.contains_tensor("shared.weight")
            || !vb.contains_tensor("encoder.embed_tokens.weight")
        {
            vb.pp("shared").get(shape, "weight")?
        } else {
            vb.pp("encoder.embed_tokens").get(shape, "weight")?
        };
        let enc = vb.pp("encoder");
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, enc.pp(format!("block.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let relative_bias = enc
            .pp("block.0.layer.0.SelfAttention.relative_attention_bias")
            .get(
                (cfg.relative_attention_num_buckets, cfg.num_heads),
                "weight",
            )?;
        Ok(Self {
            embed: Embedding::new(table, cfg.d_model),
            relative_bias,
            blocks,
            final_norm: RmsNorm::new(
                cfg.d_model,
                cfg.layer_norm_epsilon,
                enc.pp("final_layer_norm"),
            )?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
        })
    }

    /// The config.
    pub fn config(&self) -> &Mt5Config {
        &self.cfg
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// (1, H, L, L) f32 relative-position bias, shared by every layer.
    fn position_bias(&self, l: usize) -> candle_core::Result<Tensor> {
        let device = self.relative_bias.device();
        let (nb, md) = (
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        let buckets: Vec<u32> = (0..l as i64)
            .flat_map(|q| (0..l as i64).map(move |k| relative_position_bucket(k - q, nb, md)))
            .collect();
        let idx = Tensor::from_vec(buckets, l * l, device)?;
        self.relative_bias
            .to_dtype(DType::F32)?
            .index_select(&idx, 0)?
            .reshape((l, l, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }

    /// Runs the encoder on (B, L) integer `input_ids` and 0/1 `attention_mask` (any integer or
    /// float dtype); every row needs at least one attended token.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Mt5Output> {
        let (ids, mask) = crate::mclip::model::ids_and_mask(input_ids, attention_mask)?;
        let (b, l) = (ids.len(), ids[0].len());
        let device = input_ids.device();
        let mut flat_ids = Vec::with_capacity(b * l);
        for row in &ids {
            for &id in row {
                if id < 0 || id as u64 >= self.cfg.vocab_size as u64 {
                    return Err(ModelError::invalid(
                        "input_ids",
                        format!(
                            "token id {id} is outside the vocabulary 0..{}",
                            self.cfg.vocab_size
                        ),
                    ));
                }
                flat_ids.push(id as u32);
            }
        }
        let mask = Tensor::from_vec(mask.concat(), (b, 1, 1, l), device)?;
        // 0 for attended keys, f32::MIN for padding, on top of the position bias.
        let key_bias = ((1.0 - mask)? * f64::from(f32::MIN))?;
        let bias = self.position_bias(l)?.broadcast_add(&key_bias)?;

        let ids = Tensor::from_vec(flat_ids, (b, l), device)?;
        let mut x = self.embed.forward(&ids)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        Ok(Mt5Output {
            last_hidden_state: self.final_norm.forward(&x)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_follow_t5_for_small_and_large_offsets() {
        // Exact buckets below max_exact = 8; positive offsets in the upper half.
        for n in 0..8 {
            assert_eq!(relative_position_bucket(-n, 32, 128), n as u32);
            if n > 0 {
                assert_eq!(relative_position_bucket(n, 32, 128), 16 + n as u32);
            }
        }
        // log-spaced: 8 + floor(log(n/8) / log(16) * 8); exactly 10, 12, 14 at 16, 32, 64.
        assert_eq!(relative_position_bucket(-16, 32, 128), 10);
        assert_eq!(relative_position_bucket(-15, 32, 128), 9);
        assert_eq!(relative_position_bucket(-32, 32, 128), 12);
        assert_eq!(relative_position_bucket(64, 32, 128), 16 + 14);
        assert_eq!(relative_position_bucket(-1000, 32, 128), 15);
        assert_eq!(relative_position_bucket(1000, 32, 128), 31);
    }
}
