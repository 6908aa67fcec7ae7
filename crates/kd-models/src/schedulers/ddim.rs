//! `DDIMScheduler` (Song et al. 2020, <https://arxiv.org/abs/2010.02502>), ported from diffusers
//! `schedulers/scheduling_ddim.py`: the previous timestep is `t − train // N` whatever the
//! spacing, `final_alpha_cumprod` is ᾱ_0 unless `set_alpha_to_one`, and `eta > 0` draws noise
//! at every step.

use super::ddpm::{add_noise_at, reject_common, Prediction};
use super::{
    betas, check_model_output, check_steps, check_timestep, spaced_timesteps, Scheduler,
    SchedulerStep,
};
use crate::config::DdimSchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Tensor};

/// DDIM with per-request schedule state.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
    train: usize,
    spacing: String,
    steps_offset: usize,
    clip: Option<f64>,
    prediction: Prediction,
    eta: f64,
}

impl DdimScheduler {
    /// Builds the scheduler; `eta` is the stochasticity (0 = deterministic DDIM).
    pub fn new(cfg: &DdimSchedulerConfig, eta: f64) -> Result<Self> {
        reject_common(cfg.thresholding, cfg.rescale_betas_zero_snr)?;
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(ModelError::invalid(
                "eta",
                format!("{eta}; allowed a finite value ≥ 0"),
            ));
        }
        let b = betas::betas(
            &cfg.beta_schedule,
            cfg.beta_start,
            cfg.beta_end,
            cfg.num_train_timesteps,
            cfg.trained_betas.as_deref(),
        )?;
        let ac = betas::alphas_cumprod(&b);
        Ok(Self {
            final_alpha_cumprod: if cfg.set_alpha_to_one {
                1.0
            } else {
                ac[0] as f64
            },
            alphas_cumprod: ac,
            timesteps: Vec::new(),
            num_inference_steps: 0,
            train: cfg.num_train_timesteps,
            spacing: cfg.timestep_spacing.clone(),
            steps_offset: cfg.steps_offset,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
            prediction: Prediction::parse(&cfg.prediction_type)?,
            eta,
        })
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, self.train)?;
        self.timesteps = spaced_timesteps(&self.spacing, self.train, n, self.steps_offset)?;
        self.num_inference_steps = n;
        Ok(())
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn num_train_timesteps(&self) -> usize {
        self.train
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerStep> {
        if self.num_inference_steps == 0 {
            return Err(ModelError::invalid(
                "timestep",
                "set_timesteps was not called",
            ));
        }
        let t = check_timestep(t, self.train)?;
        let sample = sample.to_dtype(DType::F32)?;
        let out = model_output.to_dtype(DType::F32)?;
        check_model_output(&out, &sample, sample.dim(1)?)?;
        let prev_t = t as i64 - (self.train / self.num_inference_steps) as i64;
        let a_t = self.alphas_cumprod[t] as f64;
        let a_p = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize] as f64
        } else {
            self.final_alpha_cumprod
        };
        let (b_t, b_p) = (1.0 - a_t, 1.0 - a_p);
        let mut x0 = self.prediction.x0(&out, &sample, a_t)?;
        let eps = self.prediction.eps(&out, &sample, a_t)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let variance = (b_p / b_t) * (1.0 - a_t / a_p);
        let std_dev = self.eta * variance.sqrt();
        let dir = (eps * (1.0 - a_p - std_dev * std_dev).sqrt())?;
        let mut prev = ((&x0 * a_p.sqrt())? + dir)?;
        if self.eta > 0.0 {
            let z = noise.randn(sample.dims(), sample.device())?;
            prev = (prev + (z * std_dev)?)?;
        }
        Ok(SchedulerStep {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        add_noise_at(
            &self.alphas_cumprod,
            original,
            noise,
            check_timestep(t, self.train)?,
        )
    }
}
