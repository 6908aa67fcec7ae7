//! `DPMSolverMultistepScheduler` with `algorithm_type "dpmsolver++"` (Lu et al. 2022,
//! <https://arxiv.org/abs/2211.01095>), orders 1 and 2, ported from diffusers
//! `schedulers/scheduling_dpmsolver_multistep.py`. Deterministic: it never draws noise.
//!
//! σ_t = √((1−ᾱ)/ᾱ) (f32), α_t = 1/√(σ²+1), λ = ln α − ln σ; with `final_sigmas_type "zero"`
//! the last step is first order and returns the x0 estimate.

use super::ddpm::{reject_common, Prediction};
use super::{betas, check_model_output, check_steps, unsupported, Scheduler, SchedulerStep};
use crate::config::DpmSolverMultistepSchedulerConfig;
use crate::error::{ModelError, Result};
use crate::noise::NoiseSource;
use candle_core::{DType, Tensor};

/// DPM-Solver++ (multistep) with per-request state (schedule, model-output history).
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepScheduler {
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<usize>,
    sigmas: Vec<f32>,
    train: usize,
    last_timestep: usize,
    spacing: String,
    steps_offset: usize,
    order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    midpoint: bool,
    prediction: Prediction,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

/// (α_t, σ_t) of a DPM sigma.
fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

impl DpmSolverMultistepScheduler {
    /// Builds the scheduler (no schedule until [`Scheduler::set_timesteps`]).
    pub fn new(cfg: &DpmSolverMultistepSchedulerConfig) -> Result<Self> {
        reject_common(cfg.thresholding, cfg.rescale_betas_zero_snr)?;
        if !(1..=2).contains(&cfg.solver_order) {
            return Err(unsupported("solver_order", cfg.solver_order, "1, 2"));
        }
        if cfg.use_karras_sigmas || cfg.use_lu_lambdas {
            return Err(unsupported(
                "use_karras_sigmas/use_lu_lambdas",
                true,
                "false",
            ));
        }
        if matches!(
            cfg.variance_type.as_deref(),
            Some("learned" | "learned_range")
        ) {
            return Err(unsupported(
                "variance_type",
                &cfg.variance_type,
                "null, fixed_small",
            ));
        }
        let final_sigma_zero = match cfg.final_sigmas_type.as_str() {
            "zero" => true,
            "sigma_min" => false,
            other => return Err(unsupported("final_sigmas_type", other, "zero, sigma_min")),
        };
        let b = betas::betas(
            &cfg.beta_schedule,
            cfg.beta_start,
            cfg.beta_end,
            cfg.num_train_timesteps,
            cfg.trained_betas.as_deref(),
        )?;
        let ac = betas::alphas_cumprod(&b);
        // clipped_idx = searchsorted(flip(λ), lambda_min_clipped): how many λ are below it.
        let clipped = ac
            .iter()
            .filter(|&&a| {
                let lambda = a.sqrt().ln() - (1.0 - a).sqrt().ln();
                (lambda as f64) < cfg.lambda_min_clipped
            })
            .count();
        Ok(Self {
            alphas_cumprod: ac,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            train: cfg.num_train_timesteps,
            last_timestep: cfg.num_train_timesteps - clipped,
            spacing: cfg.timestep_spacing.clone(),
            steps_offset: cfg.steps_offset,
            order: cfg.solver_order,
            lower_order_final: cfg.lower_order_final,
            euler_at_final: cfg.euler_at_final,
            final_sigma_zero,
            midpoint: cfg.solver_type == "midpoint",
            prediction: Prediction::parse(&cfg.prediction_type)?,
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            step_index: None,
        })
    }

    /// σ after `set_timesteps` (one more than the timesteps; the last is the final sigma).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// Index of `t` in the schedule: the second match if duplicated, the last index if absent.
    fn index_for_timestep(&self, t: usize) -> usize {
        let hits: Vec<usize> = (0..self.timesteps.len())
            .filter(|&i| self.timesteps[i] == t)
            .collect();
        match hits.len() {
            0 => self.timesteps.len() - 1,
            1 => hits[0],
            _ => hits[1],
        }
    }

    fn sigma(&self, i: usize) -> f64 {
        self.sigmas[i] as f64
    }

    fn lambda(alpha: f64, sigma: f64) -> f64 {
        alpha.ln() - sigma.ln()
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        check_steps(n, self.train)?;
        let last = self.last_timestep;
        let ts: Vec<i64> = match self.spacing.as_str() {
            "linspace" => {
                let v = betas::linspace_f64(0.0, (last - 1) as f64, n + 1);
                v.into_iter()
                    .rev()
                    .take(n)
                    .map(|x| x.round_ties_even() as i64)
                    .collect()
            }
            "leading" => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|k| (k * ratio + self.steps_offset) as i64)
                    .collect()
            }
            "trailing" => {
                let ratio = self.train as f64 / n as f64;
                betas::arange_down(last as f64, ratio)
                    .into_iter()
                    .map(|x| x.round_ties_even() as i64 - 1)
                    .collect()
            }
            other => {
                return Err(unsupported(
                    "timestep_spacing",
                    other,
                    "leading, trailing, linspace",
                ))
            }
        };
        if ts.iter().any(|&t| t < 0 || t as usize >= self.train) || ts.is_empty() {
            return Err(ModelError::invalid(
                "num_inference_steps",
                format!(
                    "{n} gives timesteps {ts:?} outside 0 ..= {}",
                    self.train - 1
                ),
            ));
        }
        self.timesteps = ts.iter().map(|&t| t as usize).collect();
        let sig = |a: f32| ((1.0 - a) / a).sqrt();
        self.sigmas = self
            .timesteps
            .iter()
            .map(|&t| sig(self.alphas_cumprod[t]))
            .collect();
        self.sigmas.push(if self.final_sigma_zero {
            0.0
        } else {
            sig(self.alphas_cumprod[0])
        });
        self.model_outputs = vec![None; self.order];
        self.lower_order_nums = 0;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerStep> {
        if self.timesteps.is_empty() {
            return Err(ModelError::invalid(
                "timestep",
                "set_timesteps was not called",
            ));
        }
        let sample = sample.to_dtype(DType::F32)?;
        let out = model_output.to_dtype(DType::F32)?;
        check_model_output(&out, &sample, sample.dim(1)?)?;
        let i = match self.step_index {
            Some(i) => i,
            None => self.index_for_timestep(t),
        };
        if i >= self.timesteps.len() {
            return Err(ModelError::invalid(
                "timestep",
                format!(
                    "{t}: the schedule of {} steps is exhausted",
                    self.timesteps.len()
                ),
            ));
        }
        let n = self.timesteps.len();
        let lower_order_final = i == n - 1
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_zero);

        // convert_model_output: the x0 estimate.
        let (a_s0, s_s0) = alpha_sigma(self.sigma(i));
        let x0 = match self.prediction {
            Prediction::Epsilon => ((&sample - (&out * s_s0)?)? / a_s0)?,
            Prediction::Sample => out.clone(),
            Prediction::Velocity => ((&sample * a_s0)? - (&out * s_s0)?)?,
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.clone()));

        let (a_t, s_t) = alpha_sigma(self.sigma(i + 1));
        let lambda_t = Self::lambda(a_t, s_t);
        let lambda_s0 = Self::lambda(a_s0, s_s0);
        let h = lambda_t - lambda_s0;
        let phi = a_t * ((-h).exp() - 1.0); // α_t (e^{−h} − 1)
        let first_order = self.order == 1 || self.lower_order_nums < 1 || lower_order_final;
        let prev = if first_order {
            ((&sample * (s_t / s_s0))? - (&x0 * phi)?)?
        } else {
            let m1 = self.model_outputs[self.order - 2]
                .as_ref()
                .expect("lower_order_nums ≥ 1 implies a previous output");
            let (a_s1, s_s1) = alpha_sigma(self.sigma(i - 1));
            let lambda_s1 = Self::lambda(a_s1, s_s1);
            let r0 = (lambda_s0 - lambda_s1) / h;
            let d1 = ((&x0 - m1)? * (1.0 / r0))?;
            let base = ((&sample * (s_t / s_s0))? - (&x0 * phi)?)?;
            if self.midpoint {
                (base - (d1 * (0.5 * phi))?)?
            } else {
                (base + (d1 * (a_t * (((-h).exp() - 1.0) / h + 1.0)))?)?
            }
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(SchedulerStep {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        if self.timesteps.is_empty() {
            return Err(ModelError::invalid(
                "timestep",
                "set_timesteps was not called",
            ));
        }
        if original.dims() != noise.dims() {
            return Err(ModelError::invalid(
                "noise",
                format!("shape {:?}; expected {:?}", noise.dims(), original.dims()),
            ));
        }
        // diffusers looks t up in the schedule (no begin index is set by the V22 pipelines).
        let i = self.index_for_timestep(t);
        let (a, s) = alpha_sigma(self.sigma(i));
        let x = original.to_dtype(DType::F32)?;
        Ok(((x * a)? + (noise.to_dtype(DType::F32)? * s)?)?)
    }
}
