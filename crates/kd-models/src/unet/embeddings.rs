//! The conditioning embeddings of the Kandinsky 2.2 UNet (diffusers `models/embeddings.py`):
//! `ImageProjection` (image embed → 32 context tokens), `ImageTimeEmbedding` (image embed added
//! to the time embedding) and `ImageHintTimeEmbedding` (the same plus the ControlNet
//! `input_hint_block`, which encodes a pixel-resolution hint to 4 channels at 1/8 resolution);
//! and those of the Kandinsky 2.1 UNet: `TextImageProjection` (10 image tokens ⧺ projected text
//! hidden states) and `TextImageTimeEmbedding` (`LN(text_proj(text)) + image_proj(image)`).

use crate::conv::{conv2d, Conv2d};
use candle_core::{Module, Result, Tensor};
use candle_nn::{layer_norm, linear, Conv2dConfig, LayerNorm, Linear, VarBuilder};

/// `ImageProjection`: `LN(reshape(Linear(image_embeds), (B, tokens, dim)))`.
#[derive(Debug, Clone)]
pub struct ImageProjection {
    image_embeds: Linear,
    norm: LayerNorm,
    num_tokens: usize,
}

impl ImageProjection {
    /// Number of image tokens diffusers uses (`num_image_text_embeds` default).
    pub const NUM_TOKENS: usize = 32;

    /// Loads `image_embeds` (embed_dim → 32·cross_dim) and `norm` (cross_dim).
    pub fn new(embed_dim: usize, cross_dim: usize, vb: VarBuilder) -> Result<Self> {
        let n = Self::NUM_TOKENS;
        Ok(Self {
            image_embeds: linear(embed_dim, n * cross_dim, vb.pp("image_embeds"))?,
            norm: layer_norm(cross_dim, 1e-5, vb.pp("norm"))?,
            num_tokens: n,
        })
    }

    /// (B, embed_dim) → (B, 32, cross_dim).
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        let b = image_embeds.dim(0)?;
        let x = self.image_embeds.forward(image_embeds)?;
        let x = x.reshape((b, self.num_tokens, ()))?;
        self.norm.forward(&x)
    }
}

/// The ControlNet `input_hint_block`: 8 3×3 convs with SiLU between, three of stride 2.
#[derive(Debug, Clone)]
pub struct HintBlock {
    convs: Vec<Conv2d>,
}

impl HintBlock {
    /// (in, out, stride) of the convs at sequential indices 0, 2, …, 14.
    const LAYERS: [(usize, usize, usize); 8] = [
        (3, 16, 1),
        (16, 16, 1),
        (16, 32, 2),
        (32, 32, 1),
        (32, 96, 2),
        (96, 96, 1),
        (96, 256, 2),
        (256, 4, 1),
    ];

    /// Loads `0.*, 2.*, …, 14.*` from `vb`.
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let convs = Self::LAYERS
            .iter()
            .enumerate()
            .map(|(i, &(cin, cout, stride))| {
                let cfg = Conv2dConfig {
                    padding: 1,
                    stride,
                    ..Default::default()
                };
                conv2d(cin, cout, 3, cfg, vb.pp((2 * i).to_string()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { convs })
    }

    /// (B, 3, H, W) → (B, 4, H/8, W/8).
    pub fn forward(&self, hint: &Tensor) -> Result<Tensor> {
        let mut x = hint.clone();
        let last = self.convs.len() - 1;
        for (i, conv) in self.convs.iter().enumerate() {
            x = conv.forward(&x)?;
            if i != last {
                x = candle_nn::ops::silu(&x)?;
            }
        }
        Ok(x)
    }
}

/// `ImageTimeEmbedding` (`addition_embed_type "image"`) or `ImageHintTimeEmbedding`
/// (`"image_hint"`, with a hint block).
#[derive(Debug, Clone)]
pub struct ImageTimeEmbedding {
    image_proj: Linear,
    image_norm: LayerNorm,
    hint_block: Option<HintBlock>,
}

impl ImageTimeEmbedding {
    /// Loads `image_proj`, `image_norm` and, if `with_hint`, `input_hint_block`.
    pub fn new(
        embed_dim: usize,
        time_embed_dim: usize,
        with_hint: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let hint_block = if with_hint {
            Some(HintBlock::new(vb.pp("input_hint_block"))?)
        } else {
            None
        };
        Ok(Self {
            image_proj: linear(embed_dim, time_embed_dim, vb.pp("image_proj"))?,
            image_norm: layer_norm(time_embed_dim, 1e-5, vb.pp("image_norm"))?,
            hint_block,
        })
    }

    /// Whether this embedding takes a ControlNet hint.
    pub fn takes_hint(&self) -> bool {
        self.hint_block.is_some()
    }

    /// `LN(Linear(image_embeds))` (B, time_embed_dim).
    pub fn forward(&self, image_embeds: &Tensor) -> Result<Tensor> {
        self.image_norm
            .forward(&self.image_proj.forward(image_embeds)?)
    }

    /// The encoded hint (B, 4, H/8, W/8); `None` for a model without a hint block.
    pub fn encode_hint(&self, hint: &Tensor) -> Option<Result<Tensor>> {
        self.hint_block.as_ref().map(|b| b.forward(hint))
    }
}

/// `TextImageProjection` (`encoder_hid_dim_type "text_image_proj"`, Kandinsky 2.1):
/// `cat[reshape(Linear(image_embeds), (B, 10, cross)), Linear(hidden_states)]` along the tokens,
/// without normalisation.
#[derive(Debug, Clone)]
pub struct TextImageProjection {
    image_embeds: Linear,
    text_proj: Linear,
    num_tokens: usize,
}

impl TextImageProjection {
    /// Number of image tokens diffusers uses (`num_image_text_embeds` default).
    pub const NUM_TOKENS: usize = 10;

    /// Loads `image_embeds` (image_dim → 10·cross_dim) and `text_proj` (text_dim → cross_dim).
    pub fn new(
        text_dim: usize,
        image_dim: usize,
        cross_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let n = Self::NUM_TOKENS;
        Ok(Self {
            image_embeds: linear(image_dim, n * cross_dim, vb.pp("image_embeds"))?,
            text_proj: linear(text_dim, cross_dim, vb.pp("text_proj"))?,
            num_tokens: n,
        })
    }

    /// (B, L, text_dim) hidden states and (B, image_dim) embeds → (B, 10 + L, cross_dim).
    pub fn forward(&self, hidden_states: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let b = hidden_states.dim(0)?;
        let img = self.image_embeds.forward(image_embeds)?;
        let img = img.reshape((b, self.num_tokens, ()))?;
        let text = self.text_proj.forward(hidden_states)?;
        Tensor::cat(&[&img, &text], 1)
    }
}

/// `TextImageTimeEmbedding` (`addition_embed_type "text_image"`, Kandinsky 2.1):
/// `image_proj(image_embeds) + LN(text_proj(text_embeds))`.
#[derive(Debug, Clone)]
pub struct TextImageTimeEmbedding {
    text_proj: Linear,
    text_norm: LayerNorm,
    image_proj: Linear,
}

impl TextImageTimeEmbedding {
    /// Loads `text_proj`, `text_norm` and `image_proj`.
    pub fn new(
        text_dim: usize,
        image_dim: usize,
        time_embed_dim: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            text_proj: linear(text_dim, time_embed_dim, vb.pp("text_proj"))?,
            text_norm: layer_norm(time_embed_dim, 1e-5, vb.pp("text_norm"))?,
            image_proj: linear(image_dim, time_embed_dim, vb.pp("image_proj"))?,
        })
    }

    /// (B, text_dim) pooled text embeds and (B, image_dim) image embeds → (B, time_embed_dim).
    pub fn forward(&self, text_embeds: &Tensor, image_embeds: &Tensor) -> Result<Tensor> {
        let text = self
            .text_norm
            .forward(&self.text_proj.forward(text_embeds)?)?;
        self.image_proj.forward(image_embeds)? + text
    }
}
