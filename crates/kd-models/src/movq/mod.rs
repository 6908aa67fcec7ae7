//! `VQModel` (diffusers `models/autoencoders/vq_model.py`): MoVQ, the Kandinsky 2.1/2.2 image
//! autoencoder (<https://arxiv.org/abs/2209.09002>), and aMUSEd's VQ-GAN (group norms, decoded
//! from codebook indices). As the pipelines use them:
//!
//! * [`VqModel::encode`] = `quant_conv(encoder(x))`: continuous latents, not quantised, not scaled;
//! * [`VqModel::decode`] = `decode(z, force_not_quantize=True)`: `decoder(post_quant_conv(z), zq=z)`
//!   (MoVQ; the codebook is never used);
//! * [`VqModel::encode_indices`] = `quantize(encode(x))` indices: the nearest codebook entry of
//!   each latent (aMUSEd img2img/inpaint);
//! * [`VqModel::decode_indices`] = `decode(indices, force_not_quantize=True, shape)` with
//!   `lookup_from_codebook`: codebook lookup, then the decoder (aMUSEd).
//!
//! Attention over H·W tokens is computed in chunks of [`MovqOptions::attention_chunk`] queries, so
//! a 128×128 latent (16384 tokens) never materialises a 16384² score matrix.

mod attention;
mod decoder;
mod encoder;
mod layers;

pub use attention::AttentionBlock;
pub use decoder::Decoder;
pub use encoder::Encoder;
pub use layers::{Conv3x3, ResnetBlock, SpatialNorm};

use crate::checkpoint::{ComponentDir, Variant};
use crate::config::VqModelConfig;
use crate::conv::Conv2d;
use crate::error::{ModelError, Result};
use crate::interrupt::{self, Stop};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

/// Run-time settings of the MoVQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MovqOptions {
    /// Queries per attention chunk (0 = all tokens at once). Peak score memory is
    /// `chunk × tokens × 4` bytes: 1024 × 16384 × 4 = 64 MiB for a 1024×1024 image.
    pub attention_chunk: usize,
    /// Largest output area (pixels) of one 3×3 convolution call; larger feature maps are
    /// convolved in bands of rows (0 = never). Bounds the im2col buffer of the CUDA/Metal
    /// backends (`band × 9·C_in × 4` bytes); candle's CPU conv is already tiled.
    pub conv_band_pixels: usize,
}

impl Default for MovqOptions {
    fn default() -> Self {
        Self {
            attention_chunk: 1024,
            conv_band_pixels: 1 << 16,
        }
    }
}

/// The VQ autoencoder (encoder, `quant_conv`, `post_quant_conv`, decoder, and the codebook when
/// the config says `lookup_from_codebook`).
#[derive(Debug, Clone)]
pub struct VqModel {
    encoder: Encoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    /// `quantize.embedding.weight` (num_vq_embeddings, vq_embed_dim), f32.
    codebook: Option<Tensor>,
    cfg: VqModelConfig,
    dtype: DType,
    device: Device,
}

impl VqModel {
    /// Builds the model from a validated config; `vb` holds the diffusers keys (`encoder.*`,
    /// `quant_conv.*`, `post_quant_conv.*`, `decoder.*`, and `quantize.embedding.weight` when
    /// `lookup_from_codebook` is set).
    pub fn new(cfg: &VqModelConfig, opts: MovqOptions, vb: VarBuilder) -> Result<Self> {
        if cfg.spatial() && cfg.embed_dim() != cfg.latent_channels {
            return Err(ModelError::invalid(
                "vq_embed_dim",
                format!(
                    "must equal latent_channels ({}) for the spatial-norm decoder, got {}",
                    cfg.latent_channels,
                    cfg.embed_dim()
                ),
            ));
        }
        let lc = cfg.latent_channels;
        let ed = cfg.embed_dim();
        let codebook = if cfg.lookup_from_codebook {
            Some(
                vb.get((cfg.num_vq_embeddings, ed), "quantize.embedding.weight")?
                    .to_dtype(DType::F32)?,
            )
        } else {
            None
        };
        Ok(Self {
            codebook,
            encoder: Encoder::new(cfg, &opts, vb.pp("encoder"))?,
            quant_conv: layers::conv1x1(lc, ed, vb.pp("quant_conv"))?,
            post_quant_conv: layers::conv1x1(ed, lc, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(cfg, &opts, vb.pp("decoder"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads the `movq` component of a checkpoint folder in `dtype` on `device`.
    pub fn load(
        component: &ComponentDir,
        opts: MovqOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = component.vq_config()?;
        let vb = component
            .weights(Variant::Default)?
            .var_builder(dtype, device);
        Self::new(&cfg, opts, vb)
    }

    /// The model's config.
    pub fn config(&self) -> &VqModelConfig {
        &self.cfg
    }

    /// Pixels per latent along each side: 2^(levels − 1) (8 for the hub MoVQ).
    pub fn scale_factor(&self) -> usize {
        self.cfg.scale_factor()
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Changes the number of queries per attention chunk (0 = unchunked) in every attention.
    pub fn set_attention_chunk(&mut self, chunk: usize) {
        for a in self.encoder.attentions_mut() {
            a.set_chunk(chunk);
        }
        for a in self.decoder.attentions_mut() {
            a.set_chunk(chunk);
        }
    }

    /// The encoder (for layer-by-layer checks).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The decoder (for layer-by-layer checks).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// `post_quant_conv(latents)`.
    pub fn post_quant_conv(&self, latents: &Tensor) -> Result<Tensor> {
        Ok(self.post_quant_conv.forward(latents)?)
    }

    /// Encodes images (B, in_channels, H, W) in [-1, 1] into latents (B, latent_channels,
    /// H/sf, W/sf) = `quant_conv(encoder(x))`. H and W must be positive multiples of the scale
    /// factor. Returns the model's dtype.
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        self.encode_interruptible(image, &interrupt::never)
    }

    /// [`Self::encode`] asking `stop` between layers ([`ModelError::Interrupted`] when it says
    /// stop).
    pub fn encode_interruptible(&self, image: &Tensor, stop: Stop) -> Result<Tensor> {
        check_image(image, self.cfg.in_channels, self.scale_factor(), "the MoVQ")?;
        let x = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let h = self.encoder.forward(&x, stop)?;
        Ok(self.quant_conv.forward(&h)?)
    }

    /// Decodes latents (B, vq_embed_dim, h, w) into images (B, out_channels, h·sf, w·sf), raw
    /// (about [-1, 1], unclamped), as `decode(latents, force_not_quantize=True)`. Returns the
    /// model's dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_interruptible(latents, &interrupt::never)
    }

    /// [`Self::decode`] asking `stop` between layers ([`ModelError::Interrupted`] when it says
    /// stop).
    pub fn decode_interruptible(&self, latents: &Tensor, stop: Stop) -> Result<Tensor> {
        check_latents(latents, self.cfg.embed_dim())?;
        let z = latents.to_device(&self.device)?.to_dtype(self.dtype)?;
        let x = self.post_quant_conv.forward(&z)?;
        let zq = self.cfg.spatial().then_some(&z);
        Ok(self.decoder.forward(&x, zq, stop)?)
    }

    /// The codebook, or an error when the config does not look indices up.
    fn codebook(&self) -> Result<&Tensor> {
        self.codebook.as_ref().ok_or_else(|| {
            ModelError::invalid(
                "indices",
                "this VQ model does not decode token indices (its config has lookup_from_codebook: false)",
            )
        })
    }

    /// Codebook entries of `indices` (B, h, w) → latents (B, vq_embed_dim, h, w) in the model's
    /// dtype (`quantize.get_codebook_entry`).
    pub fn lookup(&self, indices: &Tensor) -> Result<Tensor> {
        let codebook = self.codebook()?;
        let (b, h, w) = match *indices.dims() {
            [b, h, w] if b > 0 && h > 0 && w > 0 => (b, h, w),
            _ => {
                return Err(ModelError::invalid(
                    "indices",
                    format!(
                        "expected a (B, h, w) token map with every side ≥ 1, got shape {:?}",
                        indices.dims()
                    ),
                ))
            }
        };
        let ids = indices.to_dtype(DType::U32)?.to_device(&Device::Cpu)?;
        let n = self.cfg.num_vq_embeddings;
        if let Some(&bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= n)
        {
            return Err(ModelError::invalid(
                "indices",
                format!("token {bad} is outside the codebook (0..{n})"),
            ));
        }
        let ids = ids.to_device(codebook.device())?.flatten_all()?;
        let ed = self.cfg.embed_dim();
        Ok(codebook
            .index_select(&ids, 0)?
            .reshape((b, h, w, ed))?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_device(&self.device)?
            .to_dtype(self.dtype)?)
    }

    /// Decodes token indices (B, h, w) into images (B, out_channels, h·sf, w·sf), raw
    /// (unclamped), as `decode(indices, force_not_quantize=True, shape=(B, h, w, C))`.
    pub fn decode_indices(&self, indices: &Tensor, stop: Stop) -> Result<Tensor> {
        let latents = self.lookup(indices)?;
        self.decode_interruptible(&latents, stop)
    }

    /// The index of the nearest codebook entry (Euclidean) of each latent vector: latents
    /// (B, vq_embed_dim, h, w) → indices (B, h, w) u32 (`quantize(latents)[2][2]`).
    pub fn quantize_indices(&self, latents: &Tensor) -> Result<Tensor> {
        let codebook = self.codebook()?;
        let (b, c, h, w) = dims4("latents", latents)?;
        if c != self.cfg.embed_dim() {
            return Err(ModelError::invalid(
                "latents",
                format!(
                    "expected {} channels, got shape {:?}",
                    self.cfg.embed_dim(),
                    latents.dims()
                ),
            ));
        }
        let z = latents
            .to_device(codebook.device())?
            .to_dtype(DType::F32)?
            .permute((0, 2, 3, 1))?
            .reshape((b * h * w, c))?;
        // |z − e|² = |z|² − 2 z·e + |e|²; |z|² is the same for every entry of a row.
        let e2 = codebook.sqr()?.sum_keepdim(1)?.t()?;
        let dist = e2.broadcast_sub(&(z.matmul(&codebook.t()?)? * 2.0)?)?;
        Ok(dist.argmin(D::Minus1)?.reshape((b, h, w))?)
    }

    /// Encodes images (B, in_channels, H, W) to token indices (B, H/sf, W/sf):
    /// `quantize(encode(image))`.
    pub fn encode_indices(&self, image: &Tensor, stop: Stop) -> Result<Tensor> {
        let latents = self.encode_interruptible(image, stop)?;
        self.quantize_indices(&latents)
    }
}

/// `image` (B ≥ 1, `channels`, H, W) with H and W positive multiples of `sf` (`model` names the
/// autoencoder in the message, e.g. "the MoVQ").
pub(crate) fn check_image(image: &Tensor, channels: usize, sf: usize, model: &str) -> Result<()> {
    let (_, c, h, w) = dims4("image", image)?;
    if c != channels {
        return Err(ModelError::invalid(
            "image",
            format!(
                "expected {channels} channels (B, {channels}, H, W), got shape {:?}",
                image.dims()
            ),
        ));
    }
    if h == 0 || w == 0 || !h.is_multiple_of(sf) || !w.is_multiple_of(sf) {
        return Err(ModelError::invalid(
            "image",
            format!(
                "height and width must be positive multiples of {sf} ({model} scale factor), got {h}×{w}"
            ),
        ));
    }
    Ok(())
}

/// `latents` (B ≥ 1, `channels`, h ≥ 1, w ≥ 1).
pub(crate) fn check_latents(latents: &Tensor, channels: usize) -> Result<()> {
    let (_, c, h, w) = dims4("latents", latents)?;
    if c != channels {
        return Err(ModelError::invalid(
            "latents",
            format!(
                "expected {channels} channels (B, {channels}, h, w), got shape {:?}",
                latents.dims()
            ),
        ));
    }
    if h == 0 || w == 0 {
        return Err(ModelError::invalid(
            "latents",
            format!("latent height and width must be at least 1, got {h}×{w}"),
        ));
    }
    Ok(())
}

pub(crate) fn dims4(field: &'static str, t: &Tensor) -> Result<(usize, usize, usize, usize)> {
    match *t.dims() {
        [b, c, h, w] if b > 0 => Ok((b, c, h, w)),
        _ => Err(ModelError::invalid(
            field,
            format!(
                "expected a 4-D tensor (B ≥ 1, C, H, W), got shape {:?}",
                t.dims()
            ),
        )),
    }
}
