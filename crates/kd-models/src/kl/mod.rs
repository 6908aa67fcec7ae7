//! `AutoencoderKL`: Kandinsky 2.0's image autoencoder (official `kandinsky2/vqgan/autoencoder.py`,
//! the latent-diffusion KL autoencoder with `Encoder`/`Decoder`/`DiagonalGaussianDistribution` of
//! `vqgan/vqgan_blocks.py`), loaded from the original `vae.ckpt` (a Lightning checkpoint read as
//! `torch.load(path)["state_dict"]`, through the safe pickle reader).
//!
//! As the 2.0 pipeline (`kandinsky2/kandinsky2_model.py`) uses it:
//!
//! * [`AutoencoderKl::decode`]`(latents)` = `image_encoder.decode(latents / scale)` =
//!   `decoder(post_quant_conv(latents / scale))` (`Kandinsky2.generate_img`; the pipeline then
//!   crops to the requested size and maps `(x + 1)·127.5`, rounded and clamped, to pixels);
//! * [`AutoencoderKl::encode`]`(image, noise)` = `image_encoder.encode(image).sample() * scale`
//!   (`generate_img2img`, `generate_inpainting`): the posterior is **sampled**, not its mode:
//!   `(mean + exp(0.5·clamp(logvar, −30, 20)) · ε) · scale` with ε one standard-normal draw of
//!   shape (B, embed_dim, h, w) (upstream: `torch.randn(mean.shape)` from the global CPU RNG;
//!   here: the caller's [`NoiseSource`]). `mean, logvar = chunk(quant_conv(encoder(image)), 2)`.
//!   [`AutoencoderKl::posterior`] gives the distribution for callers that want the mode.
//!
//! `scale` is 0.0512 in `CONFIG_2_0` (so decode multiplies the latents by ≈19.5).
//!
//! The encoder and decoder are the MoVQ module's diffusers-layout blocks
//! ([`crate::movq::Encoder`], [`crate::movq::Decoder`] with `norm_type="group"`): their math is
//! the latent-diffusion one (GroupNorm eps 1e-6 + SiLU resnets with a 1×1 shortcut when the
//! width changes, single-head attention scaled by 1/√C, the asymmetric (0, 1, 0, 1) zero pad +
//! stride-2 3×3 conv downsampler, nearest ×2 + 3×3 conv upsampler), so only the key names
//! differ; the private `names` module maps them (diffusers' `convert_ldm_vae_checkpoint` table)
//! and reshapes the attention's 1×1-conv weights to linear ones. What this module adds: the
//! double-z encoder output (2·z_channels) feeding `quant_conv` (2·z → 2·embed_dim), the
//! diagonal Gaussian posterior, and the latent scale. The GroupNorm group count is a config
//! value (`ddconfig.norm_num_groups`, 32 as upstream's `Normalize` hard-codes it).
//!
//! Extra tensors in the checkpoint (Lightning's `loss.*` discriminator, ...) are ignored, as
//! upstream's `strict=False` load does; every tensor the model needs must be present.

mod config;
mod names;

pub use config::{DdConfig, KlConfig, KlParams};

use crate::checkpoint::Weights;
use crate::config::VqModelConfig;
use crate::conv::{conv2d, Conv2d};
use crate::error::{ModelError, Result};
use crate::interrupt::{self, Stop};
use crate::movq::{check_image, check_latents, Decoder, Encoder, MovqOptions};
use crate::noise::NoiseSource;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use std::path::Path;

/// The posterior draws of a served request (`EncodeImages` with seeds): one RNG per image, each
/// seeded from the image's seed mixed with a fixed tag, so the posterior's ε is not the first
/// draw of the denoiser's stream for the same seed (which `q_sample` takes next).
pub fn posterior_noise(seeds: &[u64]) -> crate::noise::SeededNoise {
    /// "posterio" in ASCII: the stream tag.
    const TAG: u64 = 0x706f_7374_6572_696f;
    let derived: Vec<u64> = seeds.iter().map(|&s| s ^ TAG).collect();
    crate::noise::SeededNoise::new(&derived)
}

/// Upstream clamps the log-variance to this range before taking `exp`.
pub const LOGVAR_RANGE: (f64, f64) = (-30.0, 20.0);

/// `DiagonalGaussianDistribution` of the encoder's moments, in f32.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    /// (B, embed_dim, h, w).
    pub mean: Tensor,
    /// Log-variance, already clamped to [`LOGVAR_RANGE`]; (B, embed_dim, h, w).
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits `quant_conv` moments (B, 2·embed_dim, h, w) into mean and clamped log-variance.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let moments = moments.to_dtype(DType::F32)?;
        let c = moments.dim(1)?;
        if c == 0 || c % 2 != 0 {
            return Err(ModelError::invalid(
                "moments",
                format!(
                    "expected an even, positive channel count, got shape {:?}",
                    moments.dims()
                ),
            ));
        }
        let half = c / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, half)?.contiguous()?,
            logvar: moments
                .narrow(1, half, half)?
                .clamp(LOGVAR_RANGE.0, LOGVAR_RANGE.1)?
                .contiguous()?,
        })
    }

    /// `exp(0.5 · logvar)`.
    pub fn std(&self) -> Result<Tensor> {
        Ok((&self.logvar * 0.5)?.exp()?)
    }

    /// The mode (= the mean).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }

    /// `mean + std · ε`, ε one standard-normal draw of the mean's shape from `noise`.
    pub fn sample(&self, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        let eps = noise.randn(self.mean.dims(), self.mean.device())?;
        Ok((&self.mean + self.std()?.mul(&eps)?)?)
    }
}

/// The Kandinsky 2.0 KL autoencoder.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    encoder: Encoder,
    quant_conv: Conv2d,
    post_quant_conv: Conv2d,
    decoder: Decoder,
    cfg: KlConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderKl {
    /// Builds the model; `vb` serves diffusers-named keys (`encoder.*`, `decoder.*`,
    /// `quant_conv.*`, `post_quant_conv.*`, as a MoVQ has them). [`Self::load`] maps the original
    /// names onto them.
    pub fn new(cfg: &KlConfig, opts: MovqOptions, vb: VarBuilder) -> Result<Self> {
        cfg.validate(Path::new("<AutoencoderKL config>"))?;
        let z = cfg.params.ddconfig.z_channels;
        let e = cfg.params.embed_dim;
        let conv1x1 = |cin, cout, vb| conv2d(cin, cout, 1, Conv2dConfig::default(), vb);
        Ok(Self {
            // double_z: the encoder outputs mean and log-variance channels.
            encoder: Encoder::new(&vq_config(cfg, 2 * z), &opts, vb.pp("encoder"))?,
            quant_conv: conv1x1(2 * z, 2 * e, vb.pp("quant_conv"))?,
            post_quant_conv: conv1x1(e, z, vb.pp("post_quant_conv"))?,
            decoder: Decoder::new(&vq_config(cfg, z), &opts, vb.pp("decoder"))?,
            cfg: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Loads `vae.ckpt` (original key names, the tensors of `["state_dict"]`) in `dtype` on
    /// `device`. `config` is [`KlConfig::default`] for the official checkpoint.
    pub fn load(ckpt: &Path, config: &KlConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(ckpt, config, MovqOptions::default(), dtype, device)
    }

    /// [`Self::load`] with explicit attention-chunk / convolution-band settings.
    pub fn load_with(
        ckpt: &Path,
        config: &KlConfig,
        opts: MovqOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        config.validate(ckpt)?;
        let weights = Weights::open_pickle(ckpt, Some("state_dict"))?;
        let backend = names::LdmNames::new(weights, config.params.ddconfig.ch_mult.len());
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        Self::new(config, opts, vb)
    }

    /// The config.
    pub fn config(&self) -> &KlConfig {
        &self.cfg
    }

    /// The latent scale (0.0512 for 2.0).
    pub fn scale(&self) -> f64 {
        self.cfg.scale
    }

    /// Pixels per latent along each side (8 for 2.0).
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

    /// The encoder (diffusers layout; for layer-by-layer checks).
    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }

    /// The decoder (diffusers layout; for layer-by-layer checks).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    /// `post_quant_conv(z)` of *unscaled* latents `z` (= pipeline latents / scale).
    pub fn post_quant_conv(&self, z: &Tensor) -> Result<Tensor> {
        Ok(self.post_quant_conv.forward(z)?)
    }

    /// Decodes pipeline latents (B, embed_dim, h, w) into images (B, out_ch, h·sf, w·sf), raw
    /// (about [-1, 1], unclamped): `decoder(post_quant_conv(latents / scale))`. Returns the
    /// model's dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode_interruptible(latents, &interrupt::never)
    }

    /// [`Self::decode`] asking `stop` between layers ([`ModelError::Interrupted`] when it says
    /// stop).
    pub fn decode_interruptible(&self, latents: &Tensor, stop: Stop) -> Result<Tensor> {
        check_latents(latents, self.cfg.params.embed_dim)?;
        let z = latents
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .affine(1.0 / self.cfg.scale, 0.0)?
            .to_dtype(self.dtype)?;
        let x = self.post_quant_conv.forward(&z)?;
        interrupt::check(stop, "the KL decoder's post_quant_conv")?;
        Ok(self.decoder.forward(&x, None, stop)?)
    }

    /// `quant_conv(encoder(image))`: the posterior's moments (B, 2·embed_dim, H/sf, W/sf) in
    /// the model's dtype. Same checks as [`Self::encode`].
    pub fn moments(&self, image: &Tensor, stop: Stop) -> Result<Tensor> {
        let in_channels = self.cfg.params.ddconfig.in_channels;
        check_image(image, in_channels, self.scale_factor(), "the autoencoder's")?;
        let x = image.to_device(&self.device)?.to_dtype(self.dtype)?;
        let h = self.encoder.forward(&x, stop)?;
        interrupt::check(stop, "the KL encoder's output")?;
        Ok(self.quant_conv.forward(&h)?)
    }

    /// The posterior `encode(image)` of images (B, in_channels, H, W) in [-1, 1] (H and W
    /// positive multiples of the scale factor), in f32 and unscaled.
    pub fn posterior(&self, image: &Tensor, stop: Stop) -> Result<DiagonalGaussian> {
        DiagonalGaussian::from_moments(&self.moments(image, stop)?)
    }

    /// Encodes images (B, in_channels, H, W) in [-1, 1] into pipeline latents
    /// (B, embed_dim, H/sf, W/sf), f32, as the 2.0 img2img / inpainting pipelines do:
    /// `encode(image).sample() * scale`, drawing one (B, embed_dim, H/sf, W/sf) standard-normal
    /// tensor from `noise`.
    pub fn encode(&self, image: &Tensor, noise: &mut dyn NoiseSource) -> Result<Tensor> {
        self.encode_interruptible(image, noise, &interrupt::never)
    }

    /// [`Self::encode`] asking `stop` between layers.
    pub fn encode_interruptible(
        &self,
        image: &Tensor,
        noise: &mut dyn NoiseSource,
        stop: Stop,
    ) -> Result<Tensor> {
        let posterior = self.posterior(image, stop)?;
        Ok(posterior.sample(noise)?.affine(self.cfg.scale, 0.0)?)
    }
}

/// The diffusers-layout config of the MoVQ blocks for this autoencoder, with `latent_channels`
/// the encoder's output (2·z_channels) or the decoder's input (z_channels) width.
fn vq_config(cfg: &KlConfig, latent_channels: usize) -> VqModelConfig {
    let d = &cfg.params.ddconfig;
    let levels = d.ch_mult.len();
    let down = (0..levels)
        .map(|i| {
            if cfg.encoder_level_attention(i) {
                "AttnDownEncoderBlock2D"
            } else {
                "DownEncoderBlock2D"
            }
        })
        .map(String::from)
        .collect();
    // Up block k runs level levels − 1 − k.
    let up = (0..levels)
        .map(|k| {
            if cfg.decoder_level_attention(levels - 1 - k) {
                "AttnUpDecoderBlock2D"
            } else {
                "UpDecoderBlock2D"
            }
        })
        .map(String::from)
        .collect();
    VqModelConfig {
        in_channels: d.in_channels,
        out_channels: d.out_ch,
        down_block_types: down,
        up_block_types: up,
        block_out_channels: cfg.widths(),
        layers_per_block: d.num_res_blocks,
        act_fn: "silu".into(),
        latent_channels,
        sample_size: d.resolution,
        norm_num_groups: d.norm_num_groups,
        vq_embed_dim: None,
        norm_type: "group".into(),
        mid_block_add_attention: true,
        lookup_from_codebook: false,
        ..VqModelConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_config_2_0() {
        let c = KlConfig::default();
        c.validate(Path::new("default")).unwrap();
        assert_eq!(c.scale, 0.0512);
        assert_eq!(c.scale_factor(), 8);
        assert_eq!(c.widths(), [128, 256, 512, 512]);
        let json = r#"{"name": "AutoencoderKL", "scale": 0.0512, "params": {"ckpt_path": "",
            "embed_dim": 4, "ddconfig": {"double_z": true, "z_channels": 4, "resolution": 256,
            "in_channels": 3, "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}}}"#;
        let parsed: KlConfig = serde_json::from_str(json).unwrap();
        assert_eq!(parsed, c);
    }

    #[test]
    fn attention_levels_follow_upstream_resolutions() {
        let mut c = KlConfig::default();
        c.params.ddconfig.resolution = 90;
        c.params.ddconfig.ch_mult = vec![1, 2, 2];
        // Encoder: 90, 45, 22. Decoder: 90 // 4 = 22, then 44, 88.
        c.params.ddconfig.attn_resolutions = vec![45, 22];
        assert!(!c.encoder_level_attention(0));
        assert!(c.encoder_level_attention(1));
        assert!(c.encoder_level_attention(2));
        assert!(!c.decoder_level_attention(0));
        assert!(!c.decoder_level_attention(1));
        assert!(c.decoder_level_attention(2));
    }

    #[test]
    fn posterior_clamps_the_log_variance() {
        let dev = Device::Cpu;
        let m = Tensor::new(&[[[[0.5f32]], [[-2.0]], [[-40.0]], [[25.0]]]], &dev).unwrap();
        let p = DiagonalGaussian::from_moments(&m).unwrap();
        let lv: Vec<f32> = p.logvar.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(lv, [-30.0, 20.0]);
        let mut noise =
            crate::noise::ReplayNoise::new([Tensor::new(&[[[[1.0f32]], [[2.0]]]], &dev).unwrap()]);
        let s: Vec<f32> = p
            .sample(&mut noise)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!((s[0] - (0.5 + (-15.0f32).exp())).abs() < 1e-6);
        assert!((s[1] - (-2.0 + 2.0 * 10.0f32.exp())).abs() < 1e-2);
    }
}
