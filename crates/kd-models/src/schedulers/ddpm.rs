//! `DDPMScheduler` (Ho et al. 2020, <https://arxiv.org/abs/2006.11239>), ported from diffusers
//! `schedulers/scheduling_ddpm.py`: linear / scaled-linear / cosine betas, `steps_offset`,
//! leading / trailing / linspace spacing, `clip_sample`, `fixed_small(_log)` and
//! `learned(_range)` variance, `add_noise`. The Kandinsky 2.2 decoder default.

use super::{
    betas, check_model_output, check_steps, check_timestep, spaced_timesteps, unsupported,
    Scheduler, SchedulerStep,
};
use crate::config::DdpmSchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Tensor};

/// How the step variance is chosen (`variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variance {
    FixedSmall,
    FixedSmallLog,
    Learned,
    LearnedRange,
}

/// DDPM with per-request schedule state.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
    train: usize,
    spacing: String,
    steps_offset: usize,
    clip: Option<f64>,
    prediction: Prediction,
    variance: Variance,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prediction {
    Epsilon,
    Sample,
    Velocity,
}

impl Prediction {
    pub(crate) fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "sample" => Ok(Self::Sample),
            "v_prediction" => Ok(Self::Velocity),
            other => Err(unsupported(
                "prediction_type",
                other,
                "epsilon, sample, v_prediction",
            )),
        }
    }

    /// x0 from the model output at ᾱ_t = `a_t` (all in f32).
    pub(crate) fn x0(self, out: &Tensor, sample: &Tensor, a_t: f64) -> Result<Tensor> {
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        Ok(match self {
            Self::Epsilon => ((sample - (out * sb)?)? / sa)?,
            Self::Sample => out.clone(),
            Self::Velocity => ((sample * sa)? - (out * sb)?)?,
        })
    }

    /// ε from the model output at ᾱ_t = `a_t`.
    pub(crate) fn eps(self, out: &Tensor, sample: &Tensor, a_t: f64) -> Result<Tensor> {
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        Ok(match self {
            Self::Epsilon => out.clone(),
            Self::Sample => ((sample - (out * sa)?)? / sb)?,
            Self::Velocity => ((out * sa)? + (sample * sb)?)?,
        })
    }
}

pub(crate) fn reject_common(thresholding: bool, rescale_zero_snr: bool) -> Result<()> {
    if thresholding {
        return Err(unsupported("thresholding", true, "false"));
    }
    if rescale_zero_snr {
        return Err(unsupported("rescale_betas_zero_snr", true, "false"));
    }
    Ok(())
}

impl DdpmScheduler {
    /// Builds the scheduler (no schedule until [`Scheduler::set_timesteps`]).
    pub fn new(cfg: &DdpmSchedulerConfig) -> Result<Self> {
        reject_common(cfg.thresholding, cfg.rescale_betas_zero_snr)?;
        let variance = match cfg.variance_type.as_str() {
            "fixed_small" => Variance::FixedSmall,
            "fixed_small_log" => Variance::FixedSmallLog,
            "learned" => Variance::Learned,
            "learned_range" => Variance::LearnedRange,
            other => {
                return Err(unsupported(
                    "variance_type",
                    other,
                    "fixed_small, fixed_small_log, learned, learned_range",
                ))
            }
        };
        let b = betas::betas(
            &cfg.beta_schedule,
            cfg.beta_start,
            cfg.beta_end,
            cfg.num_train_timesteps,
            cfg.trained_betas.as_deref(),
        )?;
        Ok(Self {
            alphas_cumprod: betas::alphas_cumprod(&b),
            timesteps: Vec::new(),
            train: cfg.num_train_timesteps,
            spacing: cfg.timestep_spacing.clone(),
            steps_offset: cfg.steps_offset,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
            prediction: Prediction::parse(&cfg.prediction_type)?,
            variance,
        })
    }

    /// ᾱ for every training timestep.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// The next entry of the schedule (−1 after the last one).
    fn previous_timestep(&self, t: usize) -> Result<i64> {
        let i = self.timesteps.iter().position(|&x| x == t).ok_or_else(|| {
            ModelError::invalid(
                "timestep",
                format!("{t} is not in the schedule {:?}", self.timesteps),
            )
        })?;
        Ok(self.timesteps.get(i + 1).map_or(-1, |&p| p as i64))
    }
}

impl Scheduler for DdpmScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, self.train)?;
        self.timesteps = spaced_timesteps(&self.spacing, self.train, n, self.steps_offset)?;
        Ok(())
    }

    fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    fn num_train_timesteps(&self) -> usize {
        self.train
    }

    fn learned_variance(&self) -> bool {
        matches!(self.variance, Variance::Learned | Variance::LearnedRange)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerStep> {
        let t = check_timestep(t, self.train)?;
        let sample = sample.to_dtype(DType::F32)?;
        let c = sample.dim(1)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let (eps, predicted_var) = if self.learned_variance() && model_output.dim(1)? == 2 * c {
            (
                model_output.narrow(1, 0, c)?,
                Some(model_output.narrow(1, c, c)?),
            )
        } else {
            check_model_output(&model_output, &sample, c)?;
            (model_output, None)
        };
        let prev_t = self.previous_timestep(t)?;
        let a_t = self.alphas_cumprod[t] as f64;
        let a_p = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize] as f64
        } else {
            1.0
        };
        let (b_t, b_p) = (1.0 - a_t, 1.0 - a_p);
        let cur_alpha = a_t / a_p;
        let cur_beta = 1.0 - cur_alpha;
        let mut x0 = self.prediction.x0(&eps, &sample, a_t)?;
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        let c_x0 = a_p.sqrt() * cur_beta / b_t;
        let c_xt = cur_alpha.sqrt() * b_p / b_t;
        let mut prev = ((&x0 * c_x0)? + (&sample * c_xt)?)?;
        if t > 0 {
            let z = noise.randn(eps.dims(), eps.device())?;
            let var = (b_p / b_t * cur_beta).max(1e-20);
            let noise_term = match (self.variance, &predicted_var) {
                (Variance::FixedSmall, _) => (z * var.sqrt())?,
                (Variance::FixedSmallLog, _) => (z * (0.5 * var.ln()).exp())?,
                (Variance::LearnedRange, Some(v)) => {
                    // log σ² = frac·log β_t + (1 − frac)·log var, frac = (v + 1) / 2
                    let frac = ((v + 1.0)? / 2.0)?;
                    let (max_log, min_log) = (cur_beta.ln(), var.ln());
                    let log_var = ((&frac * max_log)? + ((frac.neg()? + 1.0)? * min_log)?)?;
                    ((log_var * 0.5)?.exp()? * z)?
                }
                (Variance::Learned, Some(v)) => (v.sqrt()? * z)?,
                (_, None) => {
                    return Err(ModelError::invalid(
                        "model_output",
                        format!(
                            "variance_type learned needs {} channels (ε and variance)",
                            2 * c
                        ),
                    ))
                }
            };
            prev = (prev + noise_term)?;
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

/// `√ᾱ_t·x0 + √(1−ᾱ_t)·ε` (DDPM and DDIM `add_noise`).
pub(crate) fn add_noise_at(
    ac: &[f32],
    original: &Tensor,
    noise: &Tensor,
    t: usize,
) -> Result<Tensor> {
    if original.dims() != noise.dims() {
        return Err(ModelError::invalid(
            "noise",
            format!(
                "shape {:?}; expected the latents' shape {:?}",
                noise.dims(),
                original.dims()
            ),
        ));
    }
    let a = ac[t] as f64;
    let x = original.to_dtype(DType::F32)?;
    let n = noise.to_dtype(DType::F32)?;
    Ok(((x * a.sqrt())? + (n * (1.0 - a).sqrt())?)?)
}
