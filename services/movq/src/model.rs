//! The loaded model of this stage: one `VqModel` and what requests are checked against. A
//! Kandinsky folder's MoVQ (`movq/`: continuous latents ⇄ pixels) or an aMUSEd folder's VQ-GAN
//! (`vqvae/`: token maps ⇄ pixels), chosen by the folder's family.

use crate::Config;
use candle_core::{DType, Tensor};
use kd_models::interrupt;
use kd_models::movq::{MovqOptions, VqModel};
use kd_models::{CheckpointDir, ModelFamily};
use kd_proto::v1;
use kd_runtime::budget::{self, Cost};
use kd_runtime::config::PixelArgs;
use kd_runtime::model_info::model_info;
use kd_runtime::{ServiceError, StageModel};

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
}

/// The loaded model and what requests are checked against.
pub struct Movq {
    pub(crate) vq: VqModel,
    /// Whether the model decodes token maps and encodes to them (an aMUSEd folder's VQ-GAN,
    /// `lookup_from_codebook`), rather than continuous latents (a Kandinsky MoVQ).
    pub(crate) tokens: bool,
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
    /// Loads `movq/` from a Kandinsky decoder checkpoint folder, or `vqvae/` from an aMUSEd
    /// folder, and runs one small decode.
    pub fn load_and_warm(config: &Config) -> Result<Self, ServiceError> {
        let dir = CheckpointDir::open(&config.stage.model_dir)?;
        let tokens = dir.family() == ModelFamily::Amused;
        let name = if tokens { "vqvae" } else { "movq" };
        let component = dir.component(name)?;
        let device = config.stage.open_device()?;
        let opts = MovqOptions {
            attention_chunk: config.attention_chunk,
            ..MovqOptions::default()
        };
        // `force_upcast` (aMUSEd's VQ-GAN: its fp16 decode overflows to NaN, as the model card
        // warns) runs the autoencoder in f32 whatever --dtype says, as diffusers' pipelines do.
        let cfg = component.vq_config()?;
        let dtype = if cfg.force_upcast && config.stage.dtype != DType::F32 {
            tracing::info!(
                requested = ?config.stage.dtype,
                "the VQ model's config says force_upcast: running it in f32"
            );
            DType::F32
        } else {
            config.stage.dtype
        };
        let vq = VqModel::load(&component, opts, dtype, &device)?;
        if tokens && !vq.config().lookup_from_codebook {
            return Err(ServiceError::Internal(format!(
                "{}: an aMUSEd VQ-GAN must decode token maps (lookup_from_codebook: true)",
                dir.root().join(name).join("config.json").display()
            )));
        }
        let info = model_info(&dir, name, &[name], dtype, &device)?;
        let mut m = Self {
            vq,
            tokens,
            info,
            max_batch: config.max_batch,
            max_pixels: config.pixels.limit(&device),
            device,
            decode_cost: Cost::default(),
            encode_cost: Cost::default(),
            admission_safety: config.stage.admission_safety,
        };
        crate::decode::warm_up(&m)?;
        m.calibrate()?;
        tracing::info!(
            component = name,
            decode_fixed_ms = m.decode_cost.fixed_s * 1e3,
            decode_per_latent_pixel_us = m.decode_cost.per_unit_s * 1e6,
            encode_fixed_ms = m.encode_cost.fixed_s * 1e3,
            encode_per_pixel_us = m.encode_cost.per_unit_s * 1e6,
            "movq ready"
        );
        Ok(m)
    }
}

impl Movq {
    /// Times one decode at 8² and 16² latents (token maps for aMUSEd) and one encode at 64² and
    /// 128² pixels (to token maps for aMUSEd).
    fn calibrate(&mut self) -> Result<(), ServiceError> {
        let (dt, dev) = (self.vq.dtype(), self.device.clone());
        let c = self.vq.config().latent_channels;
        let (vq, tokens) = (&self.vq, self.tokens);
        let never = &interrupt::never;
        // (pixels, time) of one call on a `side`² input.
        let time = |side: usize, decode: bool| {
            let x = match (decode, tokens) {
                (true, true) => Tensor::zeros((1, side, side), DType::U32, &dev)?,
                (true, false) => Tensor::zeros((1, c, side, side), dt, &dev)?,
                (false, _) => Tensor::zeros((1, 3, side, side), dt, &dev)?,
            };
            let t = budget::time_to_host(|| {
                Ok(match (decode, tokens) {
                    (true, true) => vq.decode_indices(&x, never)?,
                    (true, false) => vq.decode(&x)?,
                    (false, true) => vq.encode_indices(&x, never)?,
                    (false, false) => vq.encode(&x)?,
                })
            })?;
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
        let (cost, what) = match (decode, self.tokens) {
            (true, false) => (self.decode_cost, "MoVQ decoding"),
            (false, false) => (self.encode_cost, "MoVQ encoding"),
            (true, true) => (self.decode_cost, "VQ-GAN decoding"),
            (false, true) => (self.encode_cost, "VQ-GAN encoding"),
        };
        let estimate = cost.seconds((images * pixels) as f64);
        let work = format!("{what} ({images} images)");
        budget::check(estimate, self.admission_safety, deadline, work)
    }
}

impl StageModel for Movq {
    fn info(&self) -> &v1::ModelInfo {
        &self.info
    }
}
