//! The consistency-model schedulers few-step students are run with, ported from diffusers
//! `schedulers/scheduling_lcm.py` (`LCMScheduler`, Luo et al. 2023) and `scheduling_tcd.py`
//! (`TCDScheduler`, Zheng et al. 2024). DMD/DMD2 students use the LCM one.
//!
//! Both share everything but the step rule:
//!
//! * **Schedule.** The student was distilled on the teacher timesteps `k·i − 1`, i = 1 ..=
//!   `original_inference_steps`, k = `num_train_timesteps / original_inference_steps`. N steps
//!   pick ⌊linspace(0, len, N, endpoint = false)⌋ of them, descending; an explicit list
//!   (strictly descending, below `num_train_timesteps`, e.g. DMD2's 999/749/499/249) replaces
//!   the pick.
//! * **LCM step.** x0 from the model output, the boundary condition
//!   `denoised = c_out·x0 + c_skip·x_t` (c_skip = σ²/(s² + σ²), c_out = s/√(s² + σ²), s =
//!   t·`timestep_scaling`, σ = 0.5), then re-noised to the next timestep with a fresh draw —
//!   except at the last step of the schedule, which returns `denoised` (so one step draws
//!   nothing).
//! * **TCD step.** With γ (the step's `eta`, default 0.3): s = ⌊(1 − γ)·t_prev⌋ (in f32, as
//!   torch computes it), `x_s = √ᾱ_s·x0 + √(1 − ᾱ_s)·ε`, then forward to t_prev with a draw
//!   (`√(ᾱ_prev/ᾱ_s)·x_s + √(1 − ᾱ_prev/ᾱ_s)·z`) unless it is the last step or γ = 0.
//!
//! The step index is found from the first timestep stepped (as diffusers' `_init_step_index`),
//! so an img2img run that starts inside the schedule still ends with the noise-free step.

use super::ddpm::{add_noise_at, reject_common, Prediction};
use super::{betas, check_model_output, check_steps, check_timestep, Scheduler, SchedulerStep};
use crate::config::ConsistencySchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Tensor};

/// σ_data of the boundary-condition scalings (diffusers' fixed 0.5).
const SIGMA_DATA: f64 = 0.5;

/// Which step rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConsistencyKind {
    /// `LCMScheduler`.
    Lcm,
    /// `TCDScheduler` with its γ (`eta` of `step`, in [0, 1]).
    Tcd {
        /// Stochasticity γ: 0 = deterministic, 1 = a fresh draw at every step.
        gamma: f64,
    },
}

/// An LCM or TCD scheduler with per-request schedule state.
#[derive(Debug, Clone)]
pub struct ConsistencyScheduler {
    kind: ConsistencyKind,
    alphas_cumprod: Vec<f32>,
    train: usize,
    original_steps: usize,
    timestep_scaling: f64,
    clip: Option<f64>,
    prediction: Prediction,
    timesteps: Vec<usize>,
    num_inference_steps: usize,
    step_index: Option<usize>,
}

impl ConsistencyScheduler {
    /// Builds the scheduler for `kind` from a (validated) config.
    pub fn new(cfg: &ConsistencySchedulerConfig, kind: ConsistencyKind) -> Result<Self> {
        reject_common(cfg.thresholding, cfg.rescale_betas_zero_snr)?;
        if let ConsistencyKind::Tcd { gamma } = kind {
            if !(0.0..=1.0).contains(&gamma) {
                return Err(ModelError::invalid(
                    "eta",
                    format!("{gamma}; allowed: 0 ..= 1 (TCD's gamma)"),
                ));
            }
        }
        let train = cfg.num_train_timesteps;
        if cfg.original_inference_steps == 0 || cfg.original_inference_steps > train {
            return Err(super::unsupported(
                "original_inference_steps",
                cfg.original_inference_steps,
                &format!("1 ..= num_train_timesteps ({train})"),
            ));
        }
        let b = betas::betas(
            &cfg.beta_schedule,
            cfg.beta_start,
            cfg.beta_end,
            train,
            cfg.trained_betas.as_deref(),
        )?;
        // `set_alpha_to_one` picks diffusers' `final_alpha_cumprod`, which neither step reads:
        // the previous timestep is never negative.
        Ok(Self {
            kind,
            alphas_cumprod: betas::alphas_cumprod(&b),
            train,
            original_steps: cfg.original_inference_steps,
            timestep_scaling: cfg.timestep_scaling,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range),
            prediction: Prediction::parse(&cfg.prediction_type)?,
            timesteps: Vec::new(),
            num_inference_steps: 0,
            step_index: None,
        })
    }

    /// The teacher timesteps the student was distilled on, ascending (`k·i − 1`).
    fn origin_timesteps(&self) -> Vec<usize> {
        let k = self.train / self.original_steps;
        (1..=self.original_steps).map(|i| i * k - 1).collect()
    }

    /// (c_skip, c_out) at timestep `t`.
    fn boundary_scalings(&self, t: usize) -> (f64, f64) {
        let s = t as f64 * self.timestep_scaling;
        let d = s * s + SIGMA_DATA * SIGMA_DATA;
        (SIGMA_DATA * SIGMA_DATA / d, s / d.sqrt())
    }

    fn alpha(&self, t: usize) -> f64 {
        self.alphas_cumprod[t] as f64
    }
}

impl Scheduler for ConsistencyScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, self.train)?;
        let mut origin = self.origin_timesteps();
        if origin.len() / n < 1 || n > self.original_steps {
            // diffusers' message, with Python's float formatting.
            let ratio = n as f64 / self.original_steps as f64;
            let ratio = if ratio.fract() == 0.0 {
                format!("{ratio:.1}")
            } else {
                ratio.to_string()
            };
            let o = self.original_steps;
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!(
                    "{n}: The combination of `original_steps x strength`: {o} x 1.0 is smaller than \
                     `num_inference_steps`: {n}. Make sure to either reduce `num_inference_steps` to a \
                     value smaller than {o} or increase `strength` to a value higher than {ratio}. \
                     Allowed: 1 ..= {o} (original_inference_steps)"
                ),
            ));
        }
        origin.reverse();
        let len = origin.len();
        let step = len as f64 / n as f64;
        self.timesteps = (0..n)
            .map(|i| origin[(i as f64 * step).floor() as usize])
            .collect();
        self.num_inference_steps = n;
        self.step_index = None;
        Ok(())
    }

    fn max_inference_steps(&self) -> (usize, &'static str) {
        (self.original_steps, "original_inference_steps")
    }

    fn check_custom_timesteps(&self, timesteps: &[usize]) -> Result<()> {
        let Some(&first) = timesteps.first() else {
            return Err(ModelError::invalid(
                "timesteps",
                "empty; allowed: a strictly descending list of 1 or more timesteps below num_train_timesteps",
            ));
        };
        if let Some(w) = timesteps.windows(2).find(|w| w[1] >= w[0]) {
            return Err(ModelError::invalid(
                "timesteps",
                format!(
                    "{timesteps:?}: `custom_timesteps` must be in descending order. ({} then {}; \
                     allowed: strictly descending)",
                    w[0], w[1]
                ),
            ));
        }
        if first >= self.train {
            return Err(ModelError::invalid(
                "timesteps",
                format!(
                    "{timesteps:?}: `timesteps` must start before `self.config.train_timesteps`: {}. \
                     Allowed: 0 ..= {}",
                    self.train,
                    self.train - 1
                ),
            ));
        }
        Ok(())
    }

    fn set_custom_timesteps(&mut self, timesteps: &[usize]) -> Result<()> {
        self.check_custom_timesteps(timesteps)?;
        self.timesteps = timesteps.to_vec();
        self.num_inference_steps = timesteps.len();
        self.step_index = None;
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
        let t = check_timestep(t, self.train)?;
        let idx = match self.step_index {
            Some(i) => i,
            None => self.timesteps.iter().position(|&s| s == t).ok_or_else(|| {
                ModelError::invalid(
                    "timestep",
                    format!("{t} is not in the schedule {:?}", self.timesteps),
                )
            })?,
        };
        let sample = sample.to_dtype(DType::F32)?;
        let out = model_output.to_dtype(DType::F32)?;
        check_model_output(&out, &sample, sample.dim(1)?)?;
        let next = self.timesteps.get(idx + 1).copied();
        let last = idx + 1 == self.num_inference_steps;
        let a_t = self.alpha(t);
        let (prev_sample, x0) = match self.kind {
            ConsistencyKind::Lcm => {
                let prev_t = next.unwrap_or(t);
                let a_p = self.alpha(prev_t);
                let (c_skip, c_out) = self.boundary_scalings(t);
                let mut x0 = self.prediction.x0(&out, &sample, a_t)?;
                if let Some(r) = self.clip {
                    x0 = x0.clamp(-r, r)?;
                }
                let denoised = ((&x0 * c_out)? + (&sample * c_skip)?)?;
                let prev = if last {
                    denoised.clone()
                } else {
                    let z = noise.randn(sample.dims(), sample.device())?;
                    ((&denoised * a_p.sqrt())? + (z * (1.0 - a_p).sqrt())?)?
                };
                (prev, denoised)
            }
            ConsistencyKind::Tcd { gamma } => {
                let prev_t = next.unwrap_or(0);
                // torch: floor((1 - eta) * prev_timestep) on a float32 tensor.
                let s = ((1.0 - gamma) as f32 * prev_t as f32).floor() as usize;
                let (a_p, a_s) = (self.alpha(prev_t), self.alpha(s));
                let x0 = self.prediction.x0(&out, &sample, a_t)?;
                let eps = self.prediction.eps(&out, &sample, a_t)?;
                let noised = ((&x0 * a_s.sqrt())? + (eps * (1.0 - a_s).sqrt())?)?;
                let prev = if gamma > 0.0 && !last {
                    let z = noise.randn(sample.dims(), sample.device())?;
                    let r = a_p / a_s;
                    ((&noised * r.sqrt())? + (z * (1.0 - r).sqrt())?)?
                } else {
                    noised
                };
                (prev, x0)
            }
        };
        self.step_index = Some(idx + 1);
        Ok(SchedulerStep {
            prev_sample,
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
