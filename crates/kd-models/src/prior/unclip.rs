//! `UnCLIPScheduler` (diffusers `schedulers/scheduling_unclip.py`) as the Kandinsky prior uses
//! it: squared-cosine betas, `prediction_type = "sample"` with x₀ clamping, `fixed_small_log`
//! variance. Every scalar is an f32 computed in the same order as diffusers, which makes each
//! step bit-identical to the reference.

use crate::config::UnClipSchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Tensor};
use std::path::Path;

/// The UnCLIP scheduler: a pure function of its config (no per-request state).
#[derive(Debug, Clone)]
pub struct UnClipScheduler {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    clip_sample: bool,
    clip_sample_range: f32,
    config: UnClipSchedulerConfig,
}

/// diffusers `betas_for_alpha_bar(n, alpha_transform_type="cosine")`: computed in f64 (Python
/// floats), then stored as f32.
fn squaredcos_betas(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

impl UnClipScheduler {
    /// Builds the schedule; supports `prediction_type = "sample"`, `variance_type = "fixed_small_log"`.
    pub fn new(config: &UnClipSchedulerConfig) -> Result<Self> {
        let path = Path::new("scheduler_config.json");
        let unsupported = |field: &str, value: &str, supported: &str| ModelError::Unsupported {
            path: path.to_path_buf(),
            field: field.into(),
            value: value.into(),
            supported: supported.into(),
        };
        if config.prediction_type != "sample" {
            return Err(unsupported(
                "prediction_type",
                &config.prediction_type,
                "sample",
            ));
        }
        if config.variance_type != "fixed_small_log" {
            return Err(unsupported(
                "variance_type",
                &config.variance_type,
                "fixed_small_log",
            ));
        }
        let betas = squaredcos_betas(config.num_train_timesteps);
        // torch.cumprod on the CPU accumulates in double and rounds each output to f32.
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|&b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(Self {
            betas,
            alphas_cumprod,
            clip_sample: config.clip_sample,
            clip_sample_range: config.clip_sample_range as f32,
            config: config.clone(),
        })
    }

    /// The config it was built from.
    pub fn config(&self) -> &UnClipSchedulerConfig {
        &self.config
    }

    /// β_t for every training timestep.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// ᾱ_t for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// `set_timesteps(n)`: `round(k·(T−1)/(n−1))` for k = 0..n, descending. `n` must be ≥ 2.
    pub fn timesteps(&self, num_inference_steps: usize) -> Result<Vec<usize>> {
        let t = self.config.num_train_timesteps;
        if num_inference_steps < 2 || num_inference_steps > t {
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!("{num_inference_steps}, allowed 2..={t}"),
            ));
        }
        let ratio = (t - 1) as f64 / (num_inference_steps - 1) as f64;
        // numpy: (arange(0, n) * step_ratio).round()[::-1] — round half to even.
        Ok((0..num_inference_steps)
            .rev()
            .map(|k| (k as f64 * ratio).round_ties_even() as usize)
            .collect())
    }

    fn check_t(&self, t: usize) -> Result<()> {
        if t >= self.betas.len() {
            return Err(ModelError::invalid(
                "timestep",
                format!("{t}, allowed 0..{}", self.betas.len()),
            ));
        }
        Ok(())
    }

    /// One reverse step from `t` to `prev_timestep` (`None` ⇒ t − 1). Draws one noise tensor of
    /// the sample's shape from `noise` when t > 0.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        prev_timestep: Option<usize>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        self.check_t(t)?;
        let prev = match prev_timestep {
            Some(p) if p >= t => {
                return Err(ModelError::invalid(
                    "prev_timestep",
                    format!("{p}, must be below the current timestep {t}"),
                ))
            }
            Some(p) => Some(p),
            None => t.checked_sub(1),
        };
        let a_t = self.alphas_cumprod[t];
        let a_p = prev.map_or(1.0, |p| self.alphas_cumprod[p]);
        let bt = 1.0 - a_t;
        let bp = 1.0 - a_p;
        let (beta, alpha) = if prev.is_none() || prev == t.checked_sub(1) {
            (self.betas[t], 1.0 - self.betas[t])
        } else {
            let beta = 1.0 - a_t / a_p;
            (beta, 1.0 - beta)
        };
        let mut x0 = model_output.to_dtype(DType::F32)?;
        if self.clip_sample {
            let r = self.clip_sample_range;
            x0 = x0.clamp(-r, r)?;
        }
        let c0 = (a_p.sqrt() * beta) / bt;
        let c1 = (alpha.sqrt() * bp) / bt;
        let mu = ((x0 * c0 as f64)? + (sample.to_dtype(DType::F32)? * c1 as f64)?)?;
        if t == 0 {
            return Ok(mu);
        }
        let z = noise.randn(mu.dims(), mu.device())?;
        let var = ((bp / bt) * beta).max(1e-20);
        let sigma = (0.5 * var.ln()).exp();
        Ok((mu + (z * sigma as f64)?)?)
    }

    /// Forward diffusion `√ᾱ_t·x₀ + √(1−ᾱ_t)·ε` with one timestep per row of `original`.
    pub fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        timesteps: &[usize],
    ) -> Result<Tensor> {
        let b = original.dim(0)?;
        if timesteps.len() != b {
            return Err(ModelError::invalid(
                "timesteps",
                format!("{} timesteps for {b} rows", timesteps.len()),
            ));
        }
        let mut rows = Vec::with_capacity(b);
        for (i, &t) in timesteps.iter().enumerate() {
            self.check_t(t)?;
            let a = self.alphas_cumprod[t];
            let sa = a.sqrt();
            let s1 = (1.0 - a).sqrt();
            let x = original.get(i)?.to_dtype(DType::F32)?;
            let e = noise.get(i)?.to_dtype(DType::F32)?;
            rows.push(((x * sa as f64)? + (e * s1 as f64)?)?);
        }
        Ok(Tensor::stack(&rows, 0)?)
    }
}
