//! The pre-LayerNorm transformer encoder shared by both CLIP towers (transformers
//! `CLIPEncoderLayer`: `x += attn(LN1(x)); x += fc2(act(fc1(LN2(x))))`).
//!
//! Written here rather than reused from candle-transformers because its `clip::text_model`
//! activation enum only knows `quick_gelu` and its `stable_diffusion::clip` causal mask only
//! broadcasts for batch 1 (spec §8). Dense layers and attention are `crate::dense`'s (fused
//! kernels on the CPU); softmax runs in f32.

use crate::dense::{self, dense, Dense};
use crate::error::{ModelError, Result};
use candle_core::{Module, Tensor};
use candle_nn::{layer_norm, LayerNorm, LayerNormConfig, VarBuilder};

pub use crate::dense::Activation;

/// The MLP activation named by a transformers `hidden_act` value.
pub fn activation_from_name(name: &str) -> Result<Activation> {
    match name {
        "gelu" => Ok(Activation::Gelu),
        "quick_gelu" => Ok(Activation::QuickGelu),
        other => Err(ModelError::invalid(
            "hidden_act",
            format!("{other:?} is not supported (supported: gelu, quick_gelu)"),
        )),
    }
}

/// Encoder hyper-parameters common to the text and vision towers.
#[derive(Debug, Clone, Copy)]
pub struct EncoderConfig {
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of attention heads.
    pub num_heads: usize,
    /// Number of layers.
    pub num_layers: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// MLP activation.
    pub activation: Activation,
}

/// LayerNorm with transformers' eps.
pub(crate) fn ln(size: usize, eps: f64, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    layer_norm(
        size,
        LayerNormConfig {
            eps,
            ..Default::default()
        },
        vb,
    )
}

#[derive(Debug, Clone)]
struct SelfAttention {
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    out_proj: Dense,
    num_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(cfg: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            q_proj: dense(h, h, vb.pp("q_proj"))?,
            k_proj: dense(h, h, vb.pp("k_proj"))?,
            v_proj: dense(h, h, vb.pp("v_proj"))?,
            out_proj: dense(h, h, vb.pp("out_proj"))?,
            num_heads: cfg.num_heads,
            head_dim: h / cfg.num_heads,
        })
    }

    /// `mask`: additive f32 bias broadcastable to (B, heads, L, L).
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let proj = |layer: &Dense| layer.forward_act(x, Activation::Identity);
        let scale = (self.head_dim as f64).powf(-0.5);
        let (q, k, v) = (
            proj(&self.q_proj)?,
            proj(&self.k_proj)?,
            proj(&self.v_proj)?,
        );
        let out = dense::attention(&q, &k, &v, mask, self.num_heads, scale)?;
        self.out_proj.forward_act(&out, Activation::Identity)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    layer_norm2: LayerNorm,
    activation: Activation,
}

impl EncoderLayer {
    fn new(cfg: &EncoderConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            self_attn: SelfAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm1: ln(h, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: dense(h, i, vb.pp("mlp.fc1"))?,
            fc2: dense(i, h, vb.pp("mlp.fc2"))?,
            layer_norm2: ln(h, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            activation: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self
            .fc1
            .forward_act(&self.layer_norm2.forward(&x)?, self.activation)?;
        x + self.fc2.forward_act(&h, Activation::Identity)?
    }
}

/// A stack of CLIP encoder layers (`encoder.layers.{i}`).
#[derive(Debug, Clone)]
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

impl ClipEncoder {
    /// Loads `layers.{0..n}` under `vb` (which points at `…encoder`).
    pub fn new(cfg: &EncoderConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.num_layers)
            .map(|i| EncoderLayer::new(cfg, vb.pp(format!("layers.{i}"))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// Runs every layer; `mask` is an additive f32 bias broadcastable to (B, heads, L, L).
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.forward_states(x, mask)?.0)
    }

    /// Runs every layer and returns the last layer's output and its input (transformers'
    /// `hidden_states[-1]` and `hidden_states[-2]`; the input embeddings for a 1-layer stack).
    pub fn forward_states(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        let mut x = x.clone();
        let mut penultimate = x.clone();
        for layer in &self.layers {
            penultimate = x.clone();
            x = layer.forward(&x, mask)?;
        }
        Ok((x, penultimate))
    }
}

/// Additive causal mask (1, 1, L, L): 0 on and below the diagonal, −inf above. Broadcasts over
/// any batch size.
pub fn causal_mask(len: usize, device: &candle_core::Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(data, (1, 1, len, len), device)?)
}
