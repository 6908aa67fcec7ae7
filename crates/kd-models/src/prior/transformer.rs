//! `PriorTransformer` (diffusers `models/transformers/prior_transformer.py`), the DALL·E 2 style
//! diffusion prior of Kandinsky 2.2 (paper: <https://arxiv.org/abs/2204.06125>). It predicts the
//! (normalised) CLIP image embedding x₀ from a noisy one, conditioned on the CLIP text embedding
//! and the text tower's last hidden state.
//!
//! Token layout: `[ehs_proj(ehs) (77), embedding_proj(text_embeds), time_embedding(t),
//! proj_in(x_t), prd]` + positional embedding; output = `proj_to_clip_embeddings(norm_out(h)[:, -1])`.
//! With a text mask the attention bias is `(1 − mask)·(−10000)` (right-padded with 0 for the extra
//! tokens) **plus** a causal −10000 upper triangle; without one attention is unmasked (as diffusers).

use crate::config::PriorTransformerConfig;
use crate::dense::{self, dense, Activation, Dense};
use crate::error::{ModelError, Result};
use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{layer_norm, linear, LayerNorm, LayerNormConfig, Linear, VarBuilder};

fn ln(size: usize, vb: VarBuilder) -> candle_core::Result<LayerNorm> {
    layer_norm(
        size,
        LayerNormConfig {
            eps: 1e-5,
            ..Default::default()
        },
        vb,
    )
}

/// Self-attention of a `BasicTransformerBlock` (`attn1`: to_q/k/v and to_out.0, all with bias).
#[derive(Debug, Clone)]
struct Attention {
    to_q: Dense,
    to_k: Dense,
    to_v: Dense,
    to_out: Dense,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: dense(dim, inner, vb.pp("to_q"))?,
            to_k: dense(dim, inner, vb.pp("to_k"))?,
            to_v: dense(dim, inner, vb.pp("to_v"))?,
            to_out: dense(inner, dim, vb.pp("to_out.0"))?,
            heads,
            head_dim,
        })
    }

    /// `bias`: additive f32 (B, 1, L, L).
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let proj = |layer: &Dense| layer.forward_act(x, Activation::Identity);
        let (q, k, v) = (proj(&self.to_q)?, proj(&self.to_k)?, proj(&self.to_v)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = dense::attention(&q, &k, &v, bias, self.heads, scale)?;
        self.to_out.forward_act(&out, Activation::Identity)
    }
}

/// `BasicTransformerBlock` with layer norms, self-attention only and an exact-GELU feed-forward.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn1: Attention,
    norm3: LayerNorm,
    ff_in: Dense,
    ff_out: Dense,
}

impl Block {
    fn new(dim: usize, heads: usize, head_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: ln(dim, vb.pp("norm1"))?,
            attn1: Attention::new(dim, heads, head_dim, vb.pp("attn1"))?,
            norm3: ln(dim, vb.pp("norm3"))?,
            ff_in: dense(dim, 4 * dim, vb.pp("ff.net.0.proj"))?,
            ff_out: dense(4 * dim, dim, vb.pp("ff.net.2"))?,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = (x + self.attn1.forward(&self.norm1.forward(x)?, bias)?)?;
        let h = self
            .ff_in
            .forward_act(&self.norm3.forward(&x)?, Activation::Gelu)?;
        x + self.ff_out.forward_act(&h, Activation::Identity)?
    }
}

/// Sinusoidal timestep features (diffusers `Timesteps(dim, flip_sin_to_cos=True, shift=0)`), f32.
pub fn timestep_features(timesteps: &[f32], dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32 * i as f32) / half as f32).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t * f).collect();
        data.extend(args.iter().map(|a| a.cos()));
        data.extend(args.iter().map(|a| a.sin()));
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// The Kandinsky / unCLIP prior transformer.
#[derive(Debug, Clone)]
pub struct PriorTransformer {
    time_linear_1: Linear,
    time_linear_2: Linear,
    time_act_silu: bool,
    proj_in: Linear,
    embedding_proj: Linear,
    embedding_proj_norm: Option<LayerNorm>,
    encoder_hidden_states_proj: Option<Linear>,
    norm_in: Option<LayerNorm>,
    positional_embedding: Tensor,
    prd_embedding: Option<Tensor>,
    blocks: Vec<Block>,
    norm_out: LayerNorm,
    proj_to_clip_embeddings: Linear,
    clip_mean: Tensor,
    clip_std: Tensor,
    cfg: PriorTransformerConfig,
}

impl PriorTransformer {
    /// Loads the weights with the diffusers key names.
    pub fn new(cfg: &PriorTransformerConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.added_emb_type.is_none() {
            return Err(ModelError::invalid(
                "added_emb_type",
                "null is not supported (supported: \"prd\")",
            ));
        }
        let inner = cfg.inner_dim();
        let emb = cfg.embedding_dim;
        let time_dim = cfg.time_embed_dim.unwrap_or(inner);
        let proj_dim = cfg.embedding_proj_dim.unwrap_or(emb);
        let clip_dim = cfg.clip_embed_dim.unwrap_or(emb);
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                Block::new(
                    inner,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let layer = |name: &str, on: bool| -> candle_core::Result<Option<LayerNorm>> {
            on.then(|| {
                ln(
                    if name == "norm_in" { inner } else { proj_dim },
                    vb.pp(name),
                )
            })
            .transpose()
        };
        Ok(Self {
            time_linear_1: linear(inner, time_dim, vb.pp("time_embedding.linear_1"))?,
            time_linear_2: linear(time_dim, inner, vb.pp("time_embedding.linear_2"))?,
            time_act_silu: cfg.time_embed_act_fn == "silu",
            proj_in: linear(emb, inner, vb.pp("proj_in"))?,
            embedding_proj: linear(proj_dim, inner, vb.pp("embedding_proj"))?,
            embedding_proj_norm: layer(
                "embedding_proj_norm",
                cfg.embedding_proj_norm_type.is_some(),
            )?,
            encoder_hidden_states_proj: cfg
                .encoder_hid_proj_type
                .is_some()
                .then(|| linear(emb, inner, vb.pp("encoder_hidden_states_proj")))
                .transpose()?,
            norm_in: layer("norm_in", cfg.norm_in_type.is_some())?,
            positional_embedding: vb.get((1, cfg.seq_len(), inner), "positional_embedding")?,
            prd_embedding: cfg
                .added_emb_type
                .is_some()
                .then(|| vb.get((1, 1, inner), "prd_embedding"))
                .transpose()?,
            blocks,
            norm_out: ln(inner, vb.pp("norm_out"))?,
            proj_to_clip_embeddings: linear(inner, clip_dim, vb.pp("proj_to_clip_embeddings"))?,
            clip_mean: vb.get((1, clip_dim), "clip_mean")?,
            clip_std: vb.get((1, clip_dim), "clip_std")?,
            cfg: cfg.clone(),
        })
    }

    /// Width of the CLIP image embedding this prior predicts.
    pub fn embedding_dim(&self) -> usize {
        self.cfg.embedding_dim
    }

    /// Number of text tokens (77).
    pub fn num_embeddings(&self) -> usize {
        self.cfg.num_embeddings
    }

    /// The weight dtype.
    pub fn dtype(&self) -> DType {
        self.positional_embedding.dtype()
    }

    /// Additive f32 attention bias (B, 1, S, S) from a (B, 77) 0/1 text mask.
    fn attention_bias(&self, mask: &Tensor, batch: usize) -> Result<Tensor> {
        let s = self.cfg.seq_len();
        let n = self.cfg.num_embeddings;
        let rows: Vec<Vec<f32>> = mask
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2()?;
        let mut data = Vec::with_capacity(batch * s * s);
        for row in &rows {
            let pad: Vec<f32> = (0..s)
                .map(|j| {
                    if j < n {
                        (1.0 - row[j]) * -10000.0
                    } else {
                        0.0
                    }
                })
                .collect();
            for i in 0..s {
                data.extend((0..s).map(|j| pad[j] + if j > i { -10000.0 } else { 0.0 }));
            }
        }
        Ok(Tensor::from_vec(data, (batch, 1, s, s), mask.device())?)
    }

    /// Predicts the normalised image embedding.
    ///
    /// `hidden_states` (B, D) noisy x_t; `timesteps` one value or one per row; `proj_embedding`
    /// (B, D) CLIP `text_embeds`; `encoder_hidden_states` (B, 77, D); `attention_mask` (B, 77) 0/1.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        timesteps: &[f32],
        proj_embedding: &Tensor,
        encoder_hidden_states: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, d) = hidden_states.dims2()?;
        let emb = self.cfg.embedding_dim;
        let n = self.cfg.num_embeddings;
        if d != emb {
            return Err(ModelError::invalid(
                "hidden_states",
                format!("width {d}, expected {emb}"),
            ));
        }
        let proj_dim = self.cfg.embedding_proj_dim.unwrap_or(emb);
        if proj_embedding.dims() != [b, proj_dim] {
            return Err(ModelError::invalid(
                "proj_embedding",
                format!(
                    "shape {:?}, expected ({b}, {proj_dim})",
                    proj_embedding.dims()
                ),
            ));
        }
        if encoder_hidden_states.dims() != [b, n, emb] {
            return Err(ModelError::invalid(
                "encoder_hidden_states",
                format!(
                    "shape {:?}, expected ({b}, {n}, {emb})",
                    encoder_hidden_states.dims()
                ),
            ));
        }
        if let Some(m) = attention_mask {
            if m.dims() != [b, n] {
                return Err(ModelError::invalid(
                    "attention_mask",
                    format!("shape {:?}, expected ({b}, {n})", m.dims()),
                ));
            }
        }
        let ts: Vec<f32> = match timesteps.len() {
            1 => vec![timesteps[0]; b],
            l if l == b => timesteps.to_vec(),
            l => {
                return Err(ModelError::invalid(
                    "timestep",
                    format!("{l} timesteps for a batch of {b}; give 1 or {b}"),
                ))
            }
        };
        let dtype = self.dtype();
        let device = hidden_states.device();
        let inner = self.cfg.inner_dim();

        let t = timestep_features(&ts, inner, device)?.to_dtype(dtype)?;
        let t = self.time_linear_1.forward(&t)?;
        let t = if self.time_act_silu {
            candle_nn::ops::silu(&t)?
        } else {
            t.gelu_erf()?
        };
        let time_embeddings = self.time_linear_2.forward(&t)?;

        let x = self.proj_in.forward(&hidden_states.to_dtype(dtype)?)?;
        let mut pe = proj_embedding.to_dtype(dtype)?;
        if let Some(norm) = &self.embedding_proj_norm {
            pe = norm.forward(&pe)?;
        }
        let pe = self.embedding_proj.forward(&pe)?;
        let mut ehs = encoder_hidden_states.to_dtype(dtype)?;
        if let Some(p) = &self.encoder_hidden_states_proj {
            ehs = p.forward(&ehs)?;
        }
        let mut tokens = vec![
            ehs,
            pe.unsqueeze(1)?,
            time_embeddings.unsqueeze(1)?,
            x.unsqueeze(1)?,
        ];
        if let Some(prd) = &self.prd_embedding {
            tokens.push(prd.repeat((b, 1, 1))?);
        }
        let h = Tensor::cat(&tokens, 1)?.broadcast_add(&self.positional_embedding)?;
        let bias = attention_mask
            .map(|m| self.attention_bias(m, b))
            .transpose()?;
        let mut h = match &self.norm_in {
            Some(norm) => norm.forward(&h)?,
            None => h,
        };
        for block in &self.blocks {
            h = block.forward(&h, bias.as_ref())?;
        }
        let h = self.norm_out.forward(&h)?;
        let last = h.dim(1)? - 1;
        let out = self.proj_to_clip_embeddings.forward(&h.i((.., last))?)?;
        Ok(out.to_dtype(DType::F32)?)
    }

    /// `latents · clip_std + clip_mean` (undo the prior's embedding normalisation).
    pub fn post_process_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let std = self.clip_std.to_dtype(DType::F32)?;
        let mean = self.clip_mean.to_dtype(DType::F32)?;
        Ok(latents
            .to_dtype(DType::F32)?
            .broadcast_mul(&std)?
            .broadcast_add(&mean)?)
    }
}
