//! The loaded model of this stage: one autoencoder and what requests are checked against. A
//! Kandinsky 2.1 / 2.2 folder's MoVQ (`movq/`: continuous latents ⇄ pixels), an aMUSEd folder's
//! VQ-GAN (`vqvae/`: token maps ⇄ pixels) or a Kandinsky 2.0 folder's KL autoencoder (`vae.ckpt`:
//! scaled latents ⇄ pixels, the posterior sampled from per-image seeds), chosen by the folder's
//! family.

use crate::Config;
use candle_core::{DType, Device, Tensor};
use kd_models::interrupt::{self, Stop};
use kd_models::kd20::pipeline::KD20_VAE_FILE;
use kd_models::kl::{self, AutoencoderKl, KlConfig};
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::{CheckpointDir, ModelError, ModelFamily};
use kd_proto::v1;
use kd_runtime::budget::{self, Cost};
use kd_runtime::config::PixelArgs;
use kd_runtime::model_info::model_info;
use kd_runtime::{ServiceError, StageModel};

/// A Kandinsky 2.0 folder's optional autoencoder config sidecar (a [`KlConfig`]; without it the
/// official `CONFIG_2_0` values, as `Kd20Pipeline::load` reads the folder).
pub const KD20_VAE_CONFIG_FILE: &str = "vae.json";

/// The files whose revision a Kandinsky 2.0 folder's autoencoder reports: the folder's own files
/// (`.` : `vae.ckpt` and `vae.json`, and with them the folder's UNet checkpoint and sidecar, so
/// the revision may change when only the UNet does; never the other way round).
pub const KD20_REVISION_FILES: [&str; 1] = ["."];

/// The autoencoder a folder's family serves.
pub(crate) enum Autoencoder {
    /// A Kandinsky 2.1 / 2.2 folder's MoVQ: continuous (B, 4, h, w) latents ⇄ pixels.
    Movq(VqModel),
    /// An aMUSEd folder's VQ-GAN (`lookup_from_codebook`): (B, h, w) token maps ⇄ pixels.
    VqGan(VqModel),
    /// A Kandinsky 2.0 folder's KL autoencoder: latents in the UNet's scaled space ⇄ pixels, the
    /// encoder's posterior sampled (boxed: the variants differ in size).
    Kl(Box<AutoencoderKl>),
}

impl Autoencoder {
    /// Pixels per latent (token) along each side.
    pub(crate) fn scale_factor(&self) -> usize {
        match self {
            Self::Movq(vq) | Self::VqGan(vq) => vq.scale_factor(),
            Self::Kl(kl) => kl.scale_factor(),
        }
    }

    /// The compute dtype.
    pub(crate) fn dtype(&self) -> DType {
        match self {
            Self::Movq(vq) | Self::VqGan(vq) => vq.dtype(),
            Self::Kl(kl) => kl.dtype(),
        }
    }

    /// Channels of the continuous latents it decodes (a VQ-GAN decodes token maps, which have
    /// none: its latent width is reported).
    pub(crate) fn latent_channels(&self) -> usize {
        match self {
            Self::Movq(vq) | Self::VqGan(vq) => vq.config().latent_channels,
            Self::Kl(kl) => kl.config().params.embed_dim,
        }
    }

    /// Channels of the images it encodes.
    pub(crate) fn image_channels(&self) -> usize {
        match self {
            Self::Movq(vq) | Self::VqGan(vq) => vq.config().in_channels,
            Self::Kl(kl) => kl.config().params.ddconfig.in_channels,
        }
    }

    /// What the model is, in messages.
    pub(crate) fn what(&self) -> &'static str {
        match self {
            Self::Movq(_) => "MoVQ",
            Self::VqGan(_) => "VQ-GAN",
            Self::Kl(_) => "KL autoencoder",
        }
    }

    /// A zero input of side `side` on `device`: (1, h, w) token ids or (1, c, h, w) latents to
    /// decode, (1, 3, h, w) pixels to encode (for warm-up and calibration).
    fn zeros(&self, side: usize, decode: bool, device: &Device) -> Result<Tensor, ServiceError> {
        Ok(match (decode, self) {
            (true, Self::VqGan(_)) => Tensor::zeros((1, side, side), DType::U32, device)?,
            (true, _) => Tensor::zeros(
                (1, self.latent_channels(), side, side),
                self.dtype(),
                device,
            )?,
            (false, _) => {
                Tensor::zeros((1, self.image_channels(), side, side), self.dtype(), device)?
            }
        })
    }

    /// One raw forward pass of `x` (decode or encode; the KL posterior drawn from seed 0), the
    /// model's own output before any post-processing. What warm-up and calibration run.
    fn forward(&self, x: &Tensor, decode: bool, stop: Stop) -> Result<Tensor, ModelError> {
        match (decode, self) {
            (true, Self::Movq(vq)) => vq.decode_interruptible(x, stop),
            (true, Self::VqGan(vq)) => vq.decode_indices(x, stop),
            (true, Self::Kl(kl)) => kl.decode_interruptible(x, stop),
            (false, Self::Movq(vq)) => vq.encode_interruptible(x, stop),
            (false, Self::VqGan(vq)) => vq.encode_indices(x, stop),
            (false, Self::Kl(kl)) => {
                kl.encode_interruptible(x, &mut kl::posterior_noise(&[0]), stop)
            }
        }
    }
}

impl Movq {
    /// INVALID_ARGUMENT naming `field` when an image of `height` × `width` pixels is over
    /// `--max-pixels`.
    pub(crate) fn check_pixels(
        &self,
        field: &str,
        height: usize,
        width: usize,
    ) -> Result<(), ServiceError> {
        PixelArgs::check(field, height as u64, width as u64, self.max_pixels)
    }

    /// The pixel size (height, width) of latents (tokens) of `h` × `w`; INVALID_ARGUMENT naming
    /// `field` when it overflows or is over `--max-pixels`.
    pub(crate) fn latent_pixels(
        &self,
        field: &str,
        h: usize,
        w: usize,
    ) -> Result<(usize, usize), ServiceError> {
        let sf = self.ae.scale_factor();
        match (h.checked_mul(sf), w.checked_mul(sf)) {
            (Some(ph), Some(pw)) => {
                self.check_pixels(field, ph, pw)?;
                Ok((ph, pw))
            }
            _ => Err(ServiceError::invalid(
                field,
                format!("{h}×{w} latents are too large (× scale factor {sf})"),
            )),
        }
    }
}

/// The loaded model and what requests are checked against.
pub struct Movq {
    pub(crate) ae: Autoencoder,
    pub(crate) info: v1::ModelInfo,
    pub(crate) device: candle_core::Device,
    pub(crate) max_batch: usize,
    /// Largest image (height × width pixels) decoded or encoded.
    pub(crate) max_pixels: u64,
    /// One image's decode cost per latent pixel (token), calibrated at warm-up.
    pub(crate) decode_cost: Cost,
    /// One image's encode cost per pixel, calibrated at warm-up.
    pub(crate) encode_cost: Cost,
    /// `--admission-safety`.
    pub(crate) admission_safety: f64,
}

impl Movq {
    /// Loads the folder's autoencoder (`movq/` from a Kandinsky 2.1 / 2.2 decoder folder,
    /// `vqvae/` from an aMUSEd folder, `vae.ckpt` (+ `vae.json`) from a Kandinsky 2.0 folder)
    /// and runs one small decode.
    pub fn load_and_warm(config: &Config) -> Result<Self, ServiceError> {
        let dir = CheckpointDir::open(&config.stage.model_dir)?;
        let device = config.stage.open_device()?;
        let opts = MovqOptions {
            attention_chunk: config.attention_chunk,
            ..MovqOptions::default()
        };
        let (ae, info) = match dir.family() {
            ModelFamily::Kandinsky20 => {
                let kl = load_kl(&dir, opts, config.stage.dtype, &device)?;
                let info = model_info(&dir, "vae", &KD20_REVISION_FILES, kl.dtype(), &device)?;
                (Autoencoder::Kl(Box::new(kl)), info)
            }
            family => {
                let tokens = family == ModelFamily::Amused;
                let name = if tokens { "vqvae" } else { "movq" };
                let vq = load_vq(&dir, name, opts, config.stage.dtype, &device)?;
                if tokens && !vq.config().lookup_from_codebook {
                    return Err(ServiceError::Internal(format!(
                        "{}: an aMUSEd VQ-GAN must decode token maps (lookup_from_codebook: true)",
                        dir.root().join(name).join("config.json").display()
                    )));
                }
                let info = model_info(&dir, name, &[name], vq.dtype(), &device)?;
                let ae = if tokens {
                    Autoencoder::VqGan(vq)
                } else {
                    Autoencoder::Movq(vq)
                };
                (ae, info)
            }
        };
        let mut m = Self {
            ae,
            info,
            max_batch: config.max_batch,
            max_pixels: config.pixels.limit(&device),
            device,
            decode_cost: Cost::default(),
            encode_cost: Cost::default(),
            admission_safety: config.stage.admission_safety,
        };
        m.warm_up()?;
        m.calibrate()?;
        tracing::info!(
            component = %m.info.component,
            model = m.ae.what(),
            decode_fixed_ms = m.decode_cost.fixed_s * 1e3,
            decode_per_latent_pixel_us = m.decode_cost.per_unit_s * 1e6,
            encode_fixed_ms = m.encode_cost.fixed_s * 1e3,
            encode_per_pixel_us = m.encode_cost.per_unit_s * 1e6,
            "movq ready"
        );
        Ok(m)
    }
}

/// The VQ model of the component folder `name` (`movq` or `vqvae`) in `dtype`, or in f32 when
/// its config says `force_upcast` (aMUSEd's VQ-GAN: its fp16 decode overflows to NaN, as the
/// model card warns), as diffusers' pipelines run it.
fn load_vq(
    dir: &CheckpointDir,
    name: &str,
    opts: MovqOptions,
    dtype: DType,
    device: &Device,
) -> Result<VqModel, ServiceError> {
    let component = dir.component(name)?;
    let cfg = component.vq_config()?;
    let dtype = if cfg.force_upcast && dtype != DType::F32 {
        tracing::info!(
            requested = ?dtype,
            "the VQ model's config says force_upcast: running it in f32"
        );
        DType::F32
    } else {
        dtype
    };
    Ok(VqModel::load(&component, opts, dtype, device)?)
}

/// A Kandinsky 2.0 folder's KL autoencoder: `vae.ckpt` with the `vae.json` sidecar's config, or
/// the official `CONFIG_2_0` values without one (as `Kd20Pipeline::load`), in `dtype` (the
/// official pipeline halves it under `use_fp16`).
fn load_kl(
    dir: &CheckpointDir,
    opts: MovqOptions,
    dtype: DType,
    device: &Device,
) -> Result<AutoencoderKl, ServiceError> {
    let sidecar = dir.root().join(KD20_VAE_CONFIG_FILE);
    let cfg = if sidecar.is_file() {
        KlConfig::from_file(&sidecar)?
    } else {
        KlConfig::kandinsky_2_0()
    };
    let ckpt = dir.root().join(KD20_VAE_FILE);
    Ok(AutoencoderKl::load_with(&ckpt, &cfg, opts, dtype, device)?)
}

impl Movq {
    /// One small decode, so the first real request does not pay for lazy initialisation.
    fn warm_up(&self) -> Result<(), ServiceError> {
        let x = self.ae.zeros(8, true, &self.device)?;
        self.ae.forward(&x, true, &interrupt::never)?;
        Ok(())
    }

    /// Times one decode at 8² and 16² latents (token maps for aMUSEd) and one encode at 64² and
    /// 128² pixels (to token maps for aMUSEd).
    fn calibrate(&mut self) -> Result<(), ServiceError> {
        let (ae, dev) = (&self.ae, &self.device);
        // (pixels, time) of one call on a `side`² input.
        let time = |side: usize, decode: bool| {
            let x = ae.zeros(side, decode, dev)?;
            let t = budget::time_to_host(|| Ok(ae.forward(&x, decode, &interrupt::never)?))?;
            Ok::<_, ServiceError>(((side * side) as f64, t))
        };
        let decode_cost = Cost::fit(time(8, true)?, time(16, true)?);
        let encode_cost = Cost::fit(time(64, false)?, time(128, false)?);
        (self.decode_cost, self.encode_cost) = (decode_cost, encode_cost);
        Ok(())
    }

    /// DEADLINE_EXCEEDED when `images` of `pixels` each cannot finish before `deadline`
    /// (`decode`: latent pixels or tokens, else image pixels).
    pub(crate) fn check_budget(
        &self,
        decode: bool,
        images: usize,
        pixels: usize,
        deadline: Option<std::time::Instant>,
    ) -> Result<(), ServiceError> {
        let (cost, verb) = if decode {
            (self.decode_cost, "decoding")
        } else {
            (self.encode_cost, "encoding")
        };
        let estimate = cost.seconds(images as f64 * pixels as f64);
        let work = format!("{} {verb} ({images} images)", self.ae.what());
        budget::check(estimate, self.admission_safety, deadline, work)
    }
}

impl StageModel for Movq {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
