//! The blocks of `UVit2DModel` (diffusers `models/unets/uvit_2d.py` and `models/attention.py`).
//!
//! Feature maps are kept channels-last, (B, H, W, C), between blocks: every per-pixel layer
//! (RMS norms, 1×1 convolutions, linears) then acts on the last dimension and the token
//! sequence of an attention is a free reshape, (B, H·W, C) in the same row-major order as the
//! reference's `view(B, C, H·W).permute(0, 2, 1)`.

use super::layers::{pointwise_conv, AdaLayerNormContinuous, Attention, GegluFeedForward, RmsNorm};
use crate::interrupt::{check, Stop};
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{linear_b, Embedding, Linear, VarBuilder};

/// Widths and flags shared by the blocks (from `UVit2DConfig`).
#[derive(Debug, Clone, Copy)]
pub struct BlockDims {
    /// `block_out_channels`: the width of the convolutional blocks.
    pub channels: usize,
    /// `hidden_size`: the transformer width, also that of the conditioning embedding and of the
    /// projected encoder hidden states.
    pub hidden_size: usize,
    /// `use_bias` of every linear / convolution.
    pub bias: bool,
    /// `layer_norm_eps`.
    pub eps: f64,
    /// `ln_elementwise_affine`.
    pub affine: bool,
}

/// `UVit2DConvEmbed`: `conv(RMSNorm(embeddings(ids)))`, (B, h, w) ids → (B, h, w, C).
#[derive(Debug, Clone)]
pub struct ConvEmbed {
    embeddings: Embedding,
    layer_norm: RmsNorm,
    conv: Linear,
}

impl ConvEmbed {
    /// Loads `embeddings` (vocab, in_channels), `layer_norm`, `conv` (1×1, in → C).
    pub fn new(vocab: usize, in_channels: usize, d: BlockDims, vb: VarBuilder) -> Result<Self> {
        let table = vb.get((vocab, in_channels), "embeddings.weight")?;
        Ok(Self {
            embeddings: Embedding::new(table, in_channels),
            layer_norm: RmsNorm::new(in_channels, d.eps, d.affine, vb.pp("layer_norm"))?,
            conv: pointwise_conv(in_channels, d.channels, d.bias, vb.pp("conv"))?,
        })
    }

    /// `ids` (B, h, w), u32 or i64, already checked to lie below the vocabulary size.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let x = self.embeddings.forward(ids)?;
        self.conv.forward(&self.layer_norm.forward(&x)?)
    }
}

/// `GlobalResponseNorm` on (B, H, W, C): `γ · (x · nx) + β + x` with `gx` the L2 norm of each
/// channel over H and W (in f32) and `nx = gx / (mean_c(gx) + 1e-6)`.
#[derive(Debug, Clone)]
struct GlobalResponseNorm {
    gamma: Tensor,
    beta: Tensor,
}

impl GlobalResponseNorm {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            gamma: vb.get((1, 1, 1, dim), "gamma")?,
            beta: vb.get((1, 1, 1, dim), "beta")?,
        })
    }
}

impl Module for GlobalResponseNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gx = x
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_keepdim(1)?
            .sum_keepdim(2)?
            .sqrt()?;
        let nx = gx
            .broadcast_div(&(gx.mean_keepdim(D::Minus1)? + 1e-6)?)?
            .to_dtype(x.dtype())?;
        x.broadcast_mul(&nx)?
            .broadcast_mul(&self.gamma)?
            .broadcast_add(&self.beta)?
            + x
    }
}

/// A depthwise 3×3 convolution, padding 1 (`nn.Conv2d(C, C, 3, padding=1, groups=C)`), on
/// (B, H, W, C): nine shifted, per-channel scaled copies summed (candle's grouped convolution
/// would run one convolution per channel).
#[derive(Debug, Clone)]
struct DepthwiseConv3x3 {
    /// (9, C): tap `3·ky + kx` of every channel.
    taps: Tensor,
    bias: Option<Tensor>,
}

impl DepthwiseConv3x3 {
    fn new(channels: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let w = vb.get((channels, 1, 3, 3), "weight")?;
        Ok(Self {
            taps: w.reshape((channels, 9))?.t()?.contiguous()?,
            bias: bias.then(|| vb.get(channels, "bias")).transpose()?,
        })
    }
}

impl Module for DepthwiseConv3x3 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let padded = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
        let mut out: Option<Tensor> = None;
        for ky in 0..3 {
            for kx in 0..3 {
                let tap = self.taps.get(3 * ky + kx)?;
                let term = padded
                    .narrow(1, ky, h)?
                    .narrow(2, kx, w)?
                    .broadcast_mul(&tap)?;
                out = Some(match out {
                    None => term,
                    Some(acc) => (acc + term)?,
                });
            }
        }
        let out = out.expect("nine taps");
        match &self.bias {
            Some(b) => out.broadcast_add(b),
            None => Ok(out),
        }
    }
}

/// `ConvNextBlock`: depthwise 3×3 → RMSNorm → linear (C → 4C) → GELU → GRN → linear (4C → C),
/// plus the input; then modulated by `(scale, shift) = cond_embeds_mapper(silu(cond))`.
#[derive(Debug, Clone)]
struct ConvNextBlock {
    depthwise: DepthwiseConv3x3,
    norm: RmsNorm,
    channelwise_linear_1: Linear,
    channelwise_norm: GlobalResponseNorm,
    channelwise_linear_2: Linear,
    cond_embeds_mapper: Linear,
    channels: usize,
}

impl ConvNextBlock {
    /// `res_ffn_factor` of the reference.
    const FFN_FACTOR: usize = 4;

    fn new(d: BlockDims, vb: VarBuilder) -> Result<Self> {
        let c = d.channels;
        let inner = c * Self::FFN_FACTOR;
        Ok(Self {
            depthwise: DepthwiseConv3x3::new(c, d.bias, vb.pp("depthwise"))?,
            norm: RmsNorm::new(c, d.eps, d.affine, vb.pp("norm"))?,
            channelwise_linear_1: linear_b(c, inner, d.bias, vb.pp("channelwise_linear_1"))?,
            channelwise_norm: GlobalResponseNorm::new(inner, vb.pp("channelwise_norm"))?,
            channelwise_linear_2: linear_b(inner, c, d.bias, vb.pp("channelwise_linear_2"))?,
            cond_embeds_mapper: linear_b(
                d.hidden_size,
                2 * c,
                d.bias,
                vb.pp("cond_embeds_mapper"),
            )?,
            channels: c,
        })
    }

    /// `x` (B, H, W, C), `cond` (B, hidden_size).
    fn forward(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let h = self.depthwise.forward(x)?;
        let h = self.norm.forward(&h)?;
        let h = self.channelwise_linear_1.forward(&h)?.gelu_erf()?;
        let h = self.channelwise_norm.forward(&h)?;
        let h = (self.channelwise_linear_2.forward(&h)? + x)?;
        let emb = self
            .cond_embeds_mapper
            .forward(&candle_nn::ops::silu(cond)?)?;
        let (b, c) = (emb.dim(0)?, self.channels);
        let scale = (emb.narrow(1, 0, c)? + 1.0)?.reshape((b, 1, 1, c))?;
        let shift = emb.narrow(1, c, c)?.reshape((b, 1, 1, c))?;
        h.broadcast_mul(&scale)?.broadcast_add(&shift)
    }
}

/// `SkipFFTransformerBlock`: two *cross*-attentions (both to the encoder hidden states, mapped
/// by `kv_mapper(silu(·))` when `hidden_size ≠ C`) with RMS pre-norms (always affine, eps
/// 1e-6) and residuals; no feed-forward.
#[derive(Debug, Clone)]
struct SkipFfBlock {
    kv_mapper: Option<Linear>,
    norm1: RmsNorm,
    attn1: Attention,
    norm2: RmsNorm,
    attn2: Attention,
}

impl SkipFfBlock {
    /// The reference hard-codes the eps (and the affine weight) of these two norms.
    const NORM_EPS: f64 = 1e-6;

    fn new(d: BlockDims, heads: usize, vb: VarBuilder) -> Result<Self> {
        let c = d.channels;
        let head_dim = c / heads;
        let kv_mapper = (d.hidden_size != c)
            .then(|| linear_b(d.hidden_size, c, d.bias, vb.pp("kv_mapper")))
            .transpose()?;
        let attn = |name: &str| Attention::new(c, c, heads, head_dim, d.bias, d.bias, vb.pp(name));
        Ok(Self {
            kv_mapper,
            norm1: RmsNorm::new(c, Self::NORM_EPS, true, vb.pp("norm1"))?,
            attn1: attn("attn1")?,
            norm2: RmsNorm::new(c, Self::NORM_EPS, true, vb.pp("norm2"))?,
            attn2: attn("attn2")?,
        })
    }

    /// `x` (B, L, C), `ehs` (B, S, hidden_size).
    fn forward(&self, x: &Tensor, ehs: &Tensor) -> Result<Tensor> {
        let ctx = match &self.kv_mapper {
            Some(m) => m.forward(&candle_nn::ops::silu(ehs)?)?,
            None => ehs.clone(),
        };
        let x = (self.attn1.forward(&self.norm1.forward(x)?, Some(&ctx))? + x)?;
        self.attn2.forward(&self.norm2.forward(&x)?, Some(&ctx))? + x
    }
}

/// `Downsample2D(use_conv, kernel 2, padding 0, norm "rms_norm")`: RMS norm over channels, then
/// a 2×2 stride-2 convolution (`conv.*`). The reference pads one zero row and column at the
/// bottom/right first; with even H and W (the caller checks) they are never read, so the
/// convolution is a matmul over non-overlapping 2×2 patches.
#[derive(Debug, Clone)]
struct Downsample {
    norm: RmsNorm,
    /// `weight` (O, C, 2, 2) flattened to (O, 4C) in (c, ky, kx) order.
    conv: Linear,
    channels: usize,
}

impl Downsample {
    fn new(d: BlockDims, vb: VarBuilder) -> Result<Self> {
        let c = d.channels;
        let w = vb.get((c, c, 2, 2), "conv.weight")?.reshape((c, 4 * c))?;
        let b = d.bias.then(|| vb.get(c, "conv.bias")).transpose()?;
        Ok(Self {
            norm: RmsNorm::new(c, d.eps, d.affine, vb.pp("norm"))?,
            conv: Linear::new(w, b),
            channels: c,
        })
    }

    /// (B, H, W, C) → (B, H/2, W/2, C); H and W even.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        debug_assert_eq!(c, self.channels);
        let x = self.norm.forward(x)?;
        let patches = x
            .reshape((b, h / 2, 2, w / 2, 2, c))?
            .permute((0, 1, 3, 5, 2, 4))?
            .contiguous()?
            .reshape((b, h / 2, w / 2, 4 * c))?;
        self.conv.forward(&patches)
    }
}

/// `Upsample2D(use_conv_transpose, kernel 2, padding 0, norm "rms_norm", interpolate=False)`:
/// RMS norm over channels, then a 2×2 stride-2 transposed convolution (`conv.*`), which writes
/// each input pixel's own 2×2 output patch: a matmul and a pixel shuffle.
#[derive(Debug, Clone)]
struct Upsample {
    norm: RmsNorm,
    /// `weight` (C_in, C_out, 2, 2) flattened to (C_in, 4·C_out) in (o, ky, kx) order.
    weight: Tensor,
    bias: Option<Tensor>,
    channels: usize,
}

impl Upsample {
    fn new(d: BlockDims, vb: VarBuilder) -> Result<Self> {
        let c = d.channels;
        Ok(Self {
            norm: RmsNorm::new(c, d.eps, d.affine, vb.pp("norm"))?,
            weight: vb.get((c, c, 2, 2), "conv.weight")?.reshape((c, 4 * c))?,
            bias: d.bias.then(|| vb.get(c, "conv.bias")).transpose()?,
            channels: c,
        })
    }

    /// (B, H, W, C) → (B, 2H, 2W, C).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        debug_assert_eq!(c, self.channels);
        let x = self.norm.forward(x)?.reshape((b * h * w, c))?;
        let y = x
            .matmul(&self.weight)?
            .reshape((b, h, w, c, 2, 2))?
            .permute((0, 1, 4, 2, 5, 3))?
            .contiguous()?
            .reshape((b, 2 * h, 2 * w, c))?;
        match &self.bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    }
}

/// `UVitBlock`: optional downsample, `num_res_blocks` × (ConvNeXt block, skip-FF attention
/// block), optional upsample.
#[derive(Debug, Clone)]
pub struct UVitBlock {
    downsample: Option<Downsample>,
    res_blocks: Vec<ConvNextBlock>,
    attention_blocks: Vec<SkipFfBlock>,
    upsample: Option<Upsample>,
}

impl UVitBlock {
    /// Loads `downsample.*` (when `downsample`), `res_blocks.{i}.*`, `attention_blocks.{i}.*`
    /// and `upsample.*` (when `upsample`).
    pub fn new(
        d: BlockDims,
        num_res_blocks: usize,
        heads: usize,
        downsample: bool,
        upsample: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let res_blocks = (0..num_res_blocks)
            .map(|i| ConvNextBlock::new(d, vb.pp(format!("res_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let attention_blocks = (0..num_res_blocks)
            .map(|i| SkipFfBlock::new(d, heads, vb.pp(format!("attention_blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            downsample: downsample
                .then(|| Downsample::new(d, vb.pp("downsample")))
                .transpose()?,
            res_blocks,
            attention_blocks,
            upsample: upsample
                .then(|| Upsample::new(d, vb.pp("upsample")))
                .transpose()?,
        })
    }

    /// `x` (B, H, W, C), `cond` (B, hidden_size), `ehs` (B, S, hidden_size); asks `stop`
    /// (naming `piece`) before each ConvNeXt block.
    pub fn forward(
        &self,
        x: &Tensor,
        cond: &Tensor,
        ehs: &Tensor,
        stop: Stop,
        piece: &'static str,
    ) -> Result<Tensor> {
        let mut x = match &self.downsample {
            Some(down) => down.forward(x)?,
            None => x.clone(),
        };
        for (res, attn) in self.res_blocks.iter().zip(&self.attention_blocks) {
            check(stop, piece)?;
            x = res.forward(&x, cond)?;
            let (b, h, w, c) = x.dims4()?;
            x = attn
                .forward(&x.reshape((b, h * w, c))?, ehs)?
                .reshape((b, h, w, c))?;
        }
        match &self.upsample {
            Some(up) => up.forward(&x),
            None => Ok(x),
        }
    }
}

/// `BasicTransformerBlock(norm_type="ada_norm_continuous")` as `UVit2DModel` builds it:
/// self-attention, cross-attention and a GEGLU feed-forward, each after an
/// `AdaLayerNormContinuous` conditioned on the pooled embedding. `norm1`/`norm2` are RMS norms;
/// `norm3` is a *layer* norm (the reference hard-codes `"layer_norm"` there).
#[derive(Debug, Clone)]
pub struct TransformerLayer {
    norm1: AdaLayerNormContinuous,
    attn1: Attention,
    norm2: AdaLayerNormContinuous,
    attn2: Attention,
    norm3: AdaLayerNormContinuous,
    ff: GegluFeedForward,
}

impl TransformerLayer {
    /// Width `dim` (= hidden_size, also the cross-attention and conditioning width).
    pub fn new(
        dim: usize,
        heads: usize,
        intermediate: usize,
        bias: bool,
        eps: f64,
        affine: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let ada = |name: &str, rms: bool| {
            AdaLayerNormContinuous::new(dim, dim, affine, eps, bias, rms, vb.pp(name))
        };
        let attn = |name: &str| Attention::new(dim, dim, heads, head_dim, bias, bias, vb.pp(name));
        Ok(Self {
            norm1: ada("norm1", true)?,
            attn1: attn("attn1")?,
            norm2: ada("norm2", true)?,
            attn2: attn("attn2")?,
            norm3: ada("norm3", false)?,
            ff: GegluFeedForward::new(dim, intermediate, bias, vb.pp("ff"))?,
        })
    }

    /// `x` (B, L, dim), `ehs` (B, S, dim), `cond` (B, dim).
    pub fn forward(&self, x: &Tensor, ehs: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x, cond)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x, cond)?, Some(ehs))?
            + x)?;
        self.ff.forward(&self.norm3.forward(&x, cond)?)? + x
    }
}

/// `ConvMlmLayer`: `conv2(RMSNorm(conv1(x)))`, both 1×1: (B, H, W, C) → (B, H, W, codebook).
#[derive(Debug, Clone)]
pub struct MlmLayer {
    conv1: Linear,
    layer_norm: RmsNorm,
    conv2: Linear,
}

impl MlmLayer {
    /// Loads `conv1` (C → in_channels), `layer_norm`, `conv2` (in_channels → codebook).
    pub fn new(
        in_channels: usize,
        codebook_size: usize,
        d: BlockDims,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            conv1: pointwise_conv(d.channels, in_channels, d.bias, vb.pp("conv1"))?,
            layer_norm: RmsNorm::new(in_channels, d.eps, d.affine, vb.pp("layer_norm"))?,
            conv2: pointwise_conv(in_channels, codebook_size, d.bias, vb.pp("conv2"))?,
        })
    }
}

impl Module for MlmLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm.forward(&self.conv1.forward(x)?)?;
        self.conv2.forward(&h)
    }
}
